"""Latte (Ma et al., "Latent Diffusion Transformer for Video Generation"; Vchitect/Latte
`models/latte.py`, commit b27c24a) in Flax: DiT's blocks on video tokens.

A Latte block is a `DiTBlock` applied to regrouped tokens, so this module reuses DiT's block,
embedders and final layer (same parameter names: a Latte state_dict is a DiT state_dict plus
the fixed `temp_embed` table, loaded by `dydit_jax.convert.from_pytorch`). What is Latte's:
- input x [B, F, H, W, C] (NHWC per frame); each frame is patchified and gets DiT's 2-D
  sin-cos table, giving tokens of layout (b f) x N;
- blocks alternate: even blocks are spatial (attention over the N tokens of one frame, rows
  (b f)), odd blocks temporal (attention over the F frames of one position, rows (b n)); the
  1-D sin-cos table over frames (`temp_embed`) is added once, after block 0;
- the conditioning c = t_emb (+ the label embedding for `extras=2`; `extras=1` is the
  unconditional model, without a label table) is repeated per frame for the spatial blocks and
  the final layer, and per position for the temporal blocks;
- `forward_with_cfg` guides all 4 eps channels (the release's `[:, :, :4]`), not DiT's 3.
The release's `extras=78` (a projected text embedding) is not implemented.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from dydit_jax.models.dit import (DiT, _float_dtype, _get_1d_sincos, _pair, guide,
                                  make_presets, materialize_gradient)

EXTRAS = (1, 2)   # 1: unconditional, 2: class-conditional (the release's names)


def get_1d_sincos_temp_embed(embed_dim: int, length: int) -> np.ndarray:
    """The release's fixed [length, embed_dim] table over frame indices ([sin | cos], float64)."""
    return _get_1d_sincos(embed_dim, np.arange(length, dtype=np.float64))


