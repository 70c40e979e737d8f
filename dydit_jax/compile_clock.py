"""Compile-time accounting and the persistent compilation cache of a command-line run.

`CompileClock` adds up what JAX reports through `jax.monitoring` while it is open: tracing,
lowering and backend compilation, and the time spent reading executables back from the
persistent cache. Sample mode subtracts it from the wall time, so "sampling time" and
images/s are the warm figures whatever the engine and however many executables it compiles.

`persistent_cache(directory)` points JAX's persistent compilation cache at a directory for
the duration of a run and puts the previous setting back afterwards (tests run many runs in
one process). JAX keys every entry by the program's HLO, compile options and platform, so a
changed plan, model or batch size compiles afresh and an unchanged one starts warm.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional

import jax
from jax import monitoring

# Durations (seconds) JAX records for one compilation: tracing, lowering, and the backend
# step, which on a persistent-cache hit is the time to read the executable back (JAX then
# records a cache hit as well).
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class CompileClock:
    """`with CompileClock() as clock: ...`; then `clock.seconds` (compile time in the block,
    cache reads included), `clock.compiles` (executables compiled) and `clock.cache_hits`
    (executables read from the persistent cache instead)."""

    _lock = threading.Lock()
    _open: list = []
    _registered = False

    def __init__(self):
        self.seconds = 0.0
        self.backend_steps = 0
        self.cache_hits = 0

    @property
    def compiles(self) -> int:
        return self.backend_steps - self.cache_hits

    @classmethod
    def _on_duration(cls, event: str, seconds: float, **_):
        if event in COMPILE_EVENTS:
            for clock in list(cls._open):
                clock.seconds += seconds
                clock.backend_steps += event == BACKEND_EVENT

    @classmethod
    def _on_event(cls, event: str, **_):
        if event == CACHE_HIT_EVENT:
            for clock in list(cls._open):
                clock.cache_hits += 1

    def __enter__(self) -> "CompileClock":
        with CompileClock._lock:
            if not CompileClock._registered:  # jax.monitoring has no unregister: once
                monitoring.register_event_duration_secs_listener(CompileClock._on_duration)
                monitoring.register_event_listener(CompileClock._on_event)
                CompileClock._registered = True
            CompileClock._open.append(self)
        return self

    def __exit__(self, *exc):
        with CompileClock._lock:
            CompileClock._open.remove(self)
        return False


def resolve_cache_dir(setting: str, workdir: str) -> Optional[str]:
    """`config.compilation_cache_dir`: "auto" (default) -> `<workdir>/xla_cache`; "" or "none"
    -> no persistent cache; anything else is the directory itself."""
    if setting in ("", "none", None):
        return None
    if setting == "auto":
        return os.path.join(workdir, "xla_cache")
    return setting


@contextlib.contextmanager
def persistent_cache(directory: Optional[str]) -> Iterator[None]:
    """JAX's persistent compilation cache in `directory` while the block runs (None: leave
    the process's setting alone). Every executable is stored, however quick to compile: the
    point is a second run that starts warm, and the small ones add up."""
    if directory is None:
        yield
        return
    from jax.experimental.compilation_cache import compilation_cache as cc
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {name: getattr(jax.config, name) for name in names}
    if not str(directory).startswith("gs://"):
        os.makedirs(directory, exist_ok=True)
    cc.reset_cache()   # the cache binds to its directory on first use: rebind it to this one
    jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        yield
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        cc.reset_cache()
