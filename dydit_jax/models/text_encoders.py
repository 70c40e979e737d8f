"""FLUX's text encoders in Flax Linen: the T5 v1.1 encoder (sequence embeddings) and the CLIP
text model (pooled vector), as `transformers`' `T5EncoderModel` and `CLIPTextModel` compute
them (tests/test_text_encoders.py holds them to the PyTorch classes at 1e-5).

`transformers` 5 no longer ships Flax classes, so these are written here; parameter names
follow the PyTorch state dicts (`encoder.block.3.layer.1.DenseReluDense.wi_0.weight`,
`text_model.encoder.layers.0.self_attn.q_proj.weight`) and `load_hf_state` maps them.

T5 (google/t5-v1_1-xxl in FLUX): RMS LayerNorm without mean or bias (eps 1e-6, statistics in
float32), attention without the 1/sqrt(d) scale and with a learned relative-position bias
(bidirectional buckets, computed in the first block and shared by all), gated-GELU(tanh)
feed-forward (v1.1; `feed_forward_proj="relu"` for the original T5), no biases anywhere.
CLIP (openai/clip-vit-large-patch14): learned positions, causal self-attention, pre-LN blocks
(eps 1e-5) with quick-GELU MLPs, a final LayerNorm; the pooled vector is the final state at the
end-of-text token (the highest token id for the legacy configs with eos_token_id 2, as
transformers does).
FLUX runs T5 without an attention mask on prompts padded to max_length (512 for dev, 256 for
schnell) and CLIP on 77 tokens; an optional `mask` [B, L] (1 = real token) is supported.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Dtype = Any


# ----------------------------------------------------------------------------------------------
# T5 encoder
# ----------------------------------------------------------------------------------------------

def _from_hf(cls, config):
    get = config.get if isinstance(config, Mapping) else lambda k: getattr(config, k, None)
    return cls(**{f.name: get(f.name) for f in dataclasses.fields(cls)
                  if get(f.name) is not None})


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    @classmethod
    def from_hf(cls, config):
        """From a transformers config object (or its dict): the fields it sets."""
        return _from_hf(cls, config)


# FLUX.1's T5 (google/t5-v1_1-xxl).
T5_V1_1_XXL = T5Config()


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int):
    """T5's bidirectional buckets of (key position - query position): [q_len, k_len] int32."""
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    exact = half // 2
    # float32 as the reference computes the log-spaced buckets.
    large = exact + (np.log(np.maximum(rel, 1).astype(np.float32) / exact)
                     / math.log(max_distance / exact) * (half - exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(rel < exact, rel, large)).astype(np.int32)


def t5_layer_norm(x, weight, eps):
    """weight * x / sqrt(mean(x^2) + eps), statistics in float32 (T5LayerNorm)."""
    wide = x.astype(jnp.float64 if x.dtype == jnp.float64 else jnp.float32)
    var = jnp.mean(jnp.square(wide), axis=-1, keepdims=True)
    return weight * (wide * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class T5LayerNorm(nn.Module):
    eps: float = 1e-6
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return t5_layer_norm(x, w.astype(x.dtype), self.eps)


def _linear(features, name, dtype, param_dtype, bias=False):
    return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=param_dtype, name=name)


class T5Block(nn.Module):
    config: T5Config
    has_relative_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, n, _ = x.shape
        inner = c.num_heads * c.d_kv
        h = T5LayerNorm(c.layer_norm_epsilon, self.param_dtype, name="layer_0_layer_norm")(x)
        q, k, v = (_linear(inner, f"layer_0_SelfAttention_{p}", **kw)(h).reshape(
            b, n, c.num_heads, c.d_kv) for p in "qkv")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) + bias        # no 1/sqrt(d) in T5
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, inner)
        x = x + _linear(c.d_model, "layer_0_SelfAttention_o", **kw)(attn)
        h = T5LayerNorm(c.layer_norm_epsilon, self.param_dtype, name="layer_1_layer_norm")(x)
        if c.feed_forward_proj == "gated-gelu":
            g = nn.gelu(_linear(c.d_ff, "layer_1_DenseReluDense_wi_0", **kw)(h),
                        approximate=True)
            h = g * _linear(c.d_ff, "layer_1_DenseReluDense_wi_1", **kw)(h)
        elif c.feed_forward_proj == "relu":
            h = nn.relu(_linear(c.d_ff, "layer_1_DenseReluDense_wi", **kw)(h))
        else:
            raise ValueError(f"feed_forward_proj {c.feed_forward_proj!r} is not supported "
                             f"(gated-gelu: T5 v1.1 / FLUX; relu: the original T5)")
        return x + _linear(c.d_model, "layer_1_DenseReluDense_wo", **kw)(h)


