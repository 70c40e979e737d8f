"""The model families and what differs between them, in one place (DESIGN.md 5).

`train.py`, `generate.py`, `config_lib.py` and the tools look a family up here instead of
branching on model names: its model class, its named sizes, the constructor arguments it
reads from `config.model`, whether it is a flow-matching model, and whether its samples are
videos. A family is chosen by `config.model.family`, or for a named model by the name's prefix
("DiT-XL/2", "SiT-S/2", "Latte-XL/2"); "custom" sizes take `family` (default: "sit" when
`config.transport.enabled`, else "dit").

What an entry does not need to hold, because the model answers it: the engine block kind and
the FLOPs counter read the model's token-grouping interface (`block_kinds`, `to_block_rows`,
`after_block`, `tokens_per_sample`: a DiT attends per image, a Latte per frame / per position;
`flops.block_shapes`), and the converter maps a checkpoint onto the model's own parameter tree
(with its fixed sin-cos tables, `convert._FIXED_BUFFERS`). The objective and the sampler follow
`flow` (ADM diffusion or flow matching); `video` selects clip data, strip grids / GIFs and FVD.

FLUX ("flux-dev", "flux-schnell", "flux-lite-8b", or "custom" with family "flux") has a
constructor of its own (`build_flux`), its own objective (`flux_loss`: rectified flow with the
FLUX time shift; DyFLUX with a kept-token target) and is text-conditioned: its batches get T5 /
CLIP embeddings from `text_conditioning` in the training loop, and mode=sample takes prompts
(`flux_pipeline.sample_from_config`). The training loop, checkpoints, sharding and resume
are the same as every family's.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family.

    :param name: the registry key ("dit", "sit", "latte").
    :param prefix: the prefix of its named configs ("DiT" in "DiT-XL/2").
    :param model_class: a callable returning the Flax model class (imported lazily).
    :param extra_kwargs: `config.model` -> the family's own constructor arguments.
    :param flow: trains and samples with flow matching (config.transport must be enabled).
    :param video: its inputs and samples are clips [B, F, H, W, C].
    :param dynamic: it has a dynamic (DyDiT) mode.
    :param build: config -> the model, for a family whose constructor is not DiT's (FLUX).
    :param loss: (config, model) -> loss(params, batch, rng, step), for a family with its own
        objective (FLUX's rectified flow, `flux_loss`); None: ADM diffusion or flow matching.
    :param text: text-conditioned (prompts, `text_conditioning`) instead of class labels.
    :param named_sizes: model name -> sizes, for presets not named "<prefix>-<size>/<patch>".
    """
    name: str
    prefix: str
    model_class: Callable[[], type]
    extra_kwargs: Callable = lambda mc: {}
    flow: bool = False
    video: bool = False
    dynamic: bool = True
    build: Optional[Callable] = None
    loss: Optional[Callable] = None
    text: bool = False
    named_sizes: Optional[Callable] = None

    def sizes(self, model_name: str) -> dict:
        """depth / hidden_size / num_heads / patch_size of a named config."""
        if self.named_sizes is not None:
            return self.named_sizes(model_name)
        from dydit_jax.models.dit import named_config
        return named_config(model_name, self.prefix)


def _dit():
    from dydit_jax.models.dit import DiT
    return DiT


def _sit():
    from dydit_jax.models.sit import SiT
    return SiT


def _latte():
    from dydit_jax.models.latte import Latte
    return Latte


def _flux_sizes(name: str) -> dict:
    from dydit_jax.models.flux import FLUX_CONFIGS
    if name not in FLUX_CONFIGS:
        raise ValueError(f"unknown FLUX preset {name!r}; valid: {', '.join(FLUX_CONFIGS)}")
    p = FLUX_CONFIGS[name]
    return dict(hidden_size=p["hidden_size"], depth=p["depth"], num_heads=p["num_heads"],
                patch_size=2)


def _flux():
    from dydit_jax.models.flux import FLUX
    return FLUX


