"""UCF-101 (13,320 videos of 101 actions, class-conditional) as prepared by tfds's ``ucf101``.

tfds stores each video as feature "video" (a sequence of JPEG frames, [T, H, W, 3] uint8 once
decoded) and "label" (0..100). Its ``Video`` feature cannot even be constructed without
TensorFlow, so this source reads the prepared files directly, as the imagenet source reads
ArrayRecord without TensorFlow: the split's ``array_record`` shards (named by the builder's
``dataset_info.json``) give random access to serialized ``tf.train.Example`` records, parsed
with tfds's bundled proto; only the clip's frames are JPEG-decoded (PIL). Clip sampling and
preprocessing: :mod:`dydit_jax.data.clips` (16 frames at stride 3 by default, Latte's UCF
setting; short videos are spread over their whole length).

Preparing (once; needs ``pip install tensorflow-cpu`` and an ``ffmpeg`` binary, like tfds's
ucf101 builder itself): ``tfds build ucf101/ucf101_1 --file_format=array_record
--data_dir=DIR``. Use the ``ucf101_1`` (or ``_2``, ``_3``) config, the videos at their
320x240: ``ucf101_1_256`` has them squashed to 256x256, which the short-side resize of Latte
does not undo. All 13,320 videos (train and test lists of a split): ``split="train+test"``.

Config keys: ``data_dir`` (tfds data directory; None: ``$TFDS_DATA_DIR`` or
``~/tensorflow_datasets``), ``ucf101_config`` (default "ucf101_1"; the newest version found
is read), ``split`` ("train", "test" or names joined by "+"), and the clip keys of
:mod:`~dydit_jax.data.clips`. With several hosts every host opens the whole split and takes
its slice of the global per-epoch permutation.
"""
from __future__ import annotations

import io
import json
import os
import re

from PIL import Image

from dydit_jax.data import base, clips

DEFAULT_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


def builder_dir(data_dir: str | None, config_name: str) -> str:
    """``<data_dir>/ucf101/<config_name>/<newest version>``."""
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    root = os.path.join(os.path.expanduser(data_dir), "ucf101", config_name)
    versions = [v for v in (os.listdir(root) if os.path.isdir(root) else [])
                if re.fullmatch(r"\d+\.\d+\.\d+", v)
                and os.path.exists(os.path.join(root, v, "dataset_info.json"))]
    if not versions:
        raise FileNotFoundError(
            f"no prepared tfds ucf101/{config_name} in {root!r} (config.data.data_dir="
            f"{data_dir!r}, config.data.ucf101_config={config_name!r}): prepare it once with "
            f"`tfds build ucf101/{config_name} --file_format=array_record --data_dir=...` "
            "(needs tensorflow-cpu and ffmpeg)")
    newest = max(versions, key=lambda v: tuple(int(x) for x in v.split(".")))
    return os.path.join(root, newest)


def split_files(directory: str, split: str) -> tuple[list[str], int]:
    """The ArrayRecord shard paths of ``split`` (names joined by "+") in a tfds builder
    directory, in index order, and their example count (from ``dataset_info.json``)."""
    with open(os.path.join(directory, "dataset_info.json")) as f:
        info = json.load(f)
    if info.get("fileFormat") != "array_record":
        raise ValueError(
            f"{directory} holds tfds files in format {info.get('fileFormat', 'tfrecord')!r}; "
            "random access needs array_record: rebuild with `tfds build ucf101/... "
            "--file_format=array_record`")
    splits = {s["name"]: s for s in info.get("splits", [])}
    paths, count = [], 0
    for name in split.split("+"):
        if name not in splits:
            raise ValueError(f"config.data.split={split!r}: {directory} has no split {name!r} "
                             f"(has {', '.join(sorted(splits))}; slicing such as "
                             "'train[:10%]' is not supported)")
        lengths = [int(n) for n in splits[name].get("shardLengths", [])]
        template = splits[name].get("filepathTemplate") or DEFAULT_TEMPLATE
        for i in range(len(lengths)):
            file = (template.replace("{DATASET}", info["name"]).replace("{SPLIT}", name)
                    .replace("{FILEFORMAT}", "array_record")
                    .replace("{SHARD_X_OF_Y}", f"{i:05d}-of-{len(lengths):05d}"))
            paths.append(os.path.join(directory, file))
        count += sum(lengths)
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"tfds split {split!r}: {len(missing)} shards missing in "
                                f"{directory}, e.g. {os.path.basename(missing[0])}")
    return paths, count


def num_classes(directory: str) -> int:
    """The "label" ClassLabel's class count from the builder's ``features.json``."""
    with open(os.path.join(directory, "features.json")) as f:
        features = json.load(f)
    try:
        label = features["featuresDict"]["features"]["label"]
        return int(label["classLabel"]["numClasses"])
    except (KeyError, TypeError):
        raise ValueError(f"{directory}/features.json has no ClassLabel feature 'label'") from None


def parse_example(record: bytes) -> tuple[list[bytes], int]:
    """A serialized tfds ucf101 example -> (JPEG bytes of each frame, label)."""
    from tensorflow_datasets.proto import tf_example_pb2

    feature = tf_example_pb2.Example.FromString(record).features.feature
    if "video" not in feature or "label" not in feature:
        raise ValueError(f"a ucf101 record needs features 'video' and 'label', has "
                         f"{sorted(feature)}")
    return list(feature["video"].bytes_list.value), int(feature["label"].int64_list.value[0])


class Ucf101Source(clips.ClipSource):
    name = "ucf101"

    def __init__(self, cfg, *, process_index: int, process_count: int, local_batch_size: int):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.directory = builder_dir(base.cfg_get(cfg, "data_dir", None),
                                     str(base.cfg_get(cfg, "ucf101_config", "ucf101_1")))
        self.split = str(base.cfg_get(cfg, "split", "train"))
        paths, count = split_files(self.directory, self.split)
        self.records = ArrayRecordDataSource(paths)
        if len(self.records) != count:
            raise ValueError(f"{self.directory}: split {self.split!r} has {len(self.records)} "
                             f"records, dataset_info.json says {count}")
        self.num_classes = num_classes(self.directory)
        self._init_clips(cfg, count, process_index=process_index, process_count=process_count,
                         local_batch_size=local_batch_size)

    def _read_clip(self, index, choose):
        frames, label = parse_example(self.records[index])
        if not frames:
            raise ValueError(f"ucf101 {self.split} example {index} has no frames")
        want = choose(len(frames))
        decoded = {int(i): Image.open(io.BytesIO(frames[i])).convert("RGB") for i in set(want)}
        return [decoded[int(i)] for i in want], label

    def close(self) -> None:
        super().close()
        self.records.__exit__(None, None, None)
