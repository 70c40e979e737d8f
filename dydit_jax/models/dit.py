"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") in Flax Linen.

Read top to bottom: embedders, attention, MLP, the block, the final layer, the model, the
config table. Arrays are NHWC (channels last); tokens are [B, N, D] in row-major (h, w) order.
Parameter names follow the official PyTorch state_dict (`x_embedder.proj`, `blocks.3.attn.qkv`,
...) so `dydit_jax.convert` can map them one to one.

Numerics follow the release exactly (see tests/test_dit.py for the parity tests):
- timestep features: 256 = 128 frequencies, [cos, sin], max_period 10000, always float32;
- LayerNorm without affine, eps 1e-6; GELU with the tanh approximation;
- adaLN-Zero chunks in the order shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp;
- label table with a last "null" row used for classifier-free guidance.
`DiT(numerics="diffusers")` instead computes diffusers' `DiTTransformer2DModel` (the hub's
layout of the same weights): timestep frequencies over half-1 and a pre-MLP LayerNorm eps of
1e-5 (`NUMERICS`).

Mixed precision: `dtype` is the compute dtype of the matmuls, `param_dtype` the storage dtype.
LayerNorm statistics, the attention softmax and the output are kept in float32 (or float64 when
the whole model runs in float64).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# Default initialisers of the release (`DiT.initialize_weights`).
xavier_uniform = nn.initializers.xavier_uniform()
# The patch embedding is initialised like a Linear on the flattened (C*p*p) input.
patch_kernel_init = nn.initializers.variance_scaling(
    1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1)
normal_002 = nn.initializers.normal(stddev=0.02)
zeros = nn.initializers.zeros


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"input_size must be an int or an (height, width) pair, got {size!r}")
    return size


def _float_dtype(dtype: Dtype) -> Dtype:
    """float32 for reduced-precision compute, float64 when the model runs in float64."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def per_row(v, rows: int):
    """Per-sample values [B, ...] for `rows` = B * R sample-major rows (R > 1: a Latte
    block's rows, (b f) or (b n)), each sample's value repeated R times; unchanged when
    already per row. The adaLN layers read the conditioning once per sample through this
    instead of once per row: the rows of a sample share c, so the values are the same."""
    if v.shape[0] == rows:
        return v
    if rows % v.shape[0]:
        raise ValueError(f"conditioning of {v.shape[0]} samples cannot cover {rows} rows")
    return jnp.repeat(v, rows // v.shape[0], axis=0)


def modulate(x, shift, scale):
    """adaLN modulation. x: [B, N, D]; shift, scale: [B, D]."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


@jax.custom_vjp
def materialize_gradient(x):
    """Identity whose backward pass stores the incoming gradient in a buffer of its own (the
    forward is untouched; values are unchanged bit for bit).

    Placed between unrolled blocks, it keeps XLA from fusing the residual stream's gradient (a
    chain of elementwise adds and LayerNorm backwards over all later blocks) into each of its
    consumers: XLA:CPU recomputed that chain inside every block's weight-gradient transposes,
    quadratic in depth (DiT-S/2, batch 8: the gradient took 4.1 s, 16x its forward; one fusion
    of 858 instructions over 222 operands took 0.39 s; found with `jax.profiler`). An
    `optimization_barrier` does not help there: XLA:CPU removes it before fusion. A
    conditional is a computation boundary that fusion cannot cross, so the gradient is
    materialised once per block. The predicate is data (false only when the gradient's first
    entry is NaN) and the branches differ in form (`g`, `g + 0`: the same values but -0.0), so
    XLA cannot fold the conditional away (identical branches it does fold). The DiT-S/2
    gradient then takes 1.3 s.
    """
    return x


def _materialize_fwd(x):
    return x, None


def _materialize_bwd(_, g):
    first = g.reshape(-1)[0]
    return (jax.lax.cond(first == first, lambda a: a, lambda a: a + 0, g),)


materialize_gradient.defvjp(_materialize_fwd, _materialize_bwd)


REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable",
                  "everything_saveable")


