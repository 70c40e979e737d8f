"""Models: DiT (and its dynamic DyDiT mode)."""
from dydit_jax.models.dit import (  # noqa: F401
    DiT,
    DiT_B_2, DiT_B_4, DiT_B_8,
    DiT_L_2, DiT_L_4, DiT_L_8,
    DiT_S_2, DiT_S_4, DiT_S_8,
    DiT_XL_2, DiT_XL_4, DiT_XL_8,
    DiT_models,
    dit_config,
)
