"""Sample mode end to end on tiny models: pictures from a latent model through the SD-VAE, the
samples folder (named by weights and settings, never rewritten silently), the timing / FLOPs
line, and a second run that starts warm from the persistent compilation cache.

The VAE is the tiny diffusers AutoencoderKL of tests/data/vae (4 latent channels, 2x
downsampling), so an 8x8x4 DiT's samples decode to 16x16 RGB pictures.
"""
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dydit_jax import config_lib, main, sampling
from dydit_jax.checkpointing import save_params
from dydit_jax.convert_vae import load_vae
from dydit_jax.train import build_model

VAE_DIR = pathlib.Path(__file__).parent / "data" / "vae"


def latent_config(tmp_path, vae=True):
    """A tiny latent-space DiT (8x8x4, 10 classes) with random weights in an orbax params dir,
    sampled with DDIM 5 steps and CFG 4 in sample mode."""
    c = config_lib.base_config()
    c.mode = "sample"
    c.model.update(name="custom", input_size=8, in_channels=4, num_classes=10, hidden_size=32,
                   depth=2, num_heads=2, patch_size=2)
    c.data.update(name="latents", image_size=8, channels=4, num_classes=10)
    c.sample.update(sampler="ddim", num_steps=5, per_class=2, classes=(1, 3), batch_size=4)
    c.mesh.data = 1
    params_dir = tmp_path / "weights" / "tiny-latent-dit"
    if not params_dir.exists():
        model = build_model(c)
        variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)),
                               jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
        # adaLN-Zero starts as the identity: scale the zero-initialised layers up so the
        # samples depend on the weights (and the decoded pictures are not all one colour).
        params = jax.tree_util.tree_map(
            lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(1), a.shape),
            variables["params"])
        save_params(str(params_dir), params)
    c.sample.checkpoint = str(params_dir)
    if vae:
        c.sample.vae_dir = str(VAE_DIR)
    return c