def remat_policy(name: str):
    """The `jax.checkpoint_policies` function called `name` (one of `REMAT_POLICIES`)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; valid: {REMAT_POLICIES}")
    return getattr(jax.checkpoint_policies, name)


# The two numerics that load the same weights and differ in function (up to 1.1e-3 on
# tests/data/dit_diffusers): the timestep frequencies exp(-ln(1e4) i / (half - freq_shift)), and
# the eps of the LayerNorm before the MLP. norm1 and the final norm use 1e-6 in both.
NUMERICS = {
    "official": dict(freq_shift=0, mlp_norm_eps=1e-6),   # facebookresearch/DiT models.py
    "diffusers": dict(freq_shift=1, mlp_norm_eps=1e-5),  # diffusers' DiTTransformer2DModel
}


def numerics_settings(numerics: str) -> dict:
    """`NUMERICS[numerics]`, with an error naming the valid values."""
    if numerics not in NUMERICS:
        raise ValueError(f"unknown numerics {numerics!r}; valid: {tuple(NUMERICS)} ('official' "
                         f"reproduces facebookresearch/DiT, 'diffusers' diffusers' "
                         f"DiTTransformer2DModel)")
    return NUMERICS[numerics]


def layer_norm(x, eps: float = 1e-6):
    """LayerNorm without affine parameters, statistics in float32 (or float64)."""
    dtype = x.dtype
    x = x.astype(_float_dtype(dtype))
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return ((x - mean) * jax.lax.rsqrt(var + eps)).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Positional and timestep embeddings (fixed functions, no parameters)
# ----------------------------------------------------------------------------------------------

def get_2d_sincos_pos_embed(embed_dim: int, grid_size: Union[int, Tuple[int, int]]) -> np.ndarray:
    """The release's fixed 2-D sin-cos table, float64 numpy. Returns [gh*gw, embed_dim].

    Its first half of channels encodes the column (w) coordinate, the second half the row (h),
    exactly as the release's `np.meshgrid(grid_w, grid_h)` ordering does.
    """
    gh, gw = _pair(grid_size)
    grid_h = np.arange(gh, dtype=np.float32)
    grid_w = np.arange(gw, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape(2, 1, gh, gw)
    emb_h = _get_1d_sincos(embed_dim // 2, grid[0])
    emb_w = _get_1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _get_1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def timestep_embedding(t, dim: int = 256, max_period: float = 10000.0, freq_shift: int = 0):
    """Sinusoidal features of (possibly fractional) timesteps. t: [B] -> [B, dim], float32.

    The release builds these in float32 even in a float64 model, and so do we. `freq_shift` 1
    divides the exponents by half - 1 instead of half (diffusers' `downscale_freq_shift`).
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                    / (half - freq_shift))
    args = jnp.asarray(t).astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


# ----------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """t [B] -> [B, D]: sinusoidal features, Dense, SiLU, Dense."""
    hidden_size: int
    frequency_embedding_size: int = 256
    numerics: str = "official"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t):
        dense = functools.partial(nn.Dense, self.hidden_size, kernel_init=normal_002,
                                  dtype=self.dtype, param_dtype=self.param_dtype)
        shift = numerics_settings(self.numerics)["freq_shift"]
        t_freq = timestep_embedding(t, self.frequency_embedding_size,
                                    freq_shift=shift).astype(self.dtype)
        h = dense(name="mlp_0")(t_freq)
        return dense(name="mlp_2")(nn.silu(h))


def check_labels(labels, num_classes: int, allow_null: bool = False) -> None:
    """Raises ValueError unless every value of `labels` (concrete: numpy or a jax array, not
    a tracer) is a class id in [0, num_classes), or the null label `num_classes` when
    `allow_null` (a table with the classifier-free guidance row). An id outside the table
    would otherwise read a clamped row (jnp indexing clamps): a wrong class, silently."""
    values = np.asarray(jax.device_get(labels))   # explicit: allowed under a transfer guard
    high = num_classes + int(allow_null)
    bad = np.unique(values[(values < 0) | (values >= high)])
    if bad.size:
        null = f" or {num_classes} (the null label)" if allow_null else ""
        raise ValueError(f"labels {bad[:8].tolist()} are outside the label table: class ids "
                         f"must be in [0, {num_classes}){null} (num_classes={num_classes})")


