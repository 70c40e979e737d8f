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


# A diffusers AutoencoderKL small enough for CPU tests (VAE downsampling 2, 4 latent channels).
TINY_VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
    "block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4,
    "norm_num_groups": 4, "act_fn": "silu", "scaling_factor": 0.18215,
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
}


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A diffusers-layout folder (config.json + safetensors) of TINY_VAE with random weights."""
    import json

    from flax import traverse_util
    from safetensors.numpy import save_file

    from dydit_jax import convert_vae

    folder = tmp_path_factory.mktemp("tiny_vae")
    (folder / "config.json").write_text(json.dumps(TINY_VAE))
    model = convert_vae.vae_from_config(TINY_VAE)
    rng = np.random.default_rng(0)
    state = {}
    for path, leaf in traverse_util.flatten_dict(convert_vae.abstract_params(model)).items():
        shape = convert_vae._torch_shape(leaf.shape, convert_vae._layout(leaf))
        value = rng.normal(0, 0.1, shape) + (1.0 if path[-1] == "scale" else 0.0)
        state[convert_vae.diffusers_name(path)] = value.astype(np.float32)
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def load_npz(*parts):
    with np.load(DATA.joinpath(*parts)) as f:
        return {k: f[k] for k in f.files}


ROOT = DATA.parent.parent


def load_config(name: str, arg=None):
    """`configs/<name>.py`'s get_config(arg)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def run_python(code: str, devices: int = 1, timeout: int = 600, check: bool = True):
    """Runs `code` in a fresh interpreter with `devices` simulated CPU devices.

    Device count and x64 are process-global in JAX, so multi-device tests run in subprocesses.
    Returns the CompletedProcess; with check=True a non-zero exit fails with its output.
    """
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(ROOT), env=env, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"subprocess failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch


class CompileCounter:
    """Counts XLA backend compiles while active (jax.monitoring): all of them, or with `name`
    only those of functions whose name contains it."""

    def __init__(self, name=None):
        self.name, self.count = name, 0

    def __call__(self, event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT and (
                self.name is None or self.name in str(kwargs.get("fun_name", ""))):
            self.count += 1

    def __enter__(self):
        import jax
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        import jax
        jax.monitoring.unregister_event_duration_listener(self)