class T5Encoder(nn.Module):
    """input_ids [B, L] (int) -> last hidden state [B, L, d_model] (float32 / float64)."""
    config: T5Config = T5_V1_1_XXL
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, mask=None):
        c = self.config
        embed = nn.Embed(c.vocab_size, c.d_model, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="shared")
        x = embed(input_ids)
        n = input_ids.shape[1]
        table = self.param("relative_attention_bias", nn.initializers.normal(1.0),
                           (c.relative_attention_num_buckets, c.num_heads), self.param_dtype)
        buckets = relative_position_buckets(n, n, c.relative_attention_num_buckets,
                                            c.relative_attention_max_distance)
        bias = jnp.transpose(table[buckets], (2, 0, 1))[None].astype(jnp.float32)
        if mask is not None:
            bias = bias + jnp.where(jnp.asarray(mask)[:, None, None, :] > 0, 0.0,
                                    jnp.finfo(jnp.float32).min)
        bias = bias.astype(self.dtype)
        for i in range(c.num_layers):
            x = T5Block(c, dtype=self.dtype, param_dtype=self.param_dtype,
                        name=f"block_{i}")(x, bias)
        x = T5LayerNorm(c.layer_norm_epsilon, self.param_dtype, name="final_layer_norm")(x)
        return x.astype(jnp.float64 if self.dtype == jnp.float64 else jnp.float32)


# ----------------------------------------------------------------------------------------------
# CLIP text model
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2

    @classmethod
    def from_hf(cls, config):
        """From a transformers config object (or its dict): the fields it sets."""
        return _from_hf(cls, config)


# FLUX.1's CLIP (openai/clip-vit-large-patch14, text tower).
CLIP_L = CLIPTextConfig()

_ACTS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
         "gelu": lambda x: nn.gelu(x, approximate=False),
         "gelu_new": lambda x: nn.gelu(x, approximate=True)}


class CLIPTextModel(nn.Module):
    """input_ids [B, L] -> (last hidden state [B, L, D], pooled [B, D]) (float32 / float64)."""
    config: CLIPTextConfig = CLIP_L
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, mask=None):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if c.hidden_act not in _ACTS:
            raise ValueError(f"hidden_act {c.hidden_act!r} is not supported; valid: "
                             f"{sorted(_ACTS)}")
        b, n = input_ids.shape
        if n > c.max_position_embeddings:
            raise ValueError(f"CLIP takes at most {c.max_position_embeddings} tokens, got {n}")
        tok = nn.Embed(c.vocab_size, c.hidden_size, name="token_embedding", **kw)(input_ids)
        pos = self.param("position_embedding", nn.initializers.normal(0.02),
                         (c.max_position_embeddings, c.hidden_size), self.param_dtype)
        x = tok + pos[:n].astype(self.dtype)
        allowed = jnp.tril(jnp.ones((n, n), bool))[None, None]
        if mask is not None:
            allowed = allowed & (jnp.asarray(mask)[:, None, None, :] > 0)
        heads, hd = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        ln = _layer_norm_factory(c.layer_norm_eps, self.dtype, self.param_dtype)
        for i in range(c.num_hidden_layers):
            p = f"layers_{i}_"
            h = ln(p + "layer_norm1")(x)
            q, k, v = (nn.Dense(c.hidden_size, name=f"{p}self_attn_{s}_proj", **kw)(h).reshape(
                b, n, heads, hd) for s in "qkv")
            scores = jnp.einsum("bqhd,bkhd->bhqk", q * hd ** -0.5, k)
            scores = jnp.where(allowed, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
            attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, c.hidden_size)
            x = x + nn.Dense(c.hidden_size, name=f"{p}self_attn_out_proj", **kw)(attn)
            h = ln(p + "layer_norm2")(x)
            h = _ACTS[c.hidden_act](nn.Dense(c.intermediate_size, name=f"{p}mlp_fc1", **kw)(h))
            x = x + nn.Dense(c.hidden_size, name=f"{p}mlp_fc2", **kw)(h)
        x = ln("final_layer_norm")(x)
        if c.eos_token_id == 2:     # legacy configs: the end token has the highest id
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = x[jnp.arange(b), eos]
        out = jnp.float64 if self.dtype == jnp.float64 else jnp.float32
        return x.astype(out), pooled.astype(out)