class LabelEmbedder(nn.Module):
    """y [B] -> [B, D]. Row `num_classes` is the null label used for classifier-free guidance.

    In training, each label is replaced by the null label with probability `dropout_prob`
    (rng stream "label_dropout"); `force_drop_ids` [B] (1 = drop) overrides the random draw.
    """
    num_classes: int
    hidden_size: int
    dropout_prob: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, labels, train: bool = False, force_drop_ids=None):
        use_cfg_embedding = int(self.dropout_prob > 0)
        table = nn.Embed(self.num_classes + use_cfg_embedding, self.hidden_size,
                         embedding_init=normal_002, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="embedding_table")
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.drop_labels(labels, force_drop_ids)
        return table(labels)

    def drop_labels(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            rng = self.make_rng("label_dropout")
            drop = jax.random.uniform(rng, labels.shape) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return jnp.where(drop, self.num_classes, labels)


class PatchEmbed(nn.Module):
    """x [B, H, W, C] -> tokens [B, (H/p)*(W/p), D] (row-major), one strided conv."""
    patch_size: int
    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID",
                    kernel_init=patch_kernel_init, bias_init=zeros, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="proj")(x)
        b, h, w, d = x.shape
        return x.reshape(b, h * w, d)


# ----------------------------------------------------------------------------------------------
# Attention and MLP
# ----------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention, timm layout: qkv rows [q; k; v], each head-major.

    x: [B, N, D] -> [B, N, D]. `head_mask` [B, H] (optional) multiplies each head's output
    before `proj` (DyDiT's masked path; proj's bias is always added).
    """
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, head_mask=None):
        b, n, d = x.shape
        h = self.num_heads
        hd = d // h
        dense = functools.partial(nn.Dense, kernel_init=xavier_uniform, bias_init=zeros,
                                  dtype=self.dtype, param_dtype=self.param_dtype)
        # Dense layers on [B*N, D] (see `Mlp`).
        qkv = dense(3 * d, name="qkv")(x.reshape(b * n, d)).reshape(b, n, 3, h, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = dot_product_attention(q, k, v)  # [B, N, H, hd]
        if head_mask is not None:
            out = out * head_mask[:, None, :, None].astype(out.dtype)
        return dense(d, name="proj")(out.reshape(b * n, d)).reshape(b, n, d)


def dot_product_attention(q, k, v):
    """Softmax attention with scale head_dim**-0.5, softmax in float32. q,k,v: [B, N, H, hd].

    The second product is computed heads-first ([B, H, N, hd], the batched dot's natural
    output) and transposed explicitly: asking the einsum for [B, N, H, hd] directly made XLA:CPU
    hand the head-interleaved result to `proj` ~20 % slower for the whole DiT-S/2 forward
    (measured; same values).
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k)
    probs = jax.nn.softmax(logits.astype(_float_dtype(q.dtype)), axis=-1).astype(v.dtype)
    return jnp.transpose(jnp.einsum("bhqk,bkhd->bhqd", probs, v), (0, 2, 1, 3))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2. x: [B, N, D] -> [B, N, D].

    `group_mask` [B, G] (optional) multiplies fc1's output in G contiguous groups of
    hidden/G channels before the GELU (DyDiT's masked path; fc2's bias is always added).
    """
    hidden_features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, group_mask=None):
        dense = functools.partial(nn.Dense, kernel_init=xavier_uniform, bias_init=zeros,
                                  dtype=self.dtype, param_dtype=self.param_dtype)
        # The Dense layers run on the tokens flattened to [B*N, D] (a free reshape): their
        # weight gradients are then plain [D, B*N] x [B*N, F] products. On [B, N, D], XLA:CPU
        # transposed the activations and gradients into [D, B, N] copies first (the MLP's
        # gradient took 1.4x as long; measured on DiT-S/2 shapes).
        lead, d = x.shape[:-1], x.shape[-1]
        h = dense(self.hidden_features, name="fc1")(x.reshape(-1, d))
        h = h.reshape(lead + (self.hidden_features,))
        if group_mask is not None:
            g = group_mask.shape[-1]
            mask = jnp.repeat(group_mask, self.hidden_features // g, axis=-1)
            h = h * mask[:, None, :].astype(h.dtype)
        h = nn.gelu(h, approximate=True)
        return dense(d, name="fc2")(h.reshape(-1, self.hidden_features)).reshape(lead + (d,))


# ----------------------------------------------------------------------------------------------
# DiT block and final layer
# ----------------------------------------------------------------------------------------------

def gumbel_sigmoid_gate(logits, tau: float, noise=None):
    """DyDiT's hard gate with a straight-through gradient. logits: any shape.

    Train mode passes `noise = (g1, g2)`, two standard Gumbel draws of the logits' shape:
    soft = sigmoid((logits + g1 - g2) / tau). Eval mode passes None: soft = sigmoid(logits / tau).
    The value is hard = [soft > 0.5] (exactly 0 or 1); the gradient is the soft one's.
    Operations are ordered as in the release so that float32 results match bit for bit.
    """
    if noise is None:
        soft = jax.nn.sigmoid(logits / tau)
    else:
        g1, g2 = noise
        soft = jax.nn.sigmoid((logits + g1 - g2) / tau)
    hard = (soft > 0.5).astype(soft.dtype)
    return hard - jax.lax.stop_gradient(soft) + soft


def eval_width_masks(head_logits, group_logits, tau: float = 5.0):
    """Eval-mode TDW masks from router logits [..., H-1] -> bool [..., H] with index 0 always
    on: the decision the masked path makes, sigmoid(logit / tau) > 0.5 (not logit > 0: they
    differ for |logit| < 1e-7). For width plans, plots and the engine's on-device routing."""
    def masks(logits):
        on = gumbel_sigmoid_gate(logits, tau) > 0.5
        return jnp.concatenate([jnp.ones_like(on[..., :1]), on], axis=-1)
    return masks(head_logits), masks(group_logits)


