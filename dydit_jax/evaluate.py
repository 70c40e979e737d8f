"""The evaluate mode: sample N images, then FID, sFID, Inception Score, precision and recall;
for a video model (Latte) N clips, then FVD and per-frame FID.

    python -m dydit_jax.main --config=configs/dit_xl.py --workdir=runs/dit_xl \
        --config.mode=evaluate --config.evaluate.vae_dir=sd-vae-ft-ema \
        --config.evaluate.inception_path=inception_fid.npz \
        --config.evaluate.reference_batch=VIRTUAL_imagenet256_labeled.npz

The protocol of DiT's sample_ddp.py + the ADM evaluator (the defaults of `config.evaluate`:
50,000 samples, 250 DDPM steps, CFG 1.5), for the weights `config.sample.checkpoint` names
(empty: the workdir's latest checkpoint, EMA unless `sample.use_ema=False`):

1. Labels are uniform over `model.num_classes`: chunk k of `chunk_size` samples draws its
   labels from `np.random.default_rng([seed, k])`, and batch j of the chunk samples with
   `fold_in(fold_in(PRNGKey(seed), k), j)`. A chunk is thus a pure function of the weights,
   the sampler settings, the seed, its index and the global batch size.
2. Sampling is sharded over the batch (the mesh's data and fsdp axes, parameters replicated;
   the global batch `evaluate.batch_size` is rounded up to a multiple of the device count, the
   last batch of a chunk is padded). Latent models (`data.name=latents`, or any model when
   `evaluate.vae_dir` is set) are decoded with the VAE batch by batch (clips frame by frame),
   so memory is bounded by one batch. Images go to uint8 exactly as sample_ddp.py does
   (`sampling.to_uint8`); gray images are repeated to RGB.
3. Each chunk is written atomically (a temporary file, then a rename) to
   `<workdir>/eval/chunk_00000.npz`, ... in the ADM layout (`arr_0` uint8 NHWC, or clips
   [n, F, H, W, 3], `arr_1` labels). A rerun (after a preemption) keeps every complete chunk
   whose labels match and samples only the missing ones. `eval/spec.json` records the
   settings that the chunks depend on; a rerun with different ones (other weights, sampler,
   guidance, seed, chunk size, ...) is refused instead of mixing samples: delete `eval/` or
   use another workdir.
4. Inception features of all chunks (sharded over the batch) and of the reference:
   `evaluate.reference_batch`, an ADM `.npz` (its stored mu/sigma/mu_s/sigma_s are used when
   present; precision/recall always use its images' features), or without one the first
   `evaluate.num_reference` (0: min(N, 10,000)) images of the data source's epoch-0 order
   (`config.data`; latent datasets decoded with the VAE). Reference features are cached in
   `eval/reference.npz`.
5. The metrics (`evaluation.evaluator.compute_metrics`, the ADM evaluator's definitions; the
   Inception Score over min(10, N) splits) go to `eval/metrics.json` and a printed table.

Video models (`families.family_of(config).video`) follow the same steps with clips: chunks
hold uint8 clips, the reference is `evaluate.reference_batch` holding clips (`arr_0` uint8
[M, F, H, W, 3] with the model's F frames; stored statistics are not used) or the first
`evaluate.num_reference` (0: min(N, 10,000)) clips of the data source's epoch-0 order (for
FVD2048: N = 2048 samples and 2048 real clips). The metrics are those of
`evaluation.video_metrics` (FVD: the Frechet distance of the Kinetics-400 I3D's logits of
`evaluate.i3d_path`, clips resized to 224x224; per-frame FID, with `evaluate.inception_path`:
every frame an image), computed here sharded and streamed, chunk by chunk. The I3D needs
clips of at least 9 frames (the protocol: 16), which the config check demands.

Multi-host runs need `workdir` on a filesystem that all hosts share (chunks are written by
process 0 and read back by every process). The Inception weights are the FID network's
(`evaluation/inception.py` says how to get and convert them once), the I3D weights FVD's
(`evaluation/i3d.py`); nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Iterator, List, Tuple

import jax
import numpy as np
from tqdm import tqdm

from dydit_jax import sampling
from dydit_jax import sharding as sharding_lib
from dydit_jax.evaluation import i3d
from dydit_jax.evaluation.evaluator import FEATURES, compute_metrics
from dydit_jax.evaluation.fid import FIDStatistics, compute_statistics, frechet_distance
from dydit_jax.evaluation.fvd import FEATURE as FVD_FEATURE
from dydit_jax.evaluation.reference_batch import iter_images, read_reference_batch
from dydit_jax.families import family_of

EVAL_DIR = "eval"
CHUNK_PATTERN = "chunk_{:05d}.npz"
SPEC_FILE = "spec.json"
METRICS_FILE = "metrics.json"
REFERENCE_CACHE = "reference.npz"
# Images (clips) drawn from the data when no reference batch is given and
# evaluate.num_reference is 0: at most this many (the ADM reference batches hold 10,000).
REFERENCE_FROM_DATA = 10_000
# The metrics of clips, in table order: each compares the samples' and the reference's
# features of its name (`make_clip_feature_fn`) by the Frechet distance.
VIDEO_METRICS = ("fvd", "fid_per_frame")

_TABLE = (("fid", "FID"), ("sfid", "sFID"), ("inception_score", "Inception Score"),
          ("precision", "Precision"), ("recall", "Recall"), ("fvd", "FVD"),
          ("fid_per_frame", "FID per frame"))


# ----------------------------------------------------------------------------------------------
# Small helpers (also used by extract_latents)
# ----------------------------------------------------------------------------------------------

def is_main_process() -> bool:
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across hosts (nothing on a single host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def global_array(x: np.ndarray, sharding) -> jax.Array:
    """A global jax.Array of `x` (the same host value on every process) laid out by `sharding`."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-host sharded) array on this host."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def atomic_savez(path: str, **arrays) -> None:
    """np.savez to `path` through a temporary file and a rename (a reader never sees a partial
    file; a killed writer leaves only the temporary one)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def atomic_write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def padded(x: np.ndarray, size: int) -> np.ndarray:
    """`x` with its first axis padded to `size` by repeating its last row."""
    if len(x) == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


def as_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 images [..., H, W, C] (or clips) with C = 1 repeated to RGB; C = 3 as is."""
    if images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    if images.shape[-1] != 3:
        raise ValueError(f"images with {images.shape[-1]} channels cannot be evaluated: a "
                         f"latent model needs config.evaluate.vae_dir to decode its samples")
    return images


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

