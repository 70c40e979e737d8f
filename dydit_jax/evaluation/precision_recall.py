"""Improved precision and recall (Kynkaanniemi et al. 2019), as the ADM evaluator computes them.

Each feature set spans a manifold: the union of balls around its points, each ball's radius
the distance to the point's k-th nearest neighbour in its own set (k = 3; the point itself is
the 0-th). Then
    precision = fraction of sample features inside the reference manifold,
    recall    = fraction of reference features inside the sample manifold,
"inside" meaning within (<=) the radius of at least one ball.

Distances are squared Euclidean, |u|^2 - 2 u.v + |v|^2 clipped at 0, computed on the device in
float32 (matmuls at "highest" precision) in row blocks, so memory is block x N. ADM computes
them in float16 first (float32 only where float16 overflows), which can move a point sitting
on a ball's boundary; this module stays in float32.
"""
from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

NEAREST_K = 3


def pairwise_sq_distances(u, v):
    """u: [M, D], v: [N, D] -> squared Euclidean distances [M, N], float32."""
    u, v = u.astype(jnp.float32), v.astype(jnp.float32)
    dots = jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST)
    d = jnp.sum(u * u, axis=1)[:, None] - 2.0 * dots + jnp.sum(v * v, axis=1)[None, :]
    return jnp.maximum(d, 0.0)


@functools.partial(jax.jit, static_argnames=("k",))
def _kth_nearest(rows, points, k):
    return -jax.lax.top_k(-pairwise_sq_distances(rows, points), k + 1)[0][:, k]


@jax.jit
def _inside_any_ball(rows, centres, sq_radii):
    return jnp.any(pairwise_sq_distances(rows, centres) <= sq_radii[None, :], axis=1)


def _by_row_blocks(fn, rows: np.ndarray, block: int, *args) -> np.ndarray:
    """fn(rows[i:i+block], *args) over fixed-size blocks (the last one zero-padded, so a single
    compile serves all of them), concatenated."""
    out = []
    for start in range(0, len(rows), block):
        chunk = rows[start:start + block]
        padded = np.zeros((block,) + rows.shape[1:], rows.dtype)
        padded[:len(chunk)] = chunk
        out.append(np.asarray(fn(padded, *args))[:len(chunk)])
    return np.concatenate(out)


def manifold_radii(features, k: int = NEAREST_K, block: int = 1024) -> np.ndarray:
    """Squared distance of each feature [N, D] to its k-th nearest neighbour in the set: [N]."""
    features = np.asarray(features, np.float32)
    if len(features) <= k:
        raise ValueError(f"a manifold with k={k} needs more than {k} points, got "
                         f"{len(features)}")
    points = jnp.asarray(features)
    return _by_row_blocks(lambda r: _kth_nearest(r, points, k), features,
                          min(block, len(features)))


def precision_recall(reference, samples, k: int = NEAREST_K, block: int = 1024
                     ) -> Tuple[float, float]:
    """(precision, recall) of sample features [N2, D] against reference features [N1, D]."""
    reference = np.asarray(reference, np.float32)
    samples = np.asarray(samples, np.float32)
    if reference.ndim != 2 or samples.ndim != 2 or reference.shape[1] != samples.shape[1]:
        raise ValueError(f"precision_recall needs features [N, D] with one D, got "
                         f"{reference.shape} and {samples.shape}")
    ref_radii = jnp.asarray(manifold_radii(reference, k, block))
    sample_radii = jnp.asarray(manifold_radii(samples, k, block))
    ref_points, sample_points = jnp.asarray(reference), jnp.asarray(samples)
    precision = _by_row_blocks(_inside_any_ball, samples, min(block, len(samples)),
                               ref_points, ref_radii)
    recall = _by_row_blocks(_inside_any_ball, reference, min(block, len(reference)),
                            sample_points, sample_radii)
    return float(precision.mean()), float(recall.mean())
