"""FLUX on image-caption sets: the caption_folder / tfds_captions sources, mode=extract of
captioned images into latent (or pixel) shards with their T5 / CLIP embeddings, and training
from those shards (no text encoder in the loop; caption dropout to the stored empty prompt)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import load_config
from dydit_jax import config_lib, main, text_conditioning, train
from dydit_jax.config_lib import ConfigError
from dydit_jax.data import LatentShards, create_source, transforms, write_latent_shards
from dydit_jax.data.captioned_digits import CaptionedDigitsSource

CAPTIONS = {"a/0001.png": "a red square", "a/0002.jpg": "a blue circle",
            "0003.webp": "a green line", "0004.png": "a red square"}


def _caption_folder(root):
    """Images of different sizes and formats (one in a subfolder) with their captions."""
    rng = np.random.default_rng(0)
    for i, (name, text) in enumerate(sorted(CAPTIONS.items())):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (10 + 3 * i, 14 - i, 3), dtype=np.uint8)
        Image.fromarray(arr).save(path)
        path.with_suffix(".txt").write_text(f"{text}\n")
    return root


def _folder_cfg(folder, **kw):
    return dict(dict(name="caption_folder", data_dir=str(folder), image_size=8, channels=3,
                     shuffle=False, num_workers=2, prefetch=1), **kw)


def test_caption_folder_yields_images_and_captions(tmp_path):
    folder = _caption_folder(tmp_path / "set")
    src = create_source(_folder_cfg(folder), local_batch_size=4)
    b = src.next()
    names = sorted(CAPTIONS, key=lambda n: str(folder / n))     # sorted by path
    assert b["image"].shape == (4, 8, 8, 3) and b["image"].dtype == np.float32
    assert [src.captions[i] for i in b["caption"]] == [CAPTIONS[n] for n in names]
    assert src.captions == sorted(set(CAPTIONS.values())) and src.num_classes == 1
    for row, name in zip(b["image"], names):
        with Image.open(folder / name) as im:
            want = transforms.center_crop_arr(im.convert("RGB"), 8) / 127.5 - 1.0
        np.testing.assert_allclose(row, want, atol=1e-6)
    src.close()
    gray = create_source(_folder_cfg(folder, channels=1), local_batch_size=2)
    assert gray.next()["image"].shape == (2, 8, 8, 1)
    gray.close()

    with pytest.raises(ValueError, match="channels"):
        create_source(_folder_cfg(folder, channels=4), local_batch_size=2)
    (folder / "0005.png").write_bytes((folder / "0004.png").read_bytes())   # no 0005.txt
    with pytest.raises(FileNotFoundError, match="0005.png .no .*0005.txt"):
        create_source(_folder_cfg(folder), local_batch_size=2)


def test_tfds_captions_on_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from etils import epath

    class DyditTinyCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        pkg_dir_path = epath.Path(tmp_path)

        def _info(self):
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(
                {"picture": tfds.features.Image(), "text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield 0, {}

    cfg = dict(name="tfds_captions", tfds_name="dydit_tiny_captions", data_dir=str(tmp_path),
               decode="tfds", image_key="picture", caption_key="text", image_size=8,
               channels=3, shuffle=False, num_workers=0)
    with tfds.testing.mock_data(num_examples=6):
        src = create_source(cfg, local_batch_size=3)
        b = src.next()
        assert b["image"].shape == (3, 8, 8, 3)
        texts = [src.ds[i]["text"] for i in range(3)]
        texts = [t.decode() if isinstance(t, bytes) else t for t in texts]
        assert [src.captions[i] for i in b["caption"]] == texts
        src.close()
        with pytest.raises(ValueError, match="caption_key='caption'"):
            create_source(dict(cfg, caption_key="caption"), local_batch_size=3)


def _tiny_config():
    """configs/flux_digits.py at test_flux_train.py's tiny sizes."""
    c = load_config("flux_digits")
    c.model.update(hidden_size=32, num_heads=2, depth=1, depth_single_blocks=1)
    c.text.update(width=16, layers=1, t5_max_length=6, clip_max_length=6)
    c.train.update(batch_size=8, num_steps=2, log_every=1, checkpoint_every=2,
                   async_checkpointing=False)
    c.sample.update(num_steps=2, per_class=1, batch_size=2, prompts=("a bold one", "a seven"))
    c.compilation_cache_dir = ""
    return c