def is_latent(config) -> bool:
    """Whether samples are VAE latents: a latent dataset, or a VAE given for decoding."""
    return config.data.name == "latents" or config.evaluate.vae_dir is not None


def is_video(config) -> bool:
    """Whether samples are clips [N, F, H, W, C] (a video family, e.g. Latte)."""
    return family_of(config).video


def load_vae(config):
    """(vae, variables) of `config.evaluate.vae_dir` (a diffusers AutoencoderKL folder)."""
    if not config.evaluate.vae_dir:
        raise ValueError("a latent model (data.name=latents) needs the VAE that made its "
                         "latents: set --config.evaluate.vae_dir=<diffusers AutoencoderKL "
                         "folder, e.g. sd-vae-ft-ema>")
    from dydit_jax.convert_vae import load_vae as load
    return load(config.evaluate.vae_dir)


def load_feature_model(config):
    """(InceptionV3, variables) from `config.evaluate.inception_path`."""
    path = config.evaluate.inception_path
    if not path:
        raise ValueError("set --config.evaluate.inception_path=<FID Inception weights .npz>; "
                         "see dydit_jax/evaluation/inception.py for the file and its one-time "
                         "conversion")
    from dydit_jax.evaluation.inception import load_inception
    return load_inception(path)


def load_clip_model(config):
    """(InceptionI3d, variables) from `config.evaluate.i3d_path` (FVD's Kinetics-400 I3D)."""
    path = config.evaluate.i3d_path
    if not path:
        raise ValueError("FVD needs the Kinetics-400 I3D: set --config.evaluate.i3d_path=<i3d "
                         "weights .npz>; see dydit_jax/evaluation/i3d.py for the file and its "
                         "one-time conversion")
    return i3d.load_i3d(path)


