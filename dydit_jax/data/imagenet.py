"""ImageNet (or any tfds image-classification dataset) via tfds random access.

Reading uses ``builder.as_data_source`` (ArrayRecord random access), which needs
no TensorFlow: JPEG bytes are read with ``tfds.decode.SkipDecoding()`` and
decoded with PIL (``Image.open(...).convert("RGB")``, as DiT's ImageFolder
loader does), then :func:`~dydit_jax.data.transforms.center_crop_arr`, a random
horizontal flip (decided per example from ``seed``, ``epoch`` and the example
index) and scaling to [-1, 1]. The dataset must have been prepared in the
``array_record`` file format.

Preparing: set ``config.data.download_and_prepare = True`` to run
``builder.download_and_prepare(download_config=DownloadConfig(manual_dir=...))``
with ``file_format="array_record"`` (ImageNet needs ``ILSVRC2012_img_train.tar``
in ``manual_dir``). tfds's ``imagenet2012`` builder itself calls
``tf.io.gfile`` while preparing, so that one-time step needs
``pip install tensorflow-cpu`` (and ``importlib_resources``, which tfds 4.9.10
imports without declaring it); training reads without either.

Config keys: ``tfds_name`` (default "imagenet2012"), ``data_dir``, ``manual_dir``,
``split`` (default "train"), ``image_size``, ``random_flip`` (default True),
``download_and_prepare`` (default False), ``host_split`` ("tfds", the default:
host ``p`` opens ``tfds.even_splits(split, process_count, drop_remainder=True)[p]``
and reads only its own files, shuffled per epoch within that share; or
"global": every host opens the whole split and takes its slice of a global
per-epoch permutation, so the global batch stream does not depend on the host
count), ``decode`` ("pil", the default, or "tfds": let tfds decode the image),
``num_workers`` (decode threads, default ``min(32, cpu_count)``), ``prefetch``
(batches in flight, default 2), ``seed``, ``shuffle``.
"""
from __future__ import annotations

import os

from dydit_jax.data import base, transforms


def _tfds():
    import tensorflow_datasets as tfds

    return tfds


class ImageNetSource(base.DataSource):
    name = "imagenet"
    per_example = True

    def __init__(self, cfg, *, process_index: int, process_count: int, local_batch_size: int):
        tfds = _tfds()
        self.image_size = int(base.cfg_require(cfg, "image_size", self.name))
        self.random_flip = bool(base.cfg_get(cfg, "random_flip", True))
        self.tfds_name = str(base.cfg_get(cfg, "tfds_name", "imagenet2012"))
        self.split = str(base.cfg_get(cfg, "split", "train"))
        self.host_split = str(base.cfg_get(cfg, "host_split", "tfds"))
        if self.host_split not in ("tfds", "global"):
            raise ValueError(
                f"imagenet host_split must be 'tfds' or 'global', got {self.host_split!r}"
            )
        self.decode = str(base.cfg_get(cfg, "decode", "pil"))
        if self.decode not in ("pil", "tfds"):
            raise ValueError(f"imagenet decode must be 'pil' or 'tfds', got {self.decode!r}")
        data_dir = base.cfg_get(cfg, "data_dir", None)
        prepare = bool(base.cfg_get(cfg, "download_and_prepare", False))

        builder_kwargs = {"data_dir": data_dir}
        if prepare:
            builder_kwargs["file_format"] = "array_record"
        builder = tfds.builder(self.tfds_name, **builder_kwargs)
        if prepare:
            manual_dir = base.cfg_get(cfg, "manual_dir", None)
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
            )
        self.builder = builder

        if self.host_split == "tfds" and process_count > 1:
            split = tfds.even_splits(self.split, n=process_count, drop_remainder=True)[
                process_index
            ]
            sampler_pi, sampler_pc = 0, 1
        else:
            split = self.split
            sampler_pi, sampler_pc = process_index, process_count
        decoders = {"image": tfds.decode.SkipDecoding()} if self.decode == "pil" else None
        try:
            self.ds = builder.as_data_source(split=split, decoders=decoders)
        except Exception as e:  # re-raised with guidance
            raise RuntimeError(
                f"could not open tfds {self.tfds_name!r} split {split!r} for random access in "
                f"data_dir={data_dir!r}: {e}. The dataset must be prepared with "
                "file_format='array_record' (set config.data.download_and_prepare=True with "
                "manual_dir, or run `tfds build --file_format=array_record`)."
            ) from e

        label = builder.info.features["label"]
        self.num_classes = int(label.num_classes)
        self.image_shape = (self.image_size, self.image_size, 3)
        n = len(self.ds)
        # Key for per-example randomness: unique across hosts in both split modes.
        tfds_split = self.host_split == "tfds" and process_count > 1
        self._key_offset = process_index * n if tfds_split else 0
        self.sampler = base.EpochSampler(
            n,
            local_batch_size,
            seed=base.cfg_get(cfg, "seed", 0),
            shuffle=bool(base.cfg_get(cfg, "shuffle", True)),
            process_index=sampler_pi,
            process_count=sampler_pc,
        )
        num_workers = base.cfg_get(cfg, "num_workers", None)
        if num_workers is None:
            num_workers = min(32, os.cpu_count() or 1)
        super().__init__(num_workers=num_workers, prefetch=int(base.cfg_get(cfg, "prefetch", 2)))

    def _load_example(self, index, epoch, seed):
        ex = self.ds[index]
        image = transforms.center_crop_arr(transforms.to_pil_rgb(ex["image"]), self.image_size)
        if self.random_flip and base.flip_mask(seed, epoch, index + self._key_offset):
            image = image[:, ::-1]
        return transforms.uint8_to_unit(image), int(ex["label"])
