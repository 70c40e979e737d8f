"""Importance reordering of a pretrained DiT before DyDiT fine-tuning (DESIGN.md section 1).

DyDiT keeps head 0 and MLP group 0 always on, so before the routers are added the most
important head and group of every block should sit at index 0 (and, for width buckets that
take a prefix, the next most important at index 1, ...). Importance is magnitude:

- head h of a block: the L2 norm of all its weights, i.e. its q, k and v kernel columns and
  bias entries (`attn/qkv`, columns [q; k; v], each head-major: head h owns columns
  h*hd:(h+1)*hd of each third) and its input rows of `attn/proj` (rows h*hd:(h+1)*hd);
- MLP group g (G = num_heads contiguous groups of 4D/H hidden channels, DyDiT's grouping):
  the L2 norm of its fc1 kernel columns, fc1 bias entries and fc2 kernel rows.

Heads are sorted by decreasing importance; whole groups are sorted likewise (channels inside a
group keep their order). The sort is stable, so ties keep their order and a second call
returns identity permutations. Permuting heads (with their q/k/v columns and proj rows) and
MLP channels (fc1 columns/bias with fc2 rows) leaves the static model's function unchanged:
proj's and fc2's biases, adaLN and everything else are untouched.

Routers. A DyDiT width router's output j gates head (group) j+1; index 0 has no router output.
A permutation that moves a different head into slot 0 therefore cannot carry trained router
columns along: the head moved to slot 0 loses its column and the old head 0 has none to take.
So this runs on DiT weights *before* the routers exist, and by default it refuses parameters
that contain width routers (`head_router`, `group_router`). With `allow_fresh_routers=True`
the routers are left untouched: correct only for freshly initialised routers, whose columns are
interchangeable (DyDiT's init: small random kernels and a large positive bias, all on). The
token router reads the residual stream, which reordering leaves unchanged, so it is never a
problem.

Works on unstacked params (`blocks_0 .. blocks_{L-1}`) and on scan_layers params (`blocks`
with a leading depth axis); accepts the params dict or a `{"params": ...}` variables dict.
Importance is read from the weights alone (no data), so any model whose blocks are DiT blocks
is reordered alike: DiT, SiT and Latte (spatial and temporal blocks are the same `DiTBlock`
tree; a block without a token router, e.g. a temporal one with `token_blocks="spatial"`, has
nothing else to move).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import jax.numpy as jnp
import numpy as np

WIDTH_ROUTERS = ("head_router", "group_router")


# ----------------------------------------------------------------------------------------------
# Tree access
# ----------------------------------------------------------------------------------------------

def _split_variables(tree: Mapping) -> Tuple[Mapping, bool]:
    """(params, wrapped): accepts a params dict or a variables dict {"params": ...}."""
    if "params" in tree and isinstance(tree["params"], Mapping):
        return tree["params"], True
    return tree, False


def _block_names(params: Mapping, scan_layers: bool) -> List[str]:
    if scan_layers:
        if "blocks" not in params:
            raise ValueError("scan_layers=True expects stacked blocks under 'blocks'; found "
                             f"{sorted(params)} (pass scan_layers=False for blocks_0..)")
        return ["blocks"]
    names = sorted((k for k in params if k.startswith("blocks_")),
                   key=lambda k: int(k.split("_")[1]))
    if not names:
        hint = " (stacked 'blocks' found: pass scan_layers=True)" if "blocks" in params else ""
        raise ValueError(f"no blocks_<i> in params {sorted(params)}{hint}")
    return names


def _as_stacked(block: Mapping, stacked: bool) -> Dict[str, np.ndarray]:
    """The four weight groups of one block entry as numpy arrays with a leading layer axis."""
    try:
        leaves = {
            "qkv_k": block["attn"]["qkv"]["kernel"], "qkv_b": block["attn"]["qkv"]["bias"],
            "proj_k": block["attn"]["proj"]["kernel"],
            "fc1_k": block["mlp"]["fc1"]["kernel"], "fc1_b": block["mlp"]["fc1"]["bias"],
            "fc2_k": block["mlp"]["fc2"]["kernel"],
        }
    except KeyError as e:
        raise ValueError(f"block is missing DiT parameter {e}; expected attn/qkv, attn/proj, "
                         "mlp/fc1, mlp/fc2 with kernel and bias") from None
    out = {}
    for k, v in leaves.items():
        a = np.asarray(v)
        out[k] = a if stacked else a[None]
    return out


def _check_routers(params: Mapping, names: List[str], allow_fresh_routers: bool):
    found = [f"{b}/{r}" for b in names for r in WIDTH_ROUTERS if r in params[b]]
    if found and not allow_fresh_routers:
        raise ValueError(
            "reorder_by_importance runs on DiT weights before DyDiT fine-tuning, but these "
            f"params contain width routers: {found[:4]}{' ...' if len(found) > 4 else ''}. "
            "A router's output j gates head j+1 (head 0 is always on), so trained router "
            "columns cannot follow a permutation that changes slot 0. Reorder the plain DiT "
            "weights, or pass allow_fresh_routers=True if the routers are freshly initialised "
            "(they are then left as they are).")


# ----------------------------------------------------------------------------------------------
# Importance
# ----------------------------------------------------------------------------------------------

def _head_importance(w: Dict[str, np.ndarray], num_heads: int) -> np.ndarray:
    """[L, H] L2 norms of each head's q/k/v columns + biases and proj input rows."""
    L, d, three_d = w["qkv_k"].shape
    hd = three_d // 3 // num_heads
    f32 = np.float32
    sq = (np.square(w["qkv_k"].astype(f32)).reshape(L, d, 3, num_heads, hd).sum((1, 2, 4))
          + np.square(w["qkv_b"].astype(f32)).reshape(L, 3, num_heads, hd).sum((1, 3))
          + np.square(w["proj_k"].astype(f32)).reshape(L, num_heads, hd, -1).sum((2, 3)))
    return np.sqrt(sq)


