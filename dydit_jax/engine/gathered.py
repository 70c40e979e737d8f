"""The gathered forward pass of a dynamic DiT: smaller matmuls instead of masks.

The masked path (`DiT.apply(..., complete=False)`) computes every head and MLP group and
multiplies the switched-off ones by 0. Here every block runs only its active heads and groups
(DESIGN.md section 3), given per-block index data from a width plan (`plan.Buckets`):

- attention: the active heads' q/k/v columns of `attn/qkv` (kernel [D, 3D], columns [q; k; v],
  each head-major: head h owns columns h*hd:(h+1)*hd of every third) and their input rows of
  `attn/proj` are gathered; attention runs on k heads. Attention always sees all tokens.
- MLP: the active groups' `mlp/fc1` columns and bias entries and `mlp/fc2` rows (G = H groups
  of hidden/H channels).
- padding: a bucket of width k takes the first k entries of the block's index order (active
  first); a padded slot gathers a real (inactive) head/group, but its proj rows (fc2 rows) are
  zeroed, so it contributes exactly 0, as the masked path's multiplication by 0 does.
- SDT tokens: the token router runs on all tokens, then the kept tokens of the whole (local)
  batch, flattened to B*N rows, are gathered into a capacity bucket, run through LayerNorm,
  modulation and the gathered MLP, gated and scatter-added back. Capacity buckets are fractions
  of B*N; the bucket is chosen on device (`lax.switch` on the kept count), so no host sync.
  Exact whenever capacity >= kept count, which the choice guarantees (the largest capacity is
  B*N, which runs the masked path's dense form without gather and scatter).

Width sizes are static (shapes), index arrays are traced: one executable serves every index set
of a bucket. With several sizes, `lax.switch` picks the bucket on device (the fused sampler).

Embedders, adaLN, the token router and the final layer run through the model's own modules
(`model.apply(..., method=...)`, `DiTBlock(...).apply`); only the gathered attention and MLP
matmuls are written here (with `mlp_norm`, the pre-MLP LayerNorm of `model.numerics`). All
functions work on one device's rows; `sampler.py` wraps them in `shard_map` on a mesh.
"""
from __future__ import annotations

import functools
from typing import Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from dydit_jax.engine.plan import bucket_arrays, fraction_sizes
from dydit_jax.models import dit
from dydit_jax.models.dit import (DiTBlock, dot_product_attention, eval_width_masks,
                                  gumbel_sigmoid_gate, layer_norm, modulate)

Width = Dict[str, jax.Array]  # one block's slice of `plan.Buckets.arrays()`


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------

def split_params(model, variables):
    """-> (rest, blocks): the non-block parameters and the block parameters as a list of
    per-block trees (`blocks_{i}`, or slices of the stacked `blocks` of scan_layers)."""
    params = variables["params"] if "params" in variables else variables
    rest = {k: v for k, v in params.items() if not k.startswith("blocks")}
    if model.scan_layers:
        blocks = [jax.tree_util.tree_map(lambda a, i=i: a[i], params["blocks"])
                  for i in range(model.depth)]
    else:
        blocks = [params[f"blocks_{i}"] for i in range(model.depth)]
    return rest, blocks


def stacked_blocks(model, variables):
    """Block parameters stacked on a leading depth axis (scan_layers' own tree, no copy).

    A model whose blocks come in cycles of several kinds (`model.block_kinds`, a Latte's
    spatial + temporal pair) gets a tuple: per kind, its blocks stacked ([L / kinds, ...]),
    since the kinds' trees may differ (a block without a token router)."""
    params = variables["params"] if "params" in variables else variables
    cycle = len(model.block_kinds)
    if model.scan_layers:
        if cycle == 1:
            return params["blocks"]
        return tuple(jax.tree_util.tree_map(lambda a, p=p: a[p::cycle], params["blocks"])
                     for p in range(cycle))

    def stack(indices):
        return jax.tree_util.tree_map(lambda *a: jnp.stack(a),
                                      *(params[f"blocks_{i}"] for i in indices))
    if cycle == 1:
        return stack(range(model.depth))
    return tuple(stack(range(p, model.depth, cycle)) for p in range(cycle))


