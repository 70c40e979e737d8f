"""Moving digits: short videos made from scikit-learn's 8x8 digits (the embedded video default).

Clip i shows digit image i mod 1797 (class = the digit) moving in a straight line over
`num_frames` frames on an `image_size` x `image_size` canvas and bouncing off its walls. Its
start position and velocity are a pure function of (`seed`, i), so the same index always gives
the same clip, on any host and after any restart (the ordering and resume come from
`base.EpochSampler`, as for the image sources).

Config keys (``config.data``): ``image_size`` (canvas, default 16), ``num_frames`` (8),
``digit_scale`` (1: the native 8x8 digit; 2: 16x16, nearest), ``num_examples`` (clips per
epoch, default 1797: every digit image once), ``max_speed`` (pixels per frame, 1.5),
``motion_step`` (1: positions on the pixel grid; k: on a grid of k pixels, e.g. 2 with
``digit_scale=2``, so that every upsampled source pixel stays aligned with a 2x2 patch),
``channels`` (1 or 3), ``seed``, ``shuffle``. Values as the digits source: background -1,
the digit's 17 gray levels mapped v -> v / 8 - 1; batches are {"image": float32
[b, F, S, S, C], "label": int32 [b]}.
"""
from __future__ import annotations

import numpy as np

from dydit_jax.data import base
from dydit_jax.data.digits import NUM_CLASSES, load_digits_array

SALT_MOTION = 0x6D6F7665   # "move": keys the start positions and velocities


def trajectories(seed: int, clips: np.ndarray, num_frames: int, room: int,
                 max_speed: float) -> np.ndarray:
    """Integer top-left corners [n, F, 2] (row, col) in [0, room] of each clip's digit:
    a uniform start and a velocity of up to `max_speed` per axis, reflected at the walls."""
    u = [base.uniform_from_keys(SALT_MOTION, seed, clips, k) for k in range(4)]
    start = np.stack([u[0], u[1]], -1) * room                       # [n, 2]
    speed = (np.stack([u[2], u[3]], -1) * 2 - 1) * max_speed        # [n, 2]
    steps = np.arange(num_frames, dtype=np.float64)[None, :, None]
    path = start[:, None] + speed[:, None] * steps                  # unfolded [n, F, 2]
    if room == 0:
        return np.zeros(path.shape, np.int64)
    period = 2 * room
    folded = np.mod(path, period)
    folded = np.where(folded > room, period - folded, folded)       # bounce
    return np.rint(folded).astype(np.int64)


def render(digits: np.ndarray, corners: np.ndarray, canvas: int) -> np.ndarray:
    """Digits [n, d, d, C] placed at corners [n, F, 2] on a -1 canvas -> [n, F, S, S, C]."""
    n, d = digits.shape[0], digits.shape[1]
    f = corners.shape[1]
    out = np.full((n, f, canvas, canvas, digits.shape[-1]), -1.0, np.float32)
    for i in range(n):
        for j in range(f):
            r, c = corners[i, j]
            out[i, j, r:r + d, c:c + d] = digits[i]
    return out


class MovingDigitsSource(base.DataSource):
    name = "moving_digits"

    def __init__(self, cfg, *, process_index: int, process_count: int, local_batch_size: int):
        self.canvas = int(base.cfg_get(cfg, "image_size", 16))
        self.num_frames = int(base.cfg_get(cfg, "num_frames", 8))
        scale = int(base.cfg_get(cfg, "digit_scale", 1))
        channels = int(base.cfg_get(cfg, "channels", 1))
        self._digits, self._labels = load_digits_array(8 * scale, channels)
        size = 8 * scale
        if self.canvas < size:
            raise ValueError(f"moving digits: image_size={self.canvas} is smaller than the "
                             f"digit ({size} px at digit_scale={scale})")
        if self.num_frames < 1:
            raise ValueError(f"moving digits: num_frames={self.num_frames} must be >= 1")
        self.room = self.canvas - size
        self.max_speed = float(base.cfg_get(cfg, "max_speed", 1.5))
        self.motion_step = int(base.cfg_get(cfg, "motion_step", 1))
        if self.motion_step < 1 or self.room % self.motion_step:
            raise ValueError(f"moving digits: motion_step={self.motion_step} must be >= 1 and "
                             f"divide the room the digit has ({self.room} px = image_size "
                             f"{self.canvas} - digit {size}); change image_size or motion_step")
        self.seed = base._check_seed(base.cfg_get(cfg, "seed", 0))
        num = int(base.cfg_get(cfg, "num_examples", len(self._labels)) or len(self._labels))
        self._num_clips = num
        self.image_shape = (self.num_frames, self.canvas, self.canvas, channels)
        self.num_classes = NUM_CLASSES
        self.sampler = base.EpochSampler(
            num, local_batch_size, seed=self.seed,
            shuffle=bool(base.cfg_get(cfg, "shuffle", True)),
            process_index=process_index, process_count=process_count)
        super().__init__(num_workers=0, prefetch=0)

    def clips(self, indices) -> dict:
        """The clips of example indices (a pure function of the indices and the seed)."""
        indices = np.asarray(indices, np.int64)
        which = indices % len(self._labels)
        # The path is drawn on the coarse grid of motion_step pixels (speed in pixels, too).
        step = self.motion_step
        corners = step * trajectories(self.seed, indices, self.num_frames, self.room // step,
                                      self.max_speed / step)
        return {"image": render(self._digits[which], corners, self.canvas),
                "label": self._labels[which]}

    def _load_batch(self, indices, epoch, seed):
        return self.clips(indices)