def _layer_norm_factory(eps, dtype, param_dtype):
    def make(name):
        return nn.LayerNorm(epsilon=eps, dtype=jnp.float32 if dtype != jnp.float64 else dtype,
                            param_dtype=param_dtype, name=name)
    return make


# ----------------------------------------------------------------------------------------------
# transformers state dicts -> Flax variables
# ----------------------------------------------------------------------------------------------

def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu()
        v = (v.float() if v.is_floating_point() else v).numpy()
    return np.asarray(v)


def _flax_name(key: str, kind: str):
    """transformers key -> (our flat path, layout) or None for keys we do not hold."""
    if kind == "t5":
        if key in ("shared.weight", "encoder.embed_tokens.weight"):
            return ("shared", "embedding"), "none"
        if key.endswith("relative_attention_bias.weight"):
            if not key.startswith("encoder.block.0."):
                raise ValueError(f"{key}: only the first block has a relative position bias")
            return ("relative_attention_bias",), "none"
        if key == "encoder.final_layer_norm.weight":
            return ("final_layer_norm", "weight"), "none"
        parts = key.split(".")   # encoder.block.{i}.layer.{j}.<module>.<leaf>
        if parts[:2] != ["encoder", "block"]:
            return None
        block = f"block_{parts[2]}"
        module = "_".join(parts[3:-1])
        if module.endswith("layer_norm"):
            return (block, module, "weight"), "none"
        return (block, module, "kernel"), "linear"
    key = key[len("text_model."):] if key.startswith("text_model.") else key
    if key == "embeddings.token_embedding.weight":
        return ("token_embedding", "embedding"), "none"
    if key == "embeddings.position_embedding.weight":
        return ("position_embedding",), "none"
    if key == "embeddings.position_ids":
        return None
    parts = key.split(".")
    if parts[0] == "final_layer_norm":
        return ("final_layer_norm", {"weight": "scale", "bias": "bias"}[parts[1]]), "none"
    if parts[:2] != ["encoder", "layers"]:
        return None
    module = f"layers_{parts[2]}_" + "_".join(parts[3:-1])
    leaf = parts[-1]
    if "layer_norm" in module:
        return (module, {"weight": "scale", "bias": "bias"}[leaf]), "none"
    return (module, "kernel" if leaf == "weight" else "bias"), (
        "linear" if leaf == "weight" else "none")


def load_hf_state(model, state: Mapping[str, Any]) -> Dict[str, Any]:
    """Flax variables for a `T5Encoder` / `CLIPTextModel` from a transformers state dict
    (torch tensors or arrays; `T5EncoderModel.state_dict()`, `CLIPTextModel.state_dict()` or a
    safetensors file's dict). Strict: every parameter found once with its shape, else one
    `convert.CheckpointMismatchError` naming every missing, unexpected or misshaped key."""
    from dydit_jax.convert import CheckpointMismatchError
    kind = "t5" if isinstance(model, T5Encoder) else "clip"
    ids = jnp.zeros((1, 2), jnp.int32)
    abstract = traverse_util.flatten_dict(
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))["params"])
    found, unexpected, mismatched = {}, [], []
    for key, value in state.items():
        name = _flax_name(key, kind)
        if name is None:
            if not key.endswith("position_ids"):
                unexpected.append(key)
            continue
        path, layout = name
        if path not in abstract:
            unexpected.append(key)
            continue
        value = _to_numpy(value)
        value = value.T if layout == "linear" else value
        want = tuple(abstract[path].shape)
        if value.shape != want:
            mismatched.append((key, want[::-1] if layout == "linear" else want,
                               tuple(value.shape[::-1] if layout == "linear" else value.shape)))
            continue
        found[path] = jnp.asarray(value, abstract[path].dtype)
    missing = sorted("/".join(p) for p in abstract if p not in found)
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, sorted(unexpected), mismatched,
                                      f"(a transformers {kind.upper()} state dict for "
                                      f"{type(model).__name__}({model.config}))")
    return {"params": traverse_util.unflatten_dict(found)}
