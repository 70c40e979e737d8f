"""Input pipelines: shapes, determinism, exact resume, host sharding, formats, errors."""
import io
import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from dydit_jax import data
from dydit_jax.data import base


def _cfg(**kw):
    return ml_collections.ConfigDict(kw)


def _digits_cfg(**kw):
    d = dict(name="digits", image_size=16, seed=0, shuffle=True)
    d.update(kw)
    return _cfg(**d)


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k  # bitwise


def _check_exact_resume(make_source, k, n):
    """Consume k batches, save state (through JSON), restore into a fresh source."""
    ref = make_source()
    uninterrupted = [ref.next() for _ in range(k + n)]
    ref.close()
    first = make_source()
    for _ in range(k):
        first.next()
    state = json.loads(json.dumps(first.get_state()))
    first.next()  # the interrupted run may have gone further before dying
    first.close()
    resumed = make_source()
    resumed.set_state(state)
    for i in range(n):
        _assert_batches_equal(resumed.next(), uninterrupted[k + i])
    resumed.close()


# --------------------------------------------------------------------------- digits
@pytest.mark.parametrize("size,channels,resize", [(16, 1, "nearest"), (32, 3, "bilinear")])
def test_digits_shapes_range_labels(size, channels, resize):
    src = data.create_source(
        _digits_cfg(image_size=size, channels=channels, resize=resize), local_batch_size=32
    )
    assert src.image_shape == (size, size, channels) and src.num_classes == 10
    assert src.steps_per_epoch == 1797 // 32
    b = src.next()
    assert b["image"].shape == (32, size, size, channels) and b["image"].dtype == np.float32
    assert b["label"].shape == (32,) and b["label"].dtype == np.int32
    assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
    assert b["image"].min() == -1.0 and b["image"].max() == 1.0
    assert set(b["label"].tolist()) <= set(range(10))
    if channels == 3:
        np.testing.assert_array_equal(b["image"][..., 0], b["image"][..., 2])


def test_digits_nearest_matches_sklearn():
    from sklearn.datasets import load_digits

    src = data.create_source(_digits_cfg(image_size=32, shuffle=False), local_batch_size=8)
    b = src.next()
    d = load_digits()
    np.testing.assert_array_equal(b["label"], d.target[:8])
    pooled = b["image"][..., 0].reshape(8, 8, 4, 8, 4).mean(axis=(2, 4))  # undo 4x4 blocks
    np.testing.assert_allclose((pooled + 1) * 8, d.images[:8], atol=1e-5)


def test_digits_determinism_and_epoch_reshuffle():
    a = data.create_source(_digits_cfg(), local_batch_size=64)
    b = data.create_source(_digits_cfg(), local_batch_size=64)
    for _ in range(3):
        _assert_batches_equal(a.next(), b.next())
    other = data.create_source(_digits_cfg(seed=1), local_batch_size=64)
    assert not np.array_equal(other.batch_indices(0, 0), a.batch_indices(0, 0))
    # Each epoch is a fresh permutation, and within an epoch no example repeats.
    e0 = np.concatenate([a.batch_indices(0, s) for s in range(a.steps_per_epoch)])
    e1 = np.concatenate([a.batch_indices(1, s) for s in range(a.steps_per_epoch)])
    assert len(set(e0.tolist())) == len(e0) == a.steps_per_epoch * 64
    assert not np.array_equal(e0, e1)
    # Without shuffling the order is the dataset order.
    ordered = data.create_source(_digits_cfg(shuffle=False), local_batch_size=64)
    np.testing.assert_array_equal(ordered.batch_indices(3, 2), np.arange(128, 192))


def test_digits_exact_resume_across_epoch_boundary():
    make = lambda: data.create_source(_digits_cfg(random_flip=True), local_batch_size=100)
    steps = make().steps_per_epoch  # 17
    _check_exact_resume(make, k=steps - 2, n=5)  # resumed run crosses into epoch 1
    src = make()
    for _ in range(steps + 1):
        src.next()
    assert src.get_state()["epoch"] == 1 and src.get_state()["index"] == 1


