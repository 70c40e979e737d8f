"""SiT (Ma et al., "Scalable Interpolant Transformers"; willisma/SiT, commit 947f95b) in Flax.

SiT is DiT's backbone unchanged (same parameters, names and checkpoints: the release's
``SiT`` state_dict loads with :func:`dydit_jax.convert.from_pytorch`), used with a continuous
time t in [0, 1] that goes to the sinusoidal embedding as is (no x1000: :class:`DiT` already
embeds the raw t it is given). What differs is the output:

* ``__call__`` is the release's ``forward``: with ``learn_sigma`` the final layer still makes
  2C channels but only the first C (the prediction) are returned. ``forward_full`` returns all
  2C (DiT's output).
* ``forward_with_cfg`` (inherited from DiT) therefore works on those C channels: by default it
  guides channels 0..2 and channel 3 passes through unguided, as the release does
  (``guide_channels=None`` guides all C).

A dynamic SiT (``dynamic=True``) returns ``(out, aux)`` like DyDiT, with ``out`` sliced the
same way. Arrays are NHWC.
"""
from __future__ import annotations

from dydit_jax.models.dit import DiT, make_presets, named_config


class SiT(DiT):
    """Scalable Interpolant Transformer: :class:`DiT` whose output keeps the first C channels.

    ``apply(variables, x, t, y)``: x [B, H, W, C], t float [B] in [0, 1], y int [B] -> [B, H, W, C].
    """

    def __call__(self, x, t, y, train: bool = False, force_drop_ids=None,
                 complete: bool = False, gumbel_noise=None):
        out = super().__call__(x, t, y, train=train, force_drop_ids=force_drop_ids,
                               complete=complete, gumbel_noise=gumbel_noise)
        if self.dynamic:
            out, aux = out
            return out[..., :self.returned_channels], aux
        return out[..., :self.returned_channels]

    @property
    def returned_channels(self) -> int:
        """The prediction's C channels (the learned-sigma half is dropped)."""
        return self.in_channels

    def forward_full(self, x, t, y, train: bool = False, force_drop_ids=None,
                     complete: bool = False, gumbel_noise=None):
        """All output channels (2C with ``learn_sigma``), i.e. DiT's ``__call__``."""
        return super().__call__(x, t, y, train=train, force_drop_ids=force_drop_ids,
                                complete=complete, gumbel_noise=gumbel_noise)


def sit_config(name: str) -> dict:
    """Constructor arguments of a named config: "SiT-XL/2", "SiT_S_4", "S/8", ..."""
    return named_config(name, "SiT")


SiT_models = make_presets(SiT, "SiT")
SiT_XL_2, SiT_XL_4, SiT_XL_8 = (SiT_models[f"SiT-XL/{p}"] for p in (2, 4, 8))
SiT_L_2, SiT_L_4, SiT_L_8 = (SiT_models[f"SiT-L/{p}"] for p in (2, 4, 8))
SiT_B_2, SiT_B_4, SiT_B_8 = (SiT_models[f"SiT-B/{p}"] for p in (2, 4, 8))
SiT_S_2, SiT_S_4, SiT_S_8 = (SiT_models[f"SiT-S/{p}"] for p in (2, 4, 8))
