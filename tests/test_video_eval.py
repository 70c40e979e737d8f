"""The evaluate mode of video models (chunks of clips -> I3D and per-frame Inception features
-> FVD, per-frame FID), its config checks, and configs/latte_xl.py.

A tiny class-conditional Latte (random init) samples 9-frame 12x12 moving-digits clips (I3D's
least frame count). As in tests/test_evaluate.py the evaluations that check the wiring and the
resuming run on small stand-ins with the I3D's and the Inception's output dicts (4-d and 8-d
features: full-rank covariances from a few clips); one run reads `config.evaluate.i3d_path`,
random weights in the real I3D file format, whose 224x224 forward costs about a second a clip
on CPU, so it embeds 3 + 3 clips. The runs share a persistent compilation cache, so the
sampling loop (the same shapes in every run) compiles once.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from conftest import load_config
from dydit_jax import config_lib, evaluate, sampling, train
from dydit_jax.compile_clock import persistent_cache
from dydit_jax.config_lib import ConfigError
from dydit_jax.data import create_source
from dydit_jax.evaluation import i3d
from dydit_jax.evaluation.inception import torch_name
from dydit_jax.evaluation.video_metrics import video_metrics
from test_evaluate import TinyFeatures   # the Inception stand-in, shape-agnostic

FRAMES, SIZE = 9, 12


def latte_config(**evaluate_keys):
    config = load_config("latte_digits", f"frames={FRAMES},size={SIZE},scale=1")
    config.model.update(hidden_size=32, depth=2, num_heads=2)
    config.evaluate.update(dict(dict(num_samples=6, chunk_size=3, batch_size=3, num_steps=3,
                                     cfg_scale=2.0), **evaluate_keys))
    config.mode = "evaluate"
    config_lib.validate(config)
    return config


class TinyClipFeatures(nn.Module):
    """The I3D's outputs at small sizes: features = logits [B, 4] of clips [B, T, 224, 224, 3]
    in [-1, 1] (4x4 average-pooled frames through a Dense)."""

    @nn.compact
    def __call__(self, videos):
        b, t = videos.shape[:2]
        x = videos.reshape(b, t, 4, 56, 4, 56, 3).mean(axis=(3, 5)).reshape(b, -1)
        logits = jnp.tanh(nn.Dense(4)(x))
        return {"features": logits, "logits": logits}


@pytest.fixture(scope="module")
def stand_ins():
    clips, frames = TinyClipFeatures(), TinyFeatures()
    return ((clips, clips.init(jax.random.PRNGKey(1), jnp.zeros((1, FRAMES, 224, 224, 3)))),
            (frames, frames.init(jax.random.PRNGKey(2), jnp.zeros((1, SIZE, SIZE, 3),
                                                                   jnp.uint8))))


@pytest.fixture(scope="module")
def params():
    model = train.build_model(latte_config())
    return jax.jit(model.init)(jax.random.PRNGKey(0), *train.dummy_inputs(model))["params"]


@pytest.fixture(scope="module")
def evaluate_cached(tmp_path_factory):
    """evaluate.evaluate_from_workdir with a compilation cache shared by this module's runs."""
    cache = tmp_path_factory.mktemp("xla_cache")

    def run(*args, **kwargs):
        with persistent_cache(str(cache)):
            return evaluate.evaluate_from_workdir(*args, **kwargs)
    return run


def _chunks(workdir):
    return sorted((workdir / "eval").glob("chunk_*.npz"))


def test_config_checks_ask_for_clips_i3d_can_take_and_its_weights(tmp_path):
    config = load_config("latte_digits")   # the 8-frame demo
    config.mode = "evaluate"
    with pytest.raises(ConfigError, match=r"config.model.num_frames=8: FVD's I3D needs clips "
                                          r"of >= 9 frames .* the FVD protocol uses 16"):
        config_lib.validate(config)
    config.mode = "sample"
    config_lib.validate(config)   # sampling 8-frame clips is fine

    config = latte_config()
    config.sample.checkpoint = str(tmp_path)
    with pytest.raises(ConfigError, match="config.evaluate.i3d_path=None: mode=evaluate of a "
                                          "video model needs FVD's Kinetics-400 I3D"):
        config_lib.check_sources(config, str(tmp_path))
    config.evaluate.i3d_path = str(tmp_path / "missing.npz")
    with pytest.raises(ConfigError, match="config.evaluate.i3d_path=.*no such file"):
        config_lib.check_sources(config, str(tmp_path))
    (tmp_path / "i3d.npz").write_bytes(b"")
    config.evaluate.i3d_path = str(tmp_path / "i3d.npz")
    config_lib.check_sources(config, str(tmp_path))   # the Inception is optional for clips
    config.evaluate.num_reference = 1
    with pytest.raises(ConfigError, match="config.evaluate.num_reference=1"):
        config_lib.validate(config)


