"""ADM Gaussian diffusion as used by facebookresearch/DiT (commit ed81ce2), in JAX (NHWC).

``create_diffusion`` has the reference signature and defaults; see
:mod:`dydit_jax.diffusion.gaussian_diffusion` for the model-function contract.
"""
from . import gaussian_diffusion as gd
from .diffusion_utils import (
    approx_standard_normal_cdf,
    continuous_gaussian_log_likelihood,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from .gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    betas_for_alpha_bar,
    compute_dtype,
    get_beta_schedule,
    get_named_beta_schedule,
    loop_step_noise,
    split_loop_key,
)
from .respace import SpacedDiffusion, space_timesteps


def create_diffusion(
    timestep_respacing,
    noise_schedule="linear",
    use_kl=False,
    sigma_small=False,
    predict_xstart=False,
    learn_sigma=True,
    rescale_learned_sigmas=False,
    diffusion_steps=1000,
):
    """Build a :class:`SpacedDiffusion` exactly as DiT's ``create_diffusion``.

    :param timestep_respacing: ``""``/``None`` (all ``diffusion_steps``), ``"250"``,
        ``"ddim50"``, ``"10,20,30"`` (per-section counts) or a list of ints.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        model_var_type = ModelVarType.LEARNED_RANGE
    elif sigma_small:
        model_var_type = ModelVarType.FIXED_SMALL
    else:
        model_var_type = ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=model_var_type,
        loss_type=loss_type,
    )


__all__ = [
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "SpacedDiffusion",
    "approx_standard_normal_cdf",
    "betas_for_alpha_bar",
    "compute_dtype",
    "continuous_gaussian_log_likelihood",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "gd",
    "get_beta_schedule",
    "get_named_beta_schedule",
    "loop_step_noise",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
    "split_loop_key",
]
