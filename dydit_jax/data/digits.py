"""scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), for smoke training.

Config keys (``config.data``): ``image_size`` (a multiple of 8, normally 16 or 32),
``channels`` (1 or 3, gray repeated), ``resize`` ("nearest", the default, or
"bilinear"), ``random_flip`` (default False: digits are not mirror-symmetric),
``seed``, ``shuffle``.

Upsampling: **nearest** by default. The digits have 17 gray levels (0..16) on an
8x8 grid; integer-factor nearest upsampling (each pixel becomes a
``k x k`` block, ``k = image_size / 8``) keeps those exact values, adds no
interpolation ringing and is invertible by average pooling. ``resize="bilinear"``
uses PIL's bilinear filter on the float image instead (smoother, values between
the levels). Values map ``v -> v / 8 - 1``, i.e. 0 -> -1 and 16 -> 1.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from dydit_jax.data import base

NUM_CLASSES = 10   # labels 0..9


def load_digits_array(image_size: int, channels: int = 1, resize: str = "nearest"):
    """All 1797 digits as ``(float32 [n, S, S, channels] in [-1, 1], int32 [n])``."""
    from sklearn.datasets import load_digits

    if image_size <= 0 or image_size % 8:
        raise ValueError(f"digits image_size must be a positive multiple of 8, got {image_size}")
    if channels not in (1, 3):
        raise ValueError(f"digits channels must be 1 or 3, got {channels}")
    d = load_digits()
    imgs = d.images.astype(np.float32)  # [n, 8, 8], values 0..16
    k = image_size // 8
    if resize == "nearest":
        imgs = np.repeat(np.repeat(imgs, k, axis=1), k, axis=2)
    elif resize == "bilinear":
        imgs = np.stack(
            [
                np.asarray(
                    Image.fromarray(im).resize(
                        (image_size, image_size), resample=Image.BILINEAR
                    )
                )
                for im in imgs
            ]
        )
    else:
        raise ValueError(f"digits resize must be 'nearest' or 'bilinear', got {resize!r}")
    imgs = np.clip(imgs / np.float32(8.0) - np.float32(1.0), -1.0, 1.0).astype(np.float32)
    imgs = np.repeat(imgs[..., None], channels, axis=-1)
    return np.ascontiguousarray(imgs), d.target.astype(np.int32)


class DigitsSource(base.DataSource):
    name = "digits"

    def __init__(self, cfg, *, process_index: int, process_count: int, local_batch_size: int):
        image_size = int(base.cfg_get(cfg, "image_size", 32))
        channels = int(base.cfg_get(cfg, "channels", 1))
        self._images, self._labels = load_digits_array(
            image_size, channels, str(base.cfg_get(cfg, "resize", "nearest"))
        )
        self.random_flip = bool(base.cfg_get(cfg, "random_flip", False))
        self.image_shape = (image_size, image_size, channels)
        self.num_classes = NUM_CLASSES
        self.sampler = base.EpochSampler(
            len(self._labels),
            local_batch_size,
            seed=base.cfg_get(cfg, "seed", 0),
            shuffle=bool(base.cfg_get(cfg, "shuffle", True)),
            process_index=process_index,
            process_count=process_count,
        )
        super().__init__(num_workers=0, prefetch=0)

    def _load_batch(self, indices, epoch, seed):
        images = self._images[indices]
        if self.random_flip:
            flip = base.flip_mask(seed, epoch, indices)
            images[flip] = images[flip, :, ::-1]
        return {"image": images, "label": self._labels[indices]}