def block_module(model, index: int = 0) -> DiTBlock:
    """A standalone DiTBlock with the arguments of the model's block `index` (applied to one
    block's params; blocks differ only in whether they have a token router)."""
    return DiTBlock(hidden_size=model.hidden_size, num_heads=model.num_heads,
                    mlp_ratio=model.mlp_ratio, dynamic=True,
                    dynamic_tokens=model.block_has_token_router(index),
                    numerics=model.numerics, dtype=model.dtype, param_dtype=model.param_dtype)


def mlp_norm(model, x):
    """The block's pre-MLP LayerNorm, with the eps of `model.numerics` (1e-6 or 1e-5)."""
    return layer_norm(x, dit.numerics_settings(model.numerics)["mlp_norm_eps"])


def token_capacities(fractions: Sequence[float], rows: int) -> Tuple[int, ...]:
    """Capacity buckets (ascending, the last is `rows` = B*N) from fractions of `rows`."""
    return fraction_sizes(fractions, rows, "token capacity")


# ----------------------------------------------------------------------------------------------
# Model pieces through the model's own modules
# ----------------------------------------------------------------------------------------------

def embed(model, rest, x, t, y):
    """x [B, H, W, C], t [B], y [B] -> (tokens [B, N, D], c [B, D]) by `DiT.embed` (eval)."""
    tokens, c, _ = model.apply({"params": rest}, x, t, y, method="embed")
    return tokens, c


def final(model, rest, tokens, c):
    """tokens [B, N, D], c [B, D] -> output [B, H, W, C] by `DiT.head`, cut to the channels
    the model's `__call__` returns (all for a DiT, the prediction's C for a SiT)."""
    out = model.apply({"params": rest}, tokens, c, method="head")
    return out[..., :model.returned_channels]


def guide(out, cfg_scale, in_channels: int, guide_channels, both_halves: bool = False):
    """`DiT.forward_with_cfg`'s combination (`dit.guide`). out: [2n, ...] rows [cond; uncond]
    -> the conditional half [n, ...]: guided eps channels, then the cond rows' other channels.
    With `both_halves`: (that, the unconditional half: the same guided channels, then the
    uncond rows' other channels), i.e. `forward_with_cfg`'s whole output in two halves."""
    guided, rest = dit.guide(out, cfg_scale, in_channels, guide_channels)
    n = guided.shape[0]
    cond = jnp.concatenate([guided, rest[:n]], axis=-1)
    if not both_halves:
        return cond
    return cond, jnp.concatenate([guided, rest[n:]], axis=-1)


def routed_widths(model, rest, blocks, t, sizes: Sequence[int]) -> Width:
    """The width arrays of every block at one time t (traced scalar), decided on device.

    For samplers whose times are not known ahead (adaptive ODE solvers): the width routers
    run on `t_embedder(t)` (2 (H-1) x D MACs per block, nothing next to a block) and their
    eval decision, sigmoid(logit / tau) > 0.5 as in the masked path, gives what a
    `plan.Buckets` row holds: per block the indices active-first (stable), the active counts
    (index 0 always on) and the buckets of `sizes`. blocks: stacked block params.
    Returns a `Width` with a leading depth axis, as `blocks_forward` takes it.
    """
    t_emb = model.apply({"params": rest}, jnp.reshape(t, (1,)),
                        method=lambda m, t: m.t_embedder(t))
    blk = block_module(model)
    head, group = jax.vmap(
        lambda bp: blk.apply({"params": bp}, t_emb, method=DiTBlock.width_logits))(blocks)
    masks = eval_width_masks(head[:, 0], group[:, 0], tau=blk.tau)          # [L, H] each
    return bucket_arrays(*masks, sizes)


