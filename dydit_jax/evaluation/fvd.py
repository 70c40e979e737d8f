"""FVD: the Frechet distance of Kinetics-400 I3D embeddings of two sets of clips.

    model, variables = i3d.load_i3d("i3d_400.npz")
    samples = extract_video_features(model, variables, samples_uint8, batch_size=16)
    reference = extract_video_features(model, variables, reference_uint8, batch_size=16)
    score = fvd_from_features(samples[FEATURE], reference[FEATURE])

The protocol of TATS and content-debiased FVD (cd-fvd): clips of NUM_FRAMES = 16 frames,
uint8 [N, T, H, W, C], each frame resized to 224x224 bilinearly (torch `F.interpolate`,
align_corners=False) and scaled to [-1, 1] (`i3d.preprocess`), embedded by the 400-d logits of
the I3D (FEATURE; "features" selects the 1024-d pre-logits layer instead). Gray clips (C = 1)
are repeated to RGB. Clips need at least i3d.MIN_FRAMES = 9 frames (`i3d.check_video_shape`
says why); the common implementations do not pad short clips either.

The Gaussian statistics and the distance are FID's (`dydit_jax.evaluation.fid`): float64 on
the host, the covariance normalised by N - 1 (TATS does the same; cd-fvd and StyleGAN-V divide
by N, a relative difference of 1/N in the covariances, 5e-4 at the usual 2048 clips).
"""
from __future__ import annotations

import functools
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from dydit_jax.evaluation.fid import fid_from_features
from dydit_jax.evaluation.i3d import (INPUT_SIZE, NUM_FRAMES,  # noqa: F401 (the protocol)
                                      InceptionI3d, check_video_shape, preprocess)

FEATURE = "logits"
OUTPUTS = ("features", "logits")


@functools.partial(jax.jit, static_argnums=0)
def _embed(model, variables, videos):
    x = preprocess(videos)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return model.apply(variables, x)


def extract_video_features(model: InceptionI3d, variables: Dict[str, Any], videos,
                           batch_size: int = 16) -> Dict[str, np.ndarray]:
    """{"features": [N, 1024], "logits": [N, 400]} for uint8 videos [N, T, H, W, C], C in
    (1, 3) (a numpy array or memmap; read batch_size clips at a time, the last batch padded so
    there is one compile per model and clip shape)."""
    if videos.ndim != 5 or videos.shape[-1] not in (1, 3):
        raise ValueError(f"expected videos [N, T, H, W, C] with C = 1 or 3, got shape "
                         f"{tuple(videos.shape)}")
    if videos.dtype != np.uint8:
        raise ValueError(f"expected uint8 videos in [0, 255], got {videos.dtype} (convert "
                         f"[-1, 1] samples with dydit_jax.sampling.to_uint8)")
    if len(videos) == 0:
        raise ValueError("no videos to extract features from")
    check_video_shape((batch_size,) + tuple(videos.shape[1:2]) + (INPUT_SIZE, INPUT_SIZE, 3))
    out = {k: [] for k in OUTPUTS}
    for start in range(0, len(videos), batch_size):
        batch = np.asarray(videos[start:start + batch_size])
        n = len(batch)
        padded = np.zeros((batch_size,) + batch.shape[1:], np.uint8)
        padded[:n] = batch
        embedding = _embed(model, variables, padded)
        for k in OUTPUTS:
            out[k].append(np.asarray(embedding[k])[:n])
    return {k: np.concatenate(v) for k, v in out.items()}


def fvd_from_features(features_a, features_b) -> float:
    """FVD between two embedding sets [N, D] (`extract_video_features(...)[FEATURE]`)."""
    return fid_from_features(features_a, features_b)
