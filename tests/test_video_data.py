"""Video files as training data: clip sampling, the ucf101 source (a tiny tfds-prepared
ArrayRecord dataset in ucf101's layout, read without TensorFlow), the video_folder source (tiny
videos written with PyAV) and mode=extract on clips (latents [n, F, h, w, 4])."""
import io
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from dydit_jax.data import base, clips, create_source, transforms

FRAMES, STRIDE, SIZE = 4, 3, 16   # span 10 frames: shorter videos are spread over


def cfg(**kw):
    return ml_collections.ConfigDict(dict(dict(image_size=SIZE, num_frames=FRAMES,
                                               frame_stride=STRIDE, seed=5, shuffle=True,
                                               num_workers=2, prefetch=2), **kw))


def clip_u(seed, epoch, index):
    return float(base.uniform_from_keys(clips.SALT_CLIP, seed, epoch, index))


def assert_resumes_exactly(make, k, n):
    """k batches, the state through JSON, a fresh source: the next n batches are the same."""
    src = make()
    for _ in range(k):
        src.next()
    state = json.loads(json.dumps(src.get_state()))
    want = [src.next() for _ in range(n)]
    src.close()
    again = make()
    again.set_state(state)
    for w in want:
        got = again.next()
        np.testing.assert_array_equal(got["image"], w["image"])
        np.testing.assert_array_equal(got["label"], w["label"])
    again.close()


def test_clip_indices_stride_start_and_short_videos():
    np.testing.assert_array_equal(clips.clip_indices(30, 4, 3, 0.0), [0, 3, 6, 9])
    np.testing.assert_array_equal(clips.clip_indices(30, 4, 3, 0.999999), [20, 23, 26, 29])
    np.testing.assert_array_equal(clips.clip_indices(10, 4, 3, 0.7), [0, 3, 6, 9])
    # Shorter than the span: the whole video at a smaller stride, frames repeat below F.
    np.testing.assert_array_equal(clips.clip_indices(7, 4, 3, 0.3), [0, 2, 4, 6])
    np.testing.assert_array_equal(clips.clip_indices(2, 4, 3, 0.3), [0, 0, 0, 1])
    with pytest.raises(ValueError, match="0 frames"):
        clips.clip_indices(0, 4, 3, 0.5)
    starts = {int(clips.clip_indices(30, 4, 3, clip_u(0, e, 7))[0]) for e in range(8)}
    assert len(starts) > 2                       # a new clip of the video each epoch
    # Latte's crop: short side to the size, then the centre.
    img = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    out = transforms.resize_short_center_crop(img, 10)
    ref = np.asarray(Image.fromarray(img).resize((15, 10), Image.BILINEAR))[:, 2:12]
    np.testing.assert_array_equal(out, ref)


