"""The engine for FLUX: DyFLUX's skipped image tokens really skipped, in capacity buckets.

The masked path (`FLUX(dynamic=True).apply`) computes every token and multiplies skipped
updates by 0. Here each block kind routes as DyFLUX defines it and runs only what a kept token
needs (`ROUTES`, the block kind -> its routed forward):
- "double": the joint attention and the text FFN run on every token; the image FFN (LayerNorm,
  modulation, img_mlp) runs on the kept image tokens of the whole (local) batch, flattened
  to B*N rows and gathered into a capacity bucket, then gated and scatter-added back (as the
  DiT engine's `gathered.routed_mlp`).
- "single": every token's keys and values are computed (skipped tokens stay keys and values),
  but the queries, the MLP part of `linear1`, the attention rows and `linear2` run only for
  the text tokens and the kept image tokens: per sample, the first c kept image tokens
  (c = the capacity bucket of the largest kept count of the batch), so attention stays per
  sample. Skipped tokens keep their input exactly.
The full capacity (every token) runs the masked block's own formula (no gather or scatter). Buckets are chosen on device (`lax.switch` on the kept count):
no host sync, and one executable per sampling run (`FluxEngine.denoise`: a `lax.scan` over
the schedule; inside, one scan over the double blocks and one over the single blocks).

Exact up to float rounding whenever the capacity covers the kept count, which the choice
guarantees (the tests hold the engine to the masked path at 1e-5). On a mesh each device
routes its own rows (`FluxEngine(mesh=...)`).

TDW (`FLUX(dynamic_width=True)`): the width routers run on device on time_in(t) (a few
D x (H-1) products per block), their eval decision is the masked path's (`flux.width_gate`),
and each router's active set is gathered: heads of both streams' q/k/v columns, of the joint
attention and of each stream's `proj` rows (double), the q/k/v columns of `linear1` and the
attention rows of `linear2` (single); MLP groups of `img_mlp.0` / `txt_mlp.0` columns and
`img_mlp.2` / `txt_mlp.2` rows, of the MLP columns of `linear1` and the matching rows of
`linear2`. The gathered set is the union over the batch rows (one set: all rows of a sampler
step share t, so the union is every row's own set), ordered active-first and rounded up to a
width bucket (`width_grid`, fractions of H); each row then multiplies its slots by its own mask
(padding slots and a row's inactive heads contribute exact zeros, as in the masked path).
Width buckets are chosen on device like capacities (`lax.switch`). A single block splits
`linear2` into its attention rows and its MLP rows, so that its head and group widths switch
separately inside a capacity branch (C (W_heads + W_groups) branches, not C W_heads W_groups).
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from dydit_jax.engine.gathered import kept_first
from dydit_jax.engine.plan import fraction_sizes
from dydit_jax.engine.sampler import ExecutableCache
from dydit_jax.models.dit import dot_product_attention, layer_norm
from dydit_jax.models.flux import (FLUX, DoubleStreamBlock, SingleStreamBlock, _pairs,
                                   apply_rope, attention, block_params, modulate, token_gate,
                                   width_gate)


# Token capacity buckets, fractions of the image tokens (see `FluxEngine`).
FLUX_CAPACITIES = tuple(i / 16 for i in range(1, 17))
# TDW width buckets, fractions of the heads (and of the H MLP groups).
FLUX_WIDTHS = (0.25, 0.5, 0.75, 1.0)


def block_modules(model: FLUX):
    """Standalone (double, single) block modules with the model's arguments."""
    kw = dict(dynamic=True, router_bias_init=model.router_bias_init,
              router_tau=model.router_tau, dynamic_width=model.dynamic_width,
              width_bias_init=model.width_bias_init, dtype=model.dtype,
              param_dtype=model.param_dtype)
    return (DoubleStreamBlock(model.hidden_size, model.num_heads, model.mlp_ratio,
                              model.qkv_bias, **kw),
            SingleStreamBlock(model.hidden_size, model.num_heads, model.mlp_ratio, **kw))


def _switch(index, branches, *operands):
    if len(branches) == 1:
        return branches[0](*operands)
    return lax.switch(index, branches, *operands)


