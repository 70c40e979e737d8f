"""Pre-extracted VAE latents stored as ``.npz`` shards, with T5 / CLIP embeddings for
text-to-image.

On-disk format (``FORMAT``, written by :func:`write_latent_shards` and by mode=extract,
`dydit_jax.extract_latents`)::

    <path>/latents-00000.npz   np.savez (uncompressed) with
                                 latents: float32 [n, h, w, c]  (NHWC; c = 4 for SD VAEs),
                                          or [n, F, h, w, c] for clips of F frames
                                 labels:  int32   [n]
                               text-to-image shards (mode=extract with a text family, FLUX;
                               a pixel-space FLUX's "latents" are its pixels) also hold:
                                 txt:      float32 [n, L, d_t5]  T5 sequence embeddings
                                 vec:      float32 [n, d_clip]   pooled CLIP embeddings
                                 captions: str     [n]           the captions (not read)
    <path>/latents-00001.npz   ... all shards hold `shard_size` examples but the last
    <path>/empty_prompt.npz    text-to-image only: txt [L, d_t5] and vec [d_clip] of the
                               empty prompt (caption dropout, `text_conditioning.EmbeddingDropout`)
    <path>/meta.json           {"format": "dydit-latents-v1", "num_examples": N,
                                "shape": [h, w, c] or [F, h, w, c], "dtype": "float32",
                                "shards": [{"file": "latents-00000.npz", "num_examples": n}, ...],
                                "metadata": {...}}   # free-form, e.g. vae name, scale_factor;
                                                     # "text": {"settings": config.text's
                                                     # (text_conditioning.text_settings),
                                                     # "context_in_dim", "vec_in_dim", ...}

The stored values are exactly what training consumes: the extractor must store
*scaled* latents (e.g. ``vae.encode(x).sample() * 0.18215``) and may record the
factor in ``metadata``. ``meta.json`` is written last, so its presence marks a
complete dataset; without it the reader falls back to all ``*.npz`` files in the
directory but ``empty_prompt.npz``, in sorted order (handy for shards written by other tools).

Reading memory-maps each shard's ``latents`` (and ``txt`` / ``vec``) member (uncompressed npz
members are contiguous ``.npy`` data inside the zip), so only the rows of each batch are read;
compressed shards (``np.savez_compressed``) also work but are loaded whole. Batches are
{"image", "label"}, plus "txt" and "vec" when the shards hold them (a text-to-image model
trains on those as they are, `train.text_conditioner`). The text arrays are optional and
either in every shard or in none, so image-only datasets read as before.

Config keys: ``path`` (required), ``latent_flip`` (default False: flip the W axis
per example, every frame of a clip alike, keyed by seed/epoch/index),
``num_workers`` (threads gathering batches ahead, default 1), ``prefetch`` (batches
in flight, default 2), ``seed``, ``shuffle``.
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from dydit_jax.data import base

FORMAT = "dydit-latents-v1"
META_FILE = "meta.json"
SHARD_PATTERN = "latents-{:05d}.npz"
EMPTY_PROMPT_FILE = "empty_prompt.npz"
TEXT_ARRAYS = ("txt", "vec")   # per-example text embeddings of text-to-image shards


# --------------------------------------------------------------------------- writing
def _as_pairs(item: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(item, Mapping):
        lat, lab = item["latents"], item["labels"]
    else:
        lat, lab = item
    lat = np.asarray(lat)
    lab = np.asarray(lab)
    if lat.ndim == 3:  # a single example
        lat, lab = lat[None], lab.reshape(1)
    if lat.ndim not in (4, 5):
        raise ValueError(f"latents must be [n, h, w, c], clips [n, F, h, w, c] (or one image "
                         f"[h, w, c]), got shape {lat.shape}")
    lab = lab.reshape(-1)
    if lab.shape[0] != lat.shape[0]:
        raise ValueError(f"got {lat.shape[0]} latents but {lab.shape[0]} labels")
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    return lat, lab


def write_latent_shards(
    path: str | os.PathLike,
    latents_iter: Iterable[Any],
    shard_size: int,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``(latents [n, h, w, c] or [n, F, h, w, c], labels [n])`` batches as a latent
    dataset.

    ``latents_iter`` yields ``(latents, labels)`` tuples or ``{"latents", "labels"}``
    dicts; ``n`` may vary between items (``[h, w, c]`` with a scalar label is one
    example). Latents are stored as float32 NHWC, labels as int32, in shards of
    ``shard_size`` examples (the last may be smaller). ``metadata`` (JSON-able) is
    kept in ``meta.json``. Returns the ``meta.json`` content.
    """
    shard_size = int(shard_size)
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    existing = [f for f in os.listdir(path) if f.endswith(".npz") or f == META_FILE]
    if existing:
        if not overwrite:
            raise FileExistsError(
                f"{path} already holds a latent dataset ({len(existing)} files); "
                "pass overwrite=True to replace it"
            )
        for f in existing:
            os.remove(os.path.join(path, f))

    shards: list[dict[str, Any]] = []
    shape: tuple[int, ...] | None = None
    buf_lat: list[np.ndarray] = []
    buf_lab: list[np.ndarray] = []
    buffered = 0

    def flush(n: int) -> None:
        nonlocal buf_lat, buf_lab, buffered
        lat = np.concatenate(buf_lat) if len(buf_lat) > 1 else buf_lat[0]
        lab = np.concatenate(buf_lab) if len(buf_lab) > 1 else buf_lab[0]
        name = SHARD_PATTERN.format(len(shards))
        tmp = os.path.join(path, name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, latents=np.ascontiguousarray(lat[:n]), labels=lab[:n])
        os.replace(tmp, os.path.join(path, name))
        shards.append({"file": name, "num_examples": int(n)})
        buf_lat, buf_lab = ([lat[n:]], [lab[n:]]) if len(lat) > n else ([], [])
        buffered = len(lat) - n

    for item in latents_iter:
        lat, lab = _as_pairs(item)
        if shape is None:
            shape = tuple(int(s) for s in lat.shape[1:])
        elif tuple(lat.shape[1:]) != shape:
            raise ValueError(f"inconsistent latent shapes: {tuple(lat.shape[1:])} vs {shape}")
        if len(lat) == 0:
            continue
        buf_lat.append(lat.astype(np.float32, copy=False))
        buf_lab.append(lab.astype(np.int32))
        buffered += len(lat)
        while buffered >= shard_size:
            flush(shard_size)
    if buffered:
        flush(buffered)
    if not shards:
        raise ValueError("latents_iter yielded no examples")

    meta = {
        "format": FORMAT,
        "num_examples": int(sum(s["num_examples"] for s in shards)),
        "shape": list(shape),
        "dtype": "float32",
        "shards": shards,
        "metadata": dict(metadata or {}),
    }
    tmp = os.path.join(path, META_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(path, META_FILE))
    return meta


