"""Checkpoint I/O with orbax.

`save_params` / `load_params` write and read a bare parameter tree (converted official weights,
exported models). The training state's CheckpointManager lives with the trainer.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def save_params(path: str, params) -> None:
    """Writes `params` atomically (orbax writes to a temporary dir and renames on success)."""
    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=True)


def load_params(path: str, target=None):
    """Reads a tree written by `save_params`; `target` (arrays or ShapeDtypeStructs, possibly
    with shardings) fixes the structure, dtypes and placement."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no parameter checkpoint at {path!r}")
    with ocp.StandardCheckpointer() as ckptr:
        if target is None:
            return ckptr.restore(path)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        return ckptr.restore(path, abstract)
