"""dydit_jax.sampling: one compile per sampler, CFG layout of the release, image/npz output.

The tiny golden DiT (tests/data/dit_s) has random weights, so its samples are not images (they
grow to |x| ~ 1e3 over 250 steps); the tests compare samplers with each other, not with
pictures.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import DATA, CompileCounter
from dydit_jax import convert
from dydit_jax.diffusion import create_diffusion
from dydit_jax.models import DiT
from dydit_jax.sampling import (make_grid, make_sample_fn, save_grid_png, save_npz,
                                to_uint8)
from test_dit import TINY

LABELS = np.array([1, 7, 3, 9])


@pytest.fixture(scope="module")
def tiny():
    model = DiT(**TINY)
    return model, convert.from_pytorch(DATA / "dit_s" / "model.pt", model)


@pytest.fixture(scope="module")
def ddpm250():
    return create_diffusion("250")


@pytest.fixture(scope="module")
def ddim25():
    return create_diffusion("ddim25")


# Samplers shared by several tests (each one is a compile of a few seconds on CPU).
@pytest.fixture(scope="module")
def ddpm_cfg(tiny, ddpm250):
    return make_sample_fn(tiny[0], ddpm250, sampler="ddpm")


@pytest.fixture(scope="module")
def ddim_cfg(tiny, ddim25):
    return make_sample_fn(tiny[0], ddim25, sampler="ddim", eta=0.0)


@pytest.fixture(scope="module")
def ddim_plain(tiny, ddim25):
    return make_sample_fn(tiny[0], ddim25, sampler="ddim", use_cfg=False)


def test_ddpm_cfg_250_steps_compiles_once(tiny, ddpm_cfg):
    _, variables = tiny
    sample = ddpm_cfg
    with CompileCounter("sample_impl") as compiles:
        a = sample(variables, jax.random.PRNGKey(0), LABELS, 4.0)
        assert a.shape == (4, 8, 8, 4) and a.dtype == jnp.float32
        assert compiles.count == 1 and sample.trace_count() == 1
        # New seed, label values, scale; bare params instead of variables: same program.
        b = sample(variables, jax.random.PRNGKey(1), LABELS, 1.5)
        c = sample(variables["params"], jax.random.PRNGKey(0), LABELS[::-1].copy(),
                   np.float32(4.0))
        assert sample.jitted._cache_size() == 1
        # jax-array, Python-int and list arguments: one more entry in jit's dispatch cache
        # (keyed on argument types) but the same trace and the same executable.
        d = sample(variables, jax.random.PRNGKey(0), jnp.asarray(LABELS), jnp.asarray(2.0))
        e = sample(variables, jax.random.PRNGKey(0), list(LABELS), 4)
        jax.block_until_ready((b, c, d, e))
        assert compiles.count == 1 and sample.trace_count() == 1
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    assert not np.allclose(a, b) and not np.allclose(a, c) and not np.allclose(a, d)
    np.testing.assert_array_equal(a, e)  # same inputs, same program: deterministic
    # Rows are conditioned on their own label: reversing the labels changes every row.
    assert not np.allclose(a[0], c[0]) and not np.allclose(a[3], c[3])


def test_cfg_scale_one_equals_unguided_sampler(tiny, ddpm250, ddpm_cfg):
    """uncond + 1 * (cond - uncond) = cond on the guided channels 0..2; channel 3 and the
    variance pass through from each row, so the conditional half follows the unguided
    sampler exactly (same x_T; step noise rows 0..B-1 of the [2B] draw = the [B] draw under
    the partitionable threefry, JAX's default)."""
    model, variables = tiny
    assert jax.config.jax_threefry_partitionable
    plain = make_sample_fn(model, ddpm250, use_cfg=False)
    rng = jax.random.PRNGKey(42)
    g1 = ddpm_cfg(variables, rng, LABELS, 1.0)
    p = plain(variables, rng, LABELS, 123.0)  # cfg_scale is ignored without CFG
    g4 = ddpm_cfg(variables, rng, LABELS, 4.0)
    np.testing.assert_allclose(g1, p, atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(g4) - np.asarray(p)).max() > 1e-2


def test_ddim_path(tiny, ddim25, ddim_cfg, ddim_plain):
    model, variables = tiny
    a = ddim_cfg(variables, jax.random.PRNGKey(0), LABELS, 4.0)
    b = ddim_cfg(variables, jax.random.PRNGKey(0), LABELS, 4.0)
    c = ddim_cfg(variables, jax.random.PRNGKey(0), LABELS, 1.0)
    assert a.shape == (4, 8, 8, 4) and ddim_cfg.trace_count() == 1
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(c, ddim_plain(variables, jax.random.PRNGKey(0), LABELS, 0.0),
                               atol=1e-5, rtol=1e-5)
    # eta > 0 draws step noise: same x_T as eta = 0, different trajectory.
    noisy = make_sample_fn(model, ddim25, sampler="ddim", eta=1.0)
    n0 = noisy(variables, jax.random.PRNGKey(0), LABELS, 4.0)
    assert np.all(np.isfinite(n0)) and not np.allclose(n0, a)


def test_cfg_uses_null_label_and_conditional_half(tiny, ddim25, ddim_plain):
    """At scale 0 with every eps channel guided, eps = the null-label output; DDIM (eta 0)
    ignores the variance channels, so the guided run equals an unguided run on null labels."""
    model, variables = tiny
    guided = make_sample_fn(model, ddim25, sampler="ddim", guide_channels=None)
    rng = jax.random.PRNGKey(5)
    null = np.full_like(LABELS, TINY["num_classes"])
    np.testing.assert_allclose(guided(variables, rng, LABELS, 0.0),
                               ddim_plain(variables, rng, null, 0.0), atol=1e-5, rtol=1e-5)


def test_bad_arguments(tiny, ddim25, ddim_cfg):
    model, variables = tiny
    with pytest.raises(ValueError, match="sampler"):
        make_sample_fn(model, ddim25, sampler="euler")
    with pytest.raises(ValueError, match=r"\[B\]"):
        ddim_cfg(variables, jax.random.PRNGKey(0), LABELS[None], 1.0)


_SHARDED = """
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import sys; sys.path.insert(0, "tests")
from conftest import DATA
from dydit_jax import convert
from dydit_jax.diffusion import create_diffusion
from dydit_jax.models import DiT
from dydit_jax.sampling import make_sample_fn, sample_shardings
from test_dit import TINY
assert jax.device_count() == 2, jax.devices()
model = DiT(**TINY)
v = convert.from_pytorch(DATA / "dit_s" / "model.pt", model)
diffusion = create_diffusion("ddim10")
mesh = Mesh(np.array(jax.devices()), ("data",))
sh = sample_shardings(mesh, "data")
sharded = make_sample_fn(model, diffusion, sampler="ddim", **sh)
plain = make_sample_fn(model, diffusion, sampler="ddim")
labels = np.array([1, 7, 3, 9])
a = sharded(v, jax.random.PRNGKey(0), labels, 4.0)
b = sharded(v, jax.random.PRNGKey(1), labels, 2.0)
assert a.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 4), a.sharding
assert sharded.trace_count() == 1
np.testing.assert_allclose(a, plain(v, jax.random.PRNGKey(0), labels, 4.0), atol=1e-4, rtol=1e-4)
print("ok")
"""


def test_sharded_sampling_matches_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(DATA.parent.parent))
    res = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True,
                         cwd=str(DATA.parent.parent), env=env, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