def test_clip_chunks_metrics_and_resume(params, stand_ins, evaluate_cached, tmp_path, capsys):
    clip_model, frame_model = stand_ins
    config = latte_config()
    run = lambda: evaluate_cached(  # noqa: E731
        config, str(tmp_path), params=params, feature_model=frame_model, clip_model=clip_model)
    first = run()
    assert first["sampled_chunks"] == [0, 1] and first["num_chunks"] == 2
    chunks = _chunks(tmp_path)
    for k, path in enumerate(chunks):
        with np.load(path) as f:
            assert f["arr_0"].shape == (3, FRAMES, SIZE, SIZE, 3)
            assert f["arr_0"].dtype == np.uint8 and (f["arr_0"] == f["arr_0"][..., :1]).all()
            np.testing.assert_array_equal(f["arr_1"], evaluate.chunk_labels(0, k, 3, 10))
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert record["reference"] == "data moving_digits (6 clips)"
    assert record["fvd"] > 0 and record["fid_per_frame"] > 0 and record["num_samples"] == 6
    assert "i3d" in record and record["spec"]["model"]["num_frames"] == FRAMES
    with np.load(tmp_path / "eval" / "reference.npz") as f:
        assert f["sigma_fvd"].shape == (4, 4) and f["sigma_fid_per_frame"].shape == (8, 8)
    out = capsys.readouterr().out
    assert "FVD" in out and "FID per frame" in out

    # The definitions of evaluation.video_metrics, on the chunks and the data's first clips.
    samples = np.concatenate([np.load(p)["arr_0"] for p in chunks])
    source = create_source(config.data, local_batch_size=6)
    reference = np.asarray(sampling.to_uint8(source.next()["image"]))
    source.close()
    want = video_metrics(samples, reference, *clip_model, *frame_model, batch_size=3)
    assert first["metrics"] == pytest.approx(want, rel=1e-4)

    # A preempted run: the metrics and the last chunk are missing, a partial write is left.
    chunk0, chunk1 = chunks
    kept = chunk0.stat().st_mtime_ns
    lost = dict(np.load(chunk1))
    (tmp_path / "eval" / "metrics.json").unlink()
    chunk1.unlink()
    (tmp_path / "eval" / "chunk_00001.npz.tmp999").write_bytes(b"partial")
    second = run()
    assert second["sampled_chunks"] == [1] and chunk0.stat().st_mtime_ns == kept
    with np.load(chunk1) as f:
        np.testing.assert_array_equal(f["arr_0"], lost["arr_0"])
        np.testing.assert_array_equal(f["arr_1"], lost["arr_1"])
    assert second["metrics"] == pytest.approx(first["metrics"], rel=1e-6)

    # A reference batch of clips (ADM layout): nothing is resampled, the reference changes.
    np.savez(tmp_path / "ref.npz", arr_0=np.repeat(reference, 3, axis=-1)[::-1])
    config.evaluate.reference_batch = str(tmp_path / "ref.npz")
    third = run()
    assert third["sampled_chunks"] == []
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["reference"] \
        .startswith("file ")
    assert third["metrics"] == pytest.approx(first["metrics"], rel=1e-5)  # the same clips
    np.savez(tmp_path / "short.npz", arr_0=np.zeros((4, FRAMES + 1, 8, 8, 3), np.uint8))
    config.evaluate.reference_batch = str(tmp_path / "short.npz")
    with pytest.raises(ValueError, match="clips of 10 frames, the model samples "
                                         "config.model.num_frames=9"):
        run()
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    config.evaluate.reference_batch = str(tmp_path / "images.npz")
    with pytest.raises(ValueError, match=r"uint8 RGB clips \[N, F, H, W, 3\]"):
        run()

    # Other sampler settings are refused, not mixed in.
    config.evaluate.update(reference_batch=None, cfg_scale=4.0)
    with pytest.raises(ValueError, match="cfg_scale"):
        run()


def random_i3d_file(path):
    """Random weights in the converted file's names and PyTorch layout (He-scaled
    convolutions, unit BatchNorm statistics: activations stay O(1))."""
    rng = np.random.default_rng(0)
    arrays = {}
    for collection, tree in i3d.abstract_variables().items():
        for leaf_path, leaf in traverse_util.flatten_dict(tree).items():
            name = torch_name(collection, leaf_path)
            shape = i3d.torch_shape(leaf.shape)
            if len(shape) == 5:
                value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
            elif name.endswith(("bn.weight", "running_var")):
                value = np.ones(shape)
            else:
                value = rng.normal(0, 0.1, shape)
            arrays[name] = value.astype(np.float32)
    np.savez(path, **arrays)
    return arrays


