"""Sample-quality metrics of generated clips: FVD and, with the FID Inception, per-frame FID.

    i3d_model, i3d_variables = load_i3d("i3d_400.npz")
    inception_model, inception_variables = load_inception("inception_fid.npz")
    metrics = video_metrics(samples, reference, i3d_model, i3d_variables,
                            inception_model, inception_variables)
    # {"fvd", "fid_per_frame"}

- fvd: `fvd.extract_video_features` of both clip sets, the Frechet distance of their I3D
  embeddings (`fvd.FEATURE`, the 400-d logits, unless `feature` says otherwise);
- fid_per_frame: every frame of every clip is an image; the FID of the pooled frames of the
  samples against those of the reference (Inception pool_3 features, `evaluator.
  extract_features`; gray frames repeated to RGB).
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional

import numpy as np

from dydit_jax.evaluation.evaluator import extract_features
from dydit_jax.evaluation.fid import fid_from_features
from dydit_jax.evaluation.fvd import (FEATURE, OUTPUTS, extract_video_features,
                                     fvd_from_features)
from dydit_jax.evaluation.i3d import InceptionI3d
from dydit_jax.evaluation.inception import InceptionV3


def iter_frames(videos, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 RGB frames [<= batch_size, H, W, 3] of videos [N, T, H, W, C], clip by clip."""
    frames = videos.reshape((-1,) + tuple(videos.shape[2:]))
    for start in range(0, len(frames), batch_size):
        batch = np.asarray(frames[start:start + batch_size])
        yield np.repeat(batch, 3, axis=-1) if batch.shape[-1] == 1 else batch


def video_metrics(samples, reference, i3d_model: InceptionI3d, i3d_variables: Dict[str, Any],
                  inception_model: Optional[InceptionV3] = None,
                  inception_variables: Optional[Dict[str, Any]] = None,
                  batch_size: int = 16, frame_batch_size: int = 64,
                  feature: str = FEATURE) -> Dict[str, float]:
    """{"fvd"} (and "fid_per_frame" given the Inception) of uint8 clips samples [N, T, H, W, C]
    against reference [M, T', H', W', C'] (C in (1, 3)). `batch_size` clips go through the I3D
    at a time, `frame_batch_size` frames through the Inception."""
    if (inception_model is None) != (inception_variables is None):
        raise ValueError("pass both inception_model and inception_variables, or neither")
    if feature not in OUTPUTS:
        raise ValueError(f"feature={feature!r}: FVD embeds clips with one of {OUTPUTS}")
    sample_emb, reference_emb = (
        extract_video_features(i3d_model, i3d_variables, v, batch_size)[feature]
        for v in (samples, reference))
    metrics = {"fvd": fvd_from_features(sample_emb, reference_emb)}
    if inception_model is not None:
        sample_pool, reference_pool = (
            extract_features(inception_model, inception_variables,
                             iter_frames(v, frame_batch_size), frame_batch_size)["pool"]
            for v in (samples, reference))
        metrics["fid_per_frame"] = fid_from_features(sample_pool, reference_pool)
    return metrics
