"""The evaluate mode: sample N images, then FID, sFID, Inception Score, precision and recall.

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
   `evaluate.vae_dir` is set) are decoded with the VAE batch by batch, so memory is bounded by
   one batch. Images go to uint8 exactly as sample_ddp.py does (`sampling.to_uint8`); gray
   images are repeated to RGB.
3. Each chunk is written atomically (a temporary file, then a rename) to
   `<workdir>/eval/chunk_00000.npz`, ... in the ADM layout (`arr_0` uint8 NHWC, `arr_1`
   labels). A rerun (after a preemption) keeps every complete chunk whose labels match and
   samples only the missing ones. `eval/spec.json` records the settings that the chunks
   depend on; a rerun with different ones (other weights, sampler, guidance, seed, chunk size,
   ...) is refused instead of mixing samples: delete `eval/` or use another workdir.
4. Inception features of all chunks (sharded over the batch) and of the reference:
   `evaluate.reference_batch`, an ADM `.npz` (its stored mu/sigma/mu_s/sigma_s are used when
   present; precision/recall always use its images' features), or without one up to 10,000
   images of the training data source (`config.data`, decoded with the VAE for latent
   models). Reference features are cached in `eval/reference.npz`.
5. The metrics (`evaluation.evaluator.compute_metrics`, the ADM evaluator's definitions; the
   Inception Score over min(10, N) splits) go to `eval/metrics.json` and a printed table.

Multi-host runs need `workdir` on a filesystem that all hosts share (chunks are written by
process 0 and read back by every process). The Inception weights are the FID network's
(`evaluation/inception.py` says how to get and convert them once); nothing is downloaded.
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
from dydit_jax.evaluation.evaluator import FEATURES, compute_metrics
from dydit_jax.evaluation.fid import FIDStatistics, compute_statistics
from dydit_jax.evaluation.reference_batch import iter_images, read_reference_batch

EVAL_DIR = "eval"
CHUNK_PATTERN = "chunk_{:05d}.npz"
SPEC_FILE = "spec.json"
METRICS_FILE = "metrics.json"
REFERENCE_CACHE = "reference.npz"
# Images drawn from the training data when no reference batch is given (the ADM reference
# batches hold 10,000 images).
REFERENCE_FROM_DATA = 10_000

_TABLE = (("fid", "FID"), ("sfid", "sFID"), ("inception_score", "Inception Score"),
          ("precision", "Precision"), ("recall", "Recall"))


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


def make_decode_fn(vae, mesh):
    """latents [B, h, w, c] (diffusion units, batch-sharded) -> uint8 images [B, H, W, 3]."""
    out = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding_lib.BATCH_AXES))
    return jax.jit(lambda v, z: sampling.to_uint8(vae.apply(v, z, method="decode_latents")),
                   out_shardings=out)


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


def _chunk_complete(path: str, labels: np.ndarray) -> bool:
    if not os.path.exists(path):
        return False
    try:
        batch = read_reference_batch(path)
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
    todo = [k for k, n in enumerate(sizes)
            if not _chunk_complete(paths[k], chunk_labels(ec.seed, k, n, num_classes))]
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

        bar = tqdm(total=sum(sizes[k] for k in todo), desc="evaluate: sample", unit="img",
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

def make_feature_fn(feature_model, variables, mesh, batch: int):
    """uint8 images [b <= batch, H, W, 3] (host) -> host feature dict, sharded over the batch."""
    variables = jax.device_put(variables, sharding_lib.replicated(mesh))
    fn = jax.jit(lambda v, x: feature_model.apply(v, x))
    sharding = sharding_lib.batch_sharding(mesh)

    def features(images: np.ndarray) -> Dict[str, np.ndarray]:
        out = fn(variables, global_array(padded(images, batch), sharding))
        return {k: to_host(out[k])[:len(images)] for k in FEATURES}
    return features


def extract(features_fn, batches: Iterator[np.ndarray], total: int, desc: str
            ) -> Dict[str, np.ndarray]:
    out = {k: [] for k in FEATURES}
    with tqdm(total=total, desc=desc, unit="img", disable=not is_main_process(),
              dynamic_ncols=True) as bar:
        for images in batches:
            for k, v in features_fn(as_rgb(images)).items():
                out[k].append(v)
            bar.update(len(images))
    if not out["pool"]:
        raise ValueError(f"{desc}: no images")
    return {k: np.concatenate(v) for k, v in out.items()}


def _chunk_batches(paths: List[str], batch: int) -> Iterator[np.ndarray]:
    for path in paths:
        yield from iter_images(path, batch)


def _data_batches(config, batch: int, count: int, decode) -> Iterator[np.ndarray]:
    """`count` uint8 images of the training data source (decoded for latent datasets)."""
    from dydit_jax.data import create_source
    source = create_source(config.data, local_batch_size=batch)  # the same on every host
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


def reference_features(config, workdir: str, features_fn, mesh, batch: int
                       ) -> Tuple[np.ndarray, FIDStatistics, FIDStatistics, str]:
    """(pool features, pool statistics, spatial statistics, description) of the reference,
    cached in eval/reference.npz."""
    ec = config.evaluate
    if ec.reference_batch:
        ref = read_reference_batch(ec.reference_batch)
        source = f"file {os.path.abspath(ec.reference_batch)} ({ref.num_images} images)"
    else:
        ref = None
        count = min(ec.num_samples, REFERENCE_FROM_DATA)
        source = f"data {config.data.name} ({count} images" + (
            f", decoded with {ec.vae_dir})" if is_latent(config) else ")")
    key = (f"{source}; data {json.dumps(config.data.to_dict(), sort_keys=True)}; "
           f"inception {ec.inception_path}")
    cache = os.path.join(workdir, EVAL_DIR, REFERENCE_CACHE)
    if os.path.exists(cache):
        with np.load(cache) as f:
            if str(f["key"]) == key:
                return (f["pool"], FIDStatistics(f["mu"], f["sigma"]),
                        FIDStatistics(f["mu_s"], f["sigma_s"]), source)

    if ref is not None:
        feats = extract(features_fn, ref.iter_images(batch), ref.num_images,
                        "evaluate: reference features")
    else:
        decode = None
        if is_latent(config):
            vae, vae_vars = load_vae(config)
            vae_vars = jax.device_put(vae_vars, sharding_lib.replicated(mesh))
            decode_fn = make_decode_fn(vae, mesh)
            sharding = sharding_lib.batch_sharding(mesh)
            decode = lambda z: to_host(  # noqa: E731
                decode_fn(vae_vars, global_array(padded(z, batch), sharding)))[:len(z)]
        feats = extract(features_fn, _data_batches(config, batch, count, decode), count,
                        "evaluate: reference features (training data)")
    pool = ref.pool if ref is not None and ref.pool is not None else \
        compute_statistics(feats["pool"])
    spatial = ref.spatial if ref is not None and ref.spatial is not None else \
        compute_statistics(feats["spatial"])
    if is_main_process():
        atomic_savez(cache, key=np.asarray(key), pool=feats["pool"], mu=pool.mu,
                     sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    return feats["pool"], pool, spatial, source


def format_table(metrics: Dict[str, float]) -> str:
    rows = [f"{'metric':<16} {'value':>10}"]
    rows += [f"{name:<16} {metrics[key]:>10.4f}" for key, name in _TABLE if key in metrics]
    return "\n".join(rows)


def evaluate_from_workdir(config, workdir: str, params=None, feature_model=None
                          ) -> Dict[str, Any]:
    """The evaluate mode (see the module docstring). `params` overrides the weights of
    `config.sample.checkpoint`; `feature_model` = (module, variables) the Inception of
    `config.evaluate.inception_path` (any module with the Inception's output dict).

    Returns {"metrics": ..., "sampled_chunks": [indices sampled now], "num_chunks": n,
    "path": eval/metrics.json}."""
    ec = config.evaluate
    # Everything the metrics need is checked before hours of sampling.
    if feature_model is None:
        feature_model = load_feature_model(config)
    if ec.reference_batch:
        read_reference_batch(ec.reference_batch)
    if is_latent(config) and not ec.vae_dir:
        load_vae(config)  # raises: which VAE to set
    paths, sampled = sample_chunks(config, workdir, params)
    mesh = sharding_lib.create_mesh(config.mesh.data, config.mesh.fsdp)
    n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = round_up(ec.batch_size, n_shards)
    features_fn = make_feature_fn(*feature_model, mesh, batch)

    samples = extract(features_fn, _chunk_batches(paths, batch), ec.num_samples,
                      "evaluate: sample features")
    ref_pool_features, ref_pool, ref_spatial, ref_source = reference_features(
        config, workdir, features_fn, mesh, batch)
    metrics = compute_metrics(samples, {"pool": ref_pool_features}, ref_pool, ref_spatial,
                              num_splits=min(10, len(samples["pool"])))
    metrics = {k: float(v) for k, v in metrics.items()}
    path = os.path.join(workdir, EVAL_DIR, METRICS_FILE)
    if is_main_process():
        record = dict(metrics, num_samples=int(ec.num_samples), reference=ref_source,
                      inception=ec.inception_path,
                      spec=sample_spec(config, workdir, round_up(
                          min(ec.batch_size, ec.chunk_size), n_shards)))
        atomic_write_json(path, record)
        print(f"evaluate: {ec.num_samples} samples of {record['spec']['checkpoint']} "
              f"against {ref_source}")
        print(format_table(metrics))
        print(f"wrote {path}")
    return {"metrics": metrics, "sampled_chunks": sampled, "num_chunks": len(paths),
            "path": path}
