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

Dynamic Latte (`dynamic=True`, DyDiT++ on video). Where the routers go is not published; we
chose, for every block, spatial and temporal alike, what a DiT block has:
- TDW: the head and MLP-group routers read the timestep embedding t_emb [B, D] of the clip, so
  every frame (spatial block) and every position (temporal block) of a clip runs the same heads
  and groups at a given t, and the width plan of a sampling run is known ahead as for DiT
  (train-mode Gumbel noise is drawn per clip and repeated over its rows);
- SDT: the token router reads each token of the residual stream after attention (the same
  token in either grouping), and a skipped token skips the block's MLP. `token_blocks` says
  which blocks have a token router: "both" (default: SDT is per token and the MLP does not care
  how tokens were grouped for attention), "spatial" or "temporal" (the others run every token
  through the MLP).
The aux masks are per clip: head/group masks [B, L, H], token masks [B, L, F*N] in (frame,
position) order whatever the block's grouping (all ones in blocks without a token router).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dydit_jax.models.dit import (DiT, _float_dtype, _get_1d_sincos, _pair,
                                  make_presets, materialize_gradient, remat_policy)

EXTRAS = (1, 2)   # 1: unconditional, 2: class-conditional (the release's names)
BLOCK_KINDS = ("spatial", "temporal")   # block i is BLOCK_KINDS[i % 2]
TOKEN_BLOCKS = ("both", "spatial", "temporal")   # where dynamic Latte has token routers


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
    token_blocks: str = "both"

    def setup(self):
        if self.extras not in EXTRAS:
            raise ValueError(f"Latte extras={self.extras}: supported are 1 (unconditional) and "
                             f"2 (class labels); the text-embedding variant (78) is not")
        if self.depth % 2:
            raise ValueError(f"Latte depth={self.depth} must be even: blocks come in "
                             f"(spatial, temporal) pairs")
        if self.scan_layers and self.dynamic and self.dynamic_tokens and \
                self.token_blocks != "both":
            raise NotImplementedError(f"scan_layers stacks blocks with one parameter tree: "
                                      f"token_blocks={self.token_blocks!r} gives spatial and "
                                      f"temporal blocks different trees; use "
                                      f"token_blocks='both' or scan_layers=False")
        if self.token_blocks not in TOKEN_BLOCKS:
            raise ValueError(f"Latte token_blocks={self.token_blocks!r}; valid: {TOKEN_BLOCKS}")
        super().setup()   # the label table of extras=1 is never called, so it has no params

    # -- how blocks group the clip's tokens (the engine and the FLOPs counter read these) --

    @property
    def block_kinds(self):
        """The kinds of one cycle of blocks: block i is `block_kinds[i % 2]`."""
        return BLOCK_KINDS

    @property
    def conditional(self) -> bool:
        """extras=2 takes class labels; the unconditional model (extras=1) is called without."""
        return self.extras == 2

    @property
    def tokens_per_sample(self) -> int:
        """Tokens of one clip: F * N."""
        return self.num_frames * self.num_patches

    def block_has_token_router(self, i: int) -> bool:
        """SDT in block i: `dynamic_tokens` and the block's kind is in `token_blocks`."""
        return bool(self.dynamic_tokens) and self.token_blocks in ("both", BLOCK_KINDS[i % 2])

    def to_block_rows(self, x, kind: str, batch: int):
        """Tokens [(b f), N, D] -> the rows block `kind` attends within."""
        return x if kind == "spatial" else to_temporal(x, batch)

    def from_block_rows(self, x, kind: str, batch: int):
        return x if kind == "spatial" else to_spatial(x, batch)

    def after_block(self, x, index, batch: int):
        """What runs between blocks, on tokens [(b f), N, D]: the frame table after block 0.
        `index` may be traced (the engine's scan); the other blocks leave x as it is."""
        table = self.temp_embed().astype(x.dtype)[0]                  # [F, D]

        def add(x):
            f = table.shape[0]
            return (x.reshape((batch, f) + x.shape[1:]) + table[None, :, None]).reshape(x.shape)
        if isinstance(index, int):
            return add(x) if index == 0 else x
        return jax.lax.cond(index == 0, add, lambda x: x, x)   # no work after other blocks

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
        """The alternating stack on tokens [(B F), N, D]. Returns (x [(B F), N, D], aux): aux
        {} for the static path, else the per-clip masks and logits stacked to [B, L, ...]
        (see the module docstring).

        With `scan_layers` the blocks' parameters are stacked on a leading depth axis under
        "blocks", exactly as a scanned DiT's (so the converter, reordering and PEFT treat both
        alike), and one `nn.scan` step runs block i with an `nn.cond` on its kind (i even:
        spatial): the two branches differ only in how the tokens are grouped."""
        b = c.shape[0]
        dynamic = self.dynamic and not complete
        noise = self._gumbel_noise(gumbel_noise, b) if dynamic and train else None

        def run(block, x, i, kind, noise_l):
            """Block i of `kind` on canonical tokens x; noise_l: this block's per-clip draws."""
            rows = self.to_block_rows(x, kind, b)
            rep = rows.shape[0] // b
            routed = self.block_has_token_router(i if isinstance(i, int) else 0)
            noise_rows = None if noise_l is None else {
                k: tuple(self._per_row(g, k, kind, b) for g in pair)
                for k, pair in noise_l.items() if k != "token" or routed}
            # c per clip: the block's adaLN runs once per clip (`dit.per_row`); the width
            # routers read t_emb per row, so that the masked path's masks are per row.
            rows, aux = block(rows, c, jnp.repeat(t_emb, rep, axis=0),
                              noise_rows, train=train, complete=not dynamic)
            x = self.after_block(self.from_block_rows(rows, kind, b), i, b)
            return x, (self._clip_aux(aux, routed, kind, b, rep) if dynamic else {})

        def layer_noise(i):
            return None if noise is None else jax.tree_util.tree_map(lambda g: g[:, i], noise)

        if self.scan_layers:
            def body(block, x, layer):
                i, noise_l = layer
                return nn.cond(i % 2 == 0,
                               lambda blk, x, n: run(blk, x, i, "spatial", n),
                               lambda blk, x, n: run(blk, x, i, "temporal", n),
                               block, materialize_gradient(x), noise_l)
            if self.remat:
                body = nn.remat(body, prevent_cse=False, policy=remat_policy(self.remat_policy))
            layers = (jnp.arange(self.depth, dtype=jnp.int32),
                      None if noise is None else jax.tree_util.tree_map(
                          lambda g: jnp.moveaxis(g, 1, 0), noise))
            x, aux = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                             length=self.depth)(self.blocks, x, layers)
            if not dynamic:
                return x, {}
            return x, jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 0, 1), aux)

        per_layer = []
        for i in range(self.depth):
            def body(block, x, noise_l, i=i):
                return run(block, x, i, BLOCK_KINDS[i % 2], noise_l)
            if self.remat:
                body = nn.remat(body, prevent_cse=True, policy=remat_policy(self.remat_policy))
            x, aux_l = body(self.blocks[i], materialize_gradient(x), layer_noise(i))
            per_layer.append(aux_l)
        if not dynamic:
            return x, {}
        return x, jax.tree_util.tree_map(lambda *a: jnp.stack(a, axis=1), *per_layer)

    def _gumbel_noise(self, given, batch: int):
        """Train-mode Gumbel draws {"head"|"group"|"token": (g1, g2)}, each [B, L, ...]: the
        given ones, the missing ones drawn here, per clip ("head", "group": [B, L, H-1]) and
        per token ("token": [B, L, F*N]), from the "gumbel" rng stream."""
        given = dict(given or {})
        shapes = {"head": self.num_heads - 1, "group": self.num_heads - 1}
        if self.dynamic_tokens:
            shapes["token"] = self.tokens_per_sample
        for k, size in shapes.items():
            if k not in given:
                g = jax.random.gumbel(self.make_rng("gumbel"), (2, batch, self.depth, size),
                                      jnp.float32)
                given[k] = (g[0], g[1])
        return given

    def _per_row(self, g, name: str, kind: str, batch: int):
        """One block's per-clip draw [B, ...] -> the block's rows: width noise repeated over
        the clip's rows, token noise [B, F*N] regrouped like the tokens."""
        if name != "token":
            return jnp.repeat(g, self.num_frames if kind == "spatial" else self.num_patches,
                              axis=0)
        return self._token_rows(g, kind, batch)

    def _token_rows(self, v, kind: str, batch: int):
        """Per-token values of a clip [B, F*N] -> block `kind`'s rows [rows, S], grouped as
        `to_block_rows` groups the tokens."""
        tokens = v.reshape(batch * self.num_frames, self.num_patches, 1)
        return self.to_block_rows(tokens, kind, batch)[..., 0]

    def _token_clip(self, v, kind: str, batch: int):
        """The inverse of `_token_rows`: [rows, S] -> [B, F*N] in (frame, position) order."""
        return self.from_block_rows(v[..., None], kind, batch).reshape(batch, -1)

    def _clip_aux(self, aux, routed: bool, kind: str, batch: int, rep: int):
        """A block's aux over its rows -> per clip: width masks/logits [B, ...] (every row of
        a clip holds the same), token masks/logits [B, F*N] in (frame, position) order."""
        out = {k: aux[k][::rep] for k in ("head_masks", "head_logits", "group_masks",
                                          "group_logits")}
        if not self.dynamic_tokens:
            return out
        if routed:
            for k in ("token_masks", "token_logits"):
                out[k] = self._token_clip(aux[k], kind, batch)
        else:   # every token runs the MLP
            tokens = (batch, self.tokens_per_sample)
            out["token_masks"] = jnp.ones(tokens, out["head_masks"].dtype)
            out["token_logits"] = jnp.full(tokens, jnp.inf, jnp.float32)
        return out

    def head(self, tokens, c):
        """tokens [(B F), N, D], c [B, D] -> [B, F, H, W, C_out] (float32 or float64)."""
        b = c.shape[0]
        f = tokens.shape[0] // b
        out = self.unpatchify(self.final_layer(tokens, c))   # adaLN once per clip
        return out.reshape((b, f) + out.shape[1:]).astype(_float_dtype(self.dtype))

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels: Optional[int] = 4,
                         complete: bool = False):
        """`DiT.forward_with_cfg` (rows [0:n] conditional, [n:2n] the null label; `cfg_scale`
        may be traced) guiding, as the release does, all 4 eps channels by default."""
        return super().forward_with_cfg(x, t, y, cfg_scale, guide_channels, complete)

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