def make_decode_fn(vae, mesh):
    """latents [B, h, w, c] (diffusion units, batch-sharded) -> uint8 images [B, H, W, 3];
    clips [B, F, h, w, c] -> [B, F, H, W, 3], their B * F frames decoded as one batch."""
    out = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding_lib.BATCH_AXES))

    def decode(v, z):
        frames = z.reshape((-1,) + z.shape[-3:])
        x = sampling.to_uint8(vae.apply(v, frames, method="decode_latents"))
        return x.reshape(z.shape[:-3] + x.shape[1:])
    return jax.jit(decode, out_shardings=out)


def checkpoint_id(config, workdir: str) -> str:
    """What the weights are: the `sample.checkpoint` source, or the workdir's latest step."""
    if config.sample.checkpoint:
        return os.path.abspath(config.sample.checkpoint)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) \
        else []
    return f"workdir step {max(steps)}" if steps else "params given"


def sample_spec(config, workdir: str, batch: int) -> Dict[str, Any]:
    """The settings the chunks depend on (see the module docstring)."""
    sc, ec = config.sample, config.evaluate
    spec = dict(checkpoint=checkpoint_id(config, workdir), use_ema=sc.use_ema,
                model=config.model.to_dict(), dynamic=config.dynamic.to_dict(),
                cfg_scale=ec.cfg_scale, guide_channels=sc.guide_channels,
                engine=sc.engine, seed=ec.seed, chunk_size=ec.chunk_size, batch_size=batch,
                vae_dir=os.path.abspath(ec.vae_dir) if ec.vae_dir else None)
    if config.transport.enabled:
        spec["sampler"] = dict(transport=config.transport.to_dict())
    else:
        spec["sampler"] = dict(name=ec.sampler, num_steps=ec.num_steps, eta=sc.eta,
                               clip_denoised=sc.clip_denoised,
                               diffusion=config.diffusion.to_dict())
    return json.loads(json.dumps(spec))  # tuples -> lists, as read back from the file


def check_spec(path: str, spec: Dict[str, Any]) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
    if diff:
        details = "; ".join(f"{k}: {old.get(k)!r} -> {spec.get(k)!r}" for k in diff)
        raise ValueError(f"{os.path.dirname(path)} holds samples made with other settings "
                         f"({details}); delete it or evaluate in another workdir")


# ----------------------------------------------------------------------------------------------
# Samples, chunk by chunk
# ----------------------------------------------------------------------------------------------

def chunk_labels(seed: int, index: int, size: int, num_classes: int) -> np.ndarray:
    return np.random.default_rng([seed, index]).integers(0, num_classes, size).astype(np.int64)


def chunk_sizes(num_samples: int, chunk_size: int) -> List[int]:
    full, rest = divmod(num_samples, chunk_size)
    return [chunk_size] * full + ([rest] if rest else [])


def _chunk_complete(path: str, labels: np.ndarray, clips: bool) -> bool:
    if not os.path.exists(path):
        return False
    try:
        batch = read_reference_batch(path, clips=clips)
        with np.load(path) as f:
            stored = f["arr_1"] if "arr_1" in f.files else None
    except Exception:  # noqa: BLE001 - an unreadable chunk is resampled
        return False
    return (batch.num_images == len(labels) and stored is not None
            and np.array_equal(stored, labels))


