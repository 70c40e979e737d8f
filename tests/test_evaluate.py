"""The evaluate mode (sample -> chunks -> Inception features -> metrics) and the extract mode
(tfds images -> VAE latent shards), end to end on tiny models.

The FID Inception itself is covered by tests/test_metrics.py; here its 2048-d features would
cost two 2048x2048 matrix square roots per evaluation (minutes on a shared CPU), so the
evaluations run on a small stand-in with the same output dict, and the weight-file path is
checked separately with random weights in the Inception's real file format.
"""
import importlib.util
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from conftest import ROOT, run_python
from dydit_jax import config_lib, evaluate, main, train
from dydit_jax.evaluation.reference_batch import write_reference_batch


def digits_config():
    spec = importlib.util.spec_from_file_location("digits", ROOT / "configs" / "digits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config("steps=2,size=8,batch=16")
    config.model.update(hidden_size=32, depth=2, num_heads=2)
    config.train.update(log_every=1, checkpoint_every=2, async_checkpointing=False)
    config.evaluate.update(num_samples=16, chunk_size=8, batch_size=8, num_steps=4,
                           cfg_scale=1.5, inception_path="unused-stand-in.npz")
    config.mode = "evaluate"
    config_lib.validate(config)
    return config


class TinyFeatures(nn.Module):
    """The Inception's outputs at small sizes: pool [B, 8], spatial [B, 2, 2, 2], logits
    [B, 10] (fewer dimensions than samples, so the covariances have full rank)."""

    @nn.compact
    def __call__(self, images):
        x = (images.astype(jnp.float32) / 255.0).reshape(len(images), -1)
        pool = jnp.tanh(nn.Dense(8)(x))
        spatial = jnp.tanh(nn.Dense(8)(x)).reshape(-1, 2, 2, 2)
        return {"pool": pool, "spatial": spatial, "logits": nn.Dense(10)(pool)}


@pytest.fixture(scope="module")
def stand_in():
    model = TinyFeatures()
    return model, model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3), jnp.uint8))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny digits DiT trained for 2 steps (its checkpoint is what evaluate loads)."""
    workdir = tmp_path_factory.mktemp("trained")
    config = digits_config()
    config.mode = "train"
    train.train_and_evaluate(config, str(workdir))
    return workdir


@pytest.fixture
def workdir(trained, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(trained, path)
    return path


def _chunks(workdir):
    return sorted((workdir / "eval").glob("chunk_*.npz"))


def test_evaluate_mode_end_to_end(workdir, stand_in, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "load_feature_model", lambda config: stand_in)
    config = digits_config()
    result = main.run(config, str(workdir))

    assert result["sampled_chunks"] == [0, 1] and result["num_chunks"] == 2
    chunks = _chunks(workdir)
    assert [c.name for c in chunks] == ["chunk_00000.npz", "chunk_00001.npz"]
    for k, path in enumerate(chunks):
        with np.load(path) as f:
            assert f["arr_0"].shape == (8, 8, 8, 3) and f["arr_0"].dtype == np.uint8
            # gray samples repeated to RGB; labels uniform over the classes, by seed and chunk
            assert (f["arr_0"] == f["arr_0"][..., :1]).all()
            np.testing.assert_array_equal(f["arr_1"], evaluate.chunk_labels(0, k, 8, 10))
    record = json.loads((workdir / "eval" / "metrics.json").read_text())
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert np.isfinite(record[key]) and record[key] == pytest.approx(result["metrics"][key])
    assert record["fid"] > 0 and 1.0 <= record["inception_score"] <= 10.0
    assert 0.0 <= record["precision"] <= 1.0 and 0.0 <= record["recall"] <= 1.0
    assert record["num_samples"] == 16 and record["spec"]["checkpoint"] == "workdir step 2"
    assert record["reference"].startswith("data ")  # drawn from the digits source
    with np.load(workdir / "eval" / "reference.npz") as f:
        assert f["pool"].shape == (16, 8)
    out = capsys.readouterr().out
    assert "FID" in out and "Precision" in out and "metrics.json" in out


def test_resume_samples_only_the_missing_chunk(workdir, stand_in, tmp_path):
    rng = np.random.default_rng(0)
    reference = write_reference_batch(str(tmp_path / "ref.npz"),
                                      rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8))
    config = digits_config()
    config.evaluate.reference_batch = reference
    first = evaluate.evaluate_from_workdir(config, str(workdir), feature_model=stand_in)
    assert first["sampled_chunks"] == [0, 1]
    assert json.loads((workdir / "eval" / "metrics.json").read_text())["reference"] \
        .startswith("file ")

    # A preempted run: the metrics and the last chunk are missing, a partial write is left.
    chunk0, chunk1 = _chunks(workdir)
    kept = chunk0.stat().st_mtime_ns
    lost = dict(np.load(chunk1))
    (workdir / "eval" / "metrics.json").unlink()
    chunk1.unlink()
    (workdir / "eval" / "chunk_00001.npz.tmp999").write_bytes(b"partial")
    second = evaluate.evaluate_from_workdir(config, str(workdir), feature_model=stand_in)
    assert second["sampled_chunks"] == [1]
    assert chunk0.stat().st_mtime_ns == kept
    with np.load(chunk1) as f:  # the same samples as before: chunks are deterministic
        np.testing.assert_array_equal(f["arr_0"], lost["arr_0"])
        np.testing.assert_array_equal(f["arr_1"], lost["arr_1"])
    assert second["metrics"] == pytest.approx(first["metrics"], rel=1e-6)

    # Complete: nothing to sample. Other sampler settings are refused, not mixed in.
    assert evaluate.evaluate_from_workdir(config, str(workdir),
                                          feature_model=stand_in)["sampled_chunks"] == []
    config.evaluate.cfg_scale = 4.0
    with pytest.raises(ValueError, match="cfg_scale"):
        evaluate.evaluate_from_workdir(config, str(workdir), feature_model=stand_in)


# slow: tests/test_sampling.py holds sharded sampling to one device.
@pytest.mark.slow
def test_sharded_sampling_equals_one_device(tmp_path):
    """8 simulated devices (batch split 8 ways) write the same chunk as one device."""
    code = f"""
