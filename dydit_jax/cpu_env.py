"""Process settings that make XLA:CPU training faster: glibc's malloc keeps freed memory.

XLA:CPU allocates each train step's temporary buffers afresh (DiT-B/2 at batch 8: 2.8 GB per
step) and glibc serves allocations that large with a fresh `mmap` (and returns them with
`munmap`), so every step page-faults all of that memory in again: 730k faults per step,
measured with `getrusage` around single steps on a 2-core VM (ad-hoc script), costing 1.1-7.5 s of system time per step (the
price of a fault varied 5x with what else the machine's memory had held; the step's compute
is ~3.2 s). With glibc's tunables

    glibc.malloc.mmap_threshold=1 TiB   (large blocks come from the heap, not from mmap)
    glibc.malloc.trim_threshold=1 TiB   (freed heap memory is kept, not returned to the OS)
    glibc.malloc.arena_max=1            (XLA's worker threads allocate from that one heap)

the second and later steps fault nothing: DiT-B/2 train step 3.2-3.7 s instead of 3.7-6.8 s
(same values; `benchmarks/vs_pytorch.py`, BENCHMARKS.md). The cost: the process keeps its peak
memory until it exits (what a training process does anyway). `glibc.malloc.hugetlb=1` (THP
for large mappings) alone cut the faults 25x but not the system time in the shared-memory
case, so it is not used.

The tunables are read when the process starts, so `python -m dydit_jax.main` re-executes itself
once with them set (`reexec_with_malloc_tunables`) on Linux with glibc, unless GLIBC_TUNABLES
already sets any glibc.malloc tunable (the user's choice wins) or
`DYDIT_JAX_MALLOC_TUNABLES=0`. Calling the API from your own process: start Python with
`GLIBC_TUNABLES=` set to `TUNABLES` below.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Optional

TUNABLES = ("glibc.malloc.mmap_threshold=1099511627776:glibc.malloc.trim_threshold=1099511627776:"
            "glibc.malloc.arena_max=1")
OPT_OUT = "DYDIT_JAX_MALLOC_TUNABLES"


def tuned_environment(environ: Mapping[str, str]) -> Optional[dict]:
    """The environment to re-execute with, or None when nothing is to be done: not Linux with
    glibc, opted out (`DYDIT_JAX_MALLOC_TUNABLES=0`), or any glibc.malloc tunable already set
    (by the user, or by the re-execution itself)."""
    if environ.get(OPT_OUT, "1") == "0":
        return None
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in current:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLES}" if current else TUNABLES
    return env


def reexec_with_malloc_tunables() -> None:
    """Replace this process by the same command line with the malloc tunable set (see the
    module docstring). Returns only when nothing is to be done. Call it first thing in an
    entry point, before anything (jax, data) is loaded."""
    env = tuned_environment(os.environ)
    if env is None:
        return
    argv = list(getattr(sys, "orig_argv", [])) or [sys.executable] + sys.argv
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + argv[1:], env)