# --------------------------------------------------------------------------- reading
def _read_npy_header(f, version):
    fmt = np.lib.format
    if version == (1, 0):
        return fmt.read_array_header_1_0(f)
    if version == (2, 0):
        return fmt.read_array_header_2_0(f)
    return fmt._read_array_header(f, version)  # v3 (utf8 field names)


def _npz_member_info(path: str, member: str):
    """(shape, dtype, data_offset or None) of ``member`` (e.g. 'latents') in an npz file.

    ``data_offset`` is the byte offset of the raw array data in the file when the
    member is stored uncompressed in C order (so it can be memory-mapped), else None.
    """
    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(member + ".npy")
        except KeyError:
            raise ValueError(
                f"latent shard {path} has no array {member!r} (has {zf.namelist()})"
            ) from None
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = _read_npy_header(f, version)
            header_len = f.tell()
    if info.compress_type != zipfile.ZIP_STORED or fortran or dtype.hasobject:
        return shape, dtype, None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            return shape, dtype, None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
    return shape, dtype, info.header_offset + 30 + name_len + extra_len + header_len


def _npz_members(path: str) -> set:
    """The array names of an npz file ("latents", "labels", ...)."""
    with zipfile.ZipFile(path) as zf:
        return {n[:-4] for n in zf.namelist() if n.endswith(".npy")}


def _open_member(path: str, member: str):
    """(array, shape, dtype) of ``member``: a memmap when it is stored uncompressed, else the
    array loaded."""
    shape, dtype, offset = _npz_member_info(path, member)
    if offset is not None:
        return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset), shape, dtype
    with np.load(path) as z:
        return np.asarray(z[member]), shape, dtype