def _group_importance(w: Dict[str, np.ndarray], num_groups: int) -> np.ndarray:
    """[L, G] L2 norms of each group's fc1 columns + bias entries and fc2 rows."""
    L, d, hid = w["fc1_k"].shape
    gw = hid // num_groups
    f32 = np.float32
    sq = (np.square(w["fc1_k"].astype(f32)).reshape(L, d, num_groups, gw).sum((1, 3))
          + np.square(w["fc1_b"].astype(f32)).reshape(L, num_groups, gw).sum(2)
          + np.square(w["fc2_k"].astype(f32)).reshape(L, num_groups, gw, -1).sum((2, 3)))
    return np.sqrt(sq)


def _check_shapes(w: Dict[str, np.ndarray], num_heads: int):
    d = w["qkv_k"].shape[1]
    if w["qkv_k"].shape[2] != 3 * d or d % num_heads:
        raise ValueError(f"qkv kernel {w['qkv_k'].shape[1:]} does not fit D={d} with "
                         f"{num_heads} heads")
    if w["fc1_k"].shape[2] % num_heads:
        raise ValueError(f"MLP hidden size {w['fc1_k'].shape[2]} is not divisible into "
                         f"{num_heads} groups")


def importance(params: Mapping, num_heads: int, scan_layers: bool = False
               ) -> Dict[str, np.ndarray]:
    """{"heads": [L, H], "groups": [L, H]} importance (L2 norms, float32) of every block."""
    params, _ = _split_variables(params)
    names = _block_names(params, scan_layers)
    heads, groups = [], []
    for b in names:
        w = _as_stacked(params[b], scan_layers)
        _check_shapes(w, num_heads)
        heads.append(_head_importance(w, num_heads))
        groups.append(_group_importance(w, num_heads))
    return {"heads": np.concatenate(heads), "groups": np.concatenate(groups)}


# ----------------------------------------------------------------------------------------------
# Permutation
# ----------------------------------------------------------------------------------------------

def _permute_block(w: Dict[str, np.ndarray], head_perm: np.ndarray, group_perm: np.ndarray,
                   num_heads: int) -> Dict[str, np.ndarray]:
    """Apply [L, H] permutations (new slot s <- old index perm[s]) to stacked block weights."""
    L, d, three_d = w["qkv_k"].shape
    hd = three_d // 3 // num_heads
    hid = w["fc1_k"].shape[2]
    gw = hid // num_heads
    hp = head_perm[:, None, None, :, None]
    gp = group_perm[:, None, :, None]
    take = np.take_along_axis
    return {
        "qkv_k": take(w["qkv_k"].reshape(L, d, 3, num_heads, hd), hp, axis=3)
        .reshape(L, d, three_d),
        "qkv_b": take(w["qkv_b"].reshape(L, 3, num_heads, hd), head_perm[:, None, :, None],
                      axis=2).reshape(L, three_d),
        "proj_k": take(w["proj_k"].reshape(L, num_heads, hd, -1),
                       head_perm[:, :, None, None], axis=1).reshape(L, d, -1),
        "fc1_k": take(w["fc1_k"].reshape(L, d, num_heads, gw), gp, axis=2).reshape(L, d, hid),
        "fc1_b": take(w["fc1_b"].reshape(L, num_heads, gw), group_perm[:, :, None], axis=1)
        .reshape(L, hid),
        "fc2_k": take(w["fc2_k"].reshape(L, num_heads, gw, -1), group_perm[:, :, None, None],
                      axis=1).reshape(L, hid, -1),
    }