def test_per_host_disjoint_slices():
    b, hosts = 50, 2
    srcs = [
        data.create_source(
            _digits_cfg(), local_batch_size=b, process_index=p, process_count=hosts
        )
        for p in range(hosts)
    ]
    single = data.create_source(_digits_cfg(), local_batch_size=b * hosts)
    assert srcs[0].steps_per_epoch == srcs[1].steps_per_epoch == single.steps_per_epoch
    for epoch in (0, 1):
        seen = [
            np.concatenate([s.batch_indices(epoch, i) for i in range(s.steps_per_epoch)])
            for s in srcs
        ]
        assert not set(seen[0].tolist()) & set(seen[1].tolist())
        for i in range(single.steps_per_epoch):  # global batch independent of host count
            np.testing.assert_array_equal(
                np.concatenate([s.batch_indices(epoch, i) for s in srcs]),
                single.batch_indices(epoch, i),
            )
    x0, x1 = srcs[0].next(), srcs[1].next()
    assert x0["image"].shape == (b, 16, 16, 1)
    assert not np.array_equal(x0["image"], x1["image"])


def test_bad_configs_and_states():
    with pytest.raises(ValueError, match="imagenet, ucf101, video_folder, latents, synthetic"):
        data.create_source(_cfg(name="mnist"), local_batch_size=4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        data.create_source(_digits_cfg(), local_batch_size=1000, process_count=2)
    with pytest.raises(ValueError, match="multiple of 8"):
        data.create_source(_digits_cfg(image_size=20), local_batch_size=4)
    src = data.create_source(_digits_cfg(), local_batch_size=16)
    state = src.get_state()
    other = data.create_source(_digits_cfg(), local_batch_size=32)
    with pytest.raises(ValueError, match="global_batch_size"):
        other.set_state(state)


# --------------------------------------------------------------------------- latents
def _random_latents(n_batches=5, per_batch=7, shape=(4, 4, 4), seed=0):
    rng = np.random.default_rng(seed)
    lat = rng.normal(size=(n_batches * per_batch, *shape)).astype(np.float32)
    lab = rng.integers(0, 10, size=n_batches * per_batch)
    return lat, lab


def test_latents_round_trip(tmp_path):
    lat, lab = _random_latents()
    # Batches of varying sizes, a dict item and a single example.
    items = [(lat[:7], lab[:7]), {"latents": lat[7:20], "labels": lab[7:20]}, (lat[20], lab[20])]
    items.append((lat[21:], lab[21:]))
    meta = data.write_latent_shards(tmp_path, iter(items), shard_size=10, metadata={"vae": "x"})
    assert [s["num_examples"] for s in meta["shards"]] == [10, 10, 10, 5]
    assert meta["shape"] == [4, 4, 4] and meta["metadata"] == {"vae": "x"}
    shards = data.LatentShards(tmp_path)
    assert len(shards) == 35 and shards.shape == (4, 4, 4)
    assert all(isinstance(a, np.memmap) for a in shards._latents)  # read lazily
    got_lat, got_lab = shards.gather(np.arange(35))
    np.testing.assert_array_equal(got_lat, lat)
    np.testing.assert_array_equal(got_lab, lab)
    perm = np.random.default_rng(1).permutation(35)
    got_lat, got_lab = shards.gather(perm)
    np.testing.assert_array_equal(got_lat, lat[perm])
    np.testing.assert_array_equal(got_lab, lab[perm])
    # Through the source, in order.
    src = data.create_source(
        _cfg(name="latents", path=str(tmp_path), seed=0, shuffle=False), local_batch_size=5
    )
    assert src.image_shape == (4, 4, 4) and src.steps_per_epoch == 7
    out = [src.next() for _ in range(7)]
    np.testing.assert_array_equal(np.concatenate([o["image"] for o in out]), lat)
    np.testing.assert_array_equal(np.concatenate([o["label"] for o in out]), lab)
    assert out[0]["label"].dtype == np.int32 and out[0]["image"].dtype == np.float32
    src.close()
    with pytest.raises(FileExistsError):
        data.write_latent_shards(tmp_path, iter(items), shard_size=10)


def test_latents_without_meta_and_compressed(tmp_path):
    lat, lab = _random_latents()
    np.savez_compressed(tmp_path / "a.npz", latents=lat[:20], labels=lab[:20])
    np.savez(tmp_path / "b.npz", latents=lat[20:], labels=lab[20:])
    shards = data.LatentShards(tmp_path)
    got_lat, got_lab = shards.gather(np.arange(35)[::-1])
    np.testing.assert_array_equal(got_lat, lat[::-1])
    np.testing.assert_array_equal(got_lab, lab[::-1])


def test_latents_exact_resume_with_flip_and_prefetch(tmp_path):
    lat, lab = _random_latents(n_batches=6, per_batch=10)
    data.write_latent_shards(tmp_path, [(lat, lab)], shard_size=16)
    cfg = _cfg(
        name="latents", path=str(tmp_path), seed=3, shuffle=True, latent_flip=True,
        num_workers=2, prefetch=3,
    )
    make = lambda: data.create_source(cfg, local_batch_size=8)  # 7 steps per epoch
    _check_exact_resume(make, k=5, n=6)
    # Flips are applied along W, per example.
    src = data.create_source(cfg, local_batch_size=8)
    idx = src.batch_indices(0, 0)
    b = src.next()
    flipped = base.flip_mask(3, 0, idx)
    assert 0 < flipped.sum() < 8
    np.testing.assert_array_equal(b["image"][flipped], lat[idx][flipped][:, :, ::-1])
    np.testing.assert_array_equal(b["image"][~flipped], lat[idx][~flipped])
    src.close()


def test_latents_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.create_source(
            _cfg(name="latents", path=str(tmp_path / "nope"), seed=0, shuffle=True),
            local_batch_size=2,
        )
    with pytest.raises(FileNotFoundError, match="no .npz"):
        data.LatentShards(tmp_path)
    with pytest.raises(ValueError, match="path is required"):
        data.create_source(_cfg(name="latents", seed=0, shuffle=True), local_batch_size=2)
    np.savez(tmp_path / "a.npz", latents=np.zeros((3, 4, 4, 4), np.float32), labels=np.zeros(3))
    with pytest.raises(ValueError, match="labels"):
        data.LatentShards(tmp_path)  # float labels
    labels = np.zeros(3, np.int64)
    np.savez(tmp_path / "a.npz", latents=np.zeros((3, 4, 4, 4), np.float32), labels=labels)
    np.savez(tmp_path / "b.npz", latents=np.zeros((3, 8, 8, 4), np.float32), labels=labels)
    with pytest.raises(ValueError, match="inconsistent shapes.*b.npz"):
        data.LatentShards(tmp_path)
    with pytest.raises(ValueError, match="inconsistent latent shapes"):
        data.write_latent_shards(
            tmp_path / "w", [(np.zeros((2, 4, 4, 4)), [0, 1]), (np.zeros((2, 4, 4, 8)), [0, 1])], 4
        )


# --------------------------------------------------------------------------- synthetic
def test_synthetic():
    cfg = _cfg(
        name="synthetic", image_size=8, channels=4, num_classes=7, seed=0, shuffle=True,
        num_examples=64,
    )
    a, b = (data.create_source(cfg, local_batch_size=16) for _ in range(2))
    x = a.next()
    assert x["image"].shape == (16, 8, 8, 4) and x["image"].dtype == np.float32
    assert x["label"].dtype == np.int32 and x["label"].min() >= 0 and x["label"].max() < 7
    assert np.abs(x["image"]).max() <= 1.0
    _assert_batches_equal(x, b.next())
    _check_exact_resume(lambda: data.create_source(cfg, local_batch_size=16), k=3, n=3)


# --------------------------------------------------------------------------- center crop
def _expected_center_crop(pil_image, image_size, halvings, resized_wh):
    """The crop spelled out for one case: the halvings and the resized size are given."""
    for _ in range(halvings):
        pil_image = pil_image.resize((pil_image.size[0] // 2, pil_image.size[1] // 2), Image.BOX)
    arr = np.asarray(pil_image.resize(resized_wh, Image.BICUBIC))
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


# (w, h) after the halvings: (217, 300) -> (108, 150) -> short side 64: (64, 89); etc.
_CROP_CASES = {((300, 217), 64): (1, (64, 89)), ((97, 131), 32): (1, (43, 32)),
               ((40, 40), 64): (0, (64, 64)), ((512, 700), 256): (1, (350, 256))}


@pytest.mark.parametrize(
    "hw,size", [((300, 217), 64), ((97, 131), 32), ((40, 40), 64), ((512, 700), 256)]
)
def test_center_crop_matches_pil_reference(hw, size):
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(h * w)
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx * yy) % 256], -1).astype(np.int32)
    img = np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
    got = data.center_crop_arr(Image.fromarray(img), size)
    want = _expected_center_crop(Image.fromarray(img), size, *_CROP_CASES[(hw, size)])
    assert got.shape == (size, size, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(data.center_crop_arr(img, size), want)  # ndarray input


# --------------------------------------------------------------------------- imagenet (tfds)
def _imagenet_cfg(**kw):
    d = dict(
        name="imagenet", tfds_name="imagenet2012", data_dir="/nonexistent/tfds", split="train",
        image_size=32, seed=0, shuffle=True, num_workers=2, prefetch=2,
    )
    d.update(kw)
    return _cfg(**d)


def test_imagenet_mock_data_shapes_and_resume():
    tfds = pytest.importorskip("tensorflow_datasets")
    # tfds's mock cannot fake undecoded JPEG bytes without TensorFlow, so let tfds decode.
    cfg = _imagenet_cfg(decode="tfds")
    with tfds.testing.mock_data(num_examples=24):
        src = data.create_source(cfg, local_batch_size=4)
        assert src.num_classes == 1000 and src.image_shape == (32, 32, 3)
        assert src.steps_per_epoch == 6
        b = src.next()
        assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
        assert b["label"].shape == (4,) and b["label"].dtype == np.int32
        assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
        assert ((0 <= b["label"]) & (b["label"] < 1000)).all()
        src.close()
        _check_exact_resume(lambda: data.create_source(cfg, local_batch_size=4), k=4, n=4)
        for p in range(2):  # per-host split (the mock ignores split slicing)
            src = data.create_source(cfg, local_batch_size=4, process_index=p, process_count=2)
            assert src.next()["image"].shape == (4, 32, 32, 3)
            src.close()


def _tiny_tfds_builder(tmp_path_factory):
    """A real (not mocked) array_record tfds dataset, prepared without TensorFlow."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from etils import epath

    class DyditTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        pkg_dir_path = epath.Path(tmp_path_factory.mktemp("tiny_pkg"))

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(encoding_format="jpeg"),
                        "label": tfds.features.ClassLabel(num_classes=5),
                    }
                )
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(21)}

        def _generate_examples(self, n):
            rng = np.random.default_rng(0)
            for i in range(n):
                h, w = 40 + 3 * i, 70 - 2 * i
                arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="JPEG")  # JPEG bytes: no TF to encode
                buf.seek(0)
                yield i, {"image": buf, "label": i % 5}

    data_dir = str(tmp_path_factory.mktemp("tiny_tfds"))
    builder = tfds.builder("dydit_tiny_images", data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return data_dir


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
    return _tiny_tfds_builder(tmp_path_factory)


def test_imagenet_real_tfds_pipeline_matches_reference(tiny_tfds_dir):
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = _imagenet_cfg(tfds_name="dydit_tiny_images", data_dir=tiny_tfds_dir, image_size=16)
    src = data.create_source(cfg, local_batch_size=4)
    assert src.num_examples == 21 and src.num_classes == 5 and src.steps_per_epoch == 5
    idx = src.batch_indices(0, 0)
    b = src.next()
    assert b["image"].shape == (4, 16, 16, 3) and b["label"].dtype == np.int32
    # Reference: PIL decode -> DiT center crop -> flip -> [-1, 1].
    raw = tfds.builder("dydit_tiny_images", data_dir=tiny_tfds_dir).as_data_source(
        split="train", decoders={"image": tfds.decode.SkipDecoding()}
    )
    flips = base.flip_mask(0, 0, idx)
    for j, i in enumerate(idx):
        ex = raw[int(i)]
        ref = data.center_crop_arr(Image.open(io.BytesIO(ex["image"])).convert("RGB"), 16)
        if flips[j]:
            ref = ref[:, ::-1]
        np.testing.assert_allclose(b["image"][j], ref / 127.5 - 1.0, atol=1e-6)
        assert b["label"][j] == ex["label"]
    src.close()
    _check_exact_resume(lambda: data.create_source(cfg, local_batch_size=4), k=4, n=3)


@pytest.mark.parametrize("host_split", ["tfds", "global"])
def test_imagenet_real_tfds_host_split_disjoint(tiny_tfds_dir, host_split):
    cfg = _imagenet_cfg(
        tfds_name="dydit_tiny_images", data_dir=tiny_tfds_dir, image_size=8, random_flip=False,
        host_split=host_split,
    )
    seen = []
    for p in range(2):
        src = data.create_source(cfg, local_batch_size=2, process_index=p, process_count=2)
        assert src.steps_per_epoch == 5  # 10 examples per host (21 // 2), 2 per batch
        imgs = np.concatenate([src.next()["image"] for _ in range(src.steps_per_epoch)])
        seen.append({im.tobytes() for im in imgs})
        assert len(seen[-1]) == 10
        src.close()
    assert not seen[0] & seen[1]
