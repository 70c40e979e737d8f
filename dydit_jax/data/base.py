"""Deterministic, resumable, host-sharded batching shared by all sources.

Ordering model
--------------
A source wraps a random-access collection of ``N`` examples (``N`` is global, or
this host's share when the backend already split the data per host, see
``imagenet``'s ``host_split``). :class:`EpochSampler` decides which example
indices make up each batch:

* epoch ``e`` uses the permutation ``perm_e`` drawn from
  ``SeedSequence([seed, e])`` (or ``arange(N)`` when ``shuffle=False``);
* the global batch size is ``G = local_batch_size * process_count`` and an epoch
  has ``steps_per_epoch = N // G`` steps (the tail ``N % G`` examples of each
  epoch's permutation are dropped, a different tail every epoch);
* at step ``s`` host ``p`` takes ``perm_e[s*G + p*b : s*G + (p+1)*b]``.

So hosts see disjoint slices of each epoch's permutation, every host runs the
same number of steps, and the *global* batch at step ``s`` is
``perm_e[s*G:(s+1)*G]`` whatever the number of hosts.

A batch is a pure function of ``(seed, epoch, step)``, which makes resumption
exact: the state is ``{"epoch", "index", "seed", ...}`` where ``index`` is the
number of batches already returned in ``epoch``. Background prefetching
(threads) computes the same pure function ahead of time and is discarded on
``set_state``.

Per-example randomness (flips) is keyed by ``(seed, epoch, example_key)`` with a
counter-based hash (:func:`uniform_from_keys`), so it does not depend on batch
size, host count, prefetching or thread scheduling.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]
logger = logging.getLogger(__name__)

# Salts keep the independent random streams (permutation, flips, synthetic data) apart.
SALT_PERMUTATION = 0x5045524D  # "PERM"
SALT_FLIP = 0x464C4950  # "FLIP"
SALT_SYNTHETIC = 0x53594E54  # "SYNT"

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg.get(key, default)`` for ConfigDict / dict / plain attribute objects."""
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        try:
            return cfg.get(key, default)
        except (KeyError, AttributeError):  # pragma: no cover - defensive
            return default
    return getattr(cfg, key, default)


def cfg_require(cfg: Any, key: str, source: str) -> Any:
    value = cfg_get(cfg, key, None)
    if value is None:
        raise ValueError(f"config.data.{key} is required for data source {source!r}")
    return value


def _check_seed(seed: Any) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"config.data.seed must be a non-negative int, got {seed!r}")
    if seed < 0:
        raise ValueError(f"config.data.seed must be non-negative, got {seed}")
    return int(seed)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def hash_keys(*keys: Any) -> np.ndarray:
    """Deterministic 64-bit hash of integer keys (scalars or broadcastable arrays)."""
    arrays = np.broadcast_arrays(*[np.asarray(k, dtype=np.int64).astype(np.uint64) for k in keys])
    h = np.zeros(arrays[0].shape, np.uint64)
    for a in arrays:
        h = _splitmix64(h ^ a)
    return h


def uniform_from_keys(*keys: Any) -> np.ndarray:
    """Uniform float64 in [0, 1) per element, a pure function of the integer keys."""
    return (hash_keys(*keys) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def flip_mask(seed: int, epoch: int, example_keys: np.ndarray) -> np.ndarray:
    """Random horizontal-flip decision per example (prob. 1/2), keyed by seed/epoch/example."""
    return uniform_from_keys(SALT_FLIP, seed, epoch, example_keys) < 0.5


class EpochSampler:
    """Which example indices form host ``process_index``'s batch ``step`` of ``epoch``."""

    def __init__(
        self,
        num_examples: int,
        local_batch_size: int,
        *,
        seed: int,
        shuffle: bool,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if local_batch_size is None or int(local_batch_size) <= 0:
            raise ValueError(f"local_batch_size must be a positive int, got {local_batch_size!r}")
        if int(process_count) <= 0 or not 0 <= int(process_index) < int(process_count):
            raise ValueError(
                f"need 0 <= process_index < process_count, got {process_index}/{process_count}"
            )
        self.num_examples = int(num_examples)
        self.local_batch_size = int(local_batch_size)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.global_batch_size = self.local_batch_size * self.process_count
        self.seed = _check_seed(seed)
        self.shuffle = bool(shuffle)
        self.steps_per_epoch = self.num_examples // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"dataset has {self.num_examples} examples, fewer than one global batch "
                f"({self.local_batch_size} x {self.process_count} processes = "
                f"{self.global_batch_size})"
            )
        self._perm_cache: tuple[tuple[int, int], np.ndarray] | None = None

    def permutation(self, epoch: int, seed: int | None = None) -> np.ndarray:
        seed = self.seed if seed is None else seed
        if not self.shuffle:
            return np.arange(self.num_examples, dtype=np.int64)
        cache = self._perm_cache
        if cache is not None and cache[0] == (seed, epoch):
            return cache[1]
        rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([SALT_PERMUTATION, seed, int(epoch)]))
        )
        perm = rng.permutation(self.num_examples).astype(np.int64)
        self._perm_cache = ((seed, epoch), perm)
        return perm

    def indices(self, epoch: int, step: int, seed: int | None = None) -> np.ndarray:
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} out of range [0, {self.steps_per_epoch})")
        start = step * self.global_batch_size + self.process_index * self.local_batch_size
        return self.permutation(epoch, seed)[start : start + self.local_batch_size]