def sample_chunks(config, workdir: str, params=None) -> Tuple[List[str], List[int]]:
    """Writes the missing chunks; returns (all chunk paths, indices sampled in this call)."""
    ec = config.evaluate
    if ec.num_samples < 2 or ec.chunk_size < 1 or ec.batch_size < 1:
        raise ValueError(f"config.evaluate needs num_samples >= 2, chunk_size >= 1 and "
                         f"batch_size >= 1, got {ec.num_samples}, {ec.chunk_size}, "
                         f"{ec.batch_size}")
    out_dir = os.path.join(workdir, EVAL_DIR)
    mesh = sharding_lib.create_mesh(config.mesh.data, config.mesh.fsdp)
    n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = round_up(min(ec.batch_size, ec.chunk_size), n_shards)
    spec = sample_spec(config, workdir, batch)
    if is_main_process():
        os.makedirs(out_dir, exist_ok=True)
        check_spec(os.path.join(out_dir, SPEC_FILE), spec)
        atomic_write_json(os.path.join(out_dir, SPEC_FILE), spec)
    sync("evaluate_spec")

    sizes = chunk_sizes(ec.num_samples, ec.chunk_size)
    num_classes = config.model.num_classes
    paths = [os.path.join(out_dir, CHUNK_PATTERN.format(k)) for k in range(len(sizes))]
    video = is_video(config)
    todo = [k for k, n in enumerate(sizes)
            if not _chunk_complete(paths[k], chunk_labels(ec.seed, k, n, num_classes), video)]
    if todo and is_main_process():
        print(f"evaluate: {len(sizes) - len(todo)} of {len(sizes)} chunks already sampled; "
              f"sampling {len(todo)} ({sum(sizes[k] for k in todo)} samples)")
    if not todo:
        return paths, []

    from dydit_jax.compile_clock import CompileClock
    from dydit_jax.generate import build_sample_fn, load_sampling_params, timing_line
    from dydit_jax.train import build_model
    with CompileClock() as clock:   # the whole sampling: setup, compiles, every chunk
        t0 = time.perf_counter()
        model = build_model(config)
        if params is None:
            params = load_sampling_params(config, workdir, model)
        params = jax.device_put(params, sharding_lib.replicated(mesh))
        sample = build_sample_fn(config, model, mesh, params, ec.sampler, ec.num_steps,
                                 ec.cfg_scale, plan_dir=os.path.join(workdir, "plans"))
        decode = None
        if is_latent(config):
            vae, vae_vars = load_vae(config)
            vae_vars = jax.device_put(vae_vars, sharding_lib.replicated(mesh))
            decode_fn = make_decode_fn(vae, mesh)
            decode = lambda z: decode_fn(vae_vars, z)  # noqa: E731
        batch_sharding = sharding_lib.batch_sharding(mesh)
        base_rng = jax.random.PRNGKey(ec.seed)

        bar = tqdm(total=sum(sizes[k] for k in todo), desc="evaluate: sample",
                   unit="clip" if video else "img",
                   disable=not is_main_process(), dynamic_ncols=True)
        for k in todo:
            labels = chunk_labels(ec.seed, k, sizes[k], num_classes)
            rng = jax.random.fold_in(base_rng, k)
            images = []
            for j, start in enumerate(range(0, len(labels), batch)):
                part = labels[start:start + batch]
                y = global_array(padded(part, batch).astype(np.int32), batch_sharding)
                x = sampling.check_finite(sample(params, jax.random.fold_in(rng, j), y,
                                                 ec.cfg_scale), config)
                x = decode(x) if decode is not None else sampling.to_uint8(x)
                images.append(as_rgb(to_host(x)[:len(part)]))
                bar.update(len(part))
            if is_main_process():
                atomic_savez(paths[k], arr_0=np.concatenate(images), arr_1=labels)
            sync(f"evaluate_chunk_{k}")
        bar.close()
    if is_main_process():
        print("evaluate: " + timing_line(sample, sum(sizes[k] for k in todo),
                                         time.perf_counter() - t0, clock))
    return paths, todo


# ----------------------------------------------------------------------------------------------
# Features and metrics
# ----------------------------------------------------------------------------------------------

def make_feature_fn(feature_model, variables, mesh, batch: int, keys=FEATURES, prepare=None):
    """uint8 images [b <= batch, H, W, 3] (or clips [b, F, H, W, 3]) (host) -> host dict of
    the model's `keys` outputs, sharded over the batch; `prepare` maps the uint8 batch to the
    model's input inside the jit (None: the model takes uint8)."""
    variables = jax.device_put(variables, sharding_lib.replicated(mesh))
    prepare = prepare or (lambda x: x)
    fn = jax.jit(lambda v, x: feature_model.apply(v, prepare(x)))
    sharding = sharding_lib.batch_sharding(mesh)

    def features(images: np.ndarray) -> Dict[str, np.ndarray]:
        out = fn(variables, global_array(padded(images, batch), sharding))
        return {k: to_host(out[k])[:len(images)] for k in keys}
    return features


