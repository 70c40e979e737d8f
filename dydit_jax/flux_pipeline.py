"""Text-to-image with FLUX: prompts -> (T5, CLIP) embeddings -> flow-matching sampler -> AE.

    pipe = FluxPipeline(flux, flux_vars, ae, ae_vars, t5=(t5, t5_vars, t5_tok),
                        clip=(clip, clip_vars, clip_tok), mesh=mesh)
    images = pipe(["a bold handwritten seven"], height=512, width=512, num_steps=28,
                  guidance=3.5, seed=0)            # uint8 [B, H, W, 3]

- Prompts go through `text_conditioning.TextEncoders` (tokenizers, T5 and CLIP, no attention
  masks as BFL's `HFEmbedder`; T5 512 tokens for dev, 256 for schnell, CLIP 77), which
  caches each prompt's embeddings (`embedding_cache`, `save_cache` / `load_cache`).
- Sampling is one jitted program per (batch, size, steps): noise, the Euler loop over the
  shifted schedule (`flux_sampling`), unpacking and the AE decode. With `mesh`, the batch is
  split over the data axes and the FLUX / AE parameters are laid out by `rules` (kernels
  FSDP-sharded). With `engine=True` a dynamic FLUX samples through `engine.flux.FluxEngine`.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dydit_jax import flux_sampling
from dydit_jax.models.flux import image_ids, unpack_latents
from dydit_jax.text_conditioning import TextEncoders

DEFAULT_RULES = (("kernel$|embedding$", "fsdp"), (".*", "replicate"))


class FluxPipeline:
    """See the module docstring. t5 / clip: (module, variables, tokenizer) triples, or
    `text`: a `text_conditioning.TextEncoders` (then t5 / clip / max lengths are unused)."""

    def __init__(self, flux, flux_variables, ae, ae_variables, t5: Optional[Tuple] = None,
                 clip: Optional[Tuple] = None, t5_max_length: int = 512,
                 clip_max_length: int = 77, mesh=None, rules=DEFAULT_RULES,
                 engine: bool = False, text: Optional[TextEncoders] = None,
                 engine_capacities: Optional[Sequence[float]] = None,
                 engine_widths: Optional[Sequence[float]] = None):
        if text is None:
            if t5 is None or clip is None:
                raise ValueError("pass the text encoders: t5=(module, variables, tokenizer) "
                                 "and clip=(...), or text=TextEncoders(...)")
            text = TextEncoders(t5, clip, t5_max_length, clip_max_length)
        if ae.latent_channels * 4 != flux.in_channels:
            raise ValueError(f"the autoencoder's {ae.latent_channels} latent channels pack 2x2 "
                             f"into {4 * ae.latent_channels}, but FLUX takes in_channels="
                             f"{flux.in_channels}")
        if engine and not flux.dynamic:
            raise ValueError("engine=True needs a dynamic FLUX (FLUX(..., dynamic=True))")
        self.flux, self.ae, self.text = flux, ae, text
        self.t5, self.clip = text.t5, text.clip
        self.mesh, self.rules = mesh, rules
        self.flux_variables = self._place(flux_variables)
        self.ae_variables = self._place(ae_variables)
        self.engine = None
        if engine:
            from dydit_jax.engine.flux import FluxEngine
            self.engine = FluxEngine(flux, flux_variables, engine_capacities,
                                     width_grid=engine_widths, mesh=mesh)
        self._programs: Dict[tuple, object] = {}
        self._traces = 0          # sampling programs traced (= compiled) so far
        self.kept = []            # engine: kept image tokens [steps, blocks, rows] per call
        self.widths = []          # engine with TDW: its gathered active counts per call

    @property
    def compile_count(self) -> int:
        """Sampling programs compiled so far: traces of the jitted sampler (a retrace for a
        new dtype or shape counts too), plus the engine's executables."""
        return self._traces + (self.engine.compile_count if self.engine else 0)

    def _place(self, variables):
        if self.mesh is None:
            return variables
        from dydit_jax import sharding
        return jax.device_put(variables, sharding.tree_shardings(variables, self.mesh,
                                                                 self.rules))

    # -- prompts ---------------------------------------------------------------------------

    @property
    def embedding_cache(self):
        return self.text.cache

    def encode_prompts(self, prompts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """(txt [B, t5_max_length, d_t5], vec [B, d_clip]) for `prompts`, each encoded once."""
        return self.text.encode(prompts)

    def save_cache(self, path) -> None:
        self.text.save_cache(path)

    def load_cache(self, path) -> None:
        self.text.load_cache(path)

    # -- sampling --------------------------------------------------------------------------

    def latent_size(self, height: int, width: int) -> Tuple[int, int]:
        """The latent (h, w) of an image: 2 * ceil(size / 16) as BFL's get_noise (packing 2x2
        of an 8x-downsampled latent)."""
        f = self.ae.downsample_factor * 2
        return 2 * -(-height // f), 2 * -(-width // f)

    def _program(self, batch: int, lh: int, lw: int, steps: int, shift: bool,
                 true_cfg: float):
        key = (batch, lh, lw, steps, shift, true_cfg)
        if key in self._programs:
            return self._programs[key]
        ids = image_ids(batch, lh, lw)
        n_img = ids.shape[1]
        schedule = flux_sampling.get_schedule(steps, n_img, shift=shift)
        c = self.flux.in_channels

        def decode(ae_vars, img):
            lat = unpack_latents(img, lh, lw).transpose(0, 2, 3, 1)          # NCHW -> NHWC
            images = self.ae.apply(ae_vars, lat, method="decode_latents")
            return jnp.clip((images + 1) * 127.5 + 0.5, 0, 255).astype(jnp.uint8)

        def run(flux_vars, ae_vars, rng, txt, txt_ids, vec, guidance, neg_txt, neg_vec):
            self._traces += 1     # runs at trace time only
            noise = jax.random.normal(rng, (batch, n_img, c), jnp.float32)
            img = flux_sampling.denoise(self.flux, flux_vars, noise, ids, txt, txt_ids, vec,
                                        schedule, guidance=guidance, true_cfg=true_cfg,
                                        neg_txt=neg_txt, neg_txt_ids=txt_ids, neg_vec=neg_vec)
            return decode(ae_vars, img)

        if self.engine is None:
            fn = jax.jit(run)
        else:
            decode_fn = jax.jit(decode)

            def fn(flux_vars, ae_vars, rng, txt, txt_ids, vec, guidance, neg_txt, neg_vec):
                noise = jax.random.normal(rng, (batch, n_img, c), jnp.float32)
                img, kept = self.engine.denoise(noise, ids, txt, txt_ids, vec, schedule,
                                                guidance=guidance, true_cfg=true_cfg,
                                                neg_txt=neg_txt, neg_txt_ids=txt_ids,
                                                neg_vec=neg_vec)
                self.kept.append(kept)
                if self.engine.widths is not None:
                    self.widths.append(self.engine.widths)
                return decode_fn(ae_vars, img)
        self._programs[key] = fn
        return fn

    def __call__(self, prompts: Sequence[str], height: int = 1024, width: int = 1024,
                 num_steps: int = 28, guidance: float = 3.5, seed: int = 0,
                 shift: bool = True, true_cfg: float = 1.0,
                 negative_prompt: str = "") -> np.ndarray:
        """uint8 images [B, H', W', 3] (H' = 16 ceil(H / 16)) for `prompts`. `shift=False` is
        schnell's schedule; `true_cfg` > 1 also runs `negative_prompt` each step and guides
        with v_neg + true_cfg (v - v_neg). A new seed, prompt or guidance never recompiles."""
        if not prompts:
            raise ValueError("no prompts given")
        txt, vec = self.encode_prompts(prompts)
        # Without true CFG the program never reads the negative stream: pass the prompts'
        # own arrays rather than encoding (and caching) a negative prompt nobody asked for.
        neg_txt, neg_vec = (self.encode_prompts([negative_prompt] * len(prompts))
                            if true_cfg != 1.0 else (txt, vec))
        lh, lw = self.latent_size(height, width)
        batch = len(prompts)
        txt_ids = np.zeros((batch, txt.shape[1], 3), np.float32)
        if self.mesh is not None:
            from dydit_jax import sharding
            put = functools.partial(jax.device_put, device=sharding.batch_sharding(self.mesh))
            txt, txt_ids, vec, neg_txt, neg_vec = map(put, (txt, txt_ids, vec, neg_txt,
                                                            neg_vec))
        fn = self._program(batch, lh, lw, num_steps, shift, float(true_cfg))
        out = fn(self.flux_variables, self.ae_variables, jax.random.PRNGKey(seed), txt,
                 txt_ids, vec, jnp.float32(guidance), neg_txt, neg_vec)
        return np.asarray(out)


class PixelSpace(nn.Module):
    """The identity "autoencoder" of a FLUX trained on pixels (the digits demo): 2x2 packing
    of the C-channel image itself; gray images decode to RGB."""
    latent_channels: int = 1
    downsample_factor: int = 1

    def decode_latents(self, x):
        return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x

    def __call__(self, x):
        return self.decode_latents(x)


def save_images(images: np.ndarray, out_dir, prompts: Optional[Sequence[str]] = None,
                columns: int = 4) -> list:
    """Writes one PNG per image and `grid.png`; returns the paths."""
    import os

    from PIL import Image
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        path = os.path.join(out_dir, f"{i:04d}.png")
        Image.fromarray(im).save(path)
        paths.append(path)
    n, h, w, _ = images.shape
    cols = min(columns, n)
    rows = -(-n // cols)
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    Image.fromarray(grid).save(os.path.join(out_dir, "grid.png"))
    if prompts is not None:
        with open(os.path.join(out_dir, "prompts.txt"), "w") as f:
            f.write("\n".join(prompts) + "\n")
    return paths


def config_prompts(config) -> list:
    """`config.sample.prompts`, or the lines of `config.sample.prompt_file`, or for the
    digits demo's local encoders one prompt per digit ("a handwritten seven")."""
    sc = config.sample
    if sc.prompts and sc.prompt_file:
        raise ValueError("set config.sample.prompts or config.sample.prompt_file, not both")
    if sc.prompt_file:
        with open(sc.prompt_file) as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"config.sample.prompt_file={sc.prompt_file!r} has no prompts")
        return prompts
    if isinstance(sc.prompts, str):
        return [sc.prompts]
    if sc.prompts:
        return [str(p) for p in sc.prompts]
    if config.text.encoders == "local":
        from dydit_jax.data.captioned_digits import prompts_for_digits
        return prompts_for_digits()
    raise ValueError("a text-to-image model samples from prompts: set "
                     "--config.sample.prompts='(\"a photo of a cat\",)' or "
                     "--config.sample.prompt_file=<file, one prompt per line>")


def sample_to_folder(config, model, weights, out_dir: str, settings: dict) -> np.ndarray:
    """mode=sample for FLUX: `sample.per_class` images of each prompt (`config_prompts`), in
    batches of `sample.batch_size` (a new seed per batch), through the masked model or the
    engine (`sample.engine=gathered`), decoded by the FLUX AE of `sample.vae_dir` or, without
    one, as pixels. Writes one PNG per image, grid.png (a row per prompt), prompts.txt and
    settings.json into `out_dir`; returns the uint8 images."""
    import json
    import os
    import time

    from dydit_jax import sharding, text_conditioning
    sc = config.sample
    prompts = config_prompts(config)
    if sc.engine == "static" and model.dynamic:
        raise ValueError("sample.engine=static is not offered for FLUX: sample the routed model "
                         "(masked) or the engine (gathered)")
    vae_dir = sc.vae_dir or config.evaluate.vae_dir
    if vae_dir:
        from dydit_jax.convert_vae import load_flux_ae
        ae, ae_vars = load_flux_ae(vae_dir)
        factor = ae.downsample_factor
    else:
        ae, ae_vars, factor = PixelSpace(config.model.in_channels), {}, 1
    mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
    pipe = FluxPipeline(model, {"params": weights.params}, ae, ae_vars,
                        text=text_conditioning.from_config(config.text), mesh=mesh,
                        rules=tuple(config.mesh.rules), engine=sc.engine == "gathered",
                        engine_capacities=tuple(config.flux.capacities) or None,
                        engine_widths=tuple(config.flux.width_grid) or None)
    todo = [p for p in prompts for _ in range(sc.per_class)]
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = -(-min(sc.batch_size, len(todo)) // shards) * shards
    size = config.model.input_size * factor
    t0 = time.perf_counter()
    images = []
    for i, start in enumerate(range(0, len(todo), batch)):
        chunk = todo[start:start + batch]
        padded = chunk + [chunk[-1]] * (batch - len(chunk))
        out = pipe(padded, height=size, width=size, num_steps=sc.num_steps,
                   guidance=config.flux.guidance, seed=config.seed + i, shift=config.flux.shift,
                   true_cfg=config.flux.true_cfg)
        images.append(out[:len(chunk)])
    images = np.concatenate(images)
    wall = time.perf_counter() - t0
    if jax.process_index() == 0:
        save_images(images, out_dir, todo, columns=sc.per_class)
        np.savez(os.path.join(out_dir, "samples.npz"), images,
                 np.asarray(todo, dtype=object))
        with open(os.path.join(out_dir, "settings.json"), "w") as f:
            json.dump(settings, f, indent=1)
        labels = _named_digits(todo) if factor == 1 and size % 8 == 0 else None
        if labels is not None:
            from dydit_jax.evaluation.digit_accuracy import accuracy
            score = accuracy(images[..., :1], labels, scale=size // 8)["frame_accuracy"]
            print(f"digit accuracy (the digit each prompt names): {score:.3f}")
        print(f"sampled {len(images)} images of {len(prompts)} prompts in {wall:.1f} s "
              f"({pipe.compile_count} sampling program(s) compiled) -> {out_dir}")
        if pipe.kept:
            from dydit_jax import flops
            kept = np.concatenate([np.asarray(k) for k in pipe.kept], axis=2)
            n_img = (size // factor // 2) ** 2
            per_block = kept.mean(axis=(0, 2))
            width = {}
            if pipe.widths:       # TDW: mean active counts per block over steps and calls
                width = {name: np.concatenate([np.asarray(w[name]) for w in pipe.widths]
                                              ).mean(axis=0) for name in pipe.widths[0]}
            ratio = flops.flux_macs_ratio(model, n_img, config.text.t5_max_length, per_block,
                                          **width)
            widths = (f", heads {width['heads'].mean() / model.num_heads:.3f} and MLP groups "
                      f"{width['groups'].mean() / model.num_heads:.3f} of full width"
                      if width else "")
            print(f"engine: kept {kept.mean() / n_img:.3f} of the image tokens "
                  f"(per block {np.round(per_block / n_img, 3).tolist()}){widths}, FLOPs "
                  f"ratio {ratio:.3f} of the static model")
    return images


def _named_digits(prompts):
    """The digit each prompt names ("a bold seven" -> 7), or None if one names none."""
    from dydit_jax.data.captioned_digits import DIGIT_WORDS
    labels = []
    for p in prompts:
        found = [i for i, w in enumerate(DIGIT_WORDS) if w in p.replace(",", " ").split()]
        if len(found) != 1:
            return None
        labels.append(found[0])
    return np.asarray(labels)