class TokenRouter(nn.Module):
    """SDT router: Dense(D -> D//16), ReLU, Dense(-> 1). x: [B, N, D] -> logits [B, N]."""
    hidden_size: int
    last_bias_init: float = 35.0

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden_size // 16, kernel_init=xavier_uniform, bias_init=zeros,
                     name="fc1")(x.astype(jnp.float32))
        return nn.Dense(1, kernel_init=xavier_uniform,
                        bias_init=nn.initializers.constant(self.last_bias_init),
                        name="fc2")(nn.relu(h))[..., 0]


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block, static or dynamic (DyDiT). x: [B, N, D] -> [B, N, D].

    Static (`dynamic=False`, or `complete=True`): the plain DiT block.
    Dynamic: a head router and an MLP-group router (one Dense each on the timestep embedding
    `t_emb` [B, D], H-1 outputs, bias init 15 so that everything starts on; index 0 is always
    on) and, with `dynamic_tokens`, a token router on the residual stream after attention:
        x += gate_msa * proj(head_mask * attention(mod(LN(x))))
        token_mask from x;  group_mask from t_emb
        x += token_mask * gate_mlp * fc2(GELU(group_mask * fc1(mod(LN(x)))))
    `noise`: {"head": (g1, g2), "group": (g1, g2), "token": (g1, g2)} Gumbel draws for this
    block in train mode (drawn from the "gumbel" rng stream when absent); eval mode uses none.
    Returns (x, aux): aux holds this block's masks and router logits ({} when static).
    """
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dynamic: bool = False
    dynamic_tokens: bool = True
    router_bias_init: float = 15.0
    token_router_bias_init: float = 35.0
    tau: float = 5.0
    numerics: str = "official"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, h = self.hidden_size, self.num_heads
        self.adaLN_modulation = nn.Dense(6 * d, kernel_init=zeros, bias_init=zeros,
                                         name="adaLN_modulation", **kw)
        self.attn = Attention(h, name="attn", **kw)
        self.mlp = Mlp(int(d * self.mlp_ratio), name="mlp", **kw)
        if self.dynamic:
            if int(d * self.mlp_ratio) % h:
                raise ValueError(f"MLP width {int(d * self.mlp_ratio)} must split into "
                                 f"num_heads={h} groups")
            # Routers run in float32 whatever the compute dtype: masks flip on tiny logits.
            router = functools.partial(nn.Dense, h - 1, kernel_init=xavier_uniform,
                                       bias_init=nn.initializers.constant(self.router_bias_init))
            self.head_router = router(name="head_router")
            self.group_router = router(name="group_router")
            if self.dynamic_tokens:
                self.token_router = TokenRouter(d, self.token_router_bias_init,
                                                name="token_router")

    def width_logits(self, t_emb):
        """Head and group router logits [B, H-1] each, from the timestep embedding."""
        t_emb = t_emb.astype(jnp.float32)
        return self.head_router(t_emb), self.group_router(t_emb)

    def __call__(self, x, c, t_emb=None, noise=None, train: bool = False, complete: bool = True):
        mod = per_row(self.adaLN_modulation(nn.silu(c)), x.shape[0])   # c: [B or rows, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        mlp_eps = numerics_settings(self.numerics)["mlp_norm_eps"]
        if not self.dynamic or complete:
            x = x + gate_msa[:, None] * self.attn(modulate(layer_norm(x), shift_msa, scale_msa))
            x = x + gate_mlp[:, None] * self.mlp(modulate(layer_norm(x, mlp_eps), shift_mlp,
                                                          scale_mlp))
            return x, {}

        def draw(name, shape):
            if not train:
                return None
            if noise and name in noise:
                return noise[name]
            g = jax.random.gumbel(self.make_rng("gumbel"), (2,) + shape, jnp.float32)
            return g[0], g[1]

        def with_always_on(gate):
            return jnp.concatenate([jnp.ones_like(gate[:, :1]), gate], axis=-1)

        head_logits, group_logits = self.width_logits(t_emb)
        head_mask = with_always_on(gumbel_sigmoid_gate(
            head_logits, self.tau, draw("head", head_logits.shape)))
        x = x + gate_msa[:, None] * self.attn(modulate(layer_norm(x), shift_msa, scale_msa),
                                              head_mask=head_mask)
        aux = {"head_masks": head_mask, "head_logits": head_logits}
        if self.dynamic_tokens:
            token_logits = self.token_router(x)
            token_mask = gumbel_sigmoid_gate(token_logits, self.tau,
                                             draw("token", token_logits.shape))
            aux.update(token_masks=token_mask, token_logits=token_logits)
        group_mask = with_always_on(gumbel_sigmoid_gate(
            group_logits, self.tau, draw("group", group_logits.shape)))
        aux.update(group_masks=group_mask, group_logits=group_logits)
        update = self.mlp(modulate(layer_norm(x, mlp_eps), shift_mlp, scale_mlp),
                          group_mask=group_mask)
        gate = gate_mlp[:, None]
        if self.dynamic_tokens:
            gate = token_mask[..., None].astype(gate.dtype) * gate
        return x + gate * update, aux


class FinalLayer(nn.Module):
    """adaLN modulation then Linear to p*p*C_out per token. x: [B, N, D] -> [B, N, p*p*C_out]."""
    hidden_size: int
    patch_size: int
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, c):
        mod = nn.Dense(2 * self.hidden_size, kernel_init=zeros, bias_init=zeros,
                       dtype=self.dtype, param_dtype=self.param_dtype,
                       name="adaLN_modulation")(nn.silu(c))
        shift, scale = jnp.split(per_row(mod, x.shape[0]), 2, axis=-1)
        x = modulate(layer_norm(x), shift, scale)
        return nn.Dense(self.patch_size * self.patch_size * self.out_channels,
                        kernel_init=zeros, bias_init=zeros, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="linear")(x)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class DiT(nn.Module):
    """Diffusion Transformer. `apply(variables, x, t, y)`: x [B, H, W, C], t [B], y [B] int.

    Returns [B, H, W, C_out] with C_out = 2C when `learn_sigma` (eps channels first, then the
    variance values), else C. Constructor arguments are the official ones, plus:
    - `scan_layers`: run the blocks as one `nn.scan` (parameters stacked under "blocks" with a
      leading depth axis) instead of `blocks_0..blocks_{L-1}`; faster compiles for deep models.
    - `remat`: rematerialise each block in the backward pass (activation memory ~ one block);
      `remat_policy` names what a block keeps (`REMAT_POLICIES`, `jax.checkpoint_policies`):
      "nothing_saveable" (recompute everything, least memory), "dots_with_no_batch_dims_saveable"
      (keep the Dense outputs, recompute attention and elementwise ops), "dots_saveable" (keep
      every matmul output). Measured trade-offs: BENCHMARKS.md "Remat policies".
    - `dtype` / `param_dtype`: compute and storage dtypes (bfloat16 compute, float32 params for
      mixed precision).
    - `dynamic`: DyDiT. Every block gets TDW routers (heads and MLP groups from the timestep
      embedding) and, with `dynamic_tokens`, an SDT token router. `apply(..., complete=False,
      train=...)` then returns `(out, aux)` with the masks ("head_masks", "group_masks" [B, L, H],
      "token_masks" [B, L, N]) and router logits ("head_logits", "group_logits" [B, L, H-1],
      "token_logits" [B, L, N]); `complete=True` runs the plain DiT path with the same parameters
      and returns `(out, None)`. Train mode draws Gumbel noise from the "gumbel" rng stream, or
      takes `gumbel_noise` ({"head"|"group"|"token": (g1, g2)}, each [B, L, ...]) to replay a
      recorded draw.
    - `numerics`: "official" (facebookresearch/DiT) or "diffusers" (diffusers'
      `DiTTransformer2DModel`: the same weights, timestep frequencies over half-1 and pre-MLP
      LayerNorm eps 1e-5; `NUMERICS`). It reaches every path: blocks, routers, the engine.
    """
    input_size: Union[int, Tuple[int, int]] = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    scan_layers: bool = False
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    dynamic: bool = False
    dynamic_tokens: bool = True
    numerics: str = "official"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def returned_channels(self) -> int:
        """Channels `__call__` returns: all of the final layer's (SiT keeps the first C)."""
        return self.out_channels

    @property
    def grid_size(self) -> Tuple[int, int]:
        h, w = _pair(self.input_size)
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input_size {(h, w)} is not divisible by patch_size {p}")
        return (h // p, w // p)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    # -- how blocks group the tokens: one interface for DiT and video families (the engine,
    # the FLOPs counter and the DyDiT loss read it; `Latte` overrides it) --

    @property
    def block_kinds(self) -> Tuple[str, ...]:
        """The kinds of one cycle of blocks (block i is `block_kinds[i % len]`): a DiT's
        blocks all attend over the N tokens of a sample."""
        return ("spatial",)

    @property
    def conditional(self) -> bool:
        """Whether the model takes labels y (callers pass None to one that does not)."""
        return True

    @property
    def tokens_per_sample(self) -> int:
        """Tokens of one sample that run through every block (N)."""
        return self.num_patches

    def block_has_token_router(self, i: int) -> bool:
        """Whether dynamic block i has an SDT token router."""
        return bool(self.dynamic_tokens)

    def to_block_rows(self, x, kind: str, batch: int):
        """Tokens [B, N, D] -> the rows a block of `kind` attends within (a DiT: as they are)."""
        return x

    def from_block_rows(self, x, kind: str, batch: int):
        """The inverse of `to_block_rows`."""
        return x

    def after_block(self, x, index, batch: int):
        """What runs between block `index` and the next (a DiT: nothing)."""
        return x

    def pos_embed(self):
        """Fixed [1, N, D] sin-cos table, rounded through float32 as the release stores it."""
        table = get_2d_sincos_pos_embed(self.hidden_size, self.grid_size).astype(np.float32)
        return jnp.asarray(table[None], dtype=_float_dtype(self.dtype))

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}")
        numerics_settings(self.numerics)
        self.x_embedder = PatchEmbed(self.patch_size, self.hidden_size, **kw)
        self.t_embedder = TimestepEmbedder(self.hidden_size, numerics=self.numerics, **kw)
        self.y_embedder = LabelEmbedder(self.num_classes, self.hidden_size,
                                        self.class_dropout_prob, **kw)
        block_kw = dict(hidden_size=self.hidden_size, num_heads=self.num_heads,
                        mlp_ratio=self.mlp_ratio, dynamic=self.dynamic,
                        numerics=self.numerics, **kw)
        if self.scan_layers:
            # One block whose parameters `run_blocks` stacks along a leading depth axis.
            self.blocks = DiTBlock(**block_kw, dynamic_tokens=self.dynamic_tokens,
                                   name="blocks")
        else:
            self.blocks = [DiTBlock(**block_kw, dynamic_tokens=self.block_has_token_router(i),
                                    name=f"blocks_{i}") for i in range(self.depth)]
        self.final_layer = FinalLayer(self.hidden_size, self.patch_size, self.out_channels, **kw)

    def run_blocks(self, x, c, t_emb, train=False, complete=True, gumbel_noise=None):
        """The depth-L stack. Returns (x, aux) with aux leaves stacked to [B, L, ...]."""
        noise = {k: (jnp.moveaxis(g1, 1, 0), jnp.moveaxis(g2, 1, 0))
                 for k, (g1, g2) in (gumbel_noise or {}).items()}  # [B, L, ...] -> [L, B, ...]

        def body(block, x, noise_l):
            return block(x, c, t_emb, noise_l, train=train, complete=complete)

        if self.remat:
            body = nn.remat(body, prevent_cse=not self.scan_layers,
                            policy=remat_policy(self.remat_policy))
        if self.scan_layers:
            x, aux = nn.scan(body, variable_axes={"params": 0},
                             split_rngs={"params": True, "gumbel": True},
                             length=self.depth)(self.blocks, x, noise)
        else:
            per_layer = []
            for i, block in enumerate(self.blocks):
                x = materialize_gradient(x)
                x, aux_l = body(block, x, jax.tree_util.tree_map(lambda n: n[i], noise))
                per_layer.append(aux_l)
            aux = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *per_layer)
        return x, jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 0, 1), aux)

    def unpatchify(self, x):
        """tokens [B, N, p*p*C] (last axis ordered p_row, p_col, c) -> [B, H, W, C]."""
        b = x.shape[0]
        gh, gw = self.grid_size
        p, c = self.patch_size, self.out_channels
        x = x.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, gh * p, gw * p, c)

    def embed(self, x, t, y, train: bool = False, force_drop_ids=None):
        """x [B, H, W, C], t [B], y [B] -> (tokens [B, N, D], c [B, D], t_emb [B, D]): the
        patch + position embedding and the conditioning c = t_emb + label embedding."""
        tokens = self.x_embedder(x.astype(self.dtype)) + self.pos_embed().astype(self.dtype)
        t_emb = self.t_embedder(t)
        c = t_emb + self.y_embedder(y, train=train, force_drop_ids=force_drop_ids)
        return tokens, c, t_emb

    def head(self, tokens, c):
        """tokens [B, N, D], c [B, D] -> the final layer's output [B, H, W, C_out] (float32,
        float64 for a float64 model)."""
        return self.unpatchify(self.final_layer(tokens, c)).astype(_float_dtype(self.dtype))

    def __call__(self, x, t, y=None, train: bool = False, force_drop_ids=None,
                 complete: bool = False, gumbel_noise=None):
        self._check_inputs(x, t, y)
        tokens, c, t_emb = self.embed(x, t, y, train=train, force_drop_ids=force_drop_ids)
        complete = complete or not self.dynamic
        tokens, aux = self.run_blocks(tokens, c, t_emb, train=train, complete=complete,
                                      gumbel_noise=gumbel_noise)
        out = self.head(tokens, c)
        if not self.dynamic:
            return out
        return out, (None if complete else aux)

    def width_logits(self, t):
        """TDW router logits for timesteps t [T] without running the blocks (width plans).

        Returns (head_logits, group_logits), each [T, L, H-1]; masks are `logits`' gates.
        """
        t_emb = self.t_embedder(t)
        if self.scan_layers:
            head, group = nn.scan(lambda blk, carry, _: (carry, blk.width_logits(t_emb)),
                                  variable_axes={"params": 0}, split_rngs={"params": True},
                                  length=self.depth)(self.blocks, None, None)[1]
        else:
            head, group = (jnp.stack(a) for a in zip(*(b.width_logits(t_emb)
                                                      for b in self.blocks)))
        return jnp.moveaxis(head, 0, 1), jnp.moveaxis(group, 0, 1)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels: Optional[int] = 3,
                         complete: bool = False):
        """Classifier-free guidance in one batched pass, as the release does it.

        x, t, y: [2n, ...]; rows [0:n] conditional, rows [n:2n] the null label. Only `x[:n]` is
        used (duplicated). The release guides only eps channels 0..2 (`guide_channels=3`, which
        is the default for checkpoint parity); `guide_channels=None` guides all eps channels,
        which is what the CFG formula intends for 4-channel latents (at most the eps channels
        are guided, whatever `guide_channels` says). The remaining channels
        (and the variance channels) pass through from each row's own output. `cfg_scale` may
        be a traced value: changing it never recompiles. A dynamic model returns (out, aux).
        """
        half = x[: x.shape[0] // 2]
        combined = jnp.concatenate([half, half], axis=0)
        out = self(combined, t, y, complete=complete)
        out, aux = out if self.dynamic else (out, None)
        guided, rest = guide(out, cfg_scale, self.in_channels, guide_channels)
        out = jnp.concatenate([jnp.concatenate([guided, guided], axis=0), rest], axis=-1)
        return (out, aux) if self.dynamic else out

    def dummy_inputs(self, batch: int = 1, dtype=jnp.float32):
        """Zero (x, t, y) of the model's shapes, for init and shape inference."""
        h, w = _pair(self.input_size)
        return (jnp.zeros((batch, h, w, self.in_channels), dtype),
                jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.int32))

    def _check_inputs(self, x, t, y):
        h, w = _pair(self.input_size)
        expected = (h, w, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"DiT expects x of shape [B, {h}, {w}, {self.in_channels}] (NHWC), got "
                f"{tuple(x.shape)}. Transpose NCHW inputs with x.transpose(0, 2, 3, 1).")
        for name, v in (("t", t), ("y", y)):
            if jnp.ndim(v) != 1 or jnp.shape(v)[0] != x.shape[0]:
                raise ValueError(f"DiT expects {name} of shape [B]={[x.shape[0]]}, got "
                                 f"{tuple(jnp.shape(v))}")
        # Concrete labels (an eager call) are checked against the table; traced ones (under
        # jit) cannot be, the samplers check theirs on the host (sampling.sample).
        if not isinstance(y, jax.core.Tracer) and getattr(y, "is_fully_addressable", True):
            check_labels(y, self.num_classes, allow_null=self.class_dropout_prob > 0)


