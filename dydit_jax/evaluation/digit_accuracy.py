"""Digit accuracy: is a generated digit the digit it was asked for? (the CPU demos' score)

FID needs thousands of samples and Inception features that know nothing of 8x8 digits; the
digits demos (`configs/digits*.py`, `configs/latte_digits.py`) want a quick, objective answer
to "are the samples recognisable?". This module trains scikit-learn's RBF support-vector
classifier on the 1,797 real 8x8 digits (the same data the demos train on; it classifies
held-out real digits ~99 % correctly) and scores samples with it:

- a frame (uint8 [S, S] as the samplers write it, background 0) is mapped back to the digits'
  0..16 scale; the `8 * scale` window holding the ink is found (a moving digit may be
  anywhere on the canvas; of the windows holding all of it, the one centred on its centre of
  mass), average-pooled by `scale` to 8x8 (the inverse of the data's
  nearest upsampling) and classified;
- `accuracy(samples, labels)` gives the fraction of frames classified as their label, and
  for clips [N, F, S, S] also the fraction of clips whose frames' majority vote is right and
  the fraction of clips classified the same in every frame.

    python -m dydit_jax.evaluation.digit_accuracy runs/latte_digits/samples/*/samples.npz

prints the scores of sample-mode `.npz` files (`arr_0` the uint8 samples, `arr_1` the labels).
"""
from __future__ import annotations

import functools
from typing import Dict

import numpy as np


@functools.lru_cache(maxsize=1)
def classifier():
    """The SVC fitted on all real digits (deterministic; cached for the process)."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    d = load_digits()
    return SVC(gamma=0.001, C=10.0).fit(d.data, d.target)


def digit_windows(frames: np.ndarray, scale: int) -> np.ndarray:
    """uint8 frames [n, S, S] (or [n, S, S, 1]) -> [n, 64] in the digits' 0..16 scale: the
    `8 * scale` window with the most ink, average-pooled to 8x8."""
    frames = np.asarray(frames)
    if frames.ndim == 4:
        if frames.shape[-1] != 1:
            raise ValueError(f"digit frames must be gray, got {frames.shape[-1]} channels")
        frames = frames[..., 0]
    if frames.ndim != 3 or frames.shape[1] != frames.shape[2]:
        raise ValueError(f"digit frames must be [n, S, S], got shape {frames.shape}")
    size = 8 * scale
    canvas = frames.shape[1]
    if canvas < size:
        raise ValueError(f"frames of {canvas} px cannot hold a digit of {size} px "
                         f"(scale={scale})")
    value = frames.astype(np.float64) * (16.0 / 255.0)
    room = canvas - size
    # Ink of every window position by a summed-area table.
    table = np.pad(value.cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))
    ink = (table[:, size:, size:] - table[:, :room + 1, size:]
           - table[:, size:, :room + 1] + table[:, :room + 1, :room + 1])  # [n, room+1, room+1]
    # Several windows hold all the ink when the digit has empty border rows or columns: of
    # those, the one centred nearest the ink's centre of mass (the real digits are centred so).
    total = np.maximum(value.sum((1, 2)), 1e-9)
    grid = np.arange(canvas) + 0.5
    cy = (value.sum(2) * grid).sum(1) / total
    cx = (value.sum(1) * grid).sum(1) / total
    offsets = np.arange(room + 1) + size / 2
    dist = (offsets[None, :, None] - cy[:, None, None]) ** 2 + \
        (offsets[None, None, :] - cx[:, None, None]) ** 2
    full = ink >= ink.reshape(len(frames), -1).max(1)[:, None, None] * 0.98
    best = np.where(full, dist, np.inf).reshape(len(frames), -1).argmin(1)
    rows, cols = np.divmod(best, room + 1)
    out = np.empty((len(frames), 8, 8))
    for i, (r, c) in enumerate(zip(rows, cols)):
        window = value[i, r:r + size, c:c + size]
        out[i] = window.reshape(8, scale, 8, scale).mean((1, 3))
    return out.reshape(len(frames), 64)


def predict(frames: np.ndarray, scale: int = 2) -> np.ndarray:
    """The classifier's digit for every frame [n, S, S(, 1)] (uint8) -> int [n]."""
    return classifier().predict(digit_windows(frames, scale))


def accuracy(samples: np.ndarray, labels: np.ndarray, scale: int = 2) -> Dict[str, float]:
    """samples: uint8 images [N, S, S(, 1)] or clips [N, F, S, S(, 1)]; labels [N]."""
    samples, labels = np.asarray(samples), np.asarray(labels)
    clips = samples.ndim == 5 or (samples.ndim == 4 and samples.shape[-1] != 1)
    if not clips:
        samples = samples[:, None]
    n, f = samples.shape[:2]
    if labels.shape != (n,):
        raise ValueError(f"labels must be [N] = [{n}], got shape {labels.shape}")
    pred = predict(samples.reshape((n * f,) + samples.shape[2:]), scale).reshape(n, f)
    out = {"frame_accuracy": float((pred == labels[:, None]).mean()), "samples": int(n)}
    if clips:
        votes = np.array([np.bincount(p, minlength=10).argmax() for p in pred])
        out.update(clip_accuracy=float((votes == labels).mean()),
                   consistent_clips=float((pred == pred[:, :1]).all(1).mean()),
                   frames=int(f))
    return out


def main(argv=None) -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="digit accuracy of sample-mode .npz files")
    ap.add_argument("npz", nargs="+")
    ap.add_argument("--scale", type=int, default=2, help="digit upsampling of the data (2: 16 px)")
    args = ap.parse_args(argv)
    for path in args.npz:
        with np.load(path) as f:
            if "arr_1" not in f:
                raise SystemExit(f"{path} has no labels (arr_1): write it with sample mode")
            print(path, json.dumps(accuracy(f["arr_0"], f["arr_1"], args.scale)))


__all__ = ["classifier", "digit_windows", "predict", "accuracy"]

if __name__ == "__main__":
    main()