def make_clip_feature_fn(clip_model, frame_model, mesh, batch: int):
    """uint8 RGB clips [b <= batch, F, H, W, 3] (host) -> the features of each of
    VIDEO_METRICS: {"fvd": the I3D's FVD embedding [b, 400] (clips resized to 224x224 and
    scaled to [-1, 1], `i3d.preprocess`), "fid_per_frame": the Inception pool features of
    every frame [b * F, 2048], `batch` frames at a time} ("fid_per_frame" only given a
    `frame_model`). Both models are (module, variables)."""
    clip_fn = make_feature_fn(*clip_model, mesh, batch, keys=(FVD_FEATURE,),
                              prepare=i3d.preprocess)
    frame_fn = None if frame_model is None else \
        make_feature_fn(*frame_model, mesh, batch, keys=("pool",))

    def features(clips: np.ndarray) -> Dict[str, np.ndarray]:
        out = {"fvd": clip_fn(clips)[FVD_FEATURE]}
        if frame_fn is not None:
            frames = clips.reshape((-1,) + clips.shape[2:])
            out["fid_per_frame"] = np.concatenate(
                [frame_fn(frames[s:s + batch])["pool"] for s in range(0, len(frames), batch)])
        return out
    return features


def extract(features_fn, batches: Iterator[np.ndarray], total: int, desc: str,
            keys=FEATURES, unit: str = "img") -> Dict[str, np.ndarray]:
    """The `keys` features of every image (clip) of `batches`, concatenated."""
    out = {k: [] for k in keys}
    with tqdm(total=total, desc=desc, unit=unit, disable=not is_main_process(),
              dynamic_ncols=True) as bar:
        for images in batches:
            for k, v in features_fn(as_rgb(images)).items():
                out[k].append(v)
            bar.update(len(images))
    if not out[keys[0]]:
        raise ValueError(f"{desc}: no {unit}s")
    return {k: np.concatenate(v) for k, v in out.items()}


def _chunk_batches(paths: List[str], batch: int, clips: bool) -> Iterator[np.ndarray]:
    for path in paths:
        yield from iter_images(path, batch, clips=clips)


def reference_count(config) -> int:
    """How many images (clips) the reference draws from the data source:
    `evaluate.num_reference`, 0: min(num_samples, REFERENCE_FROM_DATA)."""
    ec = config.evaluate
    return ec.num_reference or min(ec.num_samples, REFERENCE_FROM_DATA)


def _data_batches(config, mesh, batch: int, count: int) -> Iterator[np.ndarray]:
    """uint8 batches of the first `count` images (clips) of the data source's epoch-0 order
    (the same on every host; a latent dataset decoded with the VAE)."""
    from dydit_jax.data import create_source
    decode = None
    if config.data.name == "latents":
        vae, vae_vars = load_vae(config)
        vae_vars = jax.device_put(vae_vars, sharding_lib.replicated(mesh))
        decode_fn = make_decode_fn(vae, mesh)
        sharding = sharding_lib.batch_sharding(mesh)
        decode = lambda z: to_host(  # noqa: E731
            decode_fn(vae_vars, global_array(padded(z, batch), sharding)))[:len(z)]
    source = create_source(config.data, local_batch_size=batch)
    try:
        done = 0
        while done < count:
            x = source.next()["image"][:count - done]
            if decode is not None:
                images = decode(x)
            else:
                images = np.asarray(sampling.to_uint8(np.asarray(x)))
            done += len(images)
            yield images
    finally:
        source.close()


def _reference(config, mesh, batch: int):
    """(the reference batch file's `ReferenceBatch` or None, uint8 batches of the reference
    (lazy: nothing is read before the first), their count, a description)."""
    ec = config.evaluate
    clips = is_video(config)
    kind = "clips" if clips else "images"
    if ec.reference_batch:
        ref = read_reference_batch(ec.reference_batch, clips=clips)
        return (ref, ref.iter_images(batch), ref.num_images,
                f"file {os.path.abspath(ec.reference_batch)} ({ref.num_images} {kind})")
    count = reference_count(config)
    source = f"data {config.data.name} ({count} {kind}" + (
        f", decoded with {ec.vae_dir})" if config.data.name == "latents" else ")")
    return None, _data_batches(config, mesh, batch, count), count, source


