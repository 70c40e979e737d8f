"""Shared test setup.

Tests run on CPU. Sharding tests run in subprocesses with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (see `run_with_devices`), so the main
pytest process keeps a single device and its compile caches stay small.
"""
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Parity tests need float32 matmuls at full precision (the CPU default, made explicit).
jax.config.update("jax_default_matmul_precision", "highest")

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir():
    return DATA


def load_npz(*parts):
    with np.load(DATA.joinpath(*parts)) as f:
        return {k: f[k] for k in f.files}
