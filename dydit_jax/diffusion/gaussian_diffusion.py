"""ADM Gaussian diffusion as facebookresearch/DiT uses it (commit ed81ce2), in JAX.

Conventions
-----------
* Images / latents are NHWC: ``x`` is ``[B, H, W, C]``; channels are always the LAST axis.
* ``model_fn(x, t, **model_kwargs) -> out`` with ``t`` int32 ``[B]`` on the ORIGINAL timestep
  scale (a :class:`~dydit_jax.diffusion.respace.SpacedDiffusion` maps its step indices through
  ``timestep_map`` before calling the model). With a learned variance ``out`` is
  ``[B, H, W, 2C]`` (first C channels = eps or x0, last C = variance values in [-1, 1]);
  otherwise ``[B, H, W, C]``. ``out`` may also be a tuple ``(out, extra)``; ``extra`` is passed
  through untouched.
* Schedule tables are float64 numpy arrays computed exactly as the reference computes them. A
  coefficient is gathered at ``t`` and cast to the compute dtype: float32 for float32 / bf16 /
  f16 inputs (as the reference's ``.float()``), float64 for float64 inputs (``jax_enable_x64``).
  Casting the table before the gather gives the same values as casting after it.
* Randomness is explicit. Single-step functions take either ``noise`` (an array, e.g. golden
  noise) or ``rng`` (a ``jax.random`` key). The sampling loops draw the step noise with
  :func:`loop_step_noise` (``fold_in(step_key, i)`` with ``i`` the step index), so a Python
  loop over the single-step functions can reproduce a loop exactly.
* Every method is traceable: wrap a loop in ``jax.jit`` and pass conditioning (labels,
  ``cfg_scale``...) through ``model_kwargs`` as traced pytree leaves; the loops are a single
  ``lax.scan`` so compile time does not depend on the number of steps.
"""
import enum
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .diffusion_utils import LOG2, discretized_gaussian_log_likelihood, mean_flat, normal_kl


class ModelMeanType(enum.Enum):
    """Which quantity the model predicts."""

    PREVIOUS_X = enum.auto()  # x_{t-1} (only as a training target; not used by DiT)
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """How the output variance is obtained.

    LEARNED_RANGE interpolates, in log space, between the posterior variance (FIXED_SMALL)
    and beta_t (FIXED_LARGE) with the model's variance values in [-1, 1]. As in the DiT
    reference, LEARNED is treated exactly like LEARNED_RANGE.
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # raw MSE (+ the VB term when the variance is learned)
    RESCALED_MSE = enum.auto()  # MSE + VB * num_timesteps / 1000
    KL = enum.auto()  # the variational lower bound
    RESCALED_KL = enum.auto()  # VLB * num_timesteps

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


# ----------------------------------------------------------------------------------------
# Beta schedules (float64 numpy)
# ----------------------------------------------------------------------------------------


def _warmup_beta(beta_start, beta_end, num_diffusion_timesteps, warmup_frac):
    betas = np.full(num_diffusion_timesteps, beta_end, dtype=np.float64)
    warmup_time = int(num_diffusion_timesteps * warmup_frac)
    betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
    return betas


def get_beta_schedule(beta_schedule, *, beta_start, beta_end, num_diffusion_timesteps):
    """The older, explicit beta-schedule API (kept for completeness)."""
    n = num_diffusion_timesteps
    if beta_schedule == "quad":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=np.float64) ** 2
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif beta_schedule == "warmup10":
        betas = _warmup_beta(beta_start, beta_end, n, 0.1)
    elif beta_schedule == "warmup50":
        betas = _warmup_beta(beta_start, beta_end, n, 0.5)
    elif beta_schedule == "const":
        betas = np.full(n, beta_end, dtype=np.float64)
    elif beta_schedule == "jsd":  # 1/T, 1/(T-1), ..., 1
        betas = 1.0 / np.linspace(n, 1, n, dtype=np.float64)
    else:
        raise NotImplementedError(beta_schedule)
    assert betas.shape == (n,)
    return betas


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Betas that discretize ``alpha_bar`` (a function of t in [0, 1]), capped at max_beta."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """``"linear"`` (Ho et al., scaled to any step count) or ``"squaredcos_cap_v2"``."""
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return get_beta_schedule(
            "linear",
            beta_start=scale * 0.0001,
            beta_end=scale * 0.02,
            num_diffusion_timesteps=num_diffusion_timesteps,
        )
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise NotImplementedError(f"unknown beta schedule: {schedule_name}")


# ----------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------


def compute_dtype(x):
    """float32 for float32 / half inputs, float64 for float64 inputs."""
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _extract(arr, t, x):
    """Gather the 1-D float64 table ``arr`` at ``t`` (shape [B]) -> [B, 1, ..., 1] in x's compute dtype."""
    dtype = compute_dtype(x)
    table = jnp.asarray(np.asarray(arr, dtype=np.float64).astype(np.dtype(dtype)))
    res = table[jnp.asarray(t)]
    return res.reshape(res.shape + (1,) * (jnp.ndim(x) - 1))