class LatentShards:
    """Random access to a latent dataset directory (validated on open)."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"latent dataset directory {path!r} does not exist")
        self.path = path
        meta_path = os.path.join(path, META_FILE)
        self.meta: dict[str, Any] = {}
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                self.meta = json.load(f)
            if self.meta.get("format") != FORMAT:
                raise ValueError(
                    f"{meta_path}: unknown format {self.meta.get('format')!r}, expected {FORMAT!r}"
                )
            files = [s["file"] for s in self.meta["shards"]]
            for f in files:
                if not os.path.exists(os.path.join(path, f)):
                    raise FileNotFoundError(f"{meta_path} lists shard {f!r}, missing in {path}")
        else:
            files = sorted(f for f in os.listdir(path)
                           if f.endswith(".npz") and f != EMPTY_PROMPT_FILE)
        if not files:
            raise FileNotFoundError(f"no .npz latent shards in {path!r}")

        self._latents: list[np.ndarray] = []
        self._text: dict[str, list[np.ndarray]] = {k: [] for k in TEXT_ARRAYS}
        labels = []
        counts = []
        shape = None
        for i, name in enumerate(files):
            fp = os.path.join(path, name)
            lat, lshape, ldtype = _open_member(fp, "latents")
            bshape, bdtype, _ = _npz_member_info(fp, "labels")
            if len(lshape) not in (4, 5):
                raise ValueError(f"latent shard {fp}: latents must be [n, h, w, c] or clips "
                                 f"[n, F, h, w, c], got {lshape}")
            if shape is None:
                shape, first = tuple(lshape[1:]), name
            elif tuple(lshape[1:]) != shape:
                raise ValueError(
                    f"latent shards have inconsistent shapes: {name} has latents "
                    f"{tuple(lshape[1:])} per example but {first} has {shape}"
                )
            if not np.issubdtype(ldtype, np.floating):
                raise ValueError(f"latent shard {fp}: latents dtype {ldtype} is not floating")
            if bshape != (lshape[0],) or not np.issubdtype(bdtype, np.integer):
                raise ValueError(
                    f"latent shard {fp}: labels {bshape} {bdtype} do not match "
                    f"{lshape[0]} latents (need int [n])"
                )
            if self.meta:
                want = int(self.meta["shards"][i]["num_examples"])
                if want != lshape[0]:
                    raise ValueError(
                        f"latent shard {fp} holds {lshape[0]} examples, meta.json says {want}"
                    )
            self._read_text(fp, i == 0, lshape[0], files[0])
            with np.load(fp) as z:
                labels.append(np.asarray(z["labels"]).astype(np.int32))
            self._latents.append(lat)
            counts.append(int(lshape[0]))
        if self.meta and self.meta.get("shape") and tuple(self.meta["shape"]) != shape:
            raise ValueError(f"{meta_path}: shape {self.meta['shape']} != shards' {shape}")
        self.shape: tuple[int, ...] = shape   # [h, w, c] or [F, h, w, c]
        self.has_text = bool(self._text["txt"])
        # (txt [L, d_t5], vec [d_clip]) of the empty prompt, when the extractor stored it.
        self.empty_prompt: tuple[np.ndarray, np.ndarray] | None = None
        empty = os.path.join(path, EMPTY_PROMPT_FILE)
        if self.has_text and os.path.exists(empty):
            with np.load(empty) as z:
                self.empty_prompt = (np.asarray(z["txt"], np.float32),
                                     np.asarray(z["vec"], np.float32))
            if (self.empty_prompt[0].shape != self.text_shape[0]
                    or self.empty_prompt[1].shape != self.text_shape[1]):
                raise ValueError(f"{empty}: txt {self.empty_prompt[0].shape} / vec "
                                 f"{self.empty_prompt[1].shape} do not match the shards' "
                                 f"{self.text_shape}")
        self.labels = np.concatenate(labels)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.files = files

    def _read_text(self, fp: str, first: bool, n: int, first_name: str) -> None:
        """Opens shard ``fp``'s txt / vec (checked against the first shard's), if any."""
        have = _npz_members(fp) & set(TEXT_ARRAYS)
        if have and have != set(TEXT_ARRAYS):
            raise ValueError(f"latent shard {fp} has {sorted(have)} but not "
                             f"{sorted(set(TEXT_ARRAYS) - have)}: text shards hold both")
        if not first and bool(have) != bool(self._text["txt"]):
            raise ValueError(f"latent shard {fp} {'has' if have else 'lacks'} text embeddings "
                             f"(txt, vec) but {first_name} {'lacks' if have else 'has'} them: "
                             f"every shard holds them or none does")
        if not have:
            return
        (txt, tshape, _), (vec, vshape, _) = (_open_member(fp, k) for k in TEXT_ARRAYS)
        if len(tshape) != 3 or len(vshape) != 2 or tshape[0] != n or vshape[0] != n:
            raise ValueError(f"latent shard {fp}: txt {tshape} / vec {vshape} must be "
                             f"[{n}, L, d_t5] / [{n}, d_clip] for its {n} latents")
        if not first and (tuple(tshape[1:]), tuple(vshape[1:])) != self.text_shape:
            raise ValueError(f"latent shard {fp}: txt {tshape} / vec {vshape} per example "
                             f"differ from the first shard's {self.text_shape}")
        self.text_shape = (tuple(tshape[1:]), tuple(vshape[1:]))   # ([L, d_t5], [d_clip])
        self._text["txt"].append(txt)
        self._text["vec"].append(vec)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _rows(self, arrays: list, shape: tuple, indices: np.ndarray) -> np.ndarray:
        """float32 [len(indices), *shape]: the rows `indices` of per-shard `arrays`."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError("latent index out of range")
        out = np.empty((len(indices), *shape), np.float32)
        shard = np.searchsorted(self._starts, indices, side="right") - 1
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            rows = indices[sel] - self._starts[s]
            order = np.argsort(rows, kind="stable")  # read each shard in file order
            out[sel[order]] = arrays[s][rows[order]]
        return out

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(float32 [len(indices), *shape], int32 [len(indices)])`` in the given order."""
        indices = np.asarray(indices, dtype=np.int64)
        return self._rows(self._latents, self.shape, indices), self.labels[indices]

    def gather_text(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(txt float32 [len(indices), L, d_t5], vec [len(indices), d_clip])`` of text
        shards, in the given order."""
        if not self.has_text:
            raise ValueError(f"the latent shards in {self.path} hold no text embeddings")
        return tuple(self._rows(self._text[k], shape, indices)
                     for k, shape in zip(TEXT_ARRAYS, self.text_shape))


