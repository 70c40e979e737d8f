"""FLUX (Black Forest Labs, `flux/src/flux/model.py`) in Flax Linen, and DyFLUX (DyDiT++).

Read top to bottom: RoPE over the position axes, the small layers (embedder, QK RMSNorm,
modulation), the token router of DyFLUX, the double-stream block, the single-stream block, the
final layer, the model, the presets. Tokens are packed latents `img [B, L, C]` (2x2 patches,
channels (c, ph, pw)) and text embeddings `txt [B, T, context_in_dim]`; positions are ids
`[B, L, 3]` (FLUX: [0, row, col] for the image, zeros for the text). Parameter names follow
the BFL state_dict (`double_blocks.3.img_attn.qkv`, `single_blocks.0.linear1`, ...) so that
`dydit_jax.convert` maps them one to one; diffusers names are mapped onto them there.

Numerics as the release (tests/test_flux.py holds the parity tests against its outputs):
- timestep and guidance features: 1000 t, 256 = 128 frequencies, [cos | sin], float32;
- RoPE rotates adjacent pairs (2i, 2i+1); the axes' frequencies are concatenated, each axis
  using theta^(-2j/d_axis); the rotation is applied in float32 whatever the model's dtype;
- QK RMSNorm (eps 1e-6, statistics in float32) per head before RoPE; qkv rows "(K H D)";
- LayerNorms without affine, eps 1e-6; GELU with the tanh approximation;
- the joint sequence is [txt; img]; the final layer's modulation is [shift; scale].

DyFLUX (`dynamic=True`), as alibaba-damo-academy/DyDiT `DyFLUX/flux_models` releases it: one
token router per block (`token_router`: `linear_t` on silu(vec) -> [shift, scale, shift_txt,
scale_txt], one affine LayerNorm (eps 1e-5) shared by both streams, logits = `router`(img' +
mean of txt'), bias init 5.0 so every token starts kept). A double block routes after the
attention residual and only the image FFN skips unselected tokens (the text FFN always runs); a
single block routes on its input and unselected image tokens skip the whole block update. All
tokens stay keys and values of every attention. The mask is sigmoid(logit) > 0.5 in inference;
training draws Gumbel-sigmoid gates (tau 5) with a straight-through gradient (the release
gathers the kept rows, so its router gets no gradient from the task loss; ours does). This
module is the masked formulation (skipped updates multiplied by an exact 0): the reference for
the engine, which really skips them.

TDW for FLUX (`dynamic_width=True`, off by default; the paper's figure describes it, no code is
released, so the choices here are ours): DyDiT's width routers, Dense(D -> H-1) on the
*timestep* embedding `time_in(t)` alone (float32, bias init 15, index 0 always on, Gumbel-
sigmoid STE gates with tau 5 in training, sigmoid(logit / tau) > 0.5 in inference), so that the
widths of every sampling step depend on t only and are known ahead (the engine's static
buckets); the guidance and pooled-text embeddings are deliberately not read. A double block
has a `head_router` (one head mask for the joint attention of both streams: the masked heads'
outputs are zeroed before each stream's `proj`), a `group_router` for the image FFN and a
`txt_group_router` for the text FFN (H groups of mlp_hidden / H channels of `img_mlp.0` /
`txt_mlp.0`, zeroed before the GELU). A single block has a `head_router` (attention heads,
zeroed before `linear2`) and a `group_router` (groups of the MLP part of `linear1`; their
columns of linear2's input are then exact zeros).

Mixed precision: `dtype` is the compute dtype, `param_dtype` the storage dtype; norms, softmax,
RoPE and the router logits run in float32 (float64 when the model runs in float64).

`scan_layers=True` runs the double blocks as one `nn.scan` and the single blocks as another,
their parameters stacked on a leading depth axis under `double_blocks` and `single_blocks`
(instead of `double_blocks_{i}`, `single_blocks_{i}`; `dydit_jax.convert.to_layout` converts
either way, `block_params` gives the stacked blocks of either); `remat` then rematerialises
inside the scan. Same function, faster compiles for deep models (FLUX.1-dev: 19 + 38 blocks).
"""
from __future__ import annotations

import functools
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dydit_jax.models.dit import (
    _float_dtype, dot_product_attention, gumbel_sigmoid_gate, layer_norm, remat_policy,
    timestep_embedding, xavier_uniform, zeros,
)

Dtype = Any

# BFL's timestep_embedding multiplies t (and the guidance) by 1000 before the sin-cos features.
TIME_FACTOR = 1000.0


# ----------------------------------------------------------------------------------------------
# Rotary position embedding over the id axes
# ----------------------------------------------------------------------------------------------