def _nonzero_mask(t, x):
    """1.0 where t != 0 (add noise), 0.0 at the last step; shape [B, 1, ..., 1]."""
    t = jnp.asarray(t)
    return (t != 0).astype(compute_dtype(x)).reshape(t.shape + (1,) * (jnp.ndim(x) - 1))


def _split_model_output(model_output):
    if isinstance(model_output, tuple):
        model_output, extra = model_output
        return model_output, extra
    return model_output, None


def split_loop_key(rng):
    """Split a loop's ``rng`` into ``(init_key, step_key)``.

    ``init_key`` draws x_T when no ``noise`` is given; ``step_key`` is folded with the step
    index by :func:`loop_step_noise`.
    """
    init_key, step_key = jax.random.split(rng)
    return init_key, step_key


def check_loop_key(rng) -> None:
    """TypeError unless `rng` is None or a PRNG key (a typed key, or `jax.random.PRNGKey`'s
    uint32 [2]): the reference's (ADM) loops take the starting noise where ours take `rng`,
    and a noise array there would otherwise fail deep inside jax.random."""
    dtype, shape = getattr(rng, "dtype", None), tuple(getattr(rng, "shape", ()))
    if rng is None or (dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)):
        return
    if dtype == np.uint32 and len(shape) == 1:
        return
    got = f"a {dtype} array of shape {shape}" if dtype is not None else repr(rng)
    raise TypeError(f"got {got} as rng; pass the starting noise as noise=... (keyword) and a "
                    f"PRNG key as rng (jax.random.PRNGKey(seed))")


def loop_step_noise(step_key, i, shape, dtype=jnp.float32):
    """The noise the sampling loops use at step index ``i`` (``num_timesteps-1`` down to 0)."""
    return jax.random.normal(jax.random.fold_in(step_key, i), shape, dtype)


_PROGRESS = {"bar": None}