def _dense(x, p, columns=None):
    """x @ kernel + bias on rows flattened to 2-D; `columns` a static slice of the outputs."""
    kernel, bias = p["kernel"], p["bias"]
    if columns is not None:
        kernel, bias = kernel[:, columns], bias[columns]
    return _matmul(x, kernel, bias)


def _matmul(x, kernel, bias=None):
    """x [..., K] @ kernel [K, M] (+ bias) on rows flattened to 2-D."""
    lead = x.shape[:-1]
    y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(kernel.dtype), kernel)
    if bias is not None:
        y = y + bias
    return y.reshape(lead + (kernel.shape[-1],))


# ----------------------------------------------------------------------------------------------
# TDW: width decisions and gathered weights
# ----------------------------------------------------------------------------------------------

def block_widths(model, blk, blocks, t_emb, sizes):
    """The width routers of stacked blocks on t_emb [B, D], decided as the masked path does.
    -> {router: {"mask" [L, B, H] (each row's mask), "order" [L, H] (the batch union's
    indices active-first), "count" [L], "bucket" [L] (index into `sizes`)}}."""
    logits = jax.vmap(lambda bp: blk.apply({"params": bp}, t_emb, method="width_logits"))(
        blocks)
    out = {}
    for name, lg in logits.items():
        mask = jax.vmap(lambda a: width_gate(a, False, tau=model.router_tau))(lg)
        order, count = jax.vmap(kept_first)(jnp.any(mask > 0.5, axis=1))
        bucket = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), count).astype(jnp.int32)
        out[name] = {"mask": mask, "order": order, "count": count, "bucket": bucket}
    return out


def _slot_mask(w, k: int):
    """[B, k] per row: its mask on the first k gathered indices (0 on padding slots)."""
    idx = w["order"][:k]
    return jnp.where(jnp.arange(k)[None] < w["count"], jnp.take(w["mask"], idx, axis=1), 0)


def _head_columns(idx, d: int, heads: int, parts: Sequence[int]):
    """Column indices of heads `idx` in a "(K H hd)" projection, for the parts K listed."""
    hd = d // heads
    cols = (idx[:, None] * hd + jnp.arange(hd)[None]).reshape(-1)       # within one part
    return jnp.concatenate([part * d + cols for part in parts])


def _group_rows(idx, width: int, groups: int):
    """Channel indices of groups `idx` of a `width`-wide hidden layer."""
    gw = width // groups
    return (idx[:, None] * gw + jnp.arange(gw)[None]).reshape(-1)


