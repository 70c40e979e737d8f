"""scikit-learn's digits with a caption each, for text-to-image (FLUX) on CPU.

A caption names the digit and two attributes measured from the image itself, so that the
text carries information the model can learn beyond the class:
- stroke weight: "thin" / "bold" when the ink (sum of gray levels) is in the lower / upper
  third of the digit's class, nothing in between;
- slant: "slanted" when the ink's principal axis leans more than ~11 degrees (the sign is
  ignored: a handful of the 8x8 digits lean left).
Templates: "a {weight} handwritten {word}", "the digit {word}, {weight}" and "a {weight}
{word}", with "slanted" in front of the word; the template is fixed by the example's index,
so the same image always gets the same caption. Every word any caption uses is in `WORDS`,
from which the demo's word-level tokenizer is built (`text_conditioning.word_tokenizer`).

Batches: {"image": float32 [b, S, S, C] in [-1, 1] (as `digits`), "label": int32 [b] (the
digit), "caption": int32 [b] (an index into `source.captions`; `source.caption_ids` [N]
holds every example's)}. The text embeddings of the captions are added on the host by
`text_conditioning.BatchConditioner` (train.py), once per distinct caption. Keys of
``config.data``: those of `digits` (image_size, channels, resize, seed, shuffle; no flips: a
mirrored digit would contradict its caption).
"""
from __future__ import annotations

from typing import List

import numpy as np

from dydit_jax.data import base
from dydit_jax.data.digits import NUM_CLASSES, load_digits_array

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a {weight}handwritten {slant}{word}", "the digit {slant}{word}, {weight}",
             "a {weight}{slant}{word}")
WORDS = tuple(sorted(set(DIGIT_WORDS) | {"a", "the", "digit", "handwritten", "thin", "bold",
                                         "slanted", ","}))
SLANT_THRESHOLD = 0.2   # |d col / d row| of the principal axis (tan ~11 degrees)


def attributes(images8: np.ndarray, labels: np.ndarray):
    """(weight [n] in {"thin", "", "bold"}, slanted [n] bool) of the raw 8x8 digits (0..16)."""
    ink = images8.reshape(len(images8), -1).sum(axis=1)
    weight = np.full(len(images8), "", dtype=object)
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        lo, hi = np.quantile(ink[idx], [1 / 3, 2 / 3])
        weight[idx[ink[idx] < lo]] = "thin"
        weight[idx[ink[idx] > hi]] = "bold"
    rows, cols = np.mgrid[0:8, 0:8].astype(np.float64)
    w = images8.astype(np.float64)
    total = w.sum(axis=(1, 2))
    mr = (w * rows).sum(axis=(1, 2)) / total
    mc = (w * cols).sum(axis=(1, 2)) / total
    dr, dc = rows[None] - mr[:, None, None], cols[None] - mc[:, None, None]
    crr = (w * dr * dr).sum(axis=(1, 2))
    crc = (w * dr * dc).sum(axis=(1, 2))
    # Regression of column on row: how far the ink moves sideways per row.
    slanted = np.abs(crc / np.maximum(crr, 1e-9)) > SLANT_THRESHOLD
    return weight, slanted


def caption(label: int, weight: str, slanted: bool, index: int) -> str:
    """The caption of one digit: the template of `index`, or the first template when the
    digit has no weight word (the others would read "a one" / "the digit one, ")."""
    template = TEMPLATES[index % len(TEMPLATES)] if weight else TEMPLATES[0]
    spaced = f"{weight} " if weight else ""
    return template.format(weight=weight if template == TEMPLATES[1] else spaced,
                           slant="slanted " if slanted else "", word=DIGIT_WORDS[label])


def digit_captions() -> List[str]:
    """The caption of each of the 1797 digits, in the dataset's order."""
    from sklearn.datasets import load_digits
    d = load_digits()
    weight, slanted = attributes(d.images, d.target)
    return [caption(int(y), str(w), bool(s), i)
            for i, (y, w, s) in enumerate(zip(d.target, weight, slanted))]


def prompts_for_digits(digits=range(NUM_CLASSES), weight: str = "") -> List[str]:
    """Plain prompts in the captions' first template ("a handwritten seven")."""
    return [caption(int(d), weight, False, 0) for d in digits]


class CaptionedDigitsSource(base.DataSource):
    name = "captioned_digits"

    def __init__(self, cfg, *, process_index: int, process_count: int, local_batch_size: int):
        image_size = int(base.cfg_get(cfg, "image_size", 16))
        channels = int(base.cfg_get(cfg, "channels", 1))
        if bool(base.cfg_get(cfg, "random_flip", False)):
            raise ValueError("captioned_digits takes no random_flip: a mirrored digit would not "
                             "match its caption (set config.data.random_flip=False)")
        self._images, self._labels = load_digits_array(
            image_size, channels, str(base.cfg_get(cfg, "resize", "nearest")))
        texts = digit_captions()
        self.captions = sorted(set(texts))
        index = {c: i for i, c in enumerate(self.captions)}
        self.caption_ids = np.asarray([index[c] for c in texts], np.int32)
        self.image_shape = (image_size, image_size, channels)
        self.num_classes = NUM_CLASSES
        self.sampler = base.EpochSampler(
            len(self._labels), local_batch_size, seed=base.cfg_get(cfg, "seed", 0),
            shuffle=bool(base.cfg_get(cfg, "shuffle", True)), process_index=process_index,
            process_count=process_count)
        super().__init__(num_workers=0, prefetch=0)

    def _load_batch(self, indices, epoch, seed):
        return {"image": self._images[indices], "label": self._labels[indices],
                "caption": self.caption_ids[indices]}
