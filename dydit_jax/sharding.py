"""Device mesh, parameter layout by regex rules, and global batches.

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose devices
also split the large parameters and their optimizer state). Batches are split over both axes.
Parameters are laid out by an ordered list of `(regex, rule)` pairs matched against the
"a/b/c" path of each leaf; the first match wins:
- "replicate": a full copy on every device;
- "fsdp": the largest axis that the fsdp axis size divides is split over `fsdp` (replicated if
  none is divisible, e.g. scalars and small biases). The leading depth axis of a stacked
  block tree (`scan_layers`: a path through one of `STACKED_BLOCKS`) is never split, so a
  stacked leaf is split as each of its blocks would be.
"""
from __future__ import annotations

import re
from typing import Sequence, Tuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")

# Block trees that `scan_layers` stacks on a leading depth axis: DiT's and Latte's blocks,
# FLUX's two kinds (the per-block layout names them "blocks_{i}", ...; `convert.to_layout`).
STACKED_BLOCKS = ("blocks", "double_blocks", "single_blocks")


def create_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over all devices (or `devices`). data=-1 takes what fsdp leaves."""
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must divide the number of devices ({n})")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh.data * mesh.fsdp = {data} * {fsdp} must equal the number of "
                         f"devices ({n}); set mesh.data=-1 to use all remaining devices")
    # Auto axes: shardings are given explicitly at jit boundaries and XLA propagates inside.
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2,
                         devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data and fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _fsdp_spec(shape: Tuple[int, ...], fsdp_size: int, stacked: bool = False) -> P:
    """Splits the largest divisible axis (not a stacked leaf's leading depth axis)."""
    if fsdp_size == 1:
        return P()
    candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0 and d >= fsdp_size
                  and not (stacked and i == 0)]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: shape[i])
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return P(*spec)


def tree_shardings(tree, mesh: Mesh, rules: Sequence[Tuple[str, str]]):
    """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by the rules."""
    compiled = [(re.compile(pattern), rule) for pattern, rule in rules]
    fsdp_size = mesh.shape["fsdp"]

    def leaf_sharding(path, leaf):
        name = _path_str(path)
        shape = tuple(getattr(leaf, "shape", ()))
        for pattern, rule in compiled:
            if pattern.search(name):
                if rule == "replicate":
                    return NamedSharding(mesh, P())
                if rule == "fsdp":
                    stacked = any(part in STACKED_BLOCKS for part in name.split("/"))
                    return NamedSharding(mesh, _fsdp_spec(shape, fsdp_size, stacked))
                raise ValueError(f"unknown sharding rule {rule!r} for pattern "
                                 f"{pattern.pattern!r}; use 'fsdp' or 'replicate'")
        raise ValueError(f"no sharding rule matches parameter {name!r}; end the rule list "
                         f"with ('.*', 'replicate')")

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def init_sharded(init_fn, mesh: Mesh, rules: Sequence[Tuple[str, str]], *args):
    """`init_fn(*args)` born sharded by the rules: the shapes come from `jax.eval_shape` and
    the init is jitted with those `out_shardings`, so no device (and no host) ever holds a
    full copy of a sharded leaf (a 12 B FLUX: each device its 1/fsdp share)."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = tree_shardings(abstract, mesh, rules)
    return jax.jit(init_fn, out_shardings=shardings)(*args)


def global_batch(local_batch, mesh: Mesh):
    """Per-host numpy batch (this host's slice) -> global jax.Arrays split over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch_size % n_batch_shards:
        raise ValueError(f"train.batch_size={global_batch_size} must be divisible by the "
                         f"number of batch shards (data*fsdp = {n_batch_shards})")
    if global_batch_size % jax.process_count():
        raise ValueError(f"batch size {global_batch_size} must be divisible by the number of "
                         f"hosts ({jax.process_count()})")
    return global_batch_size // jax.process_count()
