"""Random images and labels for benchmarks (no I/O, negligible host cost).

Config keys: ``image_size``, ``channels`` (default 3; use 4 with the latent
``image_size`` to benchmark latent-space training), ``num_classes`` (default
1000), ``num_examples`` (size of the virtual epoch, default 100_000),
``pool_size`` (distinct images kept in memory, default 16), ``seed``,
``shuffle``.

Example ``i`` is image ``pool[i % pool_size]`` (uniform in [-1, 1], drawn once
from the seed) with label ``hash(seed, i) % num_classes``, so a batch costs one
gather instead of generating fresh random numbers on the host.
"""
from __future__ import annotations

import numpy as np

from dydit_jax.data import base


class SyntheticSource(base.DataSource):
    name = "synthetic"

    def __init__(self, cfg, *, process_index: int, process_count: int, local_batch_size: int):
        image_size = int(base.cfg_require(cfg, "image_size", self.name))
        channels = int(base.cfg_get(cfg, "channels", 3))
        self.num_classes = int(base.cfg_get(cfg, "num_classes", 1000))
        if self.num_classes <= 0:
            raise ValueError(f"synthetic num_classes must be positive, got {self.num_classes}")
        pool_size = max(1, int(base.cfg_get(cfg, "pool_size", 16)))
        num_examples = int(base.cfg_get(cfg, "num_examples", 100_000))
        seed = base.cfg_get(cfg, "seed", 0)
        self.image_shape = (image_size, image_size, channels)
        self.sampler = base.EpochSampler(
            num_examples,
            local_batch_size,
            seed=seed,
            shuffle=bool(base.cfg_get(cfg, "shuffle", True)),
            process_index=process_index,
            process_count=process_count,
        )
        rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([base.SALT_SYNTHETIC, self.sampler.seed]))
        )
        self._images = rng.uniform(-1.0, 1.0, (pool_size, *self.image_shape)).astype(np.float32)
        self._label_seed = self.sampler.seed
        super().__init__(num_workers=0, prefetch=0)

    def _load_batch(self, indices, epoch, seed):
        del epoch, seed  # the virtual dataset is fixed; only the order changes
        labels = base.hash_keys(base.SALT_SYNTHETIC, self._label_seed, indices) % np.uint64(
            self.num_classes
        )
        return {
            "image": np.take(self._images, indices % len(self._images), axis=0),
            "label": labels.astype(np.int32),
        }
