"""The extract mode: encode a tfds image dataset (or video clips, or captioned images with
their text embeddings) once into the latent shards of `data.name=latents`.

    python -m dydit_jax.main --config=configs/dit_xl.py --workdir=runs/extract \
        --config.mode=extract --config.evaluate.vae_dir=sd-vae-ft-ema \
        --config.data.data_dir=~/tensorflow_datasets --config.data.path=latents/imagenet256

DiT's fast-training recipe (fast-DiT's extract_features.py): every image of the split (the tfds
dataset of `config.data`: `tfds_name`, `split`, `data_dir`, `decode`, ..., read as the imagenet
source reads it) is center-cropped to `extract.image_size` (0: `model.input_size` times the
VAE's downsampling, 256 for a 32x32 latent DiT), encoded with the VAE of
`config.evaluate.vae_dir` and stored as `posterior.sample() * scaling_factor`, the values
training consumes. With `extract.flip` (the default) each image also contributes the latent of
its horizontally flipped copy, the next example of the same shard (so a dataset of N images
holds 2N latents; train on it with `data.latent_flip=False`: flipping a latent along W only
approximates the flipped image's latent).

The encoder noise of image i is drawn from `fold_in(fold_in(PRNGKey(config.seed), i), copy)`
(copy 0: the image, 1: its flip), so a shard does not depend on the batch size, the device
count or on which run wrote it.

Output (`dydit_jax.data.latents` format): `latents-00000.npz`, ... each holding the latents of
`extract.shard_size` consecutive images (the last one fewer) and `meta.json`, written last.
Resumable: shards are written atomically, a rerun skips every complete shard and encodes only
the missing ones; `extract.json` records the settings and a rerun with different ones is
refused. The output directory is `extract.output_dir`, else `data.path`, else
`<workdir>/latents`. With several hosts, host p encodes shards p, p + P, ... on its own
devices (the directory must be shared); host 0 writes meta.json once all are there.

Video: with `data.name` a video source (`moving_digits` with `channels=3`, `ucf101`,
`video_folder`) each example is a clip [F, S, S, 3] (the clip of epoch 0, `data.seed`: a
latent dataset holds one fixed clip per video), its frames are encoded one by one and stored as
[F, h, w, c] (shards of [n, F, h, w, c]); frame f's encoder noise is drawn from
`fold_in(<the key above>, f)`, and the flip copy mirrors every frame.

Text-to-image (a text family, FLUX: `families.family_of(config).text`): `data.name` is an
image-caption source (`captioned_digits`, `caption_folder`: images with same-stem .txt
captions, `tfds_captions`), every example is stored with the T5 sequence embedding `txt`
[t5_max_length, d_t5] and the pooled CLIP embedding `vec` [d_clip] of its caption from the
encoders of `config.text` (`text_conditioning.from_config`; the flip copy shares them), and
its caption (`captions`); `empty_prompt.npz` holds the empty prompt's pair, which training's
caption dropout substitutes (`config.text.dropout`, `text_conditioning.EmbeddingDropout`).
The image goes through the autoencoder of `config.evaluate.vae_dir` (FLUX's: a diffusers
`vae/` folder or BFL's ae.safetensors, `convert_vae.load_flux_ae`; posterior sample,
(z - shift) * scale) or, without one, is stored as it is (a pixel-space FLUX, the digits
demo). extract.json also records `config.text`'s settings, and training on the shards refuses
other encoders (its prompts at sampling time go through `config.text`). Then train with
`data.name=latents`: the batches carry "txt" / "vec" and no text encoder runs.

    python -m dydit_jax.main --config=configs/flux_digits.py --workdir=runs/flux_extract \
        --config.mode=extract --config.extract.output_dir=latents/flux_digits

Size: each example holds t5_max_length * d_t5 + d_clip float32s of text, 48 KiB at 12 x 1024
but 8 MiB at FLUX.1-dev's 512 x 4096 (32 times its 64 x 64 x 16 latent): lower
`extract.shard_size` (a shard is assembled in memory) and mind the disk.
"""
from __future__ import annotations

import collections
import concurrent.futures
import os
from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from dydit_jax.data import VIDEO_SOURCES, create_source
from dydit_jax.data import latents as latents_lib
from dydit_jax.evaluate import (check_spec, atomic_savez, atomic_write_json, global_array,
                                is_main_process, padded, round_up, sync, to_host)