def _gathered_ffn(p0, p2, h, idx, slot_rows, groups: int):
    """fc2(GELU(fc1(h))) over the groups idx; slot_rows [R, k] zeroes each row's off groups.
    h [R, D] (rows flattened) -> [R, D]."""
    hidden = p0["kernel"].shape[1]
    cols = _group_rows(idx, hidden, groups)
    a = _matmul(h, jnp.take(p0["kernel"], cols, axis=1), jnp.take(p0["bias"], cols))
    a = a * jnp.repeat(slot_rows, hidden // groups, axis=-1).astype(a.dtype)
    a = nn.gelu(a, approximate=True)
    return _matmul(a, jnp.take(p2["kernel"], cols, axis=0), p2["bias"])


def _stream_heads(p, norm, h, idx, heads: int):
    """One stream's gathered q, k, v [B, L, k, hd] (QK-normed) for the heads idx."""
    d = h.shape[-1]
    hd = d // heads
    cols = _head_columns(idx, d, heads, (0, 1, 2))
    bias = jnp.take(p["qkv"]["bias"], cols) if "bias" in p["qkv"] else None
    qkv = _matmul(h, jnp.take(p["qkv"]["kernel"], cols, axis=1), bias)
    qkv = qkv.reshape(h.shape[:2] + (3, idx.shape[0], hd))
    q, k = norm(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return q, k, qkv[:, :, 2]


def double_forward_tdw(model, bp, img, txt, vec, pe, capacities, *, width, width_sizes):
    """`double_forward` with gathered heads (joint attention) and FFN groups. width: this
    block's `block_widths` entries; width_sizes: the static widths their buckets index."""
    blk = block_modules(model)[0]
    apply = functools.partial(blk.apply, {"params": bp})
    b, n, d = img.shape
    n_txt = txt.shape[1]
    heads = model.num_heads
    hd = d // heads
    img_mod1, img_mod2 = _pairs(apply(vec, method=lambda m, v: m.img_mod(v)))
    txt_mod1, txt_mod2 = _pairs(apply(vec, method=lambda m, v: m.txt_mod(v)))
    img_h = modulate(layer_norm(img), *img_mod1[:2])
    txt_h = modulate(layer_norm(txt), *txt_mod1[:2])

    def attend(k, img_h, txt_h):
        w = width["head"]
        idx = w["order"][:k]
        norms = [functools.partial(apply, method=lambda m, q, kk, v, s=s: getattr(
            m, f"{s}_attn").norm(q, kk, v)) for s in ("img", "txt")]
        iq, ik, iv = _stream_heads(bp["img_attn"], norms[0], img_h, idx, heads)
        tq, tk, tv = _stream_heads(bp["txt_attn"], norms[1], txt_h, idx, heads)
        cat = functools.partial(jnp.concatenate, axis=1)
        out = attention(cat([tq, iq]), cat([tk, ik]), cat([tv, iv]), pe)
        out = out.reshape(b, n_txt + n, k, hd) * _slot_mask(w, k)[:, None, :, None].astype(
            out.dtype)
        out = out.reshape(b, n_txt + n, k * hd)
        rows = _head_columns(idx, d, heads, (0,))

        def project(s, x):
            p = bp[f"{s}_attn"]["proj"]
            return _matmul(x, jnp.take(p["kernel"], rows, axis=0), p["bias"])
        return project("img", out[:, n_txt:]), project("txt", out[:, :n_txt])

    head_sizes = width_sizes
    img_att, txt_att = _switch(width["head"]["bucket"],
                               [functools.partial(attend, k) for k in head_sizes], img_h, txt_h)
    img_a = img + img_mod1[2] * img_att
    txt_a = txt + txt_mod1[2] * txt_att

    keep = token_gate(apply(img_a, txt_a, vec, method="route_logits"), False) > 0.5
    rows, kept = kept_first(keep.reshape(-1))
    caps = fraction_sizes(capacities, b * n, "token capacity")
    shift, scale, gate = (m[:, 0] for m in img_mod2)
    wg = width["group"]

    def img_ffn(k, cap, img_a, rows, kept):
        sel = rows[:cap]
        sample = sel // n
        h = modulate(layer_norm(img_a.reshape(b * n, d)[sel]), shift[sample], scale[sample])
        update = _gathered_ffn(bp["img_mlp_0"], bp["img_mlp_2"], h, wg["order"][:k],
                               _slot_mask(wg, k)[sample], heads)
        g = jnp.where((jnp.arange(cap) < kept)[:, None], gate[sample], 0)
        out = img_a.reshape(b * n, d).at[sel].add(g * update, unique_indices=True)
        return out.reshape(b, n, d)

    branches = [functools.partial(img_ffn, k, cap) for k in head_sizes for cap in caps]
    cap_index = jnp.searchsorted(jnp.asarray(caps, jnp.int32), kept).astype(jnp.int32)
    img_out = _switch(wg["bucket"] * len(caps) + cap_index, branches, img_a, rows, kept)

    wt = width["txt_group"]
    shift_t, scale_t, gate_t = txt_mod2
    h_txt = modulate(layer_norm(txt_a), shift_t, scale_t)

    def txt_ffn(k, h_txt):
        slots = jnp.repeat(_slot_mask(wt, k), n_txt, axis=0)             # rows (b, t)
        return _gathered_ffn(bp["txt_mlp_0"], bp["txt_mlp_2"], h_txt.reshape(b * n_txt, d),
                             wt["order"][:k], slots, heads).reshape(b, n_txt, d)
    txt_out = txt_a + gate_t * _switch(wt["bucket"], [functools.partial(txt_ffn, k)
                                                      for k in head_sizes], h_txt)
    return img_out, txt_out, jnp.sum(keep, axis=1, dtype=jnp.int32)


def single_forward_tdw(model, bp, x, vec, pe, n_txt: int, capacities, *, width,
                       width_sizes):
    """`single_forward` with gathered heads and MLP groups: per sample a capacity branch,
    inside it one switch over the head widths (q/k/v columns of linear1, attention, the
    attention rows of linear2) and one over the group widths (the MLP columns of linear1,
    their rows of linear2)."""
    blk = block_modules(model)[1]
    apply = functools.partial(blk.apply, {"params": bp})
    b, length, d = x.shape
    n = length - n_txt
    heads, hd = model.num_heads, d // model.num_heads
    f = blk.mlp_ratio * d
    keep = token_gate(apply(x, vec, n_txt, method="route_logits"), False) > 0.5
    rows, kept = jax.vmap(kept_first)(keep)
    caps = fraction_sizes(capacities, n, "token capacity")
    sizes = width_sizes
    shift, scale, gate = apply(vec, method=lambda m, v: m.modulation(v))
    lin1, lin2 = bp["linear1"], bp["linear2"]
    wh, wg = width["head"], width["group"]

    def attn_part(k, h, hq, pe, pe_q, wmask):
        idx = wh["order"][:k]
        kv_cols = _head_columns(idx, d, heads, (1, 2))
        kv = _matmul(h, jnp.take(lin1["kernel"], kv_cols, axis=1),
                     jnp.take(lin1["bias"], kv_cols)).reshape(h.shape[:2] + (2, k, hd))
        q_cols = _head_columns(idx, d, heads, (0,))
        q = _matmul(hq, jnp.take(lin1["kernel"], q_cols, axis=1),
                    jnp.take(lin1["bias"], q_cols)).reshape(hq.shape[:2] + (k, hd))
        q, kk = apply(q, kv[:, :, 0], kv[:, :, 1], method="qk_norm")
        out = dot_product_attention(apply_rope(q, pe_q), apply_rope(kk, pe), kv[:, :, 1])
        out = out * wmask[:, None, :k, None].astype(out.dtype)
        return _matmul(out.reshape(hq.shape[:2] + (k * hd,)),
                       jnp.take(lin2["kernel"], q_cols, axis=0))

    def mlp_part(k, hq, gmask):
        idx = wg["order"][:k]
        cols = _group_rows(idx, int(f), heads)
        a = _matmul(hq, jnp.take(lin1["kernel"], 3 * d + cols, axis=1),
                    jnp.take(lin1["bias"], 3 * d + cols))
        a = nn.gelu(a, approximate=True) * jnp.repeat(gmask[:, :k], int(f) // heads,
                                                     axis=-1)[:, None].astype(a.dtype)
        return _matmul(a, jnp.take(lin2["kernel"], d + cols, axis=0))

    def routed(cap, x, pe, shift, scale, gate, rows, kept, wmask, gmask):
        h = modulate(layer_norm(x), shift, scale)                                 # [1, L, D]
        sel = rows[:, :cap]
        take = functools.partial(jnp.take_along_axis, axis=1)
        hq = jnp.concatenate([h[:, :n_txt], take(h[:, n_txt:], sel[..., None])], axis=1)
        pe_q = jnp.concatenate([pe[:, :n_txt], take(pe[:, n_txt:], sel[..., None, None, None])],
                               axis=1)
        a = _switch(wh["bucket"], [functools.partial(attn_part, k) for k in sizes], h, hq,
                    pe, pe_q, wmask)
        m = _switch(wg["bucket"], [functools.partial(mlp_part, k) for k in sizes], hq, gmask)
        update = gate * (a + m + lin2["bias"])
        valid = (jnp.arange(cap)[None] < kept[:, None])[..., None]
        img = x[:, n_txt:].at[jnp.arange(x.shape[0])[:, None], sel].add(
            jnp.where(valid, update[:, n_txt:], 0), unique_indices=True)
        return jnp.concatenate([x[:, :n_txt] + update[:, :n_txt], img], axis=1)

    # Slot masks at the largest width (a branch of width k reads the first k slots).
    wmask, gmask = _slot_mask(wh, heads), _slot_mask(wg, heads)
    branches = [functools.partial(routed, cap) for cap in caps]
    index = jnp.searchsorted(jnp.asarray(caps, jnp.int32), kept).astype(jnp.int32)
    out = _per_sample_switch(index, branches, x, pe, shift, scale, gate, rows, kept, wmask,
                             gmask)
    return out, kept.astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Routed blocks
# ----------------------------------------------------------------------------------------------

def double_forward(model, bp, img, txt, vec, pe, capacities: Sequence[float]):
    """One double block with the image FFN on the kept tokens. Returns (img, txt, kept [B]:
    kept image tokens per sample)."""
    blk = block_modules(model)[0]
    apply = functools.partial(blk.apply, {"params": bp})
    b, n, d = img.shape
    img_a, txt_a, img_mod2, txt_mod2 = apply(img, txt, vec, pe, method="attend")
    keep = token_gate(apply(img_a, txt_a, vec, method="route_logits"), False) > 0.5
    rows, kept = kept_first(keep.reshape(-1))
    caps = fraction_sizes(capacities, b * n, "token capacity")
    shift, scale, gate = (m[:, 0] for m in img_mod2)

    def full(img_a, rows, kept):
        # Every row, the masked block's own formula (bitwise the masked path).
        update = apply(modulate(layer_norm(img_a), *img_mod2[:2]), method="img_ffn")
        return img_a + img_mod2[2] * (update * keep[..., None].astype(update.dtype))

    def routed(cap, img_a, rows, kept):
        sel = rows[:cap]
        sample = sel // n
        h = modulate(layer_norm(img_a.reshape(b * n, d)[sel]), shift[sample], scale[sample])
        update = apply(h, method="img_ffn")
        g = jnp.where((jnp.arange(cap) < kept)[:, None], gate[sample], 0)
        out = img_a.reshape(b * n, d).at[sel].add(g * update, unique_indices=True)
        return out.reshape(b, n, d)

    branches = [functools.partial(routed, cap) if cap < b * n else full for cap in caps]
    index = jnp.searchsorted(jnp.asarray(caps, jnp.int32), kept).astype(jnp.int32)
    img_out = _switch(index, branches, img_a, rows, kept)
    shift_t, scale_t, gate_t = txt_mod2
    txt_out = txt_a + gate_t * apply(modulate(layer_norm(txt_a), shift_t, scale_t),
                                     method="txt_ffn")
    return img_out, txt_out, jnp.sum(keep, axis=1, dtype=jnp.int32)


def single_forward(model, bp, x, vec, pe, n_txt: int, capacities: Sequence[float]):
    """One single block computing queries, MLP and linear2 for text + kept image tokens only.
    x: [B, T + N, D]. Returns (x, kept [B]: kept image tokens per sample).

    Each sample takes its own capacity bucket (a static loop over the local batch, one
    `lax.switch` each): attention runs per sample, and a bucket shared by the batch (sized by
    its largest kept count) computed 8 % more rows than kept on the benchmark's B = 2. Above
    `PER_SAMPLE_MAX_ROWS` local rows the batch shares one bucket (compile time)."""
    blk = block_modules(model)[1]
    apply = functools.partial(blk.apply, {"params": bp})
    b, length, d = x.shape
    n = length - n_txt
    heads, hd = model.num_heads, d // model.num_heads
    keep = token_gate(apply(x, vec, n_txt, method="route_logits"), False) > 0.5   # [B, N]
    rows, kept = jax.vmap(kept_first)(keep)                                        # [B, N], [B]
    caps = fraction_sizes(capacities, n, "token capacity")
    shift, scale, gate = apply(vec, method=lambda m, v: m.modulation(v))

    def full(x, vec, pe, shift, scale, gate, rows, kept):
        return apply(x, vec, pe, n_txt, route=True)[0]

    def routed(cap, x, vec, pe, shift, scale, gate, rows, kept):
        g = x.shape[0]
        h = modulate(layer_norm(x), shift, scale)                                 # [g, L, D]
        lin1 = bp["linear1"]
        kv = _dense(h, lin1, slice(d, 3 * d)).reshape(g, length, 2, heads, hd)
        k, v = kv[:, :, 0], kv[:, :, 1]
        sel = rows[:, :cap]                                                        # [g, c]
        take = functools.partial(jnp.take_along_axis, axis=1)
        hq = jnp.concatenate([h[:, :n_txt], take(h[:, n_txt:], sel[..., None])], axis=1)
        pe_q = jnp.concatenate([pe[:, :n_txt], take(pe[:, n_txt:], sel[..., None, None, None])],
                               axis=1)
        q = _dense(hq, lin1, slice(0, d)).reshape(g, n_txt + cap, heads, hd)
        mlp = nn.gelu(_dense(hq, lin1, slice(3 * d, None)), approximate=True)
        q, k = apply(q, k, v, method="qk_norm")
        attn = dot_product_attention(apply_rope(q, pe_q), apply_rope(k, pe), v)
        attn = attn.reshape(g, n_txt + cap, d)
        update = gate * _dense(jnp.concatenate([attn, mlp], axis=-1), bp["linear2"])
        valid = (jnp.arange(cap)[None] < kept[:, None])[..., None]
        img = x[:, n_txt:]
        img = img.at[jnp.arange(g)[:, None], sel].add(
            jnp.where(valid, update[:, n_txt:], 0), unique_indices=True)
        return jnp.concatenate([x[:, :n_txt] + update[:, :n_txt], img], axis=1)

    branches = [functools.partial(routed, cap) if cap < n else full for cap in caps]
    index = jnp.searchsorted(jnp.asarray(caps, jnp.int32), kept).astype(jnp.int32)   # [B]
    out = _per_sample_switch(index, branches, x, vec, pe, shift, scale, gate, rows, kept)
    return out, kept.astype(jnp.int32)


# A single block switches capacity per sample up to this many local rows; beyond, one bucket
# (the largest kept count's) serves the whole batch: the unrolled per-sample switches compiled
# B x buckets branch bodies (a 160-row true-CFG batch of the digits demo: minutes of XLA).
PER_SAMPLE_MAX_ROWS = 4


def _per_sample_switch(index, branches, *operands):
    """Each row through `branches[index[row]]` (a static loop of switches), or, for more than
    `PER_SAMPLE_MAX_ROWS` rows, all rows through the branch of the largest index (exact: a
    larger capacity covers every row's kept count)."""
    b = operands[0].shape[0]
    if b > PER_SAMPLE_MAX_ROWS:
        return _switch(jnp.max(index), branches, *operands)
    outs = []
    for i in range(b):
        one = slice(i, i + 1)
        outs.append(_switch(index[i], branches, *(a[one] for a in operands)))
    return jnp.concatenate(outs, axis=0)


# A block kind says how it routes: kind -> its routed forward (without, with TDW).
ROUTES = {"double": (double_forward, double_forward_tdw),
          "single": (single_forward, single_forward_tdw)}


def forward(model, rest, doubles, singles, img, img_ids, txt, txt_ids, timesteps, y,
            guidance=None, capacities: Sequence[float] = None,
            width_grid: Sequence[float] = None):
    """The routed model for one device's rows. Returns (out [B, N, out_channels], kept
    [depth + depth_single_blocks, B]: kept image tokens per block and sample, widths: None,
    or with TDW the gathered active counts {"heads", "groups": [blocks], "txt_groups":
    [depth]})."""
    capacities = FLUX_CAPACITIES if capacities is None else capacities
    width_grid = FLUX_WIDTHS if width_grid is None else width_grid
    img, txt, vec, pe = model.apply({"params": rest}, img, img_ids, txt, txt_ids, timesteps, y,
                                    guidance, method="embed")
    tdw = model.dynamic_width
    blocks = block_modules(model)
    if tdw:
        t_emb = model.apply({"params": rest}, timesteps, method="time_embedding")
        sizes = fraction_sizes(width_grid, model.num_heads, "width")
        w_double = block_widths(model, blocks[0], doubles, t_emb, sizes)
        w_single = block_widths(model, blocks[1], singles, t_emb, sizes)
    else:
        w_double = w_single = None
    route_double, route_single = (ROUTES[kind][int(tdw)] for kind in ("double", "single"))

    def width_kw(width):
        return dict(width=width, width_sizes=sizes) if tdw else {}

    def double(carry, xs):
        img, txt = carry
        bp, width = xs
        img, txt, kept = route_double(model, bp, img, txt, vec, pe, capacities,
                                      **width_kw(width))
        return (img, txt), kept

    (img, txt), kept_double = lax.scan(double, (img, txt), (doubles, w_double))
    n_txt = txt.shape[1]

    def single(x, xs):
        bp, width = xs
        return route_single(model, bp, x, vec, pe, n_txt, capacities, **width_kw(width))

    x, kept_single = lax.scan(single, jnp.concatenate([txt, img], axis=1), (singles, w_single))
    out = model.apply({"params": rest}, x[:, n_txt:], vec, method="head")
    widths = None
    if tdw:
        widths = {"heads": jnp.concatenate([w_double["head"]["count"],
                                            w_single["head"]["count"]]),
                  "groups": jnp.concatenate([w_double["group"]["count"],
                                             w_single["group"]["count"]]),
                  "txt_groups": w_double["txt_group"]["count"]}
    return out, jnp.concatenate([kept_double, kept_single]), widths


class FluxEngine:
    """Routed DyFLUX sampling with one executable per run.

        eng = FluxEngine(model, variables)
        latents, kept = eng.denoise(noise, img_ids, txt, txt_ids, vec, timesteps, guidance=3.5)
        eng.compile_count

    `kept` [steps, blocks, B]: kept image tokens per step, block and sample (the masks the
    engine routed with; `flops.flux_macs` turns them into MACs). Token capacities default to
    sixteenths (`FLUX_CAPACITIES`): a kept count is rounded up to the next capacity (a double
    block's of the batch total, a single block's per sample, or of the batch's largest count
    above `PER_SAMPLE_MAX_ROWS` rows), so a coarser grid wastes more rows (eighths cost the
    reduced FLUX of the benchmark ~6 % of its gain) but compiles fewer branches.

    With TDW (`dynamic_width`), `width_grid` (fractions of H, default quarters) sets the
    width buckets, and after each call `eng.widths` holds the gathered active counts
    ({"heads", "groups": [steps, blocks], "txt_groups": [steps, depth]}; [blocks] / [depth]
    after `forward`) for `flops.flux_macs`; None without TDW.

    Mesh (`mesh`, `batch_axes`: default the mesh's "data"/"fsdp" axes): the rows are split over
    the batch axes and each device routes its own rows inside `shard_map` (capacities are
    fractions of a device's rows; parameters replicated, as the DiT engine does). With TDW each
    device gathers the union of its rows' widths; `widths` reports the largest over devices
    (all rows of a sampler step share t, so they are equal).
    """

    def __init__(self, model: FLUX, variables,
                 token_capacities: Sequence[float] = None,
                 width_grid: Sequence[float] = None, mesh=None, batch_axes=None):
        token_capacities = FLUX_CAPACITIES if token_capacities is None else token_capacities
        width_grid = FLUX_WIDTHS if width_grid is None else width_grid
        fraction_sizes(width_grid, 1, "width")
        if not getattr(model, "dynamic", False):
            raise ValueError("FluxEngine needs a dynamic FLUX (FLUX(..., dynamic=True)); a "
                             "static model has nothing to skip: use flux_sampling.denoise")
        fraction_sizes(token_capacities, 1, "token capacity")   # checks the fractions
        self.model = model
        self.capacities = tuple(token_capacities)
        self.width_grid = tuple(width_grid)
        self.widths = None
        self.mesh = mesh
        self.batch_axes, self.num_shards = None, 1
        params = block_params(model, variables)   # (rest, doubles, singles) stacked
        if mesh is not None:
            if batch_axes is None:
                batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names) or \
                    tuple(mesh.axis_names)
            self.batch_axes = ((batch_axes,) if isinstance(batch_axes, str)
                               else tuple(batch_axes))
            self.num_shards = int(np.prod([mesh.shape[a] for a in self.batch_axes]))
            params = jax.device_put(params, NamedSharding(mesh, P()))
        self.rest, self.doubles, self.singles = params
        self._cache = ExecutableCache()

    def _routed(self, *args):
        """`forward` on each device's rows (shard_map over the batch axes), or on all rows."""
        fn = functools.partial(forward, self.model, capacities=self.capacities,
                               width_grid=self.width_grid)
        if self.mesh is None:
            return fn(*args)
        rows = P(self.batch_axes)
        guidance = args[-1]

        def per_device(*a):
            out, kept, widths = fn(*a)
            widths = None if widths is None else {k: v[None] for k, v in widths.items()}
            return out, kept, widths
        specs = (P(), P(), P()) + (rows,) * 7
        out, kept, widths = jax.shard_map(
            per_device, mesh=self.mesh,
            in_specs=specs[:-1] + ((rows if guidance is not None else None),),
            out_specs=(rows, P(None, self.batch_axes),
                       None if not self.model.dynamic_width else rows),
            check_vma=False)(*args)
        if widths is not None:
            widths = {k: jnp.max(v, axis=0) for k, v in widths.items()}
        return out, kept, widths

    def _check_rows(self, rows: int):
        if rows % self.num_shards:
            raise ValueError(f"{rows} rows do not split over the {self.num_shards} devices of "
                             f"the batch axes {self.batch_axes}: use a batch size divisible "
                             f"by {self.num_shards}")

    @property
    def compile_count(self) -> int:
        return self._cache.compiles

    def _denoise(self, rest, doubles, singles, img, img_ids, txt, txt_ids, vec, timesteps,
                 guidance, true_cfg=1.0, neg=None):
        b = img.shape[0]
        if neg is not None:     # true CFG: the prompt and the negative prompt in one batch
            txt = jnp.concatenate([txt, neg[0]])
            txt_ids = jnp.concatenate([txt_ids, neg[1]])
            vec = jnp.concatenate([vec, neg[2]])
            img_ids = jnp.concatenate([img_ids, img_ids])
        rows = txt.shape[0]
        g = jnp.full((rows,), guidance, jnp.float32) if self.model.guidance_embed else None

        def step(x, pair):
            t_curr, t_prev = pair
            xs = x if neg is None else jnp.concatenate([x, x])
            v, kept, widths = self._routed(rest, doubles, singles, xs, img_ids, txt, txt_ids,
                                           jnp.full((rows,), t_curr, x.dtype), vec, g)
            if neg is not None:
                v = v[b:] + true_cfg * (v[:b] - v[b:])
            return x + (t_prev - t_curr).astype(x.dtype) * v.astype(x.dtype), (kept, widths)

        return lax.scan(step, img, (timesteps[:-1], timesteps[1:]))

    def denoise(self, img, img_ids, txt, txt_ids, vec, timesteps, guidance: float = 4.0,
                true_cfg: float = 1.0, neg_txt=None, neg_txt_ids=None, neg_vec=None):
        """`flux_sampling.denoise` on the routed model; one executable per input shapes and
        `true_cfg` (any schedule of the same length and any guidance reuse it). With
        `true_cfg` != 1 the negative prompt runs in the same batch (kept: [steps, blocks, 2B],
        the prompts' rows first)."""
        neg = None
        if true_cfg != 1.0:
            if neg_txt is None or neg_txt_ids is None or neg_vec is None:
                raise ValueError("true_cfg != 1 needs neg_txt, neg_txt_ids and neg_vec")
            neg = (neg_txt, neg_txt_ids, neg_vec)
        args = (self.rest, self.doubles, self.singles, img, img_ids, txt, txt_ids, vec,
                jnp.asarray(timesteps, jnp.float32), jnp.asarray(guidance, jnp.float32))
        key = ("denoise", float(true_cfg)) + tuple(
            (tuple(jnp.shape(a)), str(jnp.result_type(a)))
            for a in args[3:] + (() if neg is None else neg))
        self._check_rows(jnp.shape(img)[0])
        fn = functools.partial(self._denoise, true_cfg=float(true_cfg))
        exe = self._cache.get(key, lambda: jax.jit(fn).lower(*args, neg=neg))
        latents, (kept, self.widths) = exe(*args, neg=neg)
        return latents, kept

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        """One routed evaluation (out, kept per block), compiled once per input shapes."""
        args = (self.rest, self.doubles, self.singles, img, img_ids, txt, txt_ids,
                jnp.asarray(timesteps), y, None if guidance is None else jnp.asarray(guidance))
        key = ("forward",) + tuple(
            None if a is None else (tuple(jnp.shape(a)), str(jnp.result_type(a)))
            for a in args[3:])
        self._check_rows(jnp.shape(img)[0])
        exe = self._cache.get(key, lambda: jax.jit(self._routed).lower(*args))
        out, kept, self.widths = exe(*args)
        return out, kept