def _progress_callback(i, total):
    """Host-side progress bar for the scanned loops (called through jax.debug.callback)."""
    i, total = int(i), int(total)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    if i == total - 1:
        if _PROGRESS["bar"] is not None:
            _PROGRESS["bar"].close()
        _PROGRESS["bar"] = tqdm(total=total) if tqdm is not None else None
    if _PROGRESS["bar"] is not None:
        _PROGRESS["bar"].update(1)
        if i == 0:
            _PROGRESS["bar"].close()
            _PROGRESS["bar"] = None
    elif tqdm is None and (i % max(total // 10, 1) == 0):
        print(f"diffusion step {total - i}/{total}")


# ----------------------------------------------------------------------------------------
# The diffusion process
# ----------------------------------------------------------------------------------------


class GaussianDiffusion:
    """Training and sampling utilities of the ADM Gaussian diffusion (NHWC, JAX).

    :param betas: 1-D array of betas, one per diffusion step (kept as float64 numpy).
    :param model_mean_type: a :class:`ModelMeanType`.
    :param model_var_type: a :class:`ModelVarType`.
    :param loss_type: a :class:`LossType`.

    Timestep arguments ``t`` are step indices of THIS process (0..num_timesteps-1); the model
    is called with :meth:`model_timesteps` of them.
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)
        assert betas.ndim == 1, "betas must be 1-D"
        assert (betas > 0).all() and (betas <= 1).all()
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        assert self.alphas_cumprod_prev.shape == (self.num_timesteps,)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # The posterior variance is 0 at t=0, so its log is clipped to the t=1 value there.
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(self.posterior_variance) > 1
            else np.array([])
        )
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

        # Tables used by p_mean_variance.
        self._log_betas = np.log(betas)
        if self.num_timesteps > 1:
            self._fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
            self._fixed_large_log_variance = np.log(self._fixed_large_variance)

    # -- model call ----------------------------------------------------------------------

    @property
    def timestep_map(self):
        """Step index -> timestep the model sees (the identity for an unspaced process)."""
        return np.arange(self.num_timesteps, dtype=np.int64)

    def model_timesteps(self, t):
        """The int32 timesteps the model is called with for step indices ``t``."""
        return jnp.asarray(t).astype(jnp.int32)

    def _call_model(self, model_fn, x, t, model_kwargs):
        return model_fn(x, self.model_timesteps(t), **(model_kwargs or {}))

    # -- forward process -----------------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        shape = jnp.shape(x_start)
        variance = jnp.broadcast_to(_extract(1.0 - self.alphas_cumprod, t, x_start), shape)
        log_variance = jnp.broadcast_to(
            _extract(self.log_one_minus_alphas_cumprod, t, x_start), shape
        )
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None, rng=None):
        """Sample q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        if noise is None:
            if rng is None:
                raise ValueError("q_sample needs `noise` or `rng`")
            noise = jax.random.normal(rng, jnp.shape(x_start), compute_dtype(x_start))
        assert noise.shape == x_start.shape
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        assert x_start.shape == x_t.shape
        mean = (
            _extract(self.posterior_mean_coef1, t, x_t) * x_start
            + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        shape = jnp.shape(x_t)
        variance = jnp.broadcast_to(_extract(self.posterior_variance, t, x_t), shape)
        log_variance = jnp.broadcast_to(
            _extract(self.posterior_log_variance_clipped, t, x_t), shape
        )
        return mean, variance, log_variance

    # -- reverse process -----------------------------------------------------------------

    def p_mean_variance(self, model_fn, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        :return: dict with ``mean``, ``variance``, ``log_variance``, ``pred_xstart`` (all of
            x's shape) and ``extra`` (the second element when the model returns a tuple, else None).
        """
        t = jnp.asarray(t)
        assert t.shape == (x.shape[0],), (t.shape, x.shape)
        model_output = self._call_model(model_fn, x, t, model_kwargs)
        return self.p_mean_variance_from_output(
            model_output, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn
        )

    def p_mean_variance_from_output(self, model_output, x, t, clip_denoised=True, denoised_fn=None):
        """:meth:`p_mean_variance` given an already computed raw model output."""
        model_output, extra = _split_model_output(model_output)
        C = x.shape[-1]
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            expected = x.shape[:-1] + (2 * C,)
            assert model_output.shape == expected, (model_output.shape, expected)
            model_output, model_var_values = model_output[..., :C], model_output[..., C:]
            min_log = _extract(self.posterior_log_variance_clipped, t, x)
            max_log = _extract(self._log_betas, t, x)
            # model_var_values in [-1, 1] spans [min_var, max_var] (in log space).
            frac = (model_var_values + 1) / 2
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = jnp.exp(model_log_variance)
        else:
            assert model_output.shape == x.shape, (model_output.shape, x.shape)
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                # The first variance is the posterior one, for a better decoder likelihood.
                var_table, log_table = self._fixed_large_variance, self._fixed_large_log_variance
            elif self.model_var_type == ModelVarType.FIXED_SMALL:
                var_table, log_table = self.posterior_variance, self.posterior_log_variance_clipped
            else:
                raise NotImplementedError(self.model_var_type)
            model_variance = jnp.broadcast_to(_extract(var_table, t, x), x.shape)
            model_log_variance = jnp.broadcast_to(_extract(log_table, t, x), x.shape)

        def process_xstart(v):
            if denoised_fn is not None:
                v = denoised_fn(v)
            if clip_denoised:
                return jnp.clip(v, -1, 1)
            return v

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
        elif self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, model_output))
        else:
            raise NotImplementedError(self.model_mean_type)
        model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        assert model_mean.shape == model_log_variance.shape == pred_xstart.shape == x.shape
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "extra": extra,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        assert x_t.shape == eps.shape
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart
        ) / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    @staticmethod
    def _resolve_noise(noise, rng, x, what):
        if noise is not None:
            assert noise.shape == x.shape, (noise.shape, x.shape)
            return noise
        if rng is None:
            raise ValueError(f"{what} needs `noise` or `rng`")
        return jax.random.normal(rng, x.shape, compute_dtype(x))

    def p_sample(
        self,
        model_fn,
        x,
        t,
        *,
        noise=None,
        rng=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
    ):
        """Sample x_{t-1} ~ p(x_{t-1} | x_t) (ancestral / DDPM step).

        ``noise`` (an explicit standard-normal array of x's shape) or ``rng`` must be given.
        :return: dict with ``sample`` and ``pred_xstart``.
        """
        out = self.p_mean_variance(
            model_fn, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        noise = self._resolve_noise(noise, rng, x, "p_sample")
        nonzero_mask = _nonzero_mask(t, x)  # no noise at t == 0
        sample = out["mean"] + nonzero_mask * jnp.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model_fn,
        x,
        t,
        *,
        noise=None,
        rng=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        eta=0.0,
    ):
        """Sample x_{t-1} with DDIM (eq. 12 of the DDIM paper).

        ``eta`` may be a Python float or a traced scalar. When ``eta`` is the Python value 0,
        neither ``noise`` nor ``rng`` is needed (the noise term is exactly zero).
        :return: dict with ``sample`` and ``pred_xstart``.
        """
        out = self.p_mean_variance(
            model_fn, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        # The model usually predicts eps, but re-derive it in case it predicts x_0.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        dtype = compute_dtype(x)
        alpha_bar = _extract(self.alphas_cumprod, t, x)
        alpha_bar_prev = _extract(self.alphas_cumprod_prev, t, x)
        eta_is_zero = isinstance(eta, (int, float)) and eta == 0
        if not isinstance(eta, (int, float)):
            eta = jnp.asarray(eta, dtype)
        sigma = (
            eta
            * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * jnp.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        mean_pred = (
            out["pred_xstart"] * jnp.sqrt(alpha_bar_prev)
            + jnp.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        )
        if eta_is_zero and noise is None and rng is None:
            sample = mean_pred
        else:
            noise = self._resolve_noise(noise, rng, x, "ddim_sample")
            sample = mean_pred + _nonzero_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model_fn,
        x,
        t,
        *,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        eta=0.0,
    ):
        """Deterministic DDIM step x_t -> x_{t+1} (the reverse ODE)."""
        assert eta == 0.0, "the reverse ODE is only defined for eta=0"
        out = self.p_mean_variance(
            model_fn, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        eps = (
            _extract(self.sqrt_recip_alphas_cumprod, t, x) * x - out["pred_xstart"]
        ) / _extract(self.sqrt_recipm1_alphas_cumprod, t, x)
        alpha_bar_next = _extract(self.alphas_cumprod_next, t, x)
        mean_pred = out["pred_xstart"] * jnp.sqrt(alpha_bar_next) + jnp.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    # -- sampling loops (one lax.scan each) ---------------------------------------------

    def _loop(self, step, shape, rng, noise, dtype, progressive, progress, needs_step_noise):
        check_loop_key(rng)
        shape = tuple(shape)
        if noise is not None:
            assert tuple(noise.shape) == shape, (noise.shape, shape)
            x_T = noise
        else:
            if rng is None:
                raise ValueError("a sampling loop needs `rng` (or `noise` and a noiseless sampler)")
            x_T = jax.random.normal(split_loop_key(rng)[0], shape, dtype)
        dtype = x_T.dtype
        if needs_step_noise:
            if rng is None:
                raise ValueError("this sampler draws noise at every step: pass `rng`")
            step_key = split_loop_key(rng)[1]
        total = self.num_timesteps

        def body(x, i):
            if progress:
                jax.debug.callback(_progress_callback, i, total)
            t = jnp.full((shape[0],), i, dtype=jnp.int32)
            n = loop_step_noise(step_key, i, shape, dtype) if needs_step_noise else None
            out = step(x, t, n)
            x_next = out["sample"].astype(dtype)
            ys = (x_next, out["pred_xstart"].astype(dtype)) if progressive else None
            return x_next, ys

        indices = jnp.arange(total - 1, -1, -1, dtype=jnp.int32)
        final, ys = lax.scan(body, x_T, indices)
        if progressive:
            return {"sample": ys[0], "pred_xstart": ys[1]}
        return final

    def p_sample_loop(
        self,
        model_fn,
        shape,
        rng=None,
        *,
        model_kwargs=None,
        clip_denoised=True,
        denoised_fn=None,
        noise=None,
        progress=False,
        dtype=jnp.float32,
    ):
        """Ancestral sampling from x_T down to x_0; returns the final sample.

        :param shape: ``(B, H, W, C)``.
        :param rng: a ``jax.random`` key. ``split_loop_key(rng)`` gives ``(init_key, step_key)``:
            x_T = normal(init_key) unless ``noise`` is given, and step ``i`` uses
            ``loop_step_noise(step_key, i, shape, dtype)``.
        :param noise: optional x_T (its dtype then sets the loop dtype).
        :param progress: show a host-side progress bar (via ``jax.debug.callback``).
        """
        return self._p_loop(model_fn, shape, rng, model_kwargs, clip_denoised, denoised_fn,
                            noise, progress, dtype, progressive=False)

    def p_sample_loop_progressive(
        self,
        model_fn,
        shape,
        rng=None,
        *,
        model_kwargs=None,
        clip_denoised=True,
        denoised_fn=None,
        noise=None,
        progress=False,
        dtype=jnp.float32,
    ):
        """Like :meth:`p_sample_loop` but returns every step: dict of ``sample`` and
        ``pred_xstart`` stacked on a leading axis of length ``num_timesteps`` (entry 0 is the
        output of the step at t = num_timesteps - 1, the last entry the final sample)."""
        return self._p_loop(model_fn, shape, rng, model_kwargs, clip_denoised, denoised_fn,
                            noise, progress, dtype, progressive=True)

    def _p_loop(self, model_fn, shape, rng, model_kwargs, clip_denoised, denoised_fn, noise,
                progress, dtype, progressive):
        def step(x, t, n):
            return self.p_sample(model_fn, x, t, noise=n, clip_denoised=clip_denoised,
                                 denoised_fn=denoised_fn, model_kwargs=model_kwargs)

        return self._loop(step, shape, rng, noise, dtype, progressive, progress,
                          needs_step_noise=True)

    def ddim_sample_loop(
        self,
        model_fn,
        shape,
        rng=None,
        *,
        model_kwargs=None,
        clip_denoised=True,
        denoised_fn=None,
        noise=None,
        progress=False,
        eta=0.0,
        dtype=jnp.float32,
    ):
        """DDIM sampling from x_T down to x_0; returns the final sample.

        Same arguments as :meth:`p_sample_loop`. With the Python value ``eta=0.0`` no step
        noise is drawn (``rng`` is then only needed when ``noise`` is not given); otherwise
        step ``i`` uses ``loop_step_noise(step_key, i, shape, dtype)``.
        """
        return self._ddim_loop(model_fn, shape, rng, model_kwargs, clip_denoised, denoised_fn,
                               noise, progress, eta, dtype, progressive=False)

    def ddim_sample_loop_progressive(
        self,
        model_fn,
        shape,
        rng=None,
        *,
        model_kwargs=None,
        clip_denoised=True,
        denoised_fn=None,
        noise=None,
        progress=False,
        eta=0.0,
        dtype=jnp.float32,
    ):
        """Like :meth:`ddim_sample_loop` but returns every step (see
        :meth:`p_sample_loop_progressive`)."""
        return self._ddim_loop(model_fn, shape, rng, model_kwargs, clip_denoised, denoised_fn,
                               noise, progress, eta, dtype, progressive=True)

    def _ddim_loop(self, model_fn, shape, rng, model_kwargs, clip_denoised, denoised_fn, noise,
                   progress, eta, dtype, progressive):
        needs_noise = not (isinstance(eta, (int, float)) and eta == 0)

        def step(x, t, n):
            return self.ddim_sample(model_fn, x, t, noise=n, clip_denoised=clip_denoised,
                                    denoised_fn=denoised_fn, model_kwargs=model_kwargs, eta=eta)

        return self._loop(step, shape, rng, noise, dtype, progressive, progress,
                          needs_step_noise=needs_noise)

    # -- losses --------------------------------------------------------------------------

    def _vb_terms_bpd_from_output(self, model_output, x_start, x_t, t, clip_denoised=True):
        """One VLB term in bits per dim: the decoder NLL at t == 0, else
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))."""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / LOG2
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        assert decoder_nll.shape == x_start.shape
        decoder_nll = mean_flat(decoder_nll) / LOG2
        output = jnp.where(jnp.asarray(t) == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def _vb_terms_bpd(self, model_fn, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        model_output = self._call_model(model_fn, x_t, t, model_kwargs)
        return self._vb_terms_bpd_from_output(model_output, x_start, x_t, t, clip_denoised)

    def training_losses(self, model_fn, x_start, t, model_kwargs=None, noise=None, rng=None):
        """Per-sample training losses at step indices ``t``.

        :param noise: the noise of q_sample (else drawn from ``rng``).
        :return: dict of ``[B]`` arrays: ``loss``; for MSE losses also ``mse`` and, with a
            learned variance, ``vb``. The VB term sees the eps prediction through
            ``stop_gradient`` so that it only trains the variance. If the model returns a
            tuple ``(out, extra)``, ``extra`` is returned under ``"extra"``.
        """
        t = jnp.asarray(t)
        noise = self._resolve_noise(noise, rng, x_start, "training_losses")
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}
        if self.loss_type.is_vb():
            model_output, extra = _split_model_output(
                self._call_model(model_fn, x_t, t, model_kwargs)
            )
            terms["loss"] = self._vb_terms_bpd_from_output(
                model_output, x_start, x_t, t, clip_denoised=False
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
        elif self.loss_type in (LossType.MSE, LossType.RESCALED_MSE):
            model_output, extra = _split_model_output(
                self._call_model(model_fn, x_t, t, model_kwargs)
            )
            if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
                C = x_t.shape[-1]
                expected = x_t.shape[:-1] + (2 * C,)
                assert model_output.shape == expected, (model_output.shape, expected)
                model_output, model_var_values = model_output[..., :C], model_output[..., C:]
                # Learn the variance with the VB term without letting it move the mean.
                frozen_out = jnp.concatenate(
                    [lax.stop_gradient(model_output), model_var_values], axis=-1
                )
                terms["vb"] = self._vb_terms_bpd_from_output(
                    frozen_out, x_start, x_t, t, clip_denoised=False
                )["output"]
                if self.loss_type == LossType.RESCALED_MSE:
                    # Divide by 1000 for equivalence with the initial implementation.
                    terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
            if self.model_mean_type == ModelMeanType.PREVIOUS_X:
                target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
            elif self.model_mean_type == ModelMeanType.START_X:
                target = x_start
            else:
                target = noise
            assert model_output.shape == target.shape == x_start.shape
            terms["mse"] = mean_flat((target - model_output) ** 2)
            terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        else:
            raise NotImplementedError(self.loss_type)
        if extra is not None:
            terms["extra"] = extra
        return terms

    def prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dim, per sample."""
        t = jnp.full((x_start.shape[0],), self.num_timesteps - 1, dtype=jnp.int32)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(qt_mean, qt_log_variance, 0.0, 0.0)
        return mean_flat(kl_prior) / LOG2
