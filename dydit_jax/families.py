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
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Tuple


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
    """
    name: str
    prefix: str
    model_class: Callable[[], type]
    extra_kwargs: Callable = lambda mc: {}
    flow: bool = False
    video: bool = False
    dynamic: bool = True

    def sizes(self, model_name: str) -> dict:
        """depth / hidden_size / num_heads / patch_size of a named config."""
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


FAMILIES: Dict[str, Family] = {
    "dit": Family("dit", "DiT", _dit),
    "sit": Family("sit", "SiT", _sit, flow=True),
    "latte": Family("latte", "Latte", _latte, video=True,
                    extra_kwargs=lambda mc: dict(num_frames=mc.num_frames, extras=mc.extras,
                                                 token_blocks=mc.token_blocks)),
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
        valid = ", ".join(f"{f.prefix}-{{S,B,L,XL}}/{{2,4,8}}" for f in FAMILIES.values())
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
