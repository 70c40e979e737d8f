"""Models: DiT (and its dynamic DyDiT mode), Latte (video), FLUX (text-to-image; DyFLUX)."""
from dydit_jax.models.dit import (  # noqa: F401
    DiT,
    DiT_B_2, DiT_B_4, DiT_B_8,
    DiT_L_2, DiT_L_4, DiT_L_8,
    DiT_S_2, DiT_S_4, DiT_S_8,
    DiT_XL_2, DiT_XL_4, DiT_XL_8,
    DiT_models,
    dit_config,
)
from dydit_jax.models.latte import (  # noqa: F401
    Latte,
    Latte_B_2, Latte_B_4, Latte_B_8,
    Latte_L_2, Latte_L_4, Latte_L_8,
    Latte_S_2, Latte_S_4, Latte_S_8,
    Latte_XL_2, Latte_XL_4, Latte_XL_8,
    Latte_models,
)
from dydit_jax.models.flux import FLUX, FLUX_models  # noqa: F401