def _write_block(block: Mapping, new: Dict[str, np.ndarray], stacked: bool) -> Dict:
    """A copy of `block` with the permuted leaves (same array types and dtypes as before)."""
    def put(old, arr):
        arr = arr if stacked else arr[0]
        arr = arr.astype(old.dtype)
        return np.asarray(arr) if isinstance(old, np.ndarray) else jnp.asarray(arr)

    attn, mlp = dict(block["attn"]), dict(block["mlp"])
    attn["qkv"] = {**block["attn"]["qkv"], "kernel": put(block["attn"]["qkv"]["kernel"],
                                                         new["qkv_k"]),
                   "bias": put(block["attn"]["qkv"]["bias"], new["qkv_b"])}
    attn["proj"] = {**block["attn"]["proj"], "kernel": put(block["attn"]["proj"]["kernel"],
                                                           new["proj_k"])}
    mlp["fc1"] = {**block["mlp"]["fc1"], "kernel": put(block["mlp"]["fc1"]["kernel"],
                                                       new["fc1_k"]),
                  "bias": put(block["mlp"]["fc1"]["bias"], new["fc1_b"])}
    mlp["fc2"] = {**block["mlp"]["fc2"], "kernel": put(block["mlp"]["fc2"]["kernel"],
                                                       new["fc2_k"])}
    return {**block, "attn": attn, "mlp": mlp}


def apply_permutation(params: Mapping, perms: Mapping[str, np.ndarray], num_heads: int,
                      scan_layers: bool = False, allow_fresh_routers: bool = False):
    """Apply given permutations ({"heads": [L, H], "groups": [L, H]}, new slot s holds old
    index perm[l, s]) to every block, e.g. to bring an EMA copy into the same order."""
    tree = params
    params, wrapped = _split_variables(tree)
    names = _block_names(params, scan_layers)
    _check_routers(params, names, allow_fresh_routers)
    head_perm = np.asarray(perms["heads"])
    group_perm = np.asarray(perms["groups"])
    new_params = dict(params)
    row = 0
    for b in names:
        w = _as_stacked(params[b], scan_layers)
        _check_shapes(w, num_heads)
        L = w["qkv_k"].shape[0]
        hp, gp = head_perm[row:row + L], group_perm[row:row + L]
        if hp.shape != (L, num_heads) or gp.shape != (L, num_heads):
            raise ValueError(f"permutations must be [depth, {num_heads}], got "
                             f"{head_perm.shape} and {group_perm.shape}")
        for p in (hp, gp):
            if not np.array_equal(np.sort(p, axis=-1), np.broadcast_to(np.arange(num_heads),
                                                                       p.shape)):
                raise ValueError(f"not a permutation of 0..{num_heads - 1}: {p}")
        new_params[b] = _write_block(params[b], _permute_block(w, hp, gp, num_heads),
                                     scan_layers)
        row += L
    if row != head_perm.shape[0]:
        raise ValueError(f"permutations have {head_perm.shape[0]} rows for {row} blocks")
    return {**tree, "params": new_params} if wrapped else new_params


def reorder_by_importance(params: Mapping, num_heads: int, scan_layers: bool = False,
                          allow_fresh_routers: bool = False):
    """Sort every block's heads and MLP groups by decreasing importance (index 0 = most
    important). Returns (new_params, perms) with perms = {"heads": [L, H], "groups": [L, H]}
    int arrays: slot s of block l now holds old head (group) perms[...][l, s].

    `params`: DiT, SiT or Latte params (or {"params": ...}); `scan_layers`: the blocks are
    stacked under "blocks". The static model computes the same function before and after.
    Raises when width routers are present unless `allow_fresh_routers` (see the module
    docstring).
    """
    imp = importance(params, num_heads, scan_layers)
    perms = {k: np.argsort(-v, axis=-1, kind="stable").astype(np.int32)
             for k, v in imp.items()}
    new_params = apply_permutation(params, perms, num_heads, scan_layers,
                                   allow_fresh_routers=allow_fresh_routers)
    return new_params, perms


__all__ = ["importance", "apply_permutation", "reorder_by_importance", "WIDTH_ROUTERS"]