import sys, jax
sys.path.insert(0, "tests")
from test_evaluate import digits_config
from dydit_jax import evaluate, train
assert jax.device_count() == 8
config = digits_config()
config.evaluate.update(num_samples=8, chunk_size=8)
model = train.build_model(config)
params = model.init(jax.random.PRNGKey(0), *train.dummy_inputs(model))["params"]
evaluate.sample_chunks(config, {str(tmp_path / "eight")!r}, params)
"""
    run_python(code, devices=8)
    config = digits_config()
    config.evaluate.update(num_samples=8, chunk_size=8)
    model = train.build_model(config)
    params = model.init(jax.random.PRNGKey(0), *train.dummy_inputs(model))["params"]
    _, sampled = evaluate.sample_chunks(config, str(tmp_path / "one"), params)
    assert sampled == [0]
    with np.load(tmp_path / "one" / "eval" / "chunk_00000.npz") as one, \
            np.load(tmp_path / "eight" / "eval" / "chunk_00000.npz") as eight:
        np.testing.assert_array_equal(one["arr_1"], eight["arr_1"])
        np.testing.assert_array_equal(one["arr_0"], eight["arr_0"])


def test_latent_model_samples_are_decoded_with_the_vae(tiny_vae_dir, stand_in, tmp_path):
    """A latent DiT (4x4x4 latents, random init) evaluated against its latent dataset: samples
    and reference images both go through the VAE decoder (8x8 RGB)."""
    from dydit_jax.data import write_latent_shards

    rng = np.random.default_rng(0)
    data = tmp_path / "latents"
    write_latent_shards(data, [(rng.normal(0, 1, (12, 4, 4, 4)), rng.integers(0, 10, 12))], 8)
    config = digits_config()
    config.model.update(input_size=4, in_channels=4)
    config.data.update(name="latents", path=str(data), image_size=4, channels=4)
    config.evaluate.update(vae_dir=str(tiny_vae_dir), num_samples=12, chunk_size=12)
    model = train.build_model(config)
    params = model.init(jax.random.PRNGKey(0), *train.dummy_inputs(model))["params"]
    result = evaluate.evaluate_from_workdir(config, str(tmp_path), params=params,
                                            feature_model=stand_in)
    assert result["sampled_chunks"] == [0]
    with np.load(tmp_path / "eval" / "chunk_00000.npz") as f:
        assert f["arr_0"].shape == (12, 8, 8, 3) and f["arr_0"].dtype == np.uint8
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert np.isfinite(record["fid"]) and tiny_vae_dir.name in record["reference"]
    with np.load(tmp_path / "eval" / "reference.npz") as f:
        assert f["pool"].shape == (12, 8)


def test_inception_weights_are_read_from_the_configured_file(tmp_path):
    from dydit_jax.evaluation import inception

    config = config_lib.base_config()
    with pytest.raises(ValueError, match="inception_path"):
        evaluate.load_feature_model(config)
    config.evaluate.inception_path = str(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        evaluate.load_feature_model(config)

    # Random weights in the pytorch-fid names and PyTorch layout (the converted .npz format).
    rng = np.random.default_rng(0)
    arrays = {}
    for collection, tree in inception.abstract_variables().items():
        for path, leaf in traverse_util.flatten_dict(tree).items():
            shape = inception._torch_shape(leaf.shape)
            arrays[inception.torch_name(collection, path)] = \
                rng.standard_normal(shape, dtype=np.float32)
    np.savez(tmp_path / "inception_fid.npz", **arrays)
    config.evaluate.inception_path = str(tmp_path / "inception_fid.npz")
    model, variables = evaluate.load_feature_model(config)
    assert isinstance(model, inception.InceptionV3) and model.image_size == 299
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], arrays["fc.weight"].T)


# ----------------------------------------------------------------------------------------------
# Latent extraction
# ----------------------------------------------------------------------------------------------

def extract_config(vae_dir, out):
    config = config_lib.base_config()
    config.mode = "extract"
    config.seed = 3
    config.model.update(input_size=4, in_channels=4)   # 8 px images, VAE downsampling 2
    config.data.update(tfds_name="imagenet2012", data_dir="/nonexistent/tfds", split="train",
                       decode="tfds", num_workers=2)  # the mock cannot fake undecoded JPEGs
    config.evaluate.vae_dir = str(vae_dir)
    config.extract.update(output_dir=str(out), shard_size=4, batch_size=3, flip=True)
    config_lib.validate(config)
    return config


def test_extract_writes_latent_shards_and_resumes(tiny_vae_dir, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from dydit_jax.convert_vae import load_vae
    from dydit_jax.data import LatentShards, create_source
    from dydit_jax.data.imagenet import ImageNetSource

    out = tmp_path / "latents"
    config = extract_config(tiny_vae_dir, out)
    with tfds.testing.mock_data(num_examples=10):
        result = main.run(config, str(tmp_path))
        assert result["encoded_shards"] == [0, 1, 2] and result["skipped_shards"] == []
        names = sorted(p.name for p in out.glob("*.npz"))
        assert names == ["latents-00000.npz", "latents-00001.npz", "latents-00002.npz"]
        meta = json.loads((out / "meta.json").read_text())
        assert meta["num_examples"] == 20 and meta["shape"] == [4, 4, 4]
        assert [s["num_examples"] for s in meta["shards"]] == [8, 8, 4]
        assert meta["metadata"]["flip_copies"] and meta["metadata"]["num_classes"] == 1000

        # What the latents data source reads back.
        shards = LatentShards(str(out))
        assert len(shards) == 20 and shards.shape == (4, 4, 4)
        src = create_source(dict(name="latents", path=str(out), seed=0, shuffle=True),
                            local_batch_size=4)
        batch = src.next()
        assert batch["image"].shape == (4, 4, 4, 4) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
        assert src.num_classes == 1000
        src.close()

        # Rows 2i, 2i+1: image i and its mirror image, encoded with the documented noise.
        vae, variables = load_vae(tiny_vae_dir)
        cfg = config.data.to_dict()
        cfg.update(name="imagenet", image_size=8, random_flip=False, shuffle=False,
                   num_workers=0, prefetch=0)
        images = ImageNetSource(cfg, process_index=0, process_count=1, local_batch_size=1)
        latents, labels = shards.gather(np.arange(20))
        for i in (0, 5, 9):
            image, label = images._load_example(i, 0, 0)
            assert labels[2 * i] == labels[2 * i + 1] == label
            for copy, x in enumerate((image, image[:, ::-1])):
                posterior = vae.apply(variables, jnp.asarray(x[None]), method="encode")
                key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(3), i), copy)
                noise = jax.random.normal(key, (4, 4, 4))[None]
                want = vae.scale_latents(posterior.from_noise(noise))[0]
                np.testing.assert_allclose(latents[2 * i + copy], want, atol=1e-5, rtol=1e-5)
        images.close()

        # Resume: complete shards are skipped; a lost shard (and meta.json) is rewritten.
        again = main.run(config, str(tmp_path))
        assert again["encoded_shards"] == [] and again["skipped_shards"] == [0, 1, 2]
        lost = dict(np.load(out / "latents-00001.npz"))
        (out / "latents-00001.npz").unlink()
        (out / "meta.json").unlink()
        resumed = main.run(config, str(tmp_path))
        assert resumed["encoded_shards"] == [1] and resumed["skipped_shards"] == [0, 2]
        with np.load(out / "latents-00001.npz") as f:
            np.testing.assert_allclose(f["latents"], lost["latents"], atol=1e-6)
            np.testing.assert_array_equal(f["labels"], lost["labels"])
        assert json.loads((out / "meta.json").read_text()) == meta

        config.extract.shard_size = 5
        with pytest.raises(ValueError, match="shard_size"):
            main.run(config, str(tmp_path))