SPEC_FILE = "extract.json"


def output_dir(config, workdir: str) -> str:
    return config.extract.output_dir or config.data.path or os.path.join(workdir, "latents")


def make_encode_fn(vae, mesh: Mesh, seed: int, flip: bool):
    """(variables, images [B, H, W, 3] or clips [B, F, H, W, 3] in [-1, 1], global indices
    [B]) -> scaled latents [B or 2B, (F,) h, w, c]; with `flip` rows 2j and 2j + 1 are
    example j and its mirror image."""
    batch = NamedSharding(mesh, P("batch"))

    def encode(variables, images, indices):
        rows = jnp.concatenate([images, images[..., ::-1, :]]) if flip else images
        frames = rows.shape[1] if rows.ndim == 5 else None
        posterior = vae.apply(variables, rows.reshape((-1,) + rows.shape[-3:]), method="encode")
        base = jax.random.PRNGKey(seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)
        copies = (0, 1) if flip else (0,)
        keys = jnp.concatenate([jax.vmap(lambda k, c=c: jax.random.fold_in(k, c))(keys)
                                for c in copies])
        if frames is not None:   # a key per frame: [rows, F] -> [rows * F]
            keys = jax.vmap(lambda k: jax.vmap(lambda f: jax.random.fold_in(k, f))(
                jnp.arange(frames)))(keys).reshape((-1,) + keys.shape[1:])
        shape = posterior.mean.shape[1:]
        noise = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
        z = vae.scale_latents(posterior.from_noise(noise)).astype(jnp.float32)
        z = z.reshape(rows.shape[:-3] + shape)
        if flip:  # [example 0..B-1; flips 0..B-1] -> example 0, flip 0, example 1, flip 1, ...
            b = images.shape[0]
            z = jnp.stack([z[:b], z[b:]], axis=1).reshape((2 * b,) + z.shape[1:])
        return z

    return jax.jit(encode, out_shardings=batch)


def example_loader(source):
    """index -> (image [H, W, 3] or clip [F, H, W, 3], label) of `source` in epoch 0 (built
    without flips or shuffling), for per-example and batched sources alike."""
    seed = source.sampler.seed
    if source.per_example:
        return lambda i: source._load_example(int(i), 0, seed)

    def load(i):
        batch = source._load_batch(np.asarray([i], np.int64), 0, seed)
        return batch["image"][0], int(batch["label"][0])

    return load


def pixel_copies(images: np.ndarray, flip: bool) -> np.ndarray:
    """The "latents" of a pixel-space model: the images [B, H, W, C] themselves, with `flip`
    rows 2j and 2j + 1 image j and its mirror image (as `make_encode_fn` orders them)."""
    if not flip:
        return images
    return np.stack([images, images[..., ::-1, :]], axis=1).reshape((-1,) + images.shape[1:])


def _shard_complete(path: str, arrays: Dict[str, tuple]) -> bool:
    """Whether the shard at `path` holds every array of `arrays` (name -> shape)."""
    if not os.path.exists(path):
        return False
    try:
        shapes = {k: latents_lib._npz_member_info(path, k)[0] for k in arrays}
    except Exception:  # noqa: BLE001 - an unreadable shard is written again
        return False
    return all(tuple(shapes[k]) == tuple(v) for k, v in arrays.items())


def _autoencoder(config, text: bool):
    """(vae, variables) of `config.evaluate.vae_dir`; for a text family a FLUX / SD
    autoencoder folder or BFL's ae.safetensors, or (None, None) without one (pixel space)."""
    from dydit_jax.convert_vae import load_flux_ae, load_vae
    vae_dir = config.evaluate.vae_dir
    if text:
        return load_flux_ae(vae_dir) if vae_dir else (None, None)
    if not vae_dir:
        raise ValueError("latent extraction needs a VAE: set --config.evaluate.vae_dir="
                         "<diffusers AutoencoderKL folder, e.g. sd-vae-ft-ema>")
    return load_vae(vae_dir)


