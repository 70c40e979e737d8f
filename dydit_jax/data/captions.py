"""Image-caption sets for text-to-image (FLUX): a folder of images with .txt captions, or a tfds
dataset with an image and a text feature.

``caption_folder``: every image file of ``data_dir`` (``.png .jpg .jpeg .webp``, read with
PIL; subfolders too) with a caption in the file of the same path and stem with the extension
``.txt`` (``0001.png`` + ``0001.txt``; the caption is the file's text, stripped). Files are
listed once, sorted by path, so example ``i`` is the same file on every host and after every
restart; an image without its .txt is an error that names it.

``tfds_captions``: the tfds dataset ``tfds_name`` / ``split`` in ``data_dir``, read with random
access as ``imagenet`` reads (array_record, ``decode`` "pil" or "tfds"); ``image_key`` names
the image feature, ``caption_key`` the text feature ("a/b" for a nested one; a sequence of
captions, COCO's kind, gives its first). Every caption is read once when the source opens.

Both: the image is converted to RGB (``channels=3``) or gray (``channels=1``), center-cropped
and resized to ``image_size`` as DiT does (``transforms.center_crop_arr``), optionally flipped
(``random_flip``, per example from seed / epoch / index; off by default: a caption may say
"left") and scaled to [-1, 1]. Batches are {"image": float32 [b, S, S, C], "label": int32 [b]
(0: no classes), "caption": int32 [b] (an index into ``source.captions``, the distinct captions
sorted)}; ``source.caption_ids`` [N] holds every example's index. Training adds their T5 /
CLIP embeddings on the host (`text_conditioning.BatchConditioner`, as for ``captioned_digits``);
``config.mode=extract`` stores them with each example's latent (`extract_latents`).

Config keys: ``data_dir`` (required for the folder; tfds's default directory when None),
``image_size``, ``channels`` (1 or 3), ``random_flip``, ``num_workers`` (decode threads),
``prefetch``, ``seed``, ``shuffle``; tfds also ``tfds_name``, ``split``, ``decode``,
``image_key``, ``caption_key``.
"""
from __future__ import annotations

import os

import numpy as np