class DataSource:
    """Base class: iterator of batches with exact ``get_state`` / ``set_state``.

    Subclasses provide ``self.sampler``, ``image_shape`` and ``num_classes``, and
    implement either ``_load_batch(indices, epoch, seed) -> Batch`` (vectorized) or
    ``_load_example(index, epoch, seed) -> (image, label)`` (per example, run in a
    thread pool when ``num_workers > 0``).
    """

    name: str = "base"
    image_shape: tuple[int, int, int]
    num_classes: int
    sampler: EpochSampler
    per_example: bool = False

    def __init__(self, *, num_workers: int = 0, prefetch: int = 0):
        self._epoch = 0
        self._index = 0
        self._seed = self.sampler.seed
        self.num_workers = max(0, int(num_workers))
        self.prefetch = max(0, int(prefetch))
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        if self.num_workers > 0:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.num_workers, thread_name_prefix=f"dydit-data-{self.name}"
            )
        # Queue of ((epoch, index, seed), result_getter) for upcoming batches.
        self._pending: collections.deque[tuple[tuple[int, int, int], Callable[[], Batch]]] = (
            collections.deque()
        )

    # ---------------------------------------------------------------- public API
    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def num_examples(self) -> int:
        """Examples the sampler draws from (global, or this host's share for tfds host splits)."""
        return self.sampler.num_examples

    @property
    def local_batch_size(self) -> int:
        return self.sampler.local_batch_size

    def next(self) -> Batch:
        pos = (self._epoch, self._index, self._seed)
        while self._pending and self._pending[0][0] != pos:  # stale (should not happen)
            self._pending.popleft()
        if not self._pending:
            self._pending.append((pos, self._submit(*pos)))
        _, getter = self._pending.popleft()
        self._advance()
        self._fill_prefetch()
        return getter()

    __next__ = next

    def __iter__(self):
        return self

    def get_state(self) -> dict[str, int]:
        """JSON-able position: the next ``next()`` returns batch ``index`` of ``epoch``."""
        return {
            "epoch": int(self._epoch),
            "index": int(self._index),
            "seed": int(self._seed),
            "num_examples": int(self.sampler.num_examples),
            "global_batch_size": int(self.sampler.global_batch_size),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore a position saved by ``get_state`` (exact resume)."""
        missing = {"epoch", "index"} - set(state)
        if missing:
            raise ValueError(f"data state {dict(state)!r} lacks keys {sorted(missing)}")
        for key, have in (
            ("num_examples", self.sampler.num_examples),
            ("global_batch_size", self.sampler.global_batch_size),
        ):
            if key in state and int(state[key]) != have:
                raise ValueError(
                    f"cannot resume exactly: saved data state has {key}={state[key]} but this "
                    f"source has {key}={have} (dataset, batch size or host split changed)"
                )
        epoch, index = int(state["epoch"]), int(state["index"])
        seed = _check_seed(int(state.get("seed", self._seed)))
        if seed != self.sampler.seed:
            logger.warning(
                "data state seed %d differs from config.data.seed %d; following the state",
                seed,
                self.sampler.seed,
            )
        if epoch < 0 or not 0 <= index <= self.steps_per_epoch:
            raise ValueError(f"invalid data state epoch={epoch} index={index}")
        self._cancel_pending()
        self._epoch, self._index, self._seed = epoch, index, seed
        if self._index == self.steps_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0

    def close(self) -> None:
        self._cancel_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def batch_indices(self, epoch: int, index: int) -> np.ndarray:
        """Indices (into this source's examples) of batch ``index`` of ``epoch``."""
        return self.sampler.indices(epoch, index, self._seed)

    # ---------------------------------------------------------------- internals
    def _advance(self) -> None:
        self._index += 1
        if self._index >= self.steps_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0

    def _positions_after(self, n: int):
        epoch, index = self._epoch, self._index
        for _ in range(n):
            yield (epoch, index, self._seed)
            index += 1
            if index >= self.steps_per_epoch:
                epoch, index = epoch + 1, 0

    def _fill_prefetch(self) -> None:
        if self._pool is None or self.prefetch == 0:
            return
        have = {p for p, _ in self._pending}
        for pos in self._positions_after(self.prefetch):
            if pos not in have:
                self._pending.append((pos, self._submit(*pos)))

    def _cancel_pending(self) -> None:
        while self._pending:
            _, getter = self._pending.popleft()
            cancel = getattr(getter, "cancel", None)
            if cancel is not None:
                cancel()

    def _submit(self, epoch: int, index: int, seed: int) -> Callable[[], Batch]:
        idx = self.sampler.indices(epoch, index, seed)
        if self._pool is None:
            if self.per_example:
                batch = self._collate([self._load_example(int(i), epoch, seed) for i in idx])
            else:
                batch = self._load_batch(idx, epoch, seed)
            return _Ready(batch)
        if self.per_example:
            futures = [self._pool.submit(self._load_example, int(i), epoch, seed) for i in idx]
            return _Gather(futures, self._collate)
        return _Gather([self._pool.submit(self._load_batch, idx, epoch, seed)], lambda r: r[0])

    @staticmethod
    def _collate(examples: Sequence[tuple[np.ndarray, int]]) -> Batch:
        return {
            "image": np.stack([e[0] for e in examples]).astype(np.float32, copy=False),
            "label": np.asarray([e[1] for e in examples], dtype=np.int32),
        }

    def _load_batch(self, indices: np.ndarray, epoch: int, seed: int) -> Batch:
        raise NotImplementedError

    def _load_example(self, index: int, epoch: int, seed: int) -> tuple[np.ndarray, int]:
        raise NotImplementedError


class _Ready:
    def __init__(self, batch: Batch):
        self._batch = batch

    def __call__(self) -> Batch:
        return self._batch


class _Gather:
    def __init__(self, futures, combine):
        self._futures = futures
        self._combine = combine

    def __call__(self) -> Batch:
        return self._combine([f.result() for f in self._futures])

    def cancel(self) -> None:
        for f in self._futures:
            f.cancel()