def test_latent_model_writes_decoded_pictures(tmp_path, capsys):
    config = latent_config(tmp_path)
    workdir = tmp_path / "run"
    latents = main.run(config, str(workdir))
    out = workdir / "samples" / "tiny-latent-dit-ddim5-cfg4"
    assert sorted(os.listdir(out)) == ["grid.png", "latents.npz", "samples.npz", "settings.json"]

    with np.load(out / "latents.npz") as f:
        np.testing.assert_array_equal(f["latents"], latents)
        np.testing.assert_array_equal(f["labels"], [1, 1, 3, 3])
    assert latents.shape == (4, 8, 8, 4)
    # The ADM layout: arr_0 uint8 [N, H, W, 3] pictures, arr_1 the labels.
    with np.load(out / "samples.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(labels, [1, 1, 3, 3])
    # They are the VAE's decoding of the written latents (latents / 0.18215 -> decoder).
    vae, variables = load_vae(str(VAE_DIR))
    expected = np.asarray(sampling.to_uint8(vae.apply(variables, jnp.asarray(latents),
                                                      method="decode_latents")))
    # uint8 rounding of values that differ by float32 noise between two compiled programs
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
    assert images.std() > 1.0, "decoded pictures are flat: the decode did not run"
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.ndim == 3 and grid.shape[2] == 3
    assert grid.shape[0] >= 2 * 16 and grid.shape[1] >= 2 * 16   # 2 rows (classes) x 2

    printed = capsys.readouterr().out
    assert "engine=masked: 4 samples in" in printed and "samples/s" in printed
    assert "FLOPs ratio 1.000 of the static model" in printed


def test_latent_model_without_vae_writes_latents_and_says_how(tmp_path, capsys):
    config = latent_config(tmp_path, vae=False)
    main.run(config, str(tmp_path / "run"))
    out = tmp_path / "run" / "samples" / "tiny-latent-dit-ddim5-cfg4"
    assert sorted(os.listdir(out)) == ["latents.npz", "settings.json"]
    printed = capsys.readouterr().out
    assert "--config.sample.vae_dir=" in printed and "stabilityai/sd-vae-ft-ema" in printed


def test_vae_with_other_latent_channels_is_refused_before_sampling(tmp_path):
    config = latent_config(tmp_path)
    config.model.in_channels = 3
    config.data.channels = 3
    config.sample.checkpoint = ""
    with pytest.raises(ValueError, match="4 latent channels, the model samples 3"):
        from dydit_jax import generate
        generate.sample_from_workdir(config, str(tmp_path / "run"),
                                     params={"unused": np.zeros(1)}, step=0)


def test_samples_are_not_overwritten_and_a_second_run_starts_warm(tmp_path, capsys):
    """Same weights and settings: the second run says where the samples are and writes
    nothing. Other settings: a folder beside it. `overwrite`: rewritten, and by then every
    executable comes from the workdir's persistent compilation cache (none compiled)."""
    config = latent_config(tmp_path, vae=False)
    workdir = tmp_path / "run"
    main.run(config, str(workdir))
    first = capsys.readouterr().out
    out = workdir / "samples" / "tiny-latent-dit-ddim5-cfg4"
    stamp = (out / "latents.npz").stat().st_mtime_ns

    assert main.run(config, str(workdir)) is None
    again = capsys.readouterr().out
    assert f"already in {out}" in again and "sample.overwrite=True" in again
    assert (out / "latents.npz").stat().st_mtime_ns == stamp

    config.sample.cfg_scale = 2.0
    main.run(config, str(workdir))
    assert (workdir / "samples" / "tiny-latent-dit-ddim5-cfg2" / "latents.npz").exists()
    # A setting the folder name does not show: a folder beside it, not the old samples.
    config.sample.update(cfg_scale=4.0, per_class=1)
    fewer = main.run(config, str(workdir))
    assert fewer.shape[0] == 2
    with np.load(workdir / "samples" / "tiny-latent-dit-ddim5-cfg4-2" / "latents.npz") as f:
        np.testing.assert_array_equal(f["latents"], fewer)
    assert (out / "latents.npz").stat().st_mtime_ns == stamp
    # A chosen output_dir that holds other samples is refused, not overwritten.
    config.sample.output_dir = "samples/tiny-latent-dit-ddim5-cfg4"
    with pytest.raises(FileExistsError, match="holds samples of other weights or settings"):
        main.run(config, str(workdir))
    config.sample.update(per_class=2, output_dir="")
    capsys.readouterr()

    config.sample.update(cfg_scale=4.0, overwrite=True)
    latents = main.run(config, str(workdir))
    warm = capsys.readouterr().out
    assert (out / "latents.npz").stat().st_mtime_ns != stamp
    with np.load(out / "latents.npz") as f:
        np.testing.assert_array_equal(f["latents"], latents)
    assert os.listdir(workdir / "xla_cache"), "no persistent compilation cache was written"
    assert "(0 compiled, " in warm and "from the compilation cache" in warm, warm
    assert " compiled" in first and "(0 compiled" not in first, first


def test_readme_path_official_checkpoint_to_png(tmp_path):
    """README "From an official checkpoint to a PNG" on stand-ins: an official-format .pt
    (tests/data/dit_s, made by the reference code) converted to an orbax params dir (what the
    converter CLI writes), then sample mode of configs/dit_xl.py (scanned blocks, latents)
    shrunk to the stand-in's sizes, with the VAE; and the .pt file given directly."""
    import importlib.util

    from conftest import ROOT
    from dydit_jax import convert
    from dydit_jax.models.dit import DiT

    pt = ROOT / "tests" / "data" / "dit_s" / "model.pt"
    stand_in = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                   num_heads=4, num_classes=10)
    save_params(str(tmp_path / "converted" / "tiny"),
                convert.from_pytorch(str(pt), stand_in)["params"])
    spec = importlib.util.spec_from_file_location("dit_xl", ROOT / "configs" / "dit_xl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert config.model.scan_layers and config.data.name == "latents"
    config.mode = "sample"
    config.model.update(name="custom", hidden_size=64, depth=2, num_heads=4, patch_size=2,
                        input_size=8, num_classes=10, dtype="float32")
    config.sample.update(vae_dir=str(VAE_DIR), classes=(1, 3), per_class=1, num_steps=3,
                         batch_size=2)
    grids = {}
    for source, name in ((tmp_path / "converted" / "tiny", "tiny"), (pt, "model")):
        config.sample.checkpoint = str(source)
        main.run(config, str(tmp_path / "run"))
        out = tmp_path / "run" / "samples" / f"{name}-ddpm3-cfg4"
        with np.load(out / "samples.npz") as f:
            grids[name] = f["arr_0"]
        assert grids[name].shape == (2, 16, 16, 3) and grids[name].dtype == np.uint8
        assert (out / "grid.png").stat().st_size > 100
    np.testing.assert_array_equal(grids["tiny"], grids["model"])   # same weights, same seed