def _cached(workdir: str, key: str, compute) -> Dict[str, np.ndarray]:
    """The arrays of eval/reference.npz when it was written for `key`, else `compute()`'s
    (then written there)."""
    cache = os.path.join(workdir, EVAL_DIR, REFERENCE_CACHE)
    if os.path.exists(cache):
        with np.load(cache) as f:
            if str(f["key"]) == key:
                return {k: f[k] for k in f.files if k != "key"}
    arrays = compute()
    if is_main_process():
        atomic_savez(cache, key=np.asarray(key), **arrays)
    return arrays


def reference_features(config, workdir: str, features_fn, mesh, batch: int
                       ) -> Tuple[np.ndarray, FIDStatistics, FIDStatistics, str]:
    """(pool features, pool statistics, spatial statistics, description) of the reference,
    cached in eval/reference.npz."""
    ec = config.evaluate
    ref, batches, count, source = _reference(config, mesh, batch)
    key = (f"{source}; data {json.dumps(config.data.to_dict(), sort_keys=True)}; "
           f"inception {ec.inception_path}")

    def compute():
        feats = extract(features_fn, batches, count, "evaluate: reference features")
        pool = ref.pool if ref is not None and ref.pool is not None else \
            compute_statistics(feats["pool"])
        spatial = ref.spatial if ref is not None and ref.spatial is not None else \
            compute_statistics(feats["spatial"])
        return dict(pool=feats["pool"], mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu,
                    sigma_s=spatial.sigma)
    f = _cached(workdir, key, compute)
    return (f["pool"], FIDStatistics(f["mu"], f["sigma"]),
            FIDStatistics(f["mu_s"], f["sigma_s"]), source)


def clip_reference_statistics(config, workdir: str, features_fn, metrics, mesh, batch: int
                              ) -> Tuple[Dict[str, FIDStatistics], str]:
    """({metric: statistics of the reference's features for it}, description) of the
    reference clips, for `metrics` (of VIDEO_METRICS), cached in eval/reference.npz."""
    ec = config.evaluate
    _, batches, count, source = _reference(config, mesh, batch)
    frames = ec.inception_path if "fid_per_frame" in metrics else None
    key = (f"{source}; data {json.dumps(config.data.to_dict(), sort_keys=True)}; "
           f"i3d {ec.i3d_path}; inception {frames}")

    def compute():
        feats = extract(features_fn, batches, count, "evaluate: reference features",
                        keys=metrics, unit="clip")
        stats = {k: compute_statistics(feats[k]) for k in metrics}
        return {f"{part}_{k}": getattr(s, part) for k, s in stats.items()
                for part in ("mu", "sigma")}
    f = _cached(workdir, key, compute)
    return {k: FIDStatistics(f[f"mu_{k}"], f[f"sigma_{k}"]) for k in metrics}, source


def _image_metrics(config, workdir: str, paths: List[str], feature_model, mesh, batch: int
                   ) -> Tuple[Dict[str, float], str]:
    features_fn = make_feature_fn(*feature_model, mesh, batch)
    samples = extract(features_fn, _chunk_batches(paths, batch, clips=False),
                      config.evaluate.num_samples, "evaluate: sample features")
    ref_pool_features, ref_pool, ref_spatial, ref_source = reference_features(
        config, workdir, features_fn, mesh, batch)
    metrics = compute_metrics(samples, {"pool": ref_pool_features}, ref_pool, ref_spatial,
                              num_splits=min(10, len(samples["pool"])))
    return metrics, ref_source