# ------------------------------------------------------------------------------- ucf101 (tfds)
@pytest.fixture(scope="module")
def ucf_dirs(tmp_path_factory):
    """(tfds data dir of the tiny builder, a data dir laid out as tfds's ucf101/ucf101_1).

    The tiny builder stores "video" as a Sequence of JPEG Images, the serialized layout of
    tfds's Video feature (which needs TensorFlow to build), and "label" as a 101-way
    ClassLabel; videos of 6..30 frames of 24x32."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from etils import epath

    class DyditTinyUcf(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("2.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="ucf101_1")]
        pkg_dir_path = epath.Path(tmp_path_factory.mktemp("tiny_ucf_pkg"))

        def _info(self):
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
                "video": tfds.features.Sequence(
                    tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")),
                "label": tfds.features.ClassLabel(num_classes=101)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(7, 0),
                    "test": self._generate_examples(3, 7)}

        def _generate_examples(self, n, first):
            rng = np.random.default_rng(first)
            for i in range(first, first + n):
                frames = []
                for _ in range(6 + 4 * (i % 7)):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (24, 32, 3), np.uint8)).save(
                        buf, format="JPEG")
                    frames.append(buf.getvalue())
                yield i, {"video": frames, "label": (13 * i) % 101}

    tfds_dir = tmp_path_factory.mktemp("tiny_ucf_tfds")
    builder = tfds.builder("dydit_tiny_ucf/ucf101_1", data_dir=str(tfds_dir),
                           file_format="array_record")
    builder.download_and_prepare()
    ucf_dir = tmp_path_factory.mktemp("ucf_data_dir")
    (ucf_dir / "ucf101").mkdir()
    (ucf_dir / "ucf101" / "ucf101_1").symlink_to(tfds_dir / "dydit_tiny_ucf" / "ucf101_1")
    return tfds_dir, ucf_dir


def test_ucf101_clips_match_tfds_frames_and_resume(ucf_dirs):
    import tensorflow_datasets as tfds

    tfds_dir, ucf_dir = ucf_dirs
    c = cfg(name="ucf101", data_dir=str(ucf_dir), split="train")
    src = create_source(c, local_batch_size=2)
    assert src.num_classes == 101 and src.num_examples == 7 and src.steps_per_epoch == 3
    assert src.image_shape == (FRAMES, SIZE, SIZE, 3)
    # tfds's own reader (it decodes every frame: [T, 24, 32, 3] uint8) as the reference.
    raw = tfds.builder("dydit_tiny_ucf/ucf101_1", data_dir=str(tfds_dir)).as_data_source(
        split="train")
    lengths = set()
    for epoch in range(2):   # every video once per epoch; 6-frame videos take the short path
        for step in range(src.steps_per_epoch):
            idx = src.batch_indices(epoch, step)
            batch = src.next()
            assert batch["image"].shape == (2, FRAMES, SIZE, SIZE, 3)
            assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
            for j, i in enumerate(idx):
                ex = raw[int(i)]
                frames = ex["video"]
                lengths.add(len(frames))
                want = clips.clip_indices(len(frames), FRAMES, STRIDE, clip_u(5, epoch, i))
                ref = np.stack([transforms.resize_short_center_crop(frames[t], SIZE)
                                for t in want])
                np.testing.assert_array_equal(batch["image"][j], transforms.uint8_to_unit(ref))
                assert batch["label"][j] == ex["label"]
    assert min(lengths) < (FRAMES - 1) * STRIDE + 1 < max(lengths)
    src.close()
    assert_resumes_exactly(lambda: create_source(c, local_batch_size=2), k=2, n=3)
    both = create_source(cfg(name="ucf101", data_dir=str(ucf_dir), split="train+test"),
                         local_batch_size=2)
    assert both.num_examples == 10
    both.close()


def test_ucf101_errors_name_the_fix(ucf_dirs, tmp_path):
    _, ucf_dir = ucf_dirs
    with pytest.raises(FileNotFoundError, match="tfds build ucf101/ucf101_2"):
        create_source(cfg(name="ucf101", data_dir=str(ucf_dir), ucf101_config="ucf101_2"),
                      local_batch_size=2)
    with pytest.raises(ValueError, match="no split 'val'"):
        create_source(cfg(name="ucf101", data_dir=str(ucf_dir), split="val"),
                      local_batch_size=2)


# ------------------------------------------------------------------------------- video_folder
def write_video(path, frames, codec, pix_fmt, rate=8):
    """uint8 frames [T, H, W, 3] -> a video file through PyAV."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())


def gray_levels(t):
    """Flat gray frames whose level 20 + 8 t names the frame: [t, 20, 24, 3]."""
    return np.broadcast_to((20 + 8 * np.arange(t, dtype=np.uint8))[:, None, None, None],
                           (t, 20, 24, 3)).copy()


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    """Two classes: a/ a lossless FFV1 .avi of random frames and an H.264 .mp4; b/ a 6-frame
    gray .gif (shorter than the span) and, one folder deeper, a VP9 .webm (its container gives
    no frame count). 24 frames of 20x24 unless said."""
    pytest.importorskip("av")
    root = tmp_path_factory.mktemp("videos")
    (root / "a").mkdir()
    (root / "b" / "deep").mkdir(parents=True)
    rand = np.random.default_rng(0).integers(0, 256, (24, 20, 24, 3), np.uint8)
    write_video(root / "a" / "rand.avi", rand, "ffv1", "bgr0")
    write_video(root / "a" / "gray.mp4", gray_levels(24), "libx264", "yuv420p")
    write_video(root / "b" / "short.gif", gray_levels(6), "gif", "gray")
    write_video(root / "b" / "deep" / "gray.webm", gray_levels(24), "libvpx-vp9", "yuv420p")
    (root / "b" / "notes.txt").write_text("not a video")
    return root, rand


