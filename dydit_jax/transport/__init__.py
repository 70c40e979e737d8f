"""SiT's flow-matching transport (willisma/SiT, commit 947f95b, ``transport/``) in JAX.

``create_transport`` has the reference signature and defaults; :class:`Transport` holds the
path (:mod:`~dydit_jax.transport.path`) and the training loss, :class:`Sampler` the ODE / SDE
samplers (:mod:`~dydit_jax.transport.integrators`). See
:mod:`dydit_jax.transport.transport` for the model-function contract.

    transport = create_transport("Linear", "velocity")
    terms = transport.training_losses(model_fn, x1, dict(y=y), rng=key)
    sample = Sampler(transport).sample_ode(sampling_method="heun2", num_steps=50)
    xs = sample(z, model_fn, y=y)          # [50, B, H, W, C]; xs[-1] is the sample
"""
from . import path
from .integrators import ADAPTIVE_METHODS, FIXED_GRID_METHODS, SDE_METHODS, ode, sde
from .path import DIFFUSION_FORMS, GVPCPlan, ICPlan, VPCPlan, expand_t_like_x
from .transport import LAST_STEPS, ModelType, PathType, Sampler, Transport, WeightType
from .utils import mean_flat, time_grid

PATH_TYPES = {"Linear": PathType.LINEAR, "GVP": PathType.GVP, "VP": PathType.VP}
PREDICTIONS = {"velocity": ModelType.VELOCITY, "noise": ModelType.NOISE,
               "score": ModelType.SCORE}
LOSS_WEIGHTS = {None: WeightType.NONE, "none": WeightType.NONE,
                "velocity": WeightType.VELOCITY, "likelihood": WeightType.LIKELIHOOD}


def create_transport(path_type="Linear", prediction="velocity", loss_weight=None,
                     train_eps=None, sample_eps=None):
    """Build a :class:`Transport` as the reference's ``create_transport``.

    :param path_type: "Linear", "GVP" or "VP".
    :param prediction: "velocity" (default), "noise" or "score".
    :param loss_weight: None, "velocity" or "likelihood" (noise / score models only).
    :param train_eps, sample_eps: the margins that keep t away from the singular ends.
        Defaults: VP 1e-5 (train) and 1e-3 (sample); Linear/GVP with noise or score 1e-3 and
        1e-3; a Linear/GVP velocity model is stable everywhere and always uses 0 and 0 (any
        given value is ignored, as in the reference). Unlike the reference, each eps defaults
        on its own: there a given ``sample_eps`` is ignored when ``train_eps`` is None, and a
        None ``sample_eps`` with a given ``train_eps`` breaks sampling.
    """
    if path_type not in PATH_TYPES:
        raise ValueError(f"path_type {path_type!r}; choose one of {list(PATH_TYPES)}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction {prediction!r}; choose one of {list(PREDICTIONS)}")
    if loss_weight not in LOSS_WEIGHTS:
        raise ValueError(f"loss_weight {loss_weight!r}; choose None, 'velocity' or 'likelihood'")
    model_type = PREDICTIONS[prediction]
    loss_type = LOSS_WEIGHTS[loss_weight]
    path_enum = PATH_TYPES[path_type]
    if path_enum == PathType.VP:
        train_eps = 1e-5 if train_eps is None else train_eps
        sample_eps = 1e-3 if sample_eps is None else sample_eps
    elif model_type != ModelType.VELOCITY:
        train_eps = 1e-3 if train_eps is None else train_eps
        sample_eps = 1e-3 if sample_eps is None else sample_eps
    else:  # velocity on Linear / GVP is stable everywhere
        train_eps = 0
        sample_eps = 0
    return Transport(model_type=model_type, path_type=path_enum, loss_type=loss_type,
                     train_eps=train_eps, sample_eps=sample_eps)


__all__ = [
    "ADAPTIVE_METHODS",
    "DIFFUSION_FORMS",
    "FIXED_GRID_METHODS",
    "GVPCPlan",
    "ICPlan",
    "LAST_STEPS",
    "ModelType",
    "PathType",
    "SDE_METHODS",
    "Sampler",
    "Transport",
    "VPCPlan",
    "WeightType",
    "create_transport",
    "expand_t_like_x",
    "mean_flat",
    "ode",
    "path",
    "sde",
    "time_grid",
]