def rope_table(ids, axes_dim: Sequence[int], theta: float = 10000.0):
    """ids [B, L, n_axes] -> rotations [B, L, sum(axes_dim)/2, 2, 2] ([[cos, -sin], [sin, cos]]).

    Axis i contributes axes_dim[i]/2 frequencies theta^(-2j/axes_dim[i]). The frequencies are
    exact float64 constants cast to float32 (the release builds them in float64); the angles
    are float32 (float64 when x64 is on, as the release computes them) and the table float32.
    """
    ids = jnp.asarray(ids)
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"ids have {ids.shape[-1]} position axes, the model's axes_dim "
                         f"{tuple(axes_dim)} has {len(axes_dim)}")
    wide = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    tables = []
    for i, dim in enumerate(axes_dim):
        if dim % 2:
            raise ValueError(f"axes_dim entries must be even, got {tuple(axes_dim)}")
        omega = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angle = ids[..., i].astype(wide)[..., None] * jnp.asarray(omega, wide)
        cos, sin = jnp.cos(angle), jnp.sin(angle)
        tables.append(jnp.stack([cos, -sin, sin, cos], axis=-1))
    out = jnp.concatenate(tables, axis=-2)
    return out.reshape(out.shape[:-1] + (2, 2)).astype(jnp.float32)


def apply_rope(x, pe):
    """Rotates adjacent channel pairs of x [B, L, H, hd] by pe [B, L, hd/2, 2, 2], in float32."""
    pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (-1, 1, 2))
    pe = pe[:, :, None]                                        # one table for every head
    out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
    return out.reshape(x.shape).astype(x.dtype)


def attention(q, k, v, pe):
    """RoPE, then softmax attention. q, k, v: [B, L, H, hd] -> [B, L, H * hd]."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = dot_product_attention(q, k, v)
    return out.reshape(out.shape[:2] + (-1,))


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------

def _dense(features, name, dtype, param_dtype, use_bias=True):
    return nn.Dense(features, use_bias=use_bias, kernel_init=xavier_uniform, bias_init=zeros,
                    dtype=dtype, param_dtype=param_dtype, name=name)


def dense_rows(layer, x):
    """A Dense layer on the rows of x [..., D] flattened to 2-D (see `dit.Mlp` for why)."""
    lead = x.shape[:-1]
    out = layer(x.reshape(-1, x.shape[-1]))
    return out.reshape(lead + out.shape[-1:])


class MLPEmbedder(nn.Module):
    """in_layer, SiLU, out_layer: [B, in] -> [B, hidden]."""
    hidden_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = _dense(self.hidden_dim, "in_layer", self.dtype, self.param_dtype)(x)
        return _dense(self.hidden_dim, "out_layer", self.dtype, self.param_dtype)(nn.silu(h))


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + 1e-6) in float32, cast back, times `scale`."""
    dim: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (self.dim,), self.param_dtype)
        wide = x.astype(_float_dtype(x.dtype))
        rrms = jax.lax.rsqrt(jnp.mean(jnp.square(wide), axis=-1, keepdims=True) + 1e-6)
        return (wide * rrms).astype(x.dtype) * scale.astype(x.dtype)


class QKNorm(nn.Module):
    """Per-head RMSNorm of queries and keys (`query_norm`, `key_norm`)."""
    dim: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q, k, v):
        q = RMSNorm(self.dim, self.param_dtype, name="query_norm")(q)
        k = RMSNorm(self.dim, self.param_dtype, name="key_norm")(k)
        return q.astype(v.dtype), k.astype(v.dtype)


class SelfAttention(nn.Module):
    """The parameters of one stream's attention: `qkv` ("(K H D)" rows), `norm`, `proj`.

    The blocks call `heads` and `project` separately: a double block attends over the
    concatenation of two streams' heads.
    """
    hidden_size: int
    num_heads: int
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        hd = self.hidden_size // self.num_heads
        self.qkv = _dense(3 * self.hidden_size, "qkv", self.dtype, self.param_dtype,
                          use_bias=self.qkv_bias)
        self.norm = QKNorm(hd, self.param_dtype)
        self.proj = _dense(self.hidden_size, "proj", self.dtype, self.param_dtype)

    def heads(self, x):
        """x [B, L, D] -> normalised q, k and v, each [B, L, H, hd]."""
        return split_heads(dense_rows(self.qkv, x), self.num_heads, self.norm)

    def project(self, x):
        return dense_rows(self.proj, x)


def split_heads(qkv, num_heads: int, norm):
    """[B, L, 3 D] ("(K H D)") -> q, k, v [B, L, H, hd], q and k through the QK norm."""
    b, n, three_d = qkv.shape
    qkv = qkv.reshape(b, n, 3, num_heads, three_d // (3 * num_heads))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = norm(q, k, v)
    return q, k, v


class Modulation(nn.Module):
    """`lin`(silu(vec)) -> 6 (double) or 3 (single) chunks [B, 1, D]: shift, scale, gate, ..."""
    hidden_size: int
    double: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, vec):
        n = 6 if self.double else 3
        out = _dense(n * self.hidden_size, "lin", self.dtype, self.param_dtype)(nn.silu(vec))
        return jnp.split(out[:, None, :], n, axis=-1)


