"""Clips of decoded videos: temporal sampling and Latte's preprocessing, shared by the video
sources that read real videos (``ucf101``, ``video_folder``).

A clip is ``num_frames`` frames ``frame_stride`` apart (Latte's UCF-101 setting: 16 frames,
stride 3). Its start in a video of ``T`` frames is uniform over the ``T - span + 1`` possible
starts (``span = (num_frames - 1) * frame_stride + 1``), drawn with
:func:`base.uniform_from_keys` from ``(seed, epoch, example index)``: each epoch sees a new
clip of every video, and the clip is a pure function of those keys, so resuming, prefetching
and the host count change nothing. A video shorter than ``span`` gives ``num_frames`` frames
spread over its whole length instead (``floor(linspace(0, T - 1, num_frames))``: a smaller
stride, and repeated frames when ``T < num_frames``), as Latte's sampler does for them.

Each frame is resized so that its short side is ``image_size`` (bilinear) and center-cropped
(:func:`transforms.resize_short_center_crop`); with ``random_flip`` the whole clip is mirrored
(one decision per clip, keyed like the image sources' flips). Batches are {"image": float32
[b, F, S, S, 3] in [-1, 1], "label": int32 [b]}.

Common config keys (``config.data``): ``image_size``, ``num_frames`` (default 16),
``frame_stride`` (3), ``random_flip`` (False), ``num_workers`` (decode threads, default
``min(16, cpu_count)``), ``prefetch`` (batches in flight, 2), ``seed``, ``shuffle``.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from dydit_jax.data import base, transforms

SALT_CLIP = 0x434C4950  # "CLIP": keys the clip start in each video

# (frame count T) -> the T-based frame indices [num_frames] of the clip to read.
ChooseFrames = Callable[[int], np.ndarray]


def clip_indices(length: int, num_frames: int, frame_stride: int, u: float) -> np.ndarray:
    """Frame indices int64 [num_frames] of the clip of a ``length``-frame video picked by
    ``u`` in [0, 1) (see the module docstring)."""
    if length < 1:
        raise ValueError(f"a video has {length} frames; need at least one")
    span = (num_frames - 1) * frame_stride + 1
    if length < span:
        return np.floor(np.linspace(0, length - 1, num_frames)).astype(np.int64)
    start = min(int(u * (length - span + 1)), length - span)
    return start + frame_stride * np.arange(num_frames, dtype=np.int64)


class ClipSource(base.DataSource):
    """Clips of ``num_videos`` videos. A subclass sets ``num_classes``, calls
    :meth:`_init_clips` and implements ``_read_clip(index, choose) -> (frames, label)``:
    the PIL RGB frames at ``choose(T)``, the indices for the video's frame count ``T``."""

    per_example = True

    def _init_clips(self, cfg, num_videos: int, *, process_index: int, process_count: int,
                    local_batch_size: int) -> None:
        self.image_size = int(base.cfg_require(cfg, "image_size", self.name))
        self.num_frames = int(base.cfg_get(cfg, "num_frames", 16))
        self.frame_stride = int(base.cfg_get(cfg, "frame_stride", 3))
        for key, value in (("image_size", self.image_size), ("num_frames", self.num_frames),
                           ("frame_stride", self.frame_stride)):
            if value < 1:
                raise ValueError(f"config.data.{key}={value} must be >= 1 for data source "
                                 f"{self.name!r}")
        self.random_flip = bool(base.cfg_get(cfg, "random_flip", False))
        self.image_shape = (self.num_frames, self.image_size, self.image_size, 3)
        self.sampler = base.EpochSampler(
            num_videos, local_batch_size, seed=base.cfg_get(cfg, "seed", 0),
            shuffle=bool(base.cfg_get(cfg, "shuffle", True)),
            process_index=process_index, process_count=process_count)
        num_workers = base.cfg_get(cfg, "num_workers", None)
        if num_workers is None:
            num_workers = min(16, os.cpu_count() or 1)
        super().__init__(num_workers=num_workers, prefetch=int(base.cfg_get(cfg, "prefetch", 2)))

    def choose_frames(self, index: int, epoch: int, seed: int) -> ChooseFrames:
        """``T -> frame indices`` of example ``index``'s clip in ``epoch``."""
        u = float(base.uniform_from_keys(SALT_CLIP, seed, epoch, index))
        return lambda length: clip_indices(length, self.num_frames, self.frame_stride, u)

    def _load_example(self, index, epoch, seed):
        frames, label = self._read_clip(index, self.choose_frames(index, epoch, seed))
        clip = np.stack([transforms.resize_short_center_crop(f, self.image_size)
                         for f in frames])
        if self.random_flip and base.flip_mask(seed, epoch, index):
            clip = clip[:, :, ::-1]
        return transforms.uint8_to_unit(clip), int(label)

    def _read_clip(self, index: int, choose: ChooseFrames
                   ) -> tuple[Sequence[Image.Image], int]:
        raise NotImplementedError
