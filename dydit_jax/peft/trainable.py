"""The frozen-base split of a PEFT run: what trains, what stays, and which base it was.

A PEFT train state holds only the trainable tree (adapters plus the base leaves that
`LoraSpec.trainable` names, e.g. the DyDiT routers): its EMA and Adam moments exist for those
leaves alone, and checkpoints hold only them. The frozen rest of the base is an input of the
train step, rebuilt from `train.init_from` on resume and in sample mode; the checkpoint keeps
the base's `fingerprint` so that adapters are never silently put on another base.
"""
from __future__ import annotations

import hashlib
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dydit_jax.peft.adapters import LoraSpec, is_adapter_path


def split_trainable(params, spec: LoraSpec):
    """(trainable, frozen) of a tree: adapter leaves and base leaves matching
    `spec.trainable` train, the rest is frozen."""
    pattern = re.compile(spec.trainable) if spec.trainable else None
    flat = traverse_util.flatten_dict(params)
    trainable, frozen = {}, {}
    for path, leaf in flat.items():
        name = "/".join(path)
        train = is_adapter_path(path) or (pattern is not None and pattern.search(name))
        (trainable if train else frozen)[path] = leaf
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def num_params(tree) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


_GOLDEN = np.uint32(2654435761)   # Knuth's multiplicative hash constant


@jax.jit
def _leaf_digest(x):
    """Two uint32 sums over the bit patterns of x: plain and position-weighted. Integer
    addition wraps and is associative, so the digest is the same for any sharding or device
    count (a float sum would not be)."""
    x = jnp.asarray(x)
    if x.dtype.itemsize == 8:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)       # [..., 2]
    elif x.dtype.itemsize == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    else:
        bits = x.astype(jnp.uint32)
    bits = bits.reshape(-1)
    weight = jnp.arange(bits.shape[0], dtype=jnp.uint32) * _GOLDEN + jnp.uint32(1)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32),
                      jnp.sum(bits * weight, dtype=jnp.uint32)])


def fingerprint(tree) -> str:
    """sha256 over every leaf's path, shape, dtype and bit digest (`_leaf_digest`), computed
    where the leaves live (sharded arrays are not gathered to the host)."""
    h = hashlib.sha256()
    flat = traverse_util.flatten_dict(tree)
    for path in sorted(flat, key=lambda p: "/".join(map(str, p))):
        leaf = flat[path]
        digest = np.asarray(jax.device_get(_leaf_digest(leaf)))
        h.update(json.dumps(["/".join(map(str, path)), list(leaf.shape),
                             str(leaf.dtype)]).encode())
        h.update(digest.tobytes())
    return h.hexdigest()


def base_record(base, spec: LoraSpec, trainable, source: str) -> dict:
    """What a PEFT checkpoint says about its base (the checkpoint's "base" item)."""
    return {"fingerprint": fingerprint(base), "init_from": source,
            "base_params": num_params(base), "trainable_params": num_params(trainable),
            "peft": {k: v for k, v in spec.__dict__.items()}}


def check_base(record, base, source: str) -> None:
    """Raises unless `base` is the base the checkpoint's `record` was trained on."""
    if record is None:
        raise ValueError("this checkpoint has no base record: it was not written by a PEFT "
                         "run (config.peft.method='none' reads it)")
    actual = fingerprint(base)
    if actual != record["fingerprint"]:
        raise ValueError(
            f"the adapters in this checkpoint were trained on another base: it was "
            f"init_from={record['init_from']!r} (fingerprint {record['fingerprint'][:12]}), "
            f"this run's base is init_from={source!r} (fingerprint {actual[:12]}). Set "
            f"--config.train.init_from to the base they were trained on")