# ----------------------------------------------------------------------------------------------
# uint8, grid, npz
# ----------------------------------------------------------------------------------------------

def _release_uint8(x):
    """sample_ddp.py: torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8), float32."""
    v = np.clip(np.float32(127.5) * x.astype(np.float32) + np.float32(128.0), 0, 255)
    return np.floor(v).astype(np.uint8)


def test_to_uint8_release_formula():
    x = np.array([-1.5, -1.0, -0.999, 0.0, 1 / 255, 0.5, 0.9999, 1.0, 3.0, np.nan], np.float32)
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 0, 128, 128, 191, 255, 255, 255, 0])
    dense = np.linspace(-1.1, 1.1, 200_001, dtype=np.float32)
    np.testing.assert_array_equal(to_uint8(dense), _release_uint8(dense))
    out_jax = to_uint8(jnp.asarray(dense))
    assert isinstance(out_jax, jax.Array) and out_jax.dtype == jnp.uint8
    np.testing.assert_array_equal(out_jax, _release_uint8(dense))
    np.testing.assert_array_equal(jax.jit(to_uint8)(jnp.asarray(dense)), _release_uint8(dense))
    # save_image(normalize=True, value_range=(-1, 1)) rounds the same way up to float32 ulps.
    tv = np.floor(np.clip((np.clip(dense, -1, 1) + 1) / 2 * np.float32(255) + np.float32(0.5),
                          0, 255)).astype(np.uint8)
    diff = np.abs(tv.astype(int) - to_uint8(dense).astype(int))
    assert diff.max() <= 1 and diff.mean() < 1e-3
    img = np.random.default_rng(0).uniform(-1, 1, (2, 4, 5, 3)).astype(np.float32)
    assert to_uint8(img).shape == (2, 4, 5, 3)