def guide(out, cfg_scale, in_channels: int, guide_channels: Optional[int] = 3):
    """Classifier-free guidance of a [cond; uncond] batch, as the release combines it.

    out: [2n, ..., C_out], rows [0:n] conditional, [n:2n] unconditional. The first k =
    min(guide_channels, in_channels) channels (all eps channels for None) are guided:
    uncond + s * (cond - uncond). Returns (guided [n, ..., k], rest [2n, ..., C_out - k]: every
    row's own remaining channels, unguided). Used by `DiT.forward_with_cfg` and the engine.
    """
    k = in_channels if guide_channels is None else min(guide_channels, in_channels)
    eps, rest = out[..., :k], out[..., k:]
    cond, uncond = jnp.split(eps, 2, axis=0)
    return uncond + jnp.asarray(cfg_scale, eps.dtype) * (cond - uncond), rest


# ----------------------------------------------------------------------------------------------
# Configs of the paper: S, B, L, XL x patch 2, 4, 8
# ----------------------------------------------------------------------------------------------

SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}


def named_config(name: str, prefix: str = "DiT") -> dict:
    """Constructor arguments of a named config: "DiT-XL/2", "DiT_S_4", "S/8", ...
    (`prefix` "SiT" for the same sizes under SiT's names)."""
    key = name.replace(f"{prefix}-", "").replace(f"{prefix}_", "").replace("_", "/")
    try:
        size, patch = key.split("/")
        return dict(SIZES[size], patch_size=int(patch))
    except (ValueError, KeyError):
        valid = ", ".join(f"{prefix}-{s}/{p}" for s in SIZES for p in (2, 4, 8))
        raise ValueError(f"unknown {prefix} config {name!r}; valid: {valid}") from None