# ----------------------------------------------------------------------------------------------
# Gathered attention and MLP (static width k, traced indices)
# ----------------------------------------------------------------------------------------------

def _dense(x, kernel, bias, dtype):
    """nn.Dense's arithmetic on explicit (gathered) weights, on the rows flattened to 2-D as
    the model's own Dense layers run (`dit.Mlp`): on [B, N, D] XLA:CPU ran each gathered block
    12-19 % slower than the static block at full width (Latte-S/2 shapes, measured)."""
    x, kernel, bias = (a.astype(dtype) for a in (x, kernel, bias))
    lead = x.shape[:-1]
    y = lax.dot_general(x.reshape(-1, x.shape[-1]), kernel, (((1,), (0,)), ((), ())))
    return (y + bias[None]).reshape(lead + (kernel.shape[-1],))


def _valid_rows(count, k: int, width: int):
    """[k * width] bool: rows of real (not padded) slots."""
    return jnp.repeat(jnp.arange(k) < count, width)


def gathered_attention(model, p, h, order, count, k: int):
    """proj(attention of the first k heads of `order`) without gate. h: [B, N, D] (modulated
    LN output), p: the block's `attn` params, order [H] int32, count: real slots."""
    b, n, d = h.shape
    heads = model.num_heads
    hd = d // heads
    idx = order[:k]
    # Whole head slices (hd contiguous columns / rows) are gathered, not single channels.
    qkv_w = jnp.take(p["qkv"]["kernel"].reshape(d, 3, heads, hd), idx, axis=2)
    qkv_b = jnp.take(p["qkv"]["bias"].reshape(3, heads, hd), idx, axis=1)
    qkv = _dense(h, qkv_w.reshape(d, 3 * k * hd), qkv_b.reshape(-1), model.dtype)
    qkv = qkv.reshape(b, n, 3, k, hd)
    out = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # [B, N, k, hd]
    proj = jnp.take(p["proj"]["kernel"].reshape(heads, hd, d), idx, axis=0).reshape(k * hd, d)
    proj = jnp.where(_valid_rows(count, k, hd)[:, None], proj, 0)
    return _dense(out.reshape(b, n, k * hd), proj, p["proj"]["bias"], model.dtype)


def gathered_mlp(model, p, h, order, count, k: int):
    """fc2(GELU(fc1(h))) over the first k groups of `order`. h: [..., D], p: `mlp` params."""
    d, hidden = p["fc1"]["kernel"].shape
    groups = model.num_heads
    gw = hidden // groups
    idx = order[:k]
    fc1_w = jnp.take(p["fc1"]["kernel"].reshape(d, groups, gw), idx, axis=1)
    fc1_b = jnp.take(p["fc1"]["bias"].reshape(groups, gw), idx, axis=0)
    a = _dense(h, fc1_w.reshape(d, k * gw), fc1_b.reshape(-1), model.dtype)
    a = nn.gelu(a, approximate=True)
    fc2 = jnp.take(p["fc2"]["kernel"].reshape(groups, gw, d), idx, axis=0).reshape(k * gw, d)
    fc2 = jnp.where(_valid_rows(count, k, gw)[:, None], fc2, 0)
    return _dense(a, fc2, p["fc2"]["bias"], model.dtype)


def kept_first(keep):
    """keep [T] bool -> (rows [T] int32: the kept rows in order, then the others in order;
    kept count). A permutation built with one cumsum and one scatter (O(T), no sort)."""
    keep = keep.astype(jnp.int32)
    before = jnp.cumsum(keep) - keep                      # kept rows before each row
    kept = jnp.sum(keep)
    position = jnp.arange(keep.shape[0], dtype=jnp.int32)
    dest = jnp.where(keep == 1, before, kept + position - before)
    rows = jnp.zeros_like(position).at[dest].set(position, unique_indices=True)
    return rows, kept