class Latte(DiT):
    """Latte. `apply(variables, x, t, y)`: x [B, F, H, W, C], t [B], y [B] int (extras=2; an
    unconditional model, extras=1, is called `apply(variables, x, t)`) -> [B, F, H, W, C_out]
    with C_out = 2C when `learn_sigma` (eps channels first, then the variance values).

    Constructor keywords are the release's (`input_size, patch_size, in_channels, hidden_size,
    depth, num_heads, mlp_ratio, num_frames, class_dropout_prob, num_classes, learn_sigma,
    extras`) plus DiT's switches (`dtype`, `remat`, ...). `depth` counts spatial and temporal
    blocks (even: spatial; it must be even).
    """
    num_frames: int = 16
    extras: int = 1

    def setup(self):
        if self.extras not in EXTRAS:
            raise ValueError(f"Latte extras={self.extras}: supported are 1 (unconditional) and "
                             f"2 (class labels); the text-embedding variant (78) is not")
        if self.depth % 2:
            raise ValueError(f"Latte depth={self.depth} must be even: blocks come in "
                             f"(spatial, temporal) pairs")
        if self.scan_layers:
            raise NotImplementedError("Latte with scan_layers is not implemented yet")
        if self.dynamic:
            raise NotImplementedError("dynamic Latte is not implemented yet")
        super().setup()   # the label table of extras=1 is never called, so it has no params

    def temp_embed(self):
        """Fixed [1, F, D] frame table, rounded through float32 as the release stores it."""
        table = get_1d_sincos_temp_embed(self.hidden_size, self.num_frames).astype(np.float32)
        return jnp.asarray(table[None], dtype=_float_dtype(self.dtype))

    def embed(self, x, t, y=None, train: bool = False, force_drop_ids=None):
        """x [B, F, H, W, C], t [B], y [B] -> (tokens [(B F), N, D], c [B, D], t_emb [B, D])."""
        b, f = x.shape[:2]
        frames = x.reshape((b * f,) + x.shape[2:]).astype(self.dtype)
        tokens = self.x_embedder(frames) + self.pos_embed().astype(self.dtype)
        t_emb = self.t_embedder(t)
        c = t_emb
        if self.extras == 2:
            c = c + self.y_embedder(y, train=train, force_drop_ids=force_drop_ids)
        return tokens, c, t_emb

    def run_blocks(self, x, c, t_emb, train=False, complete=True, gumbel_noise=None):
        """The alternating stack on tokens [(B F), N, D]. Returns (x [(B F), N, D], {})."""
        b, n, d = c.shape[0], x.shape[1], x.shape[2]
        f = x.shape[0] // b
        c_spatial = jnp.repeat(c, f, axis=0)   # rows (b f)
        c_temporal = jnp.repeat(c, n, axis=0)  # rows (b n)

        def body(block, x, c):
            return block(x, c, t_emb, None, train=train, complete=True)[0]

        if self.remat:
            import flax.linen as nn
            from dydit_jax.models.dit import remat_policy
            body = nn.remat(body, prevent_cse=True, policy=remat_policy(self.remat_policy))
        for i in range(0, self.depth, 2):
            x = materialize_gradient(x)
            x = body(self.blocks[i], x, c_spatial)
            x = to_temporal(x, b)
            if i == 0:
                x = x + self.temp_embed().astype(x.dtype)
            x = materialize_gradient(x)
            x = body(self.blocks[i + 1], x, c_temporal)
            x = to_spatial(x, b)
        return x, {}

    def head(self, tokens, c):
        """tokens [(B F), N, D], c [B, D] -> [B, F, H, W, C_out] (float32 or float64)."""
        b = c.shape[0]
        f = tokens.shape[0] // b
        out = self.unpatchify(self.final_layer(tokens, jnp.repeat(c, f, axis=0)))
        return out.reshape((b, f) + out.shape[1:]).astype(_float_dtype(self.dtype))

    def __call__(self, x, t, y=None, train: bool = False, force_drop_ids=None,
                 complete: bool = False, gumbel_noise=None):
        self._check_inputs(x, t, y)
        tokens, c, t_emb = self.embed(x, t, y, train=train, force_drop_ids=force_drop_ids)
        tokens, _ = self.run_blocks(tokens, c, t_emb, train=train)
        return self.head(tokens, c)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels: Optional[int] = 4,
                         complete: bool = False):
        """Classifier-free guidance in one batched pass, as the release: rows [0:n]
        conditional, [n:2n] the null label; only x[:n] is used (duplicated). The first
        `guide_channels` (the release: all 4) eps channels are guided, the rest pass through
        from each row's own output. `cfg_scale` may be traced."""
        half = x[: x.shape[0] // 2]
        out = self(jnp.concatenate([half, half], axis=0), t, y, complete=complete)
        guided, rest = guide(out, cfg_scale, self.in_channels, guide_channels)
        return jnp.concatenate([jnp.concatenate([guided, guided], axis=0), rest], axis=-1)

    def dummy_inputs(self, batch: int = 1, dtype=jnp.float32):
        """Zero inputs of the model's shapes (init, shape inference)."""
        h, w = _pair(self.input_size)
        x = jnp.zeros((batch, self.num_frames, h, w, self.in_channels), dtype)
        y = jnp.zeros((batch,), jnp.int32) if self.extras == 2 else None
        return x, jnp.zeros((batch,), jnp.float32), y

    def _check_inputs(self, x, t, y):
        h, w = _pair(self.input_size)
        expected = (self.num_frames, h, w, self.in_channels)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"Latte expects x of shape [B, {self.num_frames}, {h}, {w}, {self.in_channels}]"
                f" (frames, then NHWC), got {tuple(x.shape)}. Transpose the release's "
                f"[B, F, C, H, W] with x.transpose(0, 1, 3, 4, 2).")
        if jnp.ndim(t) != 1 or jnp.shape(t)[0] != x.shape[0]:
            raise ValueError(f"Latte expects t of shape [B]={[x.shape[0]]}, got "
                             f"{tuple(jnp.shape(t))}")
        if self.extras == 2:
            if y is None or jnp.ndim(y) != 1 or jnp.shape(y)[0] != x.shape[0]:
                raise ValueError(f"a class-conditional Latte (extras=2) expects y of shape "
                                 f"[B]={[x.shape[0]]}, got "
                                 f"{None if y is None else tuple(jnp.shape(y))}")
            if not isinstance(y, jax.core.Tracer) and getattr(y, "is_fully_addressable", True):
                from dydit_jax.models.dit import check_labels
                check_labels(y, self.num_classes, allow_null=self.class_dropout_prob > 0)
        elif y is not None:
            raise ValueError("an unconditional Latte (extras=1) takes no labels: call "
                             "apply(variables, x, t)")


def to_temporal(x, batch: int):
    """Tokens [(b f), N, D] -> [(b n), F, D] (the release's '(b f) t d -> (b t) f d')."""
    bf, n, d = x.shape
    f = bf // batch
    return x.reshape(batch, f, n, d).transpose(0, 2, 1, 3).reshape(batch * n, f, d)


def to_spatial(x, batch: int):
    """Tokens [(b n), F, D] -> [(b f), N, D]."""
    bn, f, d = x.shape
    n = bn // batch
    return x.reshape(batch, n, f, d).transpose(0, 2, 1, 3).reshape(batch * f, n, d)


Latte_models = make_presets(Latte, "Latte")
Latte_XL_2, Latte_XL_4, Latte_XL_8 = (Latte_models[f"Latte-XL/{p}"] for p in (2, 4, 8))
Latte_L_2, Latte_L_4, Latte_L_8 = (Latte_models[f"Latte-L/{p}"] for p in (2, 4, 8))
Latte_B_2, Latte_B_4, Latte_B_8 = (Latte_models[f"Latte-B/{p}"] for p in (2, 4, 8))
Latte_S_2, Latte_S_4, Latte_S_8 = (Latte_models[f"Latte-S/{p}"] for p in (2, 4, 8))