def test_extract_captioned_digits_then_train_from_the_shards(tmp_path):
    out = tmp_path / "shards"
    config = _tiny_config()
    config.mode = "extract"
    config.extract.update(output_dir=str(out), shard_size=700, batch_size=256)
    result = main.run(config, str(tmp_path / "x"), check_files=True)
    assert result["encoded_shards"] == [0, 1, 2]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["shape"] == [16, 16, 1] and meta["num_examples"] == 1797
    assert meta["metadata"]["text"]["settings"] == text_conditioning.text_settings(config.text)

    # The shards hold the pixels and the embeddings of encoding the captions directly.
    shards = LatentShards(str(out))
    assert shards.has_text and shards.text_shape == ((6, 16), (16,))
    digits = CaptionedDigitsSource(config.data, process_index=0, process_count=1,
                                   local_batch_size=1)
    idx = np.asarray([0, 699, 700, 1500, 1796])
    pixels, labels = shards.gather(idx)
    txt, vec = shards.gather_text(idx)
    np.testing.assert_array_equal(pixels, digits._images[idx])
    np.testing.assert_array_equal(labels, digits._labels[idx])
    encoders = text_conditioning.from_config(config.text)
    captions = [digits.captions[digits.caption_ids[i]] for i in idx]
    want_txt, want_vec = encoders.encode(captions)
    np.testing.assert_allclose(txt, want_txt, atol=1e-5)
    np.testing.assert_allclose(vec, want_vec, atol=1e-5)
    with np.load(out / "latents-00001.npz") as f:
        assert f["captions"][0] == captions[2]          # example 700
    empty_txt, empty_vec = encoders.encode([""])
    np.testing.assert_allclose(shards.empty_prompt[0], empty_txt[0], atol=1e-5)
    np.testing.assert_allclose(shards.empty_prompt[1], empty_vec[0], atol=1e-5)

    # Resumable: complete shards are skipped, a lost one is written again, equal.
    lost = dict(np.load(out / "latents-00001.npz"))
    (out / "latents-00001.npz").unlink()
    (out / "meta.json").unlink()
    again = main.run(config, str(tmp_path / "x"))
    assert again["encoded_shards"] == [1] and again["skipped_shards"] == [0, 2]
    with np.load(out / "latents-00001.npz") as f:
        np.testing.assert_array_equal(f["txt"], lost["txt"])
    config.text.width = 8
    with pytest.raises(ValueError, match="text"):             # other encoders: refused
        main.run(config, str(tmp_path / "x"))

    # Training from the shards: batches carry txt / vec; dropout uses the stored empty prompt.
    config = _tiny_config()
    config.data.update(name="latents", path=str(out))
    source = create_source(config.data, local_batch_size=8)
    condition = train.text_conditioner(config, source)
    assert isinstance(condition, text_conditioning.EmbeddingDropout)
    batch = source.next()
    assert batch["txt"].shape == (8, 6, 16) and batch["vec"].shape == (8, 16)
    big = {k: np.concatenate([v] * 8) for k, v in batch.items()}
    dropped = condition(big, step=3)
    rows = np.all(dropped["vec"] == shards.empty_prompt[1], axis=1)
    assert 0 < rows.sum() < 32                                 # p = 0.1 of 64
    np.testing.assert_array_equal(dropped["txt"][~rows], big["txt"][~rows])
    source.close()
    config_lib.validate(config)
    config_lib.check_sources(config, str(tmp_path / "train"))
    train.train_and_evaluate(config, str(tmp_path / "train"))   # main.run would also sample
    rows = [json.loads(line) for line in open(tmp_path / "train" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)

    config.text.t5_max_length = 8                              # not the shards' encoders
    source = create_source(config.data, local_batch_size=8)
    with pytest.raises(ValueError, match="t5_max_length"):
        train.text_conditioner(config, source)
    source.close()


def test_extract_caption_folder_through_an_autoencoder(tmp_path, tiny_vae_dir):
    from dydit_jax.convert_vae import load_vae
    folder = _caption_folder(tmp_path / "set")
    out = tmp_path / "shards"
    config = _tiny_config()
    config.mode, config.seed = "extract", 3
    config.model.update(in_channels=4, input_size=4)   # the tiny VAE: 8 px -> 4x4x4
    config.data.update(name="caption_folder", data_dir=str(folder), channels=3, num_workers=2)
    config.evaluate.vae_dir = str(tiny_vae_dir)
    config.extract.update(output_dir=str(out), shard_size=3, batch_size=2, flip=True)
    main.run(config, str(tmp_path / "x"), check_files=True)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["shape"] == [4, 4, 4] and [s["num_examples"] for s in meta["shards"]] == [6, 2]
    shards = LatentShards(str(out))
    latents, _ = shards.gather(np.arange(8))
    txt, vec = shards.gather_text(np.arange(8))
    np.testing.assert_array_equal(txt[0], txt[1])      # the flip copy shares the caption
    src = create_source(_folder_cfg(folder), local_batch_size=1)
    encoders = text_conditioning.from_config(config.text)
    want_txt, _ = encoders.encode([src.captions[src.caption_ids[3]]])
    np.testing.assert_allclose(txt[6], want_txt[0], atol=1e-5)
    vae, variables = load_vae(tiny_vae_dir)
    image = src._load_example(3, 0, 0)[0]
    for copy, x in enumerate((image, image[:, ::-1])):   # the documented encoder noise
        posterior = vae.apply(variables, jnp.asarray(x[None]), method="encode")
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(3), 3), copy)
        want = vae.scale_latents(posterior.from_noise(jax.random.normal(key, (1, 4, 4, 4))))
        np.testing.assert_allclose(latents[6 + copy], want[0], atol=1e-5)
    src.close()


