"""The ADM evaluation in one place: Inception features of image batches, then the metrics.

    model, variables = load_inception("inception_fid.npz")
    metrics = evaluate_npz("samples.npz", "VIRTUAL_imagenet256_labeled.npz", model, variables)
    # {"inception_score", "fid", "sfid", "precision", "recall"}

Like `evaluations/evaluator.py` of openai/guided-diffusion: both batches go through the
Inception; the reference's stored statistics (mu, sigma, mu_s, sigma_s) are used when present,
otherwise they are computed from its features; precision and recall always use the pool
features of both sets. Features are extracted with one jitted function at a fixed batch size
(the last batch is padded), on the default device.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Iterable, Optional

import jax
import numpy as np

from dydit_jax.evaluation.fid import FIDStatistics, compute_statistics, frechet_distance
from dydit_jax.evaluation.inception import InceptionV3
from dydit_jax.evaluation.inception_score import inception_score
from dydit_jax.evaluation.precision_recall import precision_recall
from dydit_jax.evaluation.reference_batch import iter_images, read_reference_batch

FEATURES = ("pool", "spatial", "logits")


@functools.partial(jax.jit, static_argnums=0)
def _features(model, variables, images):
    return model.apply(variables, images)


def extract_features(model: InceptionV3, variables: Dict[str, Any],
                     batches: Iterable[np.ndarray], batch_size: int) -> Dict[str, np.ndarray]:
    """{"pool": [N, 2048], "spatial": [N, 17, 17, 7], "logits": [N, 1008]} for uint8 image
    batches [b <= batch_size, H, W, 3] (one compile per model and image size)."""
    out = {k: [] for k in FEATURES}
    for images in batches:
        n = len(images)
        if n > batch_size:
            raise ValueError(f"a batch of {n} images is larger than batch_size={batch_size}")
        padded = np.zeros((batch_size,) + images.shape[1:], images.dtype)
        padded[:n] = images
        features = _features(model, variables, padded)
        for k in FEATURES:
            out[k].append(np.asarray(features[k])[:n])
    if not out["pool"]:
        raise ValueError("no images to extract features from")
    return {k: np.concatenate(v) for k, v in out.items()}


def compute_metrics(samples: Dict[str, np.ndarray], reference: Dict[str, np.ndarray],
                    reference_pool: Optional[FIDStatistics] = None,
                    reference_spatial: Optional[FIDStatistics] = None,
                    num_splits: int = 10) -> Dict[str, float]:
    """IS of the samples, FID / sFID / precision / recall against the reference, from feature
    dicts as `extract_features` returns them. Stored reference statistics override the ones
    computed from `reference`'s features."""
    if reference_pool is None:
        reference_pool = compute_statistics(reference["pool"])
    if reference_spatial is None:
        reference_spatial = compute_statistics(reference["spatial"])
    precision, recall = precision_recall(reference["pool"], samples["pool"])
    return {
        "inception_score": inception_score(samples["logits"], num_splits),
        "fid": frechet_distance(compute_statistics(samples["pool"]), reference_pool),
        "sfid": frechet_distance(compute_statistics(samples["spatial"]), reference_spatial),
        "precision": precision,
        "recall": recall,
    }


def evaluate_npz(sample_path: str, reference_path: str, model: InceptionV3,
                 variables: Dict[str, Any], batch_size: int = 64,
                 num_splits: int = 10) -> Dict[str, float]:
    """The ADM evaluator on two `.npz` batches (`arr_0` uint8 NHWC images)."""
    reference = read_reference_batch(reference_path)
    read_reference_batch(sample_path)  # checks the layout before any compute
    ref_features = extract_features(model, variables, reference.iter_images(batch_size),
                                    batch_size)
    sample_features = extract_features(model, variables, iter_images(sample_path, batch_size),
                                       batch_size)
    return compute_metrics(sample_features, ref_features, reference.pool, reference.spatial,
                           num_splits)