def test_to_uint8_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).normal(0, 0.7, 100_000).astype(np.float32)
    ref = torch.clamp(127.5 * torch.from_numpy(x) + 128.0, 0, 255).to(torch.uint8).numpy()
    np.testing.assert_array_equal(to_uint8(x), ref)


def test_grid_layout_and_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(1, 256, (5, 6, 7, 3), dtype=np.uint8)  # no zeros: padding is visible
    grid = make_grid(imgs, nrow=2)
    # torchvision: ceil(5/2)=3 rows x 2 cols of (6+2)x(7+2) cells, plus the outer padding of 2.
    assert grid.shape == (3 * 8 + 2, 2 * 9 + 2, 3)
    for k in range(5):
        y, x = divmod(k, 2)
        np.testing.assert_array_equal(grid[y * 8 + 2: y * 8 + 8, x * 9 + 2: x * 9 + 9], imgs[k])
    assert (grid == 0).sum() == grid.size - imgs.size  # padding and the empty 6th cell
    path = save_grid_png(imgs, tmp_path / "sub" / "grid.png", nrow=2)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)
    np.testing.assert_array_equal(make_grid(imgs[:1], nrow=4), imgs[0])  # single image: as is
    assert make_grid(imgs, nrow=10).shape == (8 + 2, 5 * 9 + 2, 3)
    gray = make_grid(imgs[..., :1], nrow=5)
    assert gray.shape[-1] == 3
    with pytest.raises(TypeError, match="uint8"):
        save_grid_png(imgs.astype(np.float32), tmp_path / "bad.png", nrow=2)


def test_npz_round_trip(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    path = save_npz(imgs, tmp_path / "samples", labels=[5, 0, 999])
    assert path.endswith("samples.npz")
    with np.load(path) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(f["arr_0"], imgs)
        assert f["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(f["arr_1"], [5, 0, 999])
    path = save_npz(jnp.asarray(imgs), tmp_path / "plain.npz")
    with np.load(path) as f:
        assert f.files == ["arr_0"]
        np.testing.assert_array_equal(f["arr_0"], imgs)
    with pytest.raises(ValueError, match="labels"):
        save_npz(imgs, tmp_path / "x.npz", labels=[1, 2])
    with pytest.raises(TypeError, match="uint8"):
        save_npz(imgs.astype(np.float32), tmp_path / "x.npz")


def test_samples_to_png_end_to_end(tiny, ddim_cfg, tmp_path):
    _, variables = tiny
    x0 = ddim_cfg(variables, jax.random.PRNGKey(0), LABELS, 4.0)
    images = to_uint8(jnp.tanh(x0[..., :3]))  # stand-in for the VAE decode
    assert images.shape == (4, 8, 8, 3) and images.dtype == jnp.uint8
    path = save_grid_png(images, tmp_path / "s.png", nrow=2)
    assert Image.open(path).size == (2 * 10 + 2, 2 * 10 + 2)