class LatentSource(base.DataSource):
    name = "latents"

    def __init__(self, cfg, *, process_index: int, process_count: int, local_batch_size: int):
        self.shards = LatentShards(base.cfg_require(cfg, "path", self.name))
        self.latent_flip = bool(base.cfg_get(cfg, "latent_flip", False))
        self.image_shape = self.shards.shape
        # Text-to-image shards: batches carry "txt" / "vec" (train.text_conditioner reads
        # these: the empty prompt's embeddings and the encoders' settings, when recorded).
        self.has_text = self.shards.has_text
        self.empty_prompt = self.shards.empty_prompt
        text_meta = self.shards.meta.get("metadata", {}).get("text", {})
        self.text_settings = text_meta.get("settings")
        meta_classes = self.shards.meta.get("metadata", {}).get("num_classes")
        self.num_classes = int(
            base.cfg_get(cfg, "num_classes", None)
            or meta_classes
            or int(self.shards.labels.max()) + 1
        )
        self.sampler = base.EpochSampler(
            len(self.shards),
            local_batch_size,
            seed=base.cfg_get(cfg, "seed", 0),
            shuffle=bool(base.cfg_get(cfg, "shuffle", True)),
            process_index=process_index,
            process_count=process_count,
        )
        super().__init__(
            num_workers=int(base.cfg_get(cfg, "num_workers", 1)),
            prefetch=int(base.cfg_get(cfg, "prefetch", 2)),
        )

    def _load_batch(self, indices, epoch, seed):
        lat, lab = self.shards.gather(indices)
        if self.latent_flip:
            flip = base.flip_mask(seed, epoch, indices)
            lat[flip] = lat[flip][..., ::-1, :]
        batch = {"image": lat, "label": lab}
        if self.shards.has_text:
            batch["txt"], batch["vec"] = self.shards.gather_text(indices)
        return batch