def routed_mlp(model, p, x, mod, keep, rows, kept, order, count, k: int, capacity: int):
    """x + keep * gate_mlp * MLP(modulate(LN(x))) running LN, modulate and the MLP on
    `capacity` token slots.

    x: [B, N, D]; mod: (shift_mlp, scale_mlp, gate_mlp), each [B, D]; keep: [B, N] bool;
    rows, kept: `kept_first` of the flattened keep mask. The first `capacity` rows are
    gathered (slots >= kept hold skipped tokens and get a 0 gate), run through the gathered
    MLP and scatter-added back. Exact when capacity >= kept. The full capacity B*N runs the
    masked path's dense form (every token through the MLP, gated by keep): no gather/scatter.
    """
    shift, scale, gate = mod
    b, n, d = x.shape
    if capacity == b * n:
        update = gathered_mlp(model, p, modulate(mlp_norm(model, x), shift, scale), order, count,
                              k)
        return x + (keep[..., None].astype(gate.dtype) * gate[:, None]) * update
    rows = rows[:capacity]
    sample = rows // n
    h = modulate(mlp_norm(model, x.reshape(b * n, 1, d)[rows]), shift[sample], scale[sample])
    update = gathered_mlp(model, p, h[:, 0], order, count, k)
    g = jnp.where((jnp.arange(capacity) < kept)[:, None], gate[sample], 0)
    return x.reshape(b * n, d).at[rows].add(g * update, unique_indices=True).reshape(b, n, d)


# ----------------------------------------------------------------------------------------------
# Blocks and the whole model
# ----------------------------------------------------------------------------------------------

def _switch(index, branches, *operands):
    if len(branches) == 1:
        return branches[0](*operands)
    return lax.switch(index, branches, *operands)


def block_forward(model, bp, x, c, width: Width, head_sizes: Sequence[int],
                  group_sizes: Sequence[int], capacities: Sequence[float], index: int = 0):
    """One dynamic block, gathered. Returns (x [B, N, D], kept tokens (int32 scalar)).

    x: the rows the block attends within, c their conditioning, per sample [B, D] (a Latte's
    block: rows (b f) or (b n); the modulation is computed per sample and repeated per row,
    `dit.per_row`). width: this block's `Buckets.arrays()` entries
    (head_order [H], head_count, head_bucket, group_order, group_count, group_bucket).
    head_sizes / group_sizes: the static widths that head_bucket / group_bucket index; a
    single size runs without `lax.switch` (its bucket entry is then ignored). capacities:
    token capacity fractions of the local B*N rows. index: the block's (or its kind's) index,
    for `model.block_has_token_router`.
    """
    blk = block_module(model, index)
    mod = dit.per_row(blk.apply({"params": bp}, c,
                                method=lambda m, c: m.adaLN_modulation(nn.silu(c))), x.shape[0])
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)

    h = modulate(layer_norm(x), shift_msa, scale_msa)
    attn = [functools.partial(gathered_attention, model, k=k) for k in head_sizes]
    x = x + gate_msa[:, None] * _switch(width["head_bucket"], attn, bp["attn"], h,
                                        width["head_order"], width["head_count"])

    order, count = width["group_order"], width["group_count"]
    if not model.block_has_token_router(index):
        mlp = [functools.partial(gathered_mlp, model, k=k) for k in group_sizes]
        h = modulate(mlp_norm(model, x), shift_mlp, scale_mlp)
        update = _switch(width["group_bucket"], mlp, bp["mlp"], h, order, count)
        b, n = x.shape[:2]
        return x + gate_mlp[:, None] * update, jnp.asarray(b * n, jnp.int32)

    logits = blk.apply({"params": bp}, x, method=lambda m, x: m.token_router(x))
    keep = gumbel_sigmoid_gate(logits, blk.tau) > 0.5
    rows, kept = kept_first(keep.reshape(-1))
    caps = token_capacities(capacities, keep.size)
    cap_index = jnp.searchsorted(jnp.asarray(caps, jnp.int32), kept).astype(jnp.int32)
    branches = [functools.partial(routed_mlp, model, k=k, capacity=cap)
                for k in group_sizes for cap in caps]
    index = jnp.asarray(width["group_bucket"], jnp.int32) * len(caps) + cap_index
    x = _switch(index, branches, bp["mlp"], x, (shift_mlp, scale_mlp, gate_mlp), keep, rows,
                kept, order, count)
    return x, kept