def _video_metrics(config, workdir: str, paths: List[str], clip_model, frame_model, mesh,
                   batch: int) -> Tuple[Dict[str, float], str]:
    """FVD (and per-frame FID given a `frame_model`), the definitions of
    `evaluation.video_metrics`, on features extracted chunk by chunk."""
    metrics = VIDEO_METRICS if frame_model is not None else VIDEO_METRICS[:1]
    features_fn = make_clip_feature_fn(clip_model, frame_model, mesh, batch)
    samples = extract(features_fn, _chunk_batches(paths, batch, clips=True),
                      config.evaluate.num_samples, "evaluate: sample features", keys=metrics,
                      unit="clip")
    reference, ref_source = clip_reference_statistics(config, workdir, features_fn, metrics,
                                                      mesh, batch)
    return {k: frechet_distance(compute_statistics(samples[k]), reference[k])
            for k in metrics}, ref_source


def check_reference_batch(config) -> None:
    """The layout of `evaluate.reference_batch` (images, or clips of the model's frame count
    for a video model), before anything is sampled."""
    path = config.evaluate.reference_batch
    ref = read_reference_batch(path, clips=is_video(config))
    frames = config.model.num_frames
    if is_video(config) and ref.image_shape[0] != frames:
        raise ValueError(f"config.evaluate.reference_batch={path!r} holds clips of "
                         f"{ref.image_shape[0]} frames, the model samples "
                         f"config.model.num_frames={frames}: FVD compares clips of one length "
                         f"(the protocol: {i3d.NUM_FRAMES})")


def format_table(metrics: Dict[str, float]) -> str:
    rows = [f"{'metric':<16} {'value':>10}"]
    rows += [f"{name:<16} {metrics[key]:>10.4f}" for key, name in _TABLE if key in metrics]
    return "\n".join(rows)


def evaluate_from_workdir(config, workdir: str, params=None, feature_model=None,
                          clip_model=None) -> Dict[str, Any]:
    """The evaluate mode (see the module docstring). `params` overrides the weights of
    `config.sample.checkpoint`; `feature_model` = (module, variables) the Inception of
    `config.evaluate.inception_path` (any module with the Inception's output dict; for a
    video model the per-frame FID's, which is left out without either); `clip_model` = (module,
    variables) the I3D of `config.evaluate.i3d_path` (video models; any module with the I3D's
    output dict, given clips [B, F, 224, 224, 3] in [-1, 1]).

    Returns {"metrics": ..., "sampled_chunks": [indices sampled now], "num_chunks": n,
    "path": eval/metrics.json}."""
    ec = config.evaluate
    video = is_video(config)
    # Everything the metrics need is checked before hours of sampling.
    if video:
        i3d.check_video_shape((1, config.model.num_frames, i3d.INPUT_SIZE, i3d.INPUT_SIZE, 3))
        if clip_model is None:
            clip_model = load_clip_model(config)
        if feature_model is None and ec.inception_path:
            feature_model = load_feature_model(config)
    elif feature_model is None:
        feature_model = load_feature_model(config)
    if ec.reference_batch:
        check_reference_batch(config)
    if (is_latent(config) or config.model.in_channels not in (1, 3)) and not ec.vae_dir:
        load_vae(config)  # raises: which VAE to set
    paths, sampled = sample_chunks(config, workdir, params)
    mesh = sharding_lib.create_mesh(config.mesh.data, config.mesh.fsdp)
    n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = round_up(ec.batch_size, n_shards)
    if video:
        metrics, ref_source = _video_metrics(config, workdir, paths, clip_model, feature_model,
                                             mesh, batch)
    else:
        metrics, ref_source = _image_metrics(config, workdir, paths, feature_model, mesh, batch)
    metrics = {k: float(v) for k, v in metrics.items()}
    path = os.path.join(workdir, EVAL_DIR, METRICS_FILE)
    if is_main_process():
        record = dict(metrics, num_samples=int(ec.num_samples), reference=ref_source,
                      inception=ec.inception_path,
                      spec=sample_spec(config, workdir, round_up(
                          min(ec.batch_size, ec.chunk_size), n_shards)))
        if video:
            record["i3d"] = ec.i3d_path
        atomic_write_json(path, record)
        print(f"evaluate: {ec.num_samples} samples of {record['spec']['checkpoint']} "
              f"against {ref_source}")
        print(format_table(metrics))
        print(f"wrote {path}")
    return {"metrics": metrics, "sampled_chunks": sampled, "num_chunks": len(paths),
            "path": path}
