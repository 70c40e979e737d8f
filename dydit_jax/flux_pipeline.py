"""Text-to-image with FLUX: prompts -> (T5, CLIP) embeddings -> flow-matching sampler -> AE.

    pipe = FluxPipeline(flux, flux_vars, ae, ae_vars, t5=(t5, t5_vars, t5_tok),
                        clip=(clip, clip_vars, clip_tok), mesh=mesh)
    images = pipe(["a bold handwritten seven"], height=512, width=512, num_steps=28,
                  guidance=3.5, seed=0)            # uint8 [B, H, W, 3]

- Tokenizers are `tokenizers.Tokenizer` objects (a `tokenizer.json`: the hub's FLUX repos
  ship one per encoder, or one made with the `tokenizers` library, as the digits demo does);
  prompts are padded / truncated to `max_length` (T5: 512 for dev, 256 for schnell; CLIP 77)
  and, as BFL's `HFEmbedder`, run without attention masks.
- Prompt embeddings are cached per prompt (`embedding_cache`, in memory; `save_cache` /
  `load_cache` write and read an .npz), so a sampling run with repeated prompts or several
  seeds encodes each prompt once.
- Sampling is one jitted program per (batch, size, steps): noise, the Euler loop over the
  shifted schedule (`flux_sampling`), unpacking and the AE decode. With `mesh`, the batch is
  split over the data axes and the FLUX / AE parameters are laid out by `rules` (kernels
  FSDP-sharded). With `engine=True` a dynamic FLUX samples through `engine.flux.FluxEngine`.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dydit_jax import flux_sampling
from dydit_jax.models.flux import image_ids, unpack_latents

DEFAULT_RULES = (("kernel$|embedding$", "fsdp"), (".*", "replicate"))


def tokenize(tokenizer, prompts: Sequence[str], max_length: int, pad_id: int = 0) -> np.ndarray:
    """[B, max_length] int32 ids of `prompts` (truncated, right-padded with `pad_id`)."""
    out = np.full((len(prompts), max_length), pad_id, np.int32)
    for i, enc in enumerate(tokenizer.encode_batch(list(prompts))):
        ids = enc.ids[:max_length]
        out[i, :len(ids)] = ids
    return out


class FluxPipeline:
    """See the module docstring. t5 / clip: (module, variables, tokenizer) triples."""

    def __init__(self, flux, flux_variables, ae, ae_variables, t5: Tuple, clip: Tuple,
                 t5_max_length: int = 512, clip_max_length: int = 77, mesh=None,
                 rules=DEFAULT_RULES, engine: bool = False):
        if t5_max_length < 1 or clip_max_length < 1:
            raise ValueError("t5_max_length and clip_max_length must be positive")
        if ae.latent_channels * 4 != flux.in_channels:
            raise ValueError(f"the autoencoder's {ae.latent_channels} latent channels pack 2x2 "
                             f"into {4 * ae.latent_channels}, but FLUX takes in_channels="
                             f"{flux.in_channels}")
        if engine and not flux.dynamic:
            raise ValueError("engine=True needs a dynamic FLUX (FLUX(..., dynamic=True))")
        self.flux, self.ae = flux, ae
        self.t5, self.clip = t5, clip
        self.t5_max_length, self.clip_max_length = t5_max_length, clip_max_length
        self.mesh, self.rules = mesh, rules
        self.flux_variables = self._place(flux_variables)
        self.ae_variables = self._place(ae_variables)
        self.embedding_cache: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        self.engine = None
        if engine:
            from dydit_jax.engine.flux import FluxEngine
            self.engine = FluxEngine(flux, flux_variables)
        self._programs: Dict[tuple, object] = {}
        self._traces = 0          # sampling programs traced (= compiled) so far
        self._encoders = (jax.jit(lambda v, ids: t5[0].apply(v, ids)),
                          jax.jit(lambda v, ids: clip[0].apply(v, ids)[1]))

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

    def encode_prompts(self, prompts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """(txt [B, t5_max_length, d_t5], vec [B, d_clip]) for `prompts`, each encoded once."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self.embedding_cache]
        if todo:
            (_, t5_vars, t5_tok), (_, clip_vars, clip_tok) = self.t5, self.clip
            txt = self._encoders[0](t5_vars, tokenize(t5_tok, todo, self.t5_max_length))
            vec = self._encoders[1](clip_vars, tokenize(clip_tok, todo, self.clip_max_length))
            for i, p in enumerate(todo):
                self.embedding_cache[p] = (np.asarray(txt[i]), np.asarray(vec[i]))
        txt, vec = zip(*(self.embedding_cache[p] for p in prompts))
        return np.stack(txt), np.stack(vec)

    def save_cache(self, path) -> None:
        prompts = sorted(self.embedding_cache)
        np.savez(path, prompts=np.asarray(prompts, dtype=object),
                 txt=np.stack([self.embedding_cache[p][0] for p in prompts]),
                 vec=np.stack([self.embedding_cache[p][1] for p in prompts]))

    def load_cache(self, path) -> None:
        with np.load(path, allow_pickle=True) as f:
            for p, t, v in zip(f["prompts"], f["txt"], f["vec"]):
                self.embedding_cache[str(p)] = (t, v)

    # -- sampling --------------------------------------------------------------------------

    def latent_size(self, height: int, width: int) -> Tuple[int, int]:
        """The latent (h, w) of an image: 2 * ceil(size / 16) as BFL's get_noise (packing 2x2
        of an 8x-downsampled latent)."""
        f = self.ae.downsample_factor * 2
        return 2 * -(-height // f), 2 * -(-width // f)

    def _program(self, batch: int, lh: int, lw: int, steps: int, shift: bool):
        key = (batch, lh, lw, steps, shift)
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

        def run(flux_vars, ae_vars, rng, txt, txt_ids, vec, guidance):
            self._traces += 1     # runs at trace time only
            noise = jax.random.normal(rng, (batch, n_img, c), jnp.float32)
            img = flux_sampling.denoise(self.flux, flux_vars, noise, ids, txt, txt_ids, vec,
                                        schedule, guidance=guidance)
            return decode(ae_vars, img)

        if self.engine is None:
            fn = jax.jit(run)
        else:
            decode_fn = jax.jit(decode)

            def fn(flux_vars, ae_vars, rng, txt, txt_ids, vec, guidance):
                noise = jax.random.normal(rng, (batch, n_img, c), jnp.float32)
                img, _ = self.engine.denoise(noise, ids, txt, txt_ids, vec, schedule,
                                             guidance=guidance)
                return decode_fn(ae_vars, img)
        self._programs[key] = fn
        return fn

    def __call__(self, prompts: Sequence[str], height: int = 1024, width: int = 1024,
                 num_steps: int = 28, guidance: float = 3.5, seed: int = 0,
                 shift: bool = True) -> np.ndarray:
        """uint8 images [B, H', W', 3] (H' = 16 ceil(H / 16)) for `prompts`. `shift=False` is
        schnell's schedule. A new seed, prompt or guidance never recompiles."""
        if not prompts:
            raise ValueError("no prompts given")
        txt, vec = self.encode_prompts(prompts)
        lh, lw = self.latent_size(height, width)
        batch = len(prompts)
        txt_ids = np.zeros((batch, txt.shape[1], 3), np.float32)
        if self.mesh is not None:
            from dydit_jax import sharding
            put = functools.partial(jax.device_put, device=sharding.batch_sharding(self.mesh))
            txt, txt_ids, vec = put(txt), put(txt_ids), put(vec)
        fn = self._program(batch, lh, lw, num_steps, shift)
        out = fn(self.flux_variables, self.ae_variables, jax.random.PRNGKey(seed), txt,
                 txt_ids, vec, jnp.float32(guidance))
        return np.asarray(out)


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