def default_axes_dim(head_dim: int) -> Tuple[int, int, int]:
    """RoPE widths per (index, row, column) axis in FLUX's proportions (16, 56, 56) of 128,
    each even (RoPE rotates pairs)."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"FLUX's head size (hidden_size / num_heads) must be even and >= 6 "
                         f"for RoPE over 3 axes, got {head_dim}")
    first = max(2, 2 * round(head_dim / 16))
    row = 2 * ((head_dim - first) // 4)
    return first, row, head_dim - first - row


def build_flux(config):
    """The FLUX of `config.model` (a preset name or "custom") with `config.text`'s widths
    where the model leaves them 0, dynamic (DyFLUX token routers) if `config.dynamic`, with
    TDW width routers if also `config.flux.tdw`."""
    import jax.numpy as jnp

    from dydit_jax.models.flux import FLUX, FLUX_CONFIGS
    mc = config.model
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[mc.dtype]
    common = dict(dynamic=config.dynamic.enabled,
                  dynamic_width=config.dynamic.enabled and config.flux.tdw,
                  scan_layers=mc.scan_layers, remat=mc.remat, remat_policy=mc.remat_policy,
                  dtype=dtype)
    if mc.name != "custom":
        return FLUX(**dict(FLUX_CONFIGS[mc.name], **common))
    head_dim = mc.hidden_size // mc.num_heads
    return FLUX(in_channels=4 * mc.in_channels, vec_in_dim=mc.vec_in_dim or config.text.width,
                context_in_dim=mc.context_in_dim or config.text.width,
                hidden_size=mc.hidden_size, mlp_ratio=mc.mlp_ratio, num_heads=mc.num_heads,
                depth=mc.depth, depth_single_blocks=mc.depth_single_blocks,
                axes_dim=tuple(mc.axes_dim) or default_axes_dim(head_dim),
                qkv_bias=mc.qkv_bias, guidance_embed=mc.guidance_embed, **common)


def _flux_loss(config, model):
    from dydit_jax.flux_loss import flux_loss_fn
    return flux_loss_fn(model, config.flux, config.dynamic if model.dynamic else None)


FAMILIES: Dict[str, Family] = {
    "dit": Family("dit", "DiT", _dit),
    "sit": Family("sit", "SiT", _sit, flow=True),
    "latte": Family("latte", "Latte", _latte, video=True,
                    extra_kwargs=lambda mc: dict(num_frames=mc.num_frames, extras=mc.extras,
                                                 token_blocks=mc.token_blocks)),
    "flux": Family("flux", "flux", _flux, build=build_flux, loss=_flux_loss, text=True, named_sizes=_flux_sizes),
}


def family_of(config) -> Family:
    """The family of `config.model` (see the module docstring); ValueError if unknown."""
    mc = config.model
    name = getattr(mc, "family", "") or ""
    if not name:
        if mc.name == "custom":
            name = "sit" if config.transport.enabled else "dit"
        else:
            name = next((f.name for f in FAMILIES.values()
                         if mc.name.startswith(f.prefix + "-") or
                         mc.name.startswith(f.prefix + "_")), "")
    if name not in FAMILIES:
        valid = ", ".join(f"{f.prefix}-{{S,B,L,XL}}/{{2,4,8}}" for f in FAMILIES.values()
                          if f.named_sizes is None) + ", flux-dev, flux-schnell, flux-lite-8b"
        raise ValueError(f"config.model.name={mc.name!r} / family={name!r} names no model "
                         f"family; valid names: {valid}, or 'custom' with config.model.family "
                         f"in {tuple(FAMILIES)}")
    return FAMILIES[name]


def model_kwargs(config) -> Tuple[type, dict]:
    """(model class, constructor arguments) of `config.model` (sizes from the named config or
    the custom fields), without the dtype/dynamic switches `train.build_model` adds."""
    mc = config.model
    family = family_of(config)
    if mc.name == "custom":
        sizes = dict(hidden_size=mc.hidden_size, depth=mc.depth, num_heads=mc.num_heads,
                     patch_size=mc.patch_size)
    else:
        sizes = family.sizes(mc.name)
    return family.model_class(), dict(sizes, **family.extra_kwargs(mc))