def test_bad_inputs_give_clear_errors(tmp_path):
    # Latent shards without text: FLUX training names the fix.
    write_latent_shards(tmp_path / "plain", [(np.zeros((8, 16, 16, 1)), np.zeros(8, int))], 8)
    config = _tiny_config()
    config.data.update(name="latents", path=str(tmp_path / "plain"))
    config_lib.validate(config)                        # allowed: the shards are read later
    source = create_source(config.data, local_batch_size=8)
    with pytest.raises(ValueError, match="re-extract the shards with the text family"):
        train.text_conditioner(config, source)
    source.close()

    def error(mode="train", **overrides):
        config = _tiny_config()
        config.mode = mode
        for key, value in overrides.items():
            section, name = key.split("__")
            config[section][name] = value
        with pytest.raises(ConfigError) as info:
            config_lib.validate(config)
            config_lib.check_sources(config, str(tmp_path / "run"))
        return str(info.value)

    assert error(data__name="digits").startswith("config.data.name='digits': FLUX trains")
    assert "image-caption source" in error("extract", data__name="latents")
    assert error("extract", extract__flip=True).startswith("config.extract.flip=True")
    missing = str(tmp_path / "missing")
    assert error(data__name="caption_folder", data__data_dir=missing).startswith(
        f"config.data.data_dir={missing!r}: no such file")
    assert error(data__name="caption_folder").startswith("config.data.data_dir=None")
    # A latent FLUX (16 channels) extracts through its autoencoder; a pixel one needs none.
    assert error("extract", model__in_channels=16).startswith("config.evaluate.vae_dir=None")