def modulate(x, shift, scale):
    """(1 + scale) * x + shift, in the release's operand order (bitwise)."""
    return (1 + scale) * x + shift


def mlp(fc1, fc2, x, group_mask=None):
    """fc1, GELU(tanh), fc2: the release's `nn.Sequential` (`img_mlp.0`, `img_mlp.2`).
    `group_mask` [B, G] (TDW) zeroes G contiguous groups of fc1's outputs of x [B, N, D]."""
    h = dense_rows(fc1, x)
    if group_mask is not None:
        h = h * expand_groups(group_mask, h.shape[-1])[:, None, :].astype(h.dtype)
    return dense_rows(fc2, nn.gelu(h, approximate=True))


def expand_groups(mask, width: int):
    """[B, G] group (or head) mask -> [B, width], each entry repeated width / G times."""
    return jnp.repeat(mask, width // mask.shape[-1], axis=-1)


# ----------------------------------------------------------------------------------------------
# TDW width routers (dynamic_width)
# ----------------------------------------------------------------------------------------------

def width_router(num_heads: int, bias_init: float, name: str):
    """Dense(D -> H-1) on the timestep embedding, float32 (masks flip on tiny logits)."""
    return nn.Dense(num_heads - 1, kernel_init=xavier_uniform,
                    bias_init=nn.initializers.constant(bias_init), dtype=jnp.float32,
                    name=name)


def width_gate(logits, train: bool, noise=None, tau: float = 5.0):
    """DyDiT's width gate: [B, H-1] logits -> [B, H] mask (index 0 always on); Gumbel draws
    `noise` = (g1, g2) in training, none in inference."""
    gate = gumbel_sigmoid_gate(logits, tau, noise if train else None)
    return jnp.concatenate([jnp.ones_like(gate[:, :1]), gate], axis=-1)


class WidthRouting(nn.Module):
    """The parameter-free part of a block's TDW: logits -> masks with per-router Gumbel noise
    drawn from the "gumbel" rng stream in training. Returns {name: mask [B, H]} and
    {name: logits [B, H-1]}."""
    tau: float = 5.0

    @nn.compact
    def __call__(self, logits: dict, train: bool):
        masks = {}
        for name, lg in logits.items():
            noise = None
            if train:
                g = jax.random.gumbel(self.make_rng("gumbel"), (2,) + lg.shape, jnp.float32)
                noise = (g[0], g[1])
            masks[name] = width_gate(lg, train, noise, self.tau)
        return masks


# ----------------------------------------------------------------------------------------------
# DyFLUX token routing
# ----------------------------------------------------------------------------------------------

class FluxTokenRouter(nn.Module):
    """DyFLUX's `TokenSelect_baesd_on_x_t_text`: img [B, N, D], txt [B, T, D], vec [B, D] ->
    logits [B, N] (a token runs where its gate is on), float32."""
    hidden_size: int
    bias_init: float = 5.0

    @nn.compact
    def __call__(self, img, txt, vec):
        f32 = _float_dtype(img.dtype)
        mod = nn.Dense(4 * self.hidden_size, kernel_init=xavier_uniform, bias_init=zeros,
                       dtype=f32, name="linear_t")(nn.silu(vec.astype(f32)))
        shift, scale, shift_txt, scale_txt = jnp.split(mod[:, None, :], 4, axis=-1)
        norm = nn.LayerNorm(epsilon=1e-5, dtype=f32, name="norm")
        img = norm(img.astype(f32)) * (1 + scale) + shift
        txt = norm(txt.astype(f32)) * (1 + scale_txt) + shift_txt
        router = nn.Dense(1, kernel_init=xavier_uniform,
                          bias_init=nn.initializers.constant(self.bias_init), dtype=f32,
                          name="router")
        return dense_rows(router, img + jnp.mean(txt, axis=1, keepdims=True))[..., 0]


def token_gate(logits, train: bool, noise=None, tau: float = 5.0):
    """The release's gate. Inference: exactly 1.0 where sigmoid(logit) > 0.5, else 0.0.
    Training: noise = (g1, g2) Gumbel draws, hard value of sigmoid((logit + g1 - g2) / tau) with
    the straight-through gradient of the soft one."""
    if not train:
        return (jax.nn.sigmoid(logits) > 0.5).astype(logits.dtype)
    g1, g2 = noise
    soft = jax.nn.sigmoid((logits + g1 - g2) / tau)
    hard = (soft > 0.5).astype(soft.dtype)
    return hard - jax.lax.stop_gradient(soft) + soft


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------

class DoubleStreamBlock(nn.Module):
    """Separate image and text weights, one joint attention over [txt; img].

    (img [B, N, D], txt [B, T, D], vec [B, D], pe) -> (img, txt, logits, gate); logits and gate
    are None unless `route` (a dynamic block's routing switched on): the image FFN update is
    then multiplied per token by the gate (`token_gate`; `noise` = Gumbel draws in training)."""
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    dynamic: bool = False
    router_bias_init: float = 5.0
    router_tau: float = 5.0
    dynamic_width: bool = False
    width_bias_init: float = 15.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    # TDW routers of this block kind, in the order of `width_logits` (see the module docstring).
    WIDTH_ROUTERS = ("head", "group", "txt_group")

    def setup(self):
        d, kw = self.hidden_size, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hidden = int(d * self.mlp_ratio)
        _setup_width(self, hidden)
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(d, True, name=f"{s}_mod", **kw))
            setattr(self, f"{s}_attn", SelfAttention(d, self.num_heads, self.qkv_bias,
                                                     name=f"{s}_attn", **kw))
            setattr(self, f"{s}_mlp_0", _dense(hidden, f"{s}_mlp_0", **kw))
            setattr(self, f"{s}_mlp_2", _dense(d, f"{s}_mlp_2", **kw))
        if self.dynamic:
            self.token_router = FluxTokenRouter(d, self.router_bias_init)

    def attend(self, img, txt, vec, pe, head_mask=None):
        """Both streams' modulation and the joint attention with its residuals (`head_mask`
        [B, H]: TDW's heads, zeroed before both projections). Returns (img, txt, img_mod2,
        txt_mod2): the streams after attention and the FFN's (shift, scale, gate) of each."""
        img_mod1, img_mod2 = _pairs(self.img_mod(vec))
        txt_mod1, txt_mod2 = _pairs(self.txt_mod(vec))
        img_q, img_k, img_v = self.img_attn.heads(modulate(layer_norm(img), *img_mod1[:2]))
        txt_q, txt_k, txt_v = self.txt_attn.heads(modulate(layer_norm(txt), *txt_mod1[:2]))
        cat = functools.partial(jnp.concatenate, axis=1)
        attn = attention(cat([txt_q, img_q]), cat([txt_k, img_k]), cat([txt_v, img_v]), pe)
        if head_mask is not None:
            attn = attn * expand_groups(head_mask, attn.shape[-1])[:, None].astype(attn.dtype)
        n_txt = txt.shape[1]
        img = img + img_mod1[2] * self.img_attn.project(attn[:, n_txt:])
        txt = txt + txt_mod1[2] * self.txt_attn.project(attn[:, :n_txt])
        return img, txt, img_mod2, txt_mod2

    def img_ffn(self, h, group_mask=None):
        """The image FFN on modulated rows h [..., D] (the part DyFLUX skips per token)."""
        return mlp(self.img_mlp_0, self.img_mlp_2, h, group_mask)

    def txt_ffn(self, h, group_mask=None):
        return mlp(self.txt_mlp_0, self.txt_mlp_2, h, group_mask)

    def route_logits(self, img, txt, vec):
        return self.token_router(img, txt, vec)

    def width_logits(self, t_emb):
        """TDW router logits {name: [B, H-1]} from the timestep embedding [B, D]."""
        return _width_logits(self, t_emb)

    def __call__(self, img, txt, vec, pe, route: bool = False, train: bool = False,
                 noise=None, t_emb=None):
        """-> (img, txt, token logits, token gate, width): `width` = ({name: mask [B, H]},
        {name: logits [B, H-1]}) when TDW routes (`dynamic_width` and `route`), else None."""
        width = _width(self, route, t_emb, train)
        masks = width[0] if width else {}
        img, txt, img_mod2, txt_mod2 = self.attend(img, txt, vec, pe, masks.get("head"))
        logits = gate = None
        update = self.img_ffn(modulate(layer_norm(img), *img_mod2[:2]), masks.get("group"))
        if route:
            logits = self.route_logits(img, txt, vec)
            gate = token_gate(logits, train, noise, self.router_tau)
            update = update * gate[..., None].astype(update.dtype)
        img = img + img_mod2[2] * update
        txt = txt + txt_mod2[2] * self.txt_ffn(modulate(layer_norm(txt), *txt_mod2[:2]),
                                               masks.get("txt_group"))
        return img, txt, logits, gate, width