def test_video_folder_decodes_labels_and_resumes(video_dir):
    root, rand = video_dir
    c = cfg(name="video_folder", data_dir=str(root))
    src = create_source(c, local_batch_size=2)
    names = [pathlib.Path(p).relative_to(root).as_posix() for p in src.paths]
    assert names == ["a/gray.mp4", "a/rand.avi", "b/deep/gray.webm", "b/short.gif"]
    assert src.num_classes == 2 and src.labels == [0, 0, 1, 1]
    lengths = {"a/gray.mp4": 24, "a/rand.avi": 24, "b/deep/gray.webm": 24, "b/short.gif": 6}
    for epoch in range(2):
        for step in range(src.steps_per_epoch):
            idx = src.batch_indices(epoch, step)
            batch = src.next()
            assert batch["image"].shape == (2, FRAMES, SIZE, SIZE, 3)
            for j, i in enumerate(idx):
                name = names[i]
                want = clips.clip_indices(lengths[name], FRAMES, STRIDE, clip_u(5, epoch, i))
                assert batch["label"][j] == (name[0] == "b")
                clip = batch["image"][j]
                if name == "a/rand.avi":   # lossless: exactly the reference pipeline
                    ref = np.stack([transforms.resize_short_center_crop(rand[t], SIZE)
                                    for t in want])
                    np.testing.assert_array_equal(clip, transforms.uint8_to_unit(ref))
                else:   # flat gray frames: the level names the frame (H.264/VP9: +-1 level)
                    levels = (clip.mean(axis=(1, 2, 3)) + 1) * 127.5
                    np.testing.assert_array_equal(np.rint((levels - 20) / 8), want)
                    assert np.abs(levels - (20 + 8 * want)).max() <= 1.5
    src.close()
    assert_resumes_exactly(lambda: create_source(c, local_batch_size=2), k=1, n=4)


def test_video_folder_unconditional_and_errors(video_dir, tmp_path):
    root, rand = video_dir
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "rand.avi").symlink_to(root / "a" / "rand.avi")
    (flat / "broken.mp4").write_bytes(b"\x00 not a video" * 50)
    src = create_source(cfg(name="video_folder", data_dir=str(flat), shuffle=False,
                            num_workers=0), local_batch_size=1)
    assert src.num_classes == 1 and src.labels == [0, 0]
    with pytest.raises(ValueError, match="cannot decode .*broken.mp4"):
        src.next()
    src.set_state({"epoch": 0, "index": 1})
    assert src.next()["image"].shape == (1, FRAMES, SIZE, SIZE, 3)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no video files"):
        create_source(cfg(name="video_folder", data_dir=str(tmp_path / "empty")),
                      local_batch_size=1)
    (flat / "cls").mkdir()
    (flat / "cls" / "x.avi").symlink_to(root / "a" / "rand.avi")
    with pytest.raises(ValueError, match="both directly and in subfolders"):
        create_source(cfg(name="video_folder", data_dir=str(flat)), local_batch_size=1)


# ------------------------------------------------------------------------------- extract clips
def test_extract_encodes_clips_per_frame(tiny_vae_dir, tmp_path):
    from dydit_jax import config_lib, main
    from dydit_jax.convert_vae import load_vae
    from dydit_jax.data import LatentShards

    config = config_lib.base_config()
    config.mode, config.seed = "extract", 3
    config.model.update(input_size=6, in_channels=4)    # 12 px frames, VAE downsampling 2
    config.data.update(name="moving_digits", image_size=12, channels=3, num_frames=3,
                       num_examples=5, seed=1)
    config.evaluate.vae_dir = str(tiny_vae_dir)
    out = tmp_path / "latents"
    config.extract.update(output_dir=str(out), shard_size=4, batch_size=3, flip=True)
    result = main.run(config, str(tmp_path))
    assert result["encoded_shards"] == [0, 1]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["shape"] == [3, 6, 6, 4] and meta["num_examples"] == 10
    shards = LatentShards(str(out))
    latents, labels = shards.gather(np.arange(10))

    # Rows 2i, 2i+1: clip i and its mirror image, frame f with the noise of fold_in(key, f).
    vae, variables = load_vae(tiny_vae_dir)
    encode = jax.jit(lambda x, noise: vae.scale_latents(
        vae.apply(variables, x, method="encode").from_noise(noise)))
    source = create_source(dict(config.data.to_dict(), shuffle=False), local_batch_size=1)
    frames, noise, rows = [], [], []
    for i in (0, 4):
        clip = source.clips([i])
        assert labels[2 * i] == labels[2 * i + 1] == clip["label"][0]
        for copy, x in enumerate((clip["image"][0], clip["image"][0][:, :, ::-1])):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(3), i), copy)
            frames.append(x)
            noise += [jax.random.normal(jax.random.fold_in(key, f), (6, 6, 4)) for f in range(3)]
            rows.append(2 * i + copy)
    want = encode(jnp.concatenate(frames), jnp.stack(noise)).reshape(4, 3, 6, 6, 4)
    np.testing.assert_allclose(latents[rows], want, atol=1e-5, rtol=1e-5)

    lat = create_source(dict(name="latents", path=str(out), seed=0, shuffle=False,
                             latent_flip=True), local_batch_size=5)
    batch = lat.next()
    assert batch["image"].shape == (5, 3, 6, 6, 4) and lat.image_shape == (3, 6, 6, 4)
    flips = base.flip_mask(0, 0, np.arange(5))
    for j in range(5):   # latent_flip mirrors W in every frame
        np.testing.assert_array_equal(batch["image"][j],
                                      latents[j][:, :, ::-1] if flips[j] else latents[j])
    lat.close()