def blocks_forward(model, blocks, x, c, widths: Width, sizes, capacities):
    """All blocks as one `lax.scan` over stacked block params and per-block width arrays
    (leading depth axis). Returns (x, kept [L]).

    A model with several block kinds (`model.block_kinds`: a Latte's spatial, temporal) scans
    over cycles of blocks: `blocks` holds one stacked tree per kind (`stacked_blocks`) and
    each cycle regroups the tokens for each of its blocks (`model.to_block_rows`; the
    modulation repeated per row) and runs `model.after_block` after each, as the model's
    own `run_blocks` does. The tokens between blocks stay in the model's canonical layout."""
    kinds = model.block_kinds
    if len(kinds) == 1:
        def body(x, layer):
            bp, width = layer
            return block_forward(model, bp, x, c, width, sizes, sizes, capacities)
        return lax.scan(body, x, (blocks, widths))

    cycle, batch = len(kinds), c.shape[0]
    widths = jax.tree_util.tree_map(lambda a: a.reshape((-1, cycle) + a.shape[1:]), widths)

    def cycle_body(x, layer):
        j, bps, width = layer
        kept = []
        for p, kind in enumerate(kinds):
            rows = model.to_block_rows(x, kind, batch)
            rows, k = block_forward(model, bps[p], rows, c,
                                    jax.tree_util.tree_map(lambda a: a[p], width), sizes,
                                    sizes, capacities, index=p)
            x = model.after_block(model.from_block_rows(rows, kind, batch), j * cycle + p,
                                  batch)
            kept.append(k)
        return x, jnp.stack(kept)
    steps = jnp.arange(model.depth // cycle, dtype=jnp.int32)
    x, kept = lax.scan(cycle_body, x, (steps, tuple(blocks), widths))
    return x, kept.reshape(-1)


def forward(model, rest, blocks, x, t, y, widths: Width, sizes, capacities,
            cfg_scale=None, guide_channels=3, both_halves: bool = False):
    """The gathered model at one step for one device's rows. Returns (out, kept [L]).

    blocks: stacked block params; widths: the step's width arrays, [L, ...] each.
    Without `cfg_scale`: out = the model's output [B, H, W, C_out] for x, t, y [B].
    With `cfg_scale`: like `DiT.forward_with_cfg` on rows [x; x] with labels [y; null], t
    duplicated, returning only the conditional half [B, ...] (guided eps channels first), or
    with `both_halves` the pair (conditional half, unconditional half) of `guide`.
    """
    if cfg_scale is not None:
        x = jnp.concatenate([x, x], axis=0)
        t = jnp.concatenate([t, t], axis=0)
        y = jnp.concatenate([y, jnp.full_like(y, model.num_classes)], axis=0)
    tokens, c = embed(model, rest, x, t, y)
    tokens, kept = blocks_forward(model, blocks, tokens, c, widths, sizes, capacities)
    out = final(model, rest, tokens, c)
    if cfg_scale is not None:
        out = guide(out, cfg_scale, model.in_channels, guide_channels, both_halves)
    return out, kept


__all__ = ["split_params", "stacked_blocks", "block_module", "token_capacities", "embed",
           "final", "guide", "gathered_attention", "gathered_mlp", "kept_first", "routed_mlp",
           "block_forward", "blocks_forward", "forward", "routed_widths", "mlp_norm"]