def _pairs(chunks):
    """Six modulation chunks -> ((shift, scale, gate), (shift, scale, gate))."""
    return tuple(chunks[:3]), tuple(chunks[3:])


def _setup_width(block, mlp_hidden: int):
    """A block's TDW routers (`block.WIDTH_ROUTERS`), when `dynamic_width`."""
    if not block.dynamic_width:
        return
    if not block.dynamic:
        raise ValueError("dynamic_width (TDW) needs dynamic=True (DyFLUX)")
    h = block.num_heads
    if mlp_hidden % h:
        raise ValueError(f"TDW splits the MLP width {mlp_hidden} into num_heads={h} groups: "
                         f"it must be divisible")
    block.width_routers = {name: width_router(h, block.width_bias_init, f"{name}_router")
                           for name in block.WIDTH_ROUTERS}
    block.width_routing = WidthRouting(block.router_tau)


def _width_logits(block, t_emb):
    t_emb = t_emb.astype(jnp.float32)
    return {name: router(t_emb) for name, router in block.width_routers.items()}


def _width(block, route: bool, t_emb, train: bool):
    """(masks, logits) of a routing TDW block, else None."""
    if not (block.dynamic_width and route):
        return None
    if t_emb is None:
        raise ValueError("a TDW block needs the timestep embedding t_emb")
    logits = _width_logits(block, t_emb)
    return block.width_routing(logits, train), logits


