"""Input pipelines: deterministic, host-sharded, exactly resumable batch sources.

Usage::

    source = dydit_jax.data.create_source(
        config.data, process_index=jax.process_index(),
        process_count=jax.process_count(), local_batch_size=b)
    batch = source.next()      # {"image": float32 [b, H, W, C], "label": int32 [b]}
    state = source.get_state() # small JSON-able dict, store it in the checkpoint
    source.set_state(state)    # the following batches equal an uninterrupted run's

``config.data.name`` picks the source: "digits" (sklearn 8x8 digits upsampled),
"captioned_digits" (the same with a caption each, for text-to-image),
"caption_folder" / "tfds_captions" (image-caption sets: a folder of images with same-stem
``.txt`` captions, or a tfds dataset with an image and a text feature),
"moving_digits" (videos of those digits bouncing on a canvas, [b, F, H, W, C]),
"imagenet" (tfds random access + DiT center crop), "ucf101" (tfds-prepared UCF-101
clips, [b, F, S, S, 3]), "video_folder" (clips of the video files in a folder, by
class subfolder), "latents" (pre-extracted VAE latents in ``.npz`` shards, images or
clips, with T5 / CLIP embeddings for text-to-image; :mod:`~dydit_jax.data.latents`) or
"synthetic" (random data for benchmarks). Common keys: ``image_size``, ``seed``,
``shuffle``. See :mod:`dydit_jax.data.base` for the ordering / sharding / resume model and
each module's docstring for its keys.
"""
from __future__ import annotations

import importlib
from typing import Any

from dydit_jax.data.base import DataSource, EpochSampler
from dydit_jax.data.latents import LatentShards, write_latent_shards
from dydit_jax.data.transforms import center_crop_arr

# name -> (module, class), imported on use: a source's dependencies (tfds, PyAV, ...) load only
# when it is picked.
_SOURCE_CLASSES = {
    "digits": ("digits", "DigitsSource"),
    "captioned_digits": ("captioned_digits", "CaptionedDigitsSource"),
    "caption_folder": ("captions", "CaptionFolderSource"),
    "tfds_captions": ("captions", "TfdsCaptionsSource"),
    "moving_digits": ("moving_digits", "MovingDigitsSource"),
    "imagenet": ("imagenet", "ImageNetSource"),
    "ucf101": ("ucf101", "Ucf101Source"),
    "video_folder": ("video_folder", "VideoFolderSource"),
    "latents": ("latents", "LatentSource"),
    "synthetic": ("synthetic", "SyntheticSource"),
}
SOURCES = tuple(_SOURCE_CLASSES)
VIDEO_SOURCES = ("moving_digits", "ucf101", "video_folder")   # batches [b, F, H, W, C]
# Batches with "caption" indices into `source.captions` (text-to-image).
CAPTION_SOURCES = ("captioned_digits", "caption_folder", "tfds_captions")


def create_source(
    config: Any,
    *,
    process_index: int = 0,
    process_count: int = 1,
    local_batch_size: int,
) -> DataSource:
    """Build the batch source named by ``config.name`` (``config`` is ``config.data``)."""
    name = getattr(config, "name", None) if not hasattr(config, "get") else config.get("name")
    if name not in _SOURCE_CLASSES:
        raise ValueError(f"unknown config.data.name {name!r}; valid names: "
                         f"{', '.join(SOURCES)}")
    module, cls = _SOURCE_CLASSES[name]
    source = getattr(importlib.import_module(f"dydit_jax.data.{module}"), cls)
    return source(config, process_index=int(process_index), process_count=int(process_count),
                  local_batch_size=local_batch_size)


__all__ = [
    "CAPTION_SOURCES",
    "SOURCES",
    "VIDEO_SOURCES",
    "DataSource",
    "EpochSampler",
    "LatentShards",
    "center_crop_arr",
    "create_source",
    "write_latent_shards",
]
