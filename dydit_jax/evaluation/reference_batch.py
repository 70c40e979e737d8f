"""ADM reference and sample batches (`.npz`), read in a stream.

The ADM evaluator's files (e.g. `VIRTUAL_imagenet256_labeled.npz`, the ImageNet 256x256
reference batch DiT and DyDiT evaluate against) hold
    arr_0:        uint8 [N, H, W, 3] images (NHWC)
    mu, sigma:    float64 [2048], [2048, 2048]  pool_3 statistics   (optional)
    mu_s, sigma_s: float64 [2023], [2023, 2023] spatial statistics (optional)
and sample batches (`sampling.save_npz`) hold `arr_0` (and `arr_1` labels). When the
statistics are present the evaluator uses them instead of recomputing them from `arr_0`;
`read_reference_batch` does the same. Batches of video clips (`clips=True`: the video
evaluator's sample chunks and reference clips) hold `arr_0` uint8 [N, F, H, W, 3] instead.
Images are read `batch_size` rows at a time straight out of the zip member, so a
10,000-image batch (2 GB) never sits in memory whole.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Iterator, Optional, Tuple

import numpy as np

from dydit_jax.evaluation.fid import FIDStatistics, compute_statistics

IMAGES_KEY = "arr_0"
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclasses.dataclass(frozen=True)
class ReferenceBatch:
    """A batch file's layout and its stored statistics (None when the file has none);
    `image_shape` is (H, W, 3), or (F, H, W, 3) for clips."""
    path: str
    num_images: int
    image_shape: Tuple[int, ...]
    pool: Optional[FIDStatistics]
    spatial: Optional[FIDStatistics]
    clips: bool = False

    def iter_images(self, batch_size: int) -> Iterator[np.ndarray]:
        return iter_images(self.path, batch_size, clips=self.clips)


def _open_member(zf: zipfile.ZipFile, path: str, key: str):
    name = key + ".npy"
    if name not in zf.namelist():
        raise KeyError(f"{path!r} has no {key!r} array (it has "
                       f"{sorted(n[:-4] for n in zf.namelist())}); an ADM batch stores its "
                       f"images as {IMAGES_KEY!r}")
    f = zf.open(name)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"{path!r}: {key!r} uses .npy format {version}; expected 1.0 or 2.0")
    if fortran or dtype.hasobject:
        raise ValueError(f"{path!r}: {key!r} is Fortran-ordered or holds objects; write it with "
                         f"np.savez from a C-contiguous numeric array")
    return f, shape, dtype


def _check_images(path: str, shape, dtype, clips: bool = False):
    rank, layout = (5, "RGB clips [N, F, H, W, 3]") if clips else \
        (4, "NHWC RGB images [N, H, W, 3]")
    if len(shape) != rank or shape[-1] != 3 or dtype != np.uint8:
        raise ValueError(f"{path!r}: {IMAGES_KEY!r} must be uint8 {layout}, got {dtype} "
                         f"{tuple(shape)}")


def read_reference_batch(path: str, clips: bool = False) -> ReferenceBatch:
    """The image (clip) count and shape (without reading the images) and the stored
    statistics."""
    path = os.fspath(path)
    with zipfile.ZipFile(path) as zf:
        f, shape, dtype = _open_member(zf, path, IMAGES_KEY)
        f.close()
    _check_images(path, shape, dtype, clips)
    with np.load(path) as data:
        present = [k for k in STAT_KEYS if k in data.files]
        if present and len(present) != len(STAT_KEYS):
            raise KeyError(f"{path!r} has {present} but not "
                           f"{[k for k in STAT_KEYS if k not in present]}: a reference batch "
                           f"stores all four statistics or none")
        pool = FIDStatistics(data["mu"], data["sigma"]) if present else None
        spatial = FIDStatistics(data["mu_s"], data["sigma_s"]) if present else None
    return ReferenceBatch(path, int(shape[0]), tuple(int(s) for s in shape[1:]), pool, spatial,
                          clips)


def iter_images(path: str, batch_size: int, clips: bool = False) -> Iterator[np.ndarray]:
    """uint8 [b, H, W, 3] batches of the file's images (clips: [b, F, H, W, 3]) in order (the
    last one may be short)."""
    path = os.fspath(path)
    with zipfile.ZipFile(path) as zf:
        f, shape, dtype = _open_member(zf, path, IMAGES_KEY)
        _check_images(path, shape, dtype, clips)
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        with f:
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                data = f.read(n * row_bytes)
                if len(data) != n * row_bytes:
                    raise ValueError(f"{path!r}: {IMAGES_KEY!r} is truncated at image {start}")
                yield np.frombuffer(data, dtype).reshape((n,) + tuple(shape[1:]))


def write_reference_batch(path: str, images, pool_features=None, spatial_features=None) -> str:
    """Write an ADM-layout batch: `arr_0` images and, given both feature sets
    ([N, 2048] and [N, 17, 17, 7]), their statistics mu, sigma, mu_s, sigma_s."""
    images = np.asarray(images)
    _check_images(os.fspath(path), images.shape, images.dtype)
    arrays = {IMAGES_KEY: images}
    if (pool_features is None) != (spatial_features is None):
        raise ValueError("give both pool_features and spatial_features, or neither")
    if pool_features is not None:
        pool, spatial = compute_statistics(pool_features), compute_statistics(spatial_features)
        arrays.update(mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    np.savez(path, **arrays)
    return path