@pytest.mark.filterwarnings("ignore:FID. sqrtm of a singular product")
def test_fvd_with_the_i3d_of_the_configured_file(params, evaluate_cached, tmp_path):
    config = latte_config(num_samples=3, num_reference=3)
    with pytest.raises(ValueError, match="i3d_path"):
        evaluate.load_clip_model(config)
    arrays = random_i3d_file(tmp_path / "i3d_400.npz")
    config.evaluate.i3d_path = str(tmp_path / "i3d_400.npz")
    model, variables = evaluate.load_clip_model(config)
    assert isinstance(model, i3d.InceptionI3d)
    np.testing.assert_array_equal(variables["params"]["logits"]["conv3d"]["kernel"],
                                  arrays["logits.conv3d.weight"].transpose(2, 3, 4, 1, 0))

    result = evaluate_cached(config, str(tmp_path / "run"), params=params)
    record = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert np.isfinite(record["fvd"]) and record["fvd"] == pytest.approx(result["metrics"]["fvd"])
    assert "fid_per_frame" not in record and record["inception"] is None
    assert record["i3d"] == config.evaluate.i3d_path
    with np.load(tmp_path / "run" / "eval" / "reference.npz") as f:
        assert f["mu_fvd"].shape == (i3d.NUM_CLASSES,)


def test_latent_clips_are_decoded_frame_by_frame(tiny_vae_dir):
    """Latent clips [B, F, h, w, c] (a latent Latte's samples, clip latent shards) decode to
    the frames' pictures, each as the image decoder gives it."""
    from dydit_jax import sharding as sharding_lib
    from dydit_jax.convert_vae import load_vae

    vae, variables = load_vae(str(tiny_vae_dir))
    decode = evaluate.make_decode_fn(vae, sharding_lib.create_mesh(-1, 1))
    z = np.random.default_rng(0).normal(0, 1, (2, 3, 4, 4, 4)).astype(np.float32)
    clips = np.asarray(decode(variables, z))
    assert clips.shape == (2, 3, 8, 8, 3) and clips.dtype == np.uint8
    frames = np.asarray(decode(variables, z.reshape(6, 4, 4, 4)))
    np.testing.assert_array_equal(clips.reshape(frames.shape), frames)


# ----------------------------------------------------------------------------------------------
# configs/latte_xl.py
# ----------------------------------------------------------------------------------------------

def test_latte_xl_config_builds_latte_xl2_on_ucf101_latents(tmp_path):
    from dydit_jax.models import Latte

    config = load_config("latte_xl")
    config_lib.validate(config)
    model = train.build_model(config)   # fields only: an XL model is not initialised
    assert isinstance(model, Latte)
    assert (model.depth, model.hidden_size, model.num_heads, model.patch_size) == \
        (28, 1152, 16, 2)
    assert (model.input_size, model.in_channels, model.num_frames, model.extras,
            model.num_classes) == (32, 4, 16, 2, 101)
    assert model.learn_sigma and model.remat and not model.scan_layers and not model.dynamic
    assert config.data.name == "latents" and config.train.num_steps == 1_000_000
    sc, ec = config.sample, config.evaluate
    assert (sc.sampler, sc.num_steps, sc.cfg_scale, sc.guide_channels) == ("ddpm", 250, 7.0, -1)
    assert (ec.sampler, ec.num_steps, ec.cfg_scale, ec.num_samples) == ("ddpm", 250, 7.0, 2048)
    config.mode = "evaluate"
    config_lib.validate(config)   # 16 frames: FVD's protocol

    dynamic = load_config("latte_xl", "lam=0.5,init=converted,tokens=temporal")
    config_lib.validate(dynamic)
    model = train.build_model(dynamic)
    assert model.dynamic and model.token_blocks == "temporal"
    assert dynamic.dynamic.target == 0.5 and dynamic.train.init_from == "converted"
    assert dynamic.train.num_steps == 200_000
    with pytest.raises(ConfigError, match=r"lam=0.5\) starts from a trained .*Latte: pass "
                                          r"init="):
        load_config("latte_xl", "lam=0.5")

    ucf = load_config("latte_xl", f"data=ucf101,ucf={tmp_path}")
    config_lib.validate(ucf)
    assert (ucf.data.name, ucf.data.image_size, ucf.data.num_frames, ucf.data.frame_stride,
            ucf.data.data_dir) == ("ucf101", 256, 16, 3, str(tmp_path))
    # FVD against real clips: the latent samples need the VAE, asked for before sampling.
    ucf.update_from_flattened_dict({"mode": "evaluate", "sample.checkpoint": str(tmp_path),
                                    "evaluate.i3d_path": str(tmp_path)})
    with pytest.raises(ConfigError, match="config.evaluate.vae_dir=None: mode=evaluate "
                                          "decodes the model's 4-channel latent samples"):
        config_lib.check_sources(ucf, str(tmp_path))
    with pytest.raises(ConfigError, match="data='imagenet'"):
        load_config("latte_xl", "data=imagenet")