def extract_from_config(config, workdir: str) -> Dict[str, Any]:
    """The extract mode (see the module docstring). Returns {"path", "meta", "encoded_shards",
    "skipped_shards"} (shard indices this process encoded now / found complete)."""
    from dydit_jax import families, text_conditioning

    ec = config.extract
    if ec.shard_size < 1 or ec.batch_size < 1:
        raise ValueError(f"config.extract.shard_size and batch_size must be positive, got "
                         f"{ec.shard_size} and {ec.batch_size}")
    family = families.family_of(config)
    text = family.text
    vae, variables = _autoencoder(config, text)
    factor = vae.downsample_factor if vae is not None else 1
    image_size = ec.image_size or config.model.input_size * factor
    if image_size % factor:
        raise ValueError(f"image size {image_size} is not a multiple of the VAE's "
                         f"downsampling factor {factor}")
    latent = image_size // factor
    copies = 2 if ec.flip else 1
    out = output_dir(config, workdir)

    video = config.data.name in VIDEO_SOURCES
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    workers = max(1, int(data_cfg.num_workers or 1))  # decoding threads (ours, below)
    data_cfg.update(name=data_cfg.name if video or text else "imagenet", image_size=image_size,
                    random_flip=False, shuffle=False, num_workers=0, prefetch=0)
    source = create_source(data_cfg, local_batch_size=1)
    num_images = source.num_examples
    channels = source.image_shape[-1]
    if vae is not None and channels != 3:
        raise ValueError(f"extract encodes RGB images with the VAE, but data.name="
                         f"{data_cfg.name} gives {channels}-channel "
                         f"{'clips' if video else 'images'}: set config.data.channels=3")
    settings = {k: v for k, v in data_cfg.items() if k not in ("num_workers", "prefetch")}
    if video:
        shape = (source.image_shape[0], latent, latent, vae.latent_channels)
        spec = dict(data=settings, num_images=num_images)
        what = f"clips of {source.image_shape[0]} frames of data.name={data_cfg.name}"
    elif text:
        if not hasattr(source, "caption_ids"):
            raise ValueError(f"extract for a text-to-image model reads captioned images: "
                             f"config.data.name={data_cfg.name} has no captions")
        shape = (latent, latent, vae.latent_channels if vae is not None else channels)
        want = family.build(config).in_channels // 4
        if shape[-1] != want:
            fix = ("set config.data.channels to it (pixel space), or config.evaluate.vae_dir "
                   "to a latent FLUX's autoencoder" if vae is None else
                   "use the model's autoencoder, or set config.model.in_channels")
            raise ValueError(f"extract would store {shape[-1]}-channel "
                             f"{'pixels' if vae is None else 'latents'} for a FLUX of "
                             f"{want} channels (config.model.in_channels): {fix}")
        text_spec = text_conditioning.text_settings(config.text)
        spec = dict(data=settings, num_images=num_images, text=text_spec)
        what = f"captioned images of data.name={data_cfg.name}"
    else:
        shape = (latent, latent, vae.latent_channels)
        spec = dict(tfds_name=data_cfg.tfds_name, split=data_cfg.split,
                    data_dir=data_cfg.data_dir, decode=data_cfg.decode, num_images=num_images)
        what = f"images of {data_cfg.tfds_name}/{data_cfg.split}"
    spec.update(image_size=image_size, shard_size=ec.shard_size, flip=bool(ec.flip),
                seed=config.seed,
                vae_dir=os.path.abspath(config.evaluate.vae_dir) if vae is not None else None)
    mesh = Mesh(np.asarray(jax.local_devices()), ("batch",))
    batch = round_up(max(1, ec.batch_size // jax.process_count()), mesh.size)
    if is_main_process():
        os.makedirs(out, exist_ok=True)
        spec_path = os.path.join(out, SPEC_FILE)
        if (os.path.exists(os.path.join(out, latents_lib.META_FILE))
                and not os.path.exists(spec_path)):
            raise FileExistsError(f"{out} already holds a latent dataset not written by the "
                                  f"extract mode; choose another config.extract.output_dir")
        check_spec(spec_path, spec)
        atomic_write_json(spec_path, spec)
    sync("extract_spec")
    if text:   # built after the settings check: a refused rerun fails at once
        encoders = text_conditioning.from_config(config.text)
        if is_main_process():
            empty_txt, empty_vec = encoders.embed([""], batch)
            atomic_savez(os.path.join(out, latents_lib.EMPTY_PROMPT_FILE), txt=empty_txt[0],
                         vec=empty_vec[0])

    starts = list(range(0, num_images, ec.shard_size))
    counts = [min(ec.shard_size, num_images - s) for s in starts]
    names = [latents_lib.SHARD_PATTERN.format(k) for k in range(len(starts))]

    def arrays(count):   # what a complete shard of `count` source images holds
        n = count * copies
        have = {"latents": (n,) + tuple(shape), "labels": (n,)}
        if text:
            d_t5, d_clip = encoders.widths
            have.update(txt=(n, config.text.t5_max_length, d_t5), vec=(n, d_clip))
        return have

    mine = [k for k in range(len(starts)) if k % jax.process_count() == jax.process_index()]
    todo = [k for k in mine
            if not _shard_complete(os.path.join(out, names[k]), arrays(counts[k]))]
    skipped = [k for k in mine if k not in todo]
    if is_main_process():
        print(f"extract: {num_images} {what} at {image_size}px -> {len(starts)} shards in "
              f"{out}; {len(skipped)} complete, {len(todo)} to encode")

    if todo:
        sharding = NamedSharding(mesh, P("batch"))
        if vae is None:
            def encode_images(images, idx):
                return pixel_copies(images, bool(ec.flip))
        else:
            encode = make_encode_fn(vae, mesh, config.seed, bool(ec.flip))
            variables = jax.device_put(variables, NamedSharding(mesh, P()))

            def encode_images(images, idx):
                z = encode(variables, global_array(padded(images, batch), sharding),
                           global_array(padded(idx, batch).astype(np.int32), sharding))
                return to_host(z)[:len(idx) * copies]
        load = example_loader(source)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool, \
                tqdm(total=sum(counts[k] for k in todo), desc="extract", unit="img",
                     disable=not is_main_process(), dynamic_ncols=True) as bar:
            for k in todo:
                parts = collections.defaultdict(list)
                for start in range(starts[k], starts[k] + counts[k], batch):
                    idx = np.arange(start, min(start + batch, starts[k] + counts[k]))
                    examples = list(pool.map(load, idx))
                    images = np.stack([e[0] for e in examples]).astype(np.float32)
                    labels = np.asarray([e[1] for e in examples], np.int32)
                    parts["latents"].append(encode_images(images, idx))
                    parts["labels"].append(np.repeat(labels, copies))
                    if text:
                        captions = [source.captions[source.caption_ids[i]] for i in idx]
                        txt, vec = encoders.embed(captions, batch)
                        parts["txt"].append(np.repeat(txt, copies, axis=0))
                        parts["vec"].append(np.repeat(vec, copies, axis=0))
                        parts["captions"].append(np.repeat(np.asarray(captions), copies))
                    bar.update(len(idx))
                atomic_savez(os.path.join(out, names[k]),
                             **{key: np.concatenate(v) for key, v in parts.items()})
    source.close()
    sync("extract_shards")

    metadata = dict(spec, num_classes=int(source.num_classes), flip_copies=bool(ec.flip))
    if vae is not None:
        metadata.update(scaling_factor=float(vae.scaling_factor),
                        shift_factor=float(vae.shift_factor))
    if text:
        d_t5, d_clip = encoders.widths
        metadata["text"] = dict(settings=text_spec, context_in_dim=d_t5, vec_in_dim=d_clip,
                                empty_prompt=latents_lib.EMPTY_PROMPT_FILE)
    meta = dict(format=latents_lib.FORMAT, num_examples=num_images * copies, shape=list(shape),
                dtype="float32",
                shards=[dict(file=n, num_examples=c * copies) for n, c in zip(names, counts)],
                metadata=metadata)
    if is_main_process():
        missing = [n for n, c in zip(names, counts)
                   if not _shard_complete(os.path.join(out, n), arrays(c))]
        if missing:
            raise RuntimeError(f"extract: shards {missing[:5]} are missing or incomplete in "
                               f"{out}; rerun to write them")
        atomic_write_json(os.path.join(out, latents_lib.META_FILE), meta)
        kind = "latents" if vae is not None else "images"
        print(f"extract: wrote {meta['num_examples']} {kind} {list(shape)}"
              f"{' with text embeddings' if text else ''} "
              f"({'with' if ec.flip else 'without'} flip copies) to {out}")
    sync("extract_meta")
    return {"path": out, "meta": meta, "encoded_shards": todo, "skipped_shards": skipped}
