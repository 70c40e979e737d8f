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
guarantees (the tests hold the engine to the masked path at 1e-5). TDW (dynamic width) is not
released for FLUX and not implemented here; neither is a mesh (one device's rows).
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from dydit_jax.engine.gathered import kept_first
from dydit_jax.engine.plan import fraction_sizes
from dydit_jax.engine.sampler import ExecutableCache
from dydit_jax.models.dit import dot_product_attention, layer_norm
from dydit_jax.models.flux import (FLUX, DoubleStreamBlock, SingleStreamBlock, apply_rope,
                                   modulate, token_gate)


# Token capacity buckets, fractions of the image tokens (see `FluxEngine`).
FLUX_CAPACITIES = tuple(i / 16 for i in range(1, 17))


def block_modules(model: FLUX):
    """Standalone (double, single) block modules with the model's arguments."""
    kw = dict(dynamic=True, router_bias_init=model.router_bias_init,
              router_tau=model.router_tau, dtype=model.dtype, param_dtype=model.param_dtype)
    return (DoubleStreamBlock(model.hidden_size, model.num_heads, model.mlp_ratio,
                              model.qkv_bias, **kw),
            SingleStreamBlock(model.hidden_size, model.num_heads, model.mlp_ratio, **kw))


def split_params(model: FLUX, variables):
    """-> (rest, double blocks stacked [depth, ...], single blocks stacked [depth_single, ...])."""
    params = variables["params"] if "params" in variables else variables
    rest = {k: v for k, v in params.items() if not k.startswith(("double_blocks_",
                                                                 "single_blocks_"))}

    def stack(prefix, n):
        return jax.tree_util.tree_map(lambda *a: jnp.stack(a),
                                      *(params[f"{prefix}_{i}"] for i in range(n)))
    return (rest, stack("double_blocks", model.depth),
            stack("single_blocks", model.depth_single_blocks))


def _switch(index, branches, *operands):
    if len(branches) == 1:
        return branches[0](*operands)
    return lax.switch(index, branches, *operands)


def _dense(x, p, columns=None):
    """x @ kernel + bias on rows flattened to 2-D; `columns` a static slice of the outputs."""
    kernel, bias = p["kernel"], p["bias"]
    if columns is not None:
        kernel, bias = kernel[:, columns], bias[columns]
    lead = x.shape[:-1]
    y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(kernel.dtype), kernel) + bias
    return y.reshape(lead + (kernel.shape[-1],))


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
    its largest kept count) computed 8 % more rows than kept on the benchmark's B = 2."""
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
    outs = []
    for i in range(b):
        one = slice(i, i + 1)
        outs.append(_switch(index[i], branches, x[one], vec[one], pe[one], shift[one],
                            scale[one], gate[one], rows[one], kept[one]))
    return jnp.concatenate(outs, axis=0), kept.astype(jnp.int32)


# A block kind says how it routes: kind -> its routed forward.
ROUTES = {"double": double_forward, "single": single_forward}


def forward(model, rest, doubles, singles, img, img_ids, txt, txt_ids, timesteps, y,
            guidance=None, capacities: Sequence[float] = None):
    """The routed model for one device's rows. Returns (out [B, N, out_channels], kept
    [depth + depth_single_blocks, B]: kept image tokens per block and sample)."""
    capacities = FLUX_CAPACITIES if capacities is None else capacities
    img, txt, vec, pe = model.apply({"params": rest}, img, img_ids, txt, txt_ids, timesteps, y,
                                    guidance, method="embed")

    def double(carry, bp):
        img, txt = carry
        img, txt, kept = ROUTES["double"](model, bp, img, txt, vec, pe, capacities)
        return (img, txt), kept

    (img, txt), kept_double = lax.scan(double, (img, txt), doubles)
    n_txt = txt.shape[1]

    def single(x, bp):
        return ROUTES["single"](model, bp, x, vec, pe, n_txt, capacities)

    x, kept_single = lax.scan(single, jnp.concatenate([txt, img], axis=1), singles)
    out = model.apply({"params": rest}, x[:, n_txt:], vec, method="head")
    return out, jnp.concatenate([kept_double, kept_single])


class FluxEngine:
    """Routed DyFLUX sampling with one executable per run.

        eng = FluxEngine(model, variables)
        latents, kept = eng.denoise(noise, img_ids, txt, txt_ids, vec, timesteps, guidance=3.5)
        eng.compile_count

    `kept` [steps, blocks, B]: kept image tokens per step, block and sample (the masks the
    engine routed with; `flops.flux_macs` turns them into MACs). Token capacities default to
    sixteenths (`FLUX_CAPACITIES`): a kept count is rounded up to the next capacity, and a
    single block's per-sample capacity is the batch's largest kept count, so a coarser grid
    wastes more rows (eighths cost the reduced FLUX of the benchmark ~6 % of its gain).
    """

    def __init__(self, model: FLUX, variables,
                 token_capacities: Sequence[float] = None):
        token_capacities = FLUX_CAPACITIES if token_capacities is None else token_capacities
        if not getattr(model, "dynamic", False):
            raise ValueError("FluxEngine needs a dynamic FLUX (FLUX(..., dynamic=True)); a "
                             "static model has nothing to skip: use flux_sampling.denoise")
        fraction_sizes(token_capacities, 1, "token capacity")   # checks the fractions
        self.model = model
        self.capacities = tuple(token_capacities)
        self.rest, self.doubles, self.singles = split_params(model, variables)
        self._cache = ExecutableCache()

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
            v, kept = forward(self.model, rest, doubles, singles, xs, img_ids, txt, txt_ids,
                              jnp.full((rows,), t_curr, x.dtype), vec, g, self.capacities)
            if neg is not None:
                v = v[b:] + true_cfg * (v[:b] - v[b:])
            return x + (t_prev - t_curr).astype(x.dtype) * v.astype(x.dtype), kept

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
        fn = functools.partial(self._denoise, true_cfg=float(true_cfg))
        exe = self._cache.get(key, lambda: jax.jit(fn).lower(*args, neg=neg))
        return exe(*args, neg=neg)

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        """One routed evaluation (out, kept per block), compiled once per input shapes."""
        args = (self.rest, self.doubles, self.singles, img, img_ids, txt, txt_ids,
                jnp.asarray(timesteps), y, None if guidance is None else jnp.asarray(guidance))
        key = ("forward",) + tuple(
            None if a is None else (tuple(jnp.shape(a)), str(jnp.result_type(a)))
            for a in args[3:])
        fn = functools.partial(forward, self.model, capacities=self.capacities)
        exe = self._cache.get(key, lambda: jax.jit(fn).lower(*args))
        return exe(*args)