class SingleStreamBlock(nn.Module):
    """One stream over [txt; img]: linear1 -> [qkv | mlp], linear2 on [attn, gelu(mlp)].

    (x [B, T + N, D], vec, pe, n_txt) -> (x, logits, gate). With `route`, the update of image
    token i is multiplied by its gate (unselected tokens keep their input exactly); logits and
    gate are None otherwise."""
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dynamic: bool = False
    router_bias_init: float = 5.0
    router_tau: float = 5.0
    dynamic_width: bool = False
    width_bias_init: float = 15.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    WIDTH_ROUTERS = ("head", "group")

    def setup(self):
        d, kw = self.hidden_size, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.mlp_hidden = int(d * self.mlp_ratio)
        _setup_width(self, self.mlp_hidden)
        self.linear1 = _dense(3 * d + self.mlp_hidden, "linear1", **kw)
        self.linear2 = _dense(d, "linear2", **kw)
        self.norm = QKNorm(d // self.num_heads, self.param_dtype)
        self.modulation = Modulation(d, False, **kw)
        if self.dynamic:
            self.token_router = FluxTokenRouter(d, self.router_bias_init)

    def route_logits(self, x, vec, n_txt: int):
        """The router reads the block input, split into [txt | img] (before the norm)."""
        return self.token_router(x[:, n_txt:], x[:, :n_txt], vec)

    def qk_norm(self, q, k, v):
        return self.norm(q, k, v)

    def width_logits(self, t_emb):
        """TDW router logits {name: [B, H-1]} from the timestep embedding [B, D]."""
        return _width_logits(self, t_emb)

    def __call__(self, x, vec, pe, n_txt: int, route: bool = False, train: bool = False,
                 noise=None, t_emb=None):
        """-> (x, token logits, token gate, width) (see `DoubleStreamBlock.__call__`)."""
        width = _width(self, route, t_emb, train)
        masks = width[0] if width else {}
        shift, scale, gate = self.modulation(vec)
        logits = token = None
        if route:
            logits = self.route_logits(x, vec, n_txt)
            token = token_gate(logits, train, noise, self.router_tau)
        h = dense_rows(self.linear1, modulate(layer_norm(x), shift, scale))
        d = self.hidden_size
        q, k, v = split_heads(h[..., :3 * d], self.num_heads, self.norm)
        mlp = nn.gelu(h[..., 3 * d:], approximate=True)
        attn = attention(q, k, v, pe)
        if masks:
            attn = attn * expand_groups(masks["head"], d)[:, None].astype(attn.dtype)
            mlp = mlp * expand_groups(masks["group"], self.mlp_hidden)[:, None].astype(
                mlp.dtype)
        update = dense_rows(self.linear2, jnp.concatenate([attn, mlp], -1))
        if route:
            keep = token.astype(update.dtype)
            keep = jnp.concatenate([jnp.ones((keep.shape[0], n_txt), keep.dtype), keep], axis=1)
            update = update * keep[..., None]
        return x + gate * update, logits, token, width


class LastLayer(nn.Module):
    """adaLN ([shift; scale]) then `linear` to the packed output channels."""
    hidden_size: int
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, vec):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mod = _dense(2 * self.hidden_size, "adaLN_modulation", **kw)(nn.silu(vec))
        shift, scale = jnp.split(mod[:, None, :], 2, axis=-1)
        return dense_rows(_dense(self.out_channels, "linear", **kw),
                          modulate(layer_norm(x), shift, scale))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class FLUX(nn.Module):
    """The release's `Flux(FluxParams)`; `dynamic=True` adds DyFLUX's token routers.

    __call__(img [B, L, in_channels], img_ids [B, L, 3], txt [B, T, context_in_dim],
    txt_ids [B, T, 3], timesteps [B] in [0, 1], y [B, vec_in_dim], guidance [B] or None)
    -> the velocity [B, L, out_channels] (float32; float64 for a float64 model). A dynamic
    model returns (out, aux): aux["token_masks"] and aux["token_logits"], [depth +
    depth_single_blocks, B, L] in execution order (1 = the token runs); `route=False` runs
    every token (the model without routing, as diffusers' plain FluxTransformer2DModel on the
    same weights) and returns (out, None). `train=True` draws the gates' Gumbel noise from the
    "gumbel" rng stream, or takes it as `gumbel_noise` [blocks, 2, B, L].

    With `dynamic_width` (TDW, see the module docstring) aux also holds "head_masks" and
    "group_masks" [blocks, B, H] (the image FFN's groups in double blocks, the MLP part's in
    single blocks), "txt_group_masks" [depth, B, H] (double blocks' text FFN), and the
    routers' logits under the same names with "_logits" ([..., H-1]). Training draws the width
    gates' noise from the "gumbel" rng inside each block (a scanned model splits that rng per
    block, so its draws differ from an unscanned one's; the token noise does not).

    `scan_layers`: one `nn.scan` per block kind (see the module docstring); `remat`:
    rematerialise each block in the backward pass (`remat_policy` as in `dit.DiT`).
    """
    in_channels: int = 64
    out_channels: Optional[int] = None
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: Sequence[int] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True
    dynamic: bool = False
    router_bias_init: float = 5.0
    router_tau: float = 5.0
    dynamic_width: bool = False
    width_bias_init: float = 15.0
    scan_layers: bool = False
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def num_blocks(self) -> int:
        return self.depth + self.depth_single_blocks

    def setup(self):
        d = self.hidden_size
        if d % self.num_heads:
            raise ValueError(f"hidden_size {d} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != d // self.num_heads:
            raise ValueError(f"sum(axes_dim) = {sum(self.axes_dim)} must equal the head size "
                             f"{d // self.num_heads} (hidden_size / num_heads)")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.img_in = _dense(d, "img_in", **kw)
        self.time_in = MLPEmbedder(d, **kw)
        self.vector_in = MLPEmbedder(d, **kw)
        if self.guidance_embed:
            self.guidance_in = MLPEmbedder(d, **kw)
        self.txt_in = _dense(d, "txt_in", **kw)
        common = dict(dynamic=self.dynamic, router_bias_init=self.router_bias_init,
                      router_tau=self.router_tau, dynamic_width=self.dynamic_width,
                      width_bias_init=self.width_bias_init, **kw)
        double = functools.partial(DoubleStreamBlock, d, self.num_heads, self.mlp_ratio,
                                   self.qkv_bias, **common)
        single = functools.partial(SingleStreamBlock, d, self.num_heads, self.mlp_ratio, **common)
        if self.scan_layers:
            # One block per kind whose parameters `_run_kind` stacks along a leading depth axis.
            self.double_blocks = double(name="double_blocks")
            self.single_blocks = single(name="single_blocks")
        else:
            self.double_blocks = [double(name=f"double_blocks_{i}") for i in range(self.depth)]
            self.single_blocks = [single(name=f"single_blocks_{i}")
                                  for i in range(self.depth_single_blocks)]
        self.final_layer = LastLayer(d, self.out_dim, **kw)

    def time_embedding(self, timesteps):
        """time_in(t) [B, D]: what the TDW routers read."""
        return self.time_in(self._features(timesteps))

    def conditioning(self, timesteps, y, guidance=None):
        """vec [B, D] = time_in(t) (+ guidance_in(g)) + vector_in(y)."""
        vec = self.time_embedding(timesteps)
        if self.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX has a guidance embedding (FLUX.1-dev style): pass "
                                 "guidance [B] (e.g. 3.5), or build it with guidance_embed="
                                 "False (schnell)")
            vec = vec + self.guidance_in(self._features(guidance))
        return vec + self.vector_in(y.astype(self.dtype))

    def _features(self, t):
        t = jnp.asarray(t)
        return timestep_embedding(TIME_FACTOR * t.astype(jnp.float32), 256).astype(self.dtype)

    def embed(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        """-> (img [B, N, D], txt [B, T, D], vec [B, D], pe [B, T + N, hd/2, 2, 2])."""
        self._check_inputs(img, img_ids, txt, txt_ids, timesteps, y)
        img = dense_rows(self.img_in, img.astype(self.dtype))
        vec = self.conditioning(timesteps, y, guidance)
        txt = dense_rows(self.txt_in, txt.astype(self.dtype))
        pe = rope_table(jnp.concatenate([txt_ids, img_ids], axis=1), self.axes_dim, self.theta)
        return img, txt, vec, pe

    def head(self, img, vec):
        """The final layer on the image tokens [B, N, D] -> [B, N, out] (float32/64)."""
        return self.final_layer(img, vec).astype(_float_dtype(self.dtype))

    def __call__(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None,
                 train: bool = False, route: bool = True, gumbel_noise=None):
        img, txt, vec, pe = self.embed(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        route = self.dynamic and route
        n_txt = txt.shape[1]
        noise = None
        if route and train:
            noise = gumbel_noise
            if noise is None:
                noise = jax.random.gumbel(self.make_rng("gumbel"),
                                          (self.num_blocks, 2) + img.shape[:2], jnp.float32)
            if tuple(noise.shape) != (self.num_blocks, 2) + img.shape[:2]:
                raise ValueError(f"gumbel_noise must be [blocks, 2, B, L] = "
                                 f"{[self.num_blocks, 2, *img.shape[:2]]}, got "
                                 f"{list(noise.shape)}")

        t_emb = (self.time_embedding(timesteps) if route and self.dynamic_width else None)

        def gumbel(noise_i):                       # [2, B, L] -> (g1, g2)
            return None if noise_i is None else (noise_i[0], noise_i[1])

        def double(block, carry, noise_i):
            img, txt, logits, gate, width = block(*carry, vec, pe, route=route, train=train,
                                                  noise=gumbel(noise_i), t_emb=t_emb)
            return (img, txt), (logits, gate, width)

        def single(block, x, noise_i):
            x, logits, gate, width = block(x, vec, pe, n_txt, route=route, train=train,
                                           noise=gumbel(noise_i), t_emb=t_emb)
            return x, (logits, gate, width)

        if self.remat:
            policy = remat_policy(self.remat_policy)
            double = nn.remat(double, prevent_cse=not self.scan_layers, policy=policy)
            single = nn.remat(single, prevent_cse=not self.scan_layers, policy=policy)

        (img, txt), doubles = self._run_kind(
            self.double_blocks, self.depth, double, (img, txt),
            None if noise is None else noise[:self.depth])
        x, singles = self._run_kind(self.single_blocks, self.depth_single_blocks, single,
                                    jnp.concatenate([txt, img], axis=1),
                                    None if noise is None else noise[self.depth:])
        out = self.head(x[:, n_txt:], vec)
        if not self.dynamic:
            return out
        if not route:
            return out, None
        kinds = [k for k in (doubles, singles) if k is not None]   # execution order
        aux = {"token_logits": jnp.concatenate([k[0] for k in kinds]),
               "token_masks": jnp.concatenate([k[1] for k in kinds])}
        if self.dynamic_width:
            aux.update(stack_width([k[2] for k in kinds]))
        return out, aux

    def _run_kind(self, blocks, n: int, step, carry, xs=None):
        """`step(block, carry, x_i) -> (carry, out_i)` through one kind's n blocks: one
        `nn.scan` over the stacked parameters (`scan_layers`; rngs split per block), else a
        loop. xs: [n, ...] or None. Returns (carry, the outs stacked [n, ...]); (carry, None)
        when the kind has no blocks."""
        if not n:
            return carry, None
        if self.scan_layers:
            return nn.scan(step, variable_axes={"params": 0},
                           split_rngs={"params": True, "gumbel": True},
                           length=n)(blocks, carry, xs)
        outs = []
        for i, block in enumerate(blocks):
            carry, out = step(block, carry, None if xs is None else xs[i])
            outs.append(out)
        return carry, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)

    def width_logits(self, timesteps):
        """TDW router logits for times [T] without running the blocks (width plans):
        {"head": [T, blocks, H-1], "group": [T, blocks, H-1], "txt_group": [T, depth, H-1]}."""
        if not self.dynamic_width:
            raise ValueError("width_logits needs a FLUX built with dynamic_width=True")
        t_emb = self.time_embedding(jnp.asarray(timesteps))

        def step(block, carry, _):
            return carry, block.width_logits(t_emb)

        kinds = [self._run_kind(blocks, n, step, None)[1]
                 for blocks, n in ((self.double_blocks, self.depth),
                                   (self.single_blocks, self.depth_single_blocks))]
        return {name: jnp.moveaxis(jnp.concatenate([k[name] for k in kinds
                                                    if k is not None and name in k]), 0, 1)
                for name in DoubleStreamBlock.WIDTH_ROUTERS}

    def dummy_inputs(self, batch: int = 1, dtype=jnp.float32, image_tokens: int = 4,
                     text_tokens: int = 2):
        """Zero inputs of the model's widths (for init and shape inference)."""
        z = functools.partial(jnp.zeros, dtype=dtype)
        guidance = z((batch,)) if self.guidance_embed else None
        return (z((batch, image_tokens, self.in_channels)), z((batch, image_tokens, 3)),
                z((batch, text_tokens, self.context_in_dim)), z((batch, text_tokens, 3)),
                z((batch,)), z((batch, self.vec_in_dim)), guidance)

    def _check_inputs(self, img, img_ids, txt, txt_ids, timesteps, y):
        def need(name, v, shape):
            got = tuple(jnp.shape(v))
            if len(got) != len(shape) or any(s is not None and g != s
                                             for g, s in zip(got, shape)):
                want = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
                raise ValueError(f"FLUX expects {name} of shape {want}, got {got}")
        b = jnp.shape(img)[0] if jnp.ndim(img) else None
        need("img (packed latents [B, L, in_channels])", img, (b, None, self.in_channels))
        n_img, n_txt = jnp.shape(img)[1], jnp.shape(txt)[1] if jnp.ndim(txt) == 3 else None
        n_axes = len(self.axes_dim)
        need("img_ids", img_ids, (b, n_img, n_axes))
        need("txt (text embeddings [B, T, context_in_dim])", txt, (b, None,
                                                                   self.context_in_dim))
        need("txt_ids", txt_ids, (b, n_txt, n_axes))
        need("timesteps", timesteps, (b,))
        need("y (pooled text vector)", y, (b, self.vec_in_dim))


# ----------------------------------------------------------------------------------------------
# Presets (the release's configs in `flux/util.py`; FLUX.1-lite-8B: Freepik's distillation)
# ----------------------------------------------------------------------------------------------

_FLUX_12B = dict(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096,
                 hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19,
                 depth_single_blocks=38, axes_dim=(16, 56, 56), theta=10_000, qkv_bias=True)

FLUX_CONFIGS = {
    "flux-dev": dict(_FLUX_12B, guidance_embed=True),
    "flux-schnell": dict(_FLUX_12B, guidance_embed=False),
    "flux-lite-8b": dict(_FLUX_12B, depth=8, guidance_embed=True),
}


def _preset(name):
    def make(**kwargs):
        return FLUX(**{**FLUX_CONFIGS[name], **kwargs})
    make.__name__ = name.replace("-", "_")
    return make


FLUX_models = {name: _preset(name) for name in FLUX_CONFIGS}


def stack_width(kinds):
    """Each block kind's (masks, logits) dicts stacked over its blocks ([n, B, ...]), in
    execution order -> aux entries ("head_masks" [blocks, B, H], ..., "txt_group_masks"
    [depth, B, H] from the double blocks only)."""
    out = {}
    for name in DoubleStreamBlock.WIDTH_ROUTERS:
        out[f"{name}_masks"] = jnp.concatenate([m[name] for m, _ in kinds if name in m])
        out[f"{name}_logits"] = jnp.concatenate([lg[name] for _, lg in kinds if name in lg])
    return out


_BLOCK_KEY = re.compile(r"^(double|single)_blocks(_\d+)?$")


def block_params(model: FLUX, params):
    """-> (rest, doubles, singles): the parameters outside the blocks, and the double and
    single blocks' stacked on a leading depth axis ([depth, ...], [depth_single_blocks, ...];
    {} for a kind without blocks), from the layout of `model` (`scan_layers`: the stacked
    trees as they are; else `double_blocks_{i}` / `single_blocks_{i}` stacked).
    `params`: the tree or {"params": tree}."""
    params = params["params"] if "params" in params else params
    rest = {k: v for k, v in params.items() if not _BLOCK_KEY.match(k)}

    def kind(name, n):
        if not n:
            return {}
        want, other = ((name, f"{name}_0") if model.scan_layers else (f"{name}_0", name))
        if want not in params:
            found = f"{other!r} is there: " if other in params else ""
            raise ValueError(f"block_params: no {want!r} in the parameters of a FLUX with "
                             f"scan_layers={model.scan_layers}; {found}convert them with "
                             f"dydit_jax.convert.to_layout(params, {model.scan_layers})")
        if model.scan_layers:
            return params[name]
        return jax.tree_util.tree_map(lambda *a: jnp.stack(a),
                                      *(params[f"{name}_{i}"] for i in range(n)))
    return (rest, kind("double_blocks", model.depth),
            kind("single_blocks", model.depth_single_blocks))


def pack_latents(latent):
    """NCHW latents [B, C, H, W] -> img [B, (H/2)(W/2), 4C], channels (c, ph, pw), as
    `flux.sampling.prepare` packs them."""
    b, c, h, w = latent.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2, got {h}x{w}")
    x = latent.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(img, height: int, width: int):
    """The inverse of `pack_latents`: img [B, (H/2)(W/2), 4C] -> [B, C, H, W]."""
    b, n, c4 = img.shape
    x = img.reshape(b, height // 2, width // 2, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def image_ids(batch: int, height: int, width: int) -> np.ndarray:
    """[B, (H/2)(W/2), 3] ids [0, row, col] of a packed H x W latent, row-major."""
    rows, cols = np.meshgrid(np.arange(height // 2), np.arange(width // 2), indexing="ij")
    ids = np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(1, -1, 3)
    return np.repeat(ids, batch, axis=0).astype(np.float32)