from dydit_jax.data import base, transforms

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def list_captioned_images(data_dir: str) -> tuple[list[str], list[str]]:
    """(image paths sorted, their captions) of a caption folder (see the module docstring)."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"config.data.data_dir={data_dir!r} is not a folder of images "
                                "with .txt captions")
    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(data_dir) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise FileNotFoundError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) in {data_dir} "
                                "(config.data.data_dir)")
    texts = [os.path.splitext(p)[0] + ".txt" for p in paths]
    missing = [t for t in texts if not os.path.isfile(t)]
    if missing:
        raise FileNotFoundError(f"{data_dir}: {len(missing)} image(s) without a caption, e.g. "
                                f"{paths[texts.index(missing[0])]} (no {missing[0]}): every "
                                "image needs a .txt of the same name (config.data.data_dir)")
    captions = []
    for t in texts:
        with open(t, encoding="utf-8") as f:
            captions.append(f.read().strip())
    return paths, captions


class CaptionSource(base.DataSource):
    """Shared by the image-caption sources: preprocessing of `_read_image(index)` (a PIL
    image), the caption index of each example, the batches."""
    per_example = True

    def _init_captions(self, cfg, texts, *, process_index, process_count, local_batch_size):
        self.image_size = int(base.cfg_require(cfg, "image_size", self.name))
        self.channels = int(base.cfg_get(cfg, "channels", 3))
        if self.channels not in (1, 3):
            raise ValueError(f"config.data.channels={self.channels}: data.name={self.name} "
                             "reads RGB (3) or gray (1) images")
        self.random_flip = bool(base.cfg_get(cfg, "random_flip", False))
        self.captions = sorted(set(texts))
        index = {c: i for i, c in enumerate(self.captions)}
        self.caption_ids = np.asarray([index[c] for c in texts], np.int32)
        self.image_shape = (self.image_size, self.image_size, self.channels)
        self.num_classes = 1
        self.sampler = base.EpochSampler(
            len(texts), local_batch_size, seed=base.cfg_get(cfg, "seed", 0),
            shuffle=bool(base.cfg_get(cfg, "shuffle", True)), process_index=process_index,
            process_count=process_count)
        super().__init__(num_workers=int(base.cfg_get(cfg, "num_workers", 1)),
                         prefetch=int(base.cfg_get(cfg, "prefetch", 2)))

    def _read_image(self, index: int):
        raise NotImplementedError

    def _load_example(self, index, epoch, seed):
        image = self._read_image(index).convert("L" if self.channels == 1 else "RGB")
        image = transforms.center_crop_arr(image, self.image_size)
        if self.random_flip and base.flip_mask(seed, epoch, index):
            image = image[:, ::-1]
        image = transforms.uint8_to_unit(image).reshape(self.image_shape)
        return image, 0, int(self.caption_ids[index])

    @staticmethod
    def _collate(examples):
        return {"image": np.stack([e[0] for e in examples]),
                "label": np.asarray([e[1] for e in examples], np.int32),
                "caption": np.asarray([e[2] for e in examples], np.int32)}


class CaptionFolderSource(CaptionSource):
    name = "caption_folder"

    def __init__(self, cfg, *, process_index: int, process_count: int, local_batch_size: int):
        data_dir = os.path.expanduser(str(base.cfg_require(cfg, "data_dir", self.name)))
        self.paths, texts = list_captioned_images(data_dir)
        self._init_captions(cfg, texts, process_index=process_index,
                            process_count=process_count, local_batch_size=local_batch_size)

    def _read_image(self, index):
        from PIL import Image
        with Image.open(self.paths[index]) as im:
            return im.copy()   # loaded, independent of the closed file


def _caption_text(example, key: str) -> str:
    value = example
    for part in key.split("/"):
        value = value[part]
    if isinstance(value, (list, tuple, np.ndarray)) and not isinstance(value, (str, bytes)):
        value = value[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsCaptionsSource(CaptionSource):
    name = "tfds_captions"

    def __init__(self, cfg, *, process_index: int, process_count: int, local_batch_size: int):
        import tensorflow_datasets as tfds
        tfds_name = str(base.cfg_require(cfg, "tfds_name", self.name))
        split = str(base.cfg_get(cfg, "split", "train"))
        data_dir = base.cfg_get(cfg, "data_dir", None)
        self.image_key = str(base.cfg_get(cfg, "image_key", "image"))
        caption_key = str(base.cfg_get(cfg, "caption_key", "caption"))
        decode = str(base.cfg_get(cfg, "decode", "pil"))
        if decode not in ("pil", "tfds"):
            raise ValueError(f"config.data.decode={decode!r}; valid: pil, tfds")
        builder = tfds.builder(tfds_name, data_dir=data_dir)
        features = builder.info.features
        for key, what in ((self.image_key, "image_key"), (caption_key.split("/")[0],
                                                          "caption_key")):
            if key not in features:
                raise ValueError(f"config.data.{what}={key!r}: tfds {tfds_name!r} has the "
                                 f"features {sorted(features.keys())}")
        decoders = {self.image_key: tfds.decode.SkipDecoding()} if decode == "pil" else None
        try:
            self.ds = builder.as_data_source(split=split, decoders=decoders)
        except Exception as e:  # re-raised with guidance
            raise RuntimeError(f"could not open tfds {tfds_name!r} split {split!r} for random "
                               f"access in data_dir={data_dir!r}: {e}. Prepare it with "
                               "file_format='array_record' (`tfds build --file_format="
                               "array_record`).") from e
        texts = [_caption_text(self.ds[i], caption_key) for i in range(len(self.ds))]
        self._init_captions(cfg, texts, process_index=process_index,
                            process_count=process_count, local_batch_size=local_batch_size)

    def _read_image(self, index):
        return transforms.to_pil_rgb(self.ds[index][self.image_key])