def dit_config(name: str) -> dict:
    """Constructor arguments of a named DiT config: "DiT-XL/2", "DiT_S_4", "S/8", ..."""
    return named_config(name, "DiT")


def make_presets(cls, prefix: str) -> dict:
    """{"<prefix>-XL/2": constructor, ...} for every size x patch 2, 4, 8 of the paper."""
    def preset(size: str, patch: int):
        def make(**kwargs):
            return cls(**{**SIZES[size], "patch_size": patch, **kwargs})
        make.__name__ = f"{prefix}_{size}_{patch}"
        make.__doc__ = f"{prefix}-{size}/{patch}: {SIZES[size]}, patch {patch}."
        return make
    return {f"{prefix}-{s}/{p}": preset(s, p) for s in SIZES for p in (2, 4, 8)}


DiT_models = make_presets(DiT, "DiT")
DiT_XL_2, DiT_XL_4, DiT_XL_8 = (DiT_models[f"DiT-XL/{p}"] for p in (2, 4, 8))
DiT_L_2, DiT_L_4, DiT_L_8 = (DiT_models[f"DiT-L/{p}"] for p in (2, 4, 8))
DiT_B_2, DiT_B_4, DiT_B_8 = (DiT_models[f"DiT-B/{p}"] for p in (2, 4, 8))
DiT_S_2, DiT_S_4, DiT_S_8 = (DiT_models[f"DiT-S/{p}"] for p in (2, 4, 8))
