"""SiT's flow-matching transport: training losses and samplers (willisma/SiT, commit 947f95b,
``transport/transport.py``), in JAX.

Conventions
-----------
* x1 is data, x0 is Gaussian noise, t is continuous and t = 1 is the data end; the model is
  called as ``model(x_t, t, **model_kwargs)`` with ``t`` float ``[B]`` in [0, 1] (no x1000) and
  returns an array shaped like ``x_t`` (for a ``learn_sigma`` SiT, its first C channels: see
  :class:`dydit_jax.models.sit.SiT`). A model may also return ``(out, extra)`` (a dynamic
  model's aux): training returns ``extra`` under ``terms["extra"]``, sampling ignores it.
* Arrays may be NHWC or NCHW: only axis 0 (the batch) is special.
* Randomness is explicit. :meth:`Transport.training_losses` takes ``rng`` or the injected
  ``x0`` / ``t``; the SDE sampler takes ``rng`` or the injected draws ``noise``.
* Every function is traceable; the fixed-step samplers are one ``lax.scan`` each.
"""
import enum
import logging
import math

import jax
import jax.numpy as jnp

from . import path
from .integrators import ode, sde
from .utils import compute_dtype, mean_flat, split_model_output


class ModelType(enum.Enum):
    """What the model predicts."""

    NOISE = enum.auto()  # epsilon (= x0)
    SCORE = enum.auto()  # grad log p_t(x)
    VELOCITY = enum.auto()  # the probability-flow velocity


class PathType(enum.Enum):
    """Which interpolation path."""

    LINEAR = enum.auto()
    GVP = enum.auto()
    VP = enum.auto()


class WeightType(enum.Enum):
    """Loss weighting of the noise / score objectives (velocity is never weighted)."""

    NONE = enum.auto()
    VELOCITY = enum.auto()
    LIKELIHOOD = enum.auto()


PATH_PLANS = {PathType.LINEAR: path.ICPlan, PathType.GVP: path.GVPCPlan,
              PathType.VP: path.VPCPlan}
# The SDE's final deterministic step (`Sampler.get_last_step`; None: no last step).
LAST_STEPS = ("Mean", "Tweedie", "Euler")


def _call(model, x, t, model_kwargs):
    """Model output without a dynamic model's aux."""
    return split_model_output(model(x, t, **model_kwargs))[0]


class Transport:
    """A path plus a prediction type: training losses, drift and score for the samplers.

    Build it with :func:`dydit_jax.transport.create_transport`.
    """

    def __init__(self, *, model_type, path_type, loss_type, train_eps, sample_eps):
        self.loss_type = loss_type
        self.model_type = model_type
        self.path_type = path_type
        self.path_sampler = PATH_PLANS[path_type]()
        self.train_eps = train_eps
        self.sample_eps = sample_eps

    def prior_logp(self, z):
        """log N(z; 0, I) per sample (axis 0 is the batch)."""
        n = math.prod(z.shape[1:])
        return -n / 2.0 * math.log(2 * math.pi) - jnp.sum(
            z.reshape(z.shape[0], -1) ** 2, axis=-1) / 2.0

    def check_interval(self, train_eps, sample_eps, *, diffusion_form="SBDM", sde=False,
                       reverse=False, eval=False, last_step_size=0.0):
        """The time interval ``(t0, t1)`` of training (``eval=False``) or sampling.

        * VP: t1 = 1 - eps (ODE, or SDE without a last step), else 1 - last_step_size; t0 = 0.
        * Linear / GVP with a noise or score model, or any SDE: t0 = eps when the model is not
          a velocity model or the SDE uses the "SBDM" diffusion (which divides by t), else 0;
          t1 as for VP.
        * Linear / GVP velocity ODE (and training): [0, 1].
        ``reverse`` maps both ends through ``1 - t``.
        """
        t0, t1 = 0, 1
        eps = train_eps if not eval else sample_eps
        if self.path_type == PathType.VP:
            t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        elif self.model_type != ModelType.VELOCITY or sde:
            # Avoid the 1/t singularity by starting at eps.
            at_eps = (diffusion_form == "SBDM" and sde) or self.model_type != ModelType.VELOCITY
            t0 = eps if at_eps else 0
            t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        if reverse:
            t0, t1 = 1 - t0, 1 - t1
        return t0, t1

    # -- training -----------------------------------------------------------------------------

    def sample(self, x1, rng):
        """``(t, x0, x1)``: x0 ~ N(0, I) like x1, t ~ U[t0, t1) per sample (``check_interval``)."""
        k0, kt = jax.random.split(rng)
        dtype = compute_dtype(x1)
        x0 = jax.random.normal(k0, x1.shape, dtype)
        t = self.sample_t(kt, x1.shape[0], dtype)
        return t, x0, x1

    def sample_t(self, rng, batch, dtype=jnp.float32):
        """t ~ U[t0, t1) of the training interval, ``[batch]``."""
        t0, t1 = self.check_interval(self.train_eps, self.sample_eps)
        return jax.random.uniform(rng, (batch,), dtype) * (t1 - t0) + t0

    def training_losses(self, model, x1, model_kwargs=None, *, rng=None, x0=None, t=None):
        """Per-sample losses of ``model`` on data ``x1``.

        :param rng: draws ``x0`` and ``t`` (split in two: noise, then time) when not given.
        :param x0, t: inject the noise ``[B, ...]`` and the times ``[B]`` (e.g. recorded draws).
        :return: dict with ``loss`` ``[B]`` (mean over the non-batch axes), ``pred``, and the
            path quantities ``t``, ``x0``, ``xt``, ``ut`` (unused ones cost nothing under jit);
            ``extra`` when the model returns ``(out, extra)``.

        Velocity models regress u_t. Noise models regress x0 and score models regress
        -x0 / sigma_t (as ``(pred * sigma_t + x0)^2``), weighted by 1, (drift_var / sigma_t)^2
        ("velocity") or drift_var / sigma_t^2 ("likelihood").
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if x0 is None or t is None:
            if rng is None:
                raise ValueError("training_losses needs `rng` unless both `x0` and `t` are given")
            t_new, x0_new, _ = self.sample(x1, rng)
            x0 = x0_new if x0 is None else x0
            t = t_new if t is None else t
        x0, t = jnp.asarray(x0), jnp.asarray(t)
        t, xt, ut = self.path_sampler.plan(t, x0, x1)
        model_output, extra = split_model_output(model(xt, t, **model_kwargs))
        if model_output.shape != xt.shape:
            raise ValueError(f"the model output {model_output.shape} must match x_t {xt.shape}; "
                             "a learn_sigma model must return only its first C channels "
                             "(SiT's __call__ does)")
        terms = {"pred": model_output, "t": t, "x0": x0, "xt": xt, "ut": ut}
        if self.model_type == ModelType.VELOCITY:
            terms["loss"] = mean_flat((model_output - ut) ** 2)
        else:
            _, drift_var = self.path_sampler.compute_drift(xt, t)
            sigma_t, _ = self.path_sampler.compute_sigma_t(path.expand_t_like_x(t, xt))
            if self.loss_type == WeightType.VELOCITY:
                weight = (drift_var / sigma_t) ** 2
            elif self.loss_type == WeightType.LIKELIHOOD:
                weight = drift_var / (sigma_t ** 2)
            elif self.loss_type == WeightType.NONE:
                weight = 1
            else:
                raise NotImplementedError(self.loss_type)
            if self.model_type == ModelType.NOISE:
                terms["loss"] = mean_flat(weight * ((model_output - x0) ** 2))
            else:
                terms["loss"] = mean_flat(weight * ((model_output * sigma_t + x0) ** 2))
        if extra is not None:
            terms["extra"] = extra
        return terms

    # -- drift and score of the samplers --------------------------------------------------------

    def get_drift(self):
        """``drift(x, t, model, **model_kwargs)``: the probability-flow ODE velocity."""
        ps = self.path_sampler

        def score_ode(x, t, model, **model_kwargs):
            drift_mean, drift_var = ps.compute_drift(x, t)
            model_output = _call(model, x, t, model_kwargs)
            return -drift_mean + drift_var * model_output

        def noise_ode(x, t, model, **model_kwargs):
            drift_mean, drift_var = ps.compute_drift(x, t)
            sigma_t, _ = ps.compute_sigma_t(path.expand_t_like_x(t, x))
            model_output = _call(model, x, t, model_kwargs)
            score = model_output / -sigma_t
            return -drift_mean + drift_var * score

        def velocity_ode(x, t, model, **model_kwargs):
            return _call(model, x, t, model_kwargs)

        drift_fn = {ModelType.NOISE: noise_ode, ModelType.SCORE: score_ode,
                    ModelType.VELOCITY: velocity_ode}[self.model_type]

        def body_fn(x, t, model, **model_kwargs):
            out = drift_fn(x, t, model, **model_kwargs)
            if out.shape != x.shape:
                raise ValueError(f"drift shape {out.shape} must match the state {x.shape}")
            return out

        return body_fn

    def get_score(self):
        """``score(x, t, model, **model_kwargs)``: grad log p_t(x) from the model's prediction."""
        ps = self.path_sampler
        if self.model_type == ModelType.NOISE:
            def score_fn(x, t, model, **kwargs):
                return _call(model, x, t, kwargs) / -ps.compute_sigma_t(
                    path.expand_t_like_x(t, x))[0]
        elif self.model_type == ModelType.SCORE:
            def score_fn(x, t, model, **kwargs):
                return _call(model, x, t, kwargs)
        elif self.model_type == ModelType.VELOCITY:
            def score_fn(x, t, model, **kwargs):
                return ps.get_score_from_velocity(_call(model, x, t, kwargs), x, t)
        else:
            raise NotImplementedError(self.model_type)
        return score_fn


class Sampler:
    """ODE / SDE samplers of a :class:`Transport`.

    Each ``sample_*`` returns a function ``fn(init, model, **model_kwargs)`` (the SDE one also
    takes ``rng=`` or ``noise=``); for classifier-free guidance pass a CFG forward as
    ``model`` with the doubled batch, e.g. ``model = partial(sit.apply, variables,
    method=sit.forward_with_cfg)``, ``init = concat([z, z])``, ``y = concat([y, null])`` and
    ``cfg_scale=4.0`` in ``model_kwargs``, as the release's ``sample.py`` does.
    """

    def __init__(self, transport):
        self.transport = transport
        self.drift = self.transport.get_drift()
        self.score = self.transport.get_score()

    def get_sde_diffusion_and_drift(self, *, diffusion_form="SBDM", diffusion_norm=1.0):
        """``(sde_drift(x, t, model, **kw), diffusion(x, t))`` with
        sde_drift = drift + diffusion * score.

        The drift and the score are two functions of ONE model output at (x, t): the model is
        evaluated once and both read it. The reference calls the model twice with the same
        inputs (same values, twice the cost), and XLA does not merge the two calls (measured:
        an SDE sampler compiled to 2.0x the FLOPs of the ODE sampler of the same grid).
        """
        ps = self.transport.path_sampler

        def diffusion_fn(x, t):
            return ps.compute_diffusion(x, t, form=diffusion_form, norm=diffusion_norm)

        def sde_drift(x, t, model, **kwargs):
            out = model(x, t, **kwargs)

            def evaluated(x_, t_, **kw):  # the output at (x, t), computed above
                return out

            return self.drift(x, t, evaluated, **kwargs) + diffusion_fn(x, t) * self.score(
                x, t, evaluated, **kwargs)

        return sde_drift, diffusion_fn

    def get_last_step(self, sde_drift, *, last_step, last_step_size):
        """The SDE's final deterministic step ``fn(x, t, model, **kw)`` at t = t1.

        None: identity. "Mean": x + sde_drift * size. "Euler": x + drift * size.
        "Tweedie": x / alpha_t + sigma_t^2 / alpha_t * score (alpha, sigma at t[0]).
        """
        ps = self.transport.path_sampler
        if last_step is None:
            return lambda x, t, model, **kw: x
        if last_step == "Mean":
            return lambda x, t, model, **kw: x + sde_drift(x, t, model, **kw) * last_step_size
        if last_step == "Tweedie":
            def tweedie(x, t, model, **kw):
                alpha = ps.compute_alpha_t(t)[0]
                sigma = ps.compute_sigma_t(t)[0]
                a, s = jnp.reshape(alpha, (-1,))[0], jnp.reshape(sigma, (-1,))[0]
                return x / a + (s ** 2) / a * self.score(x, t, model, **kw)
            return tweedie
        if last_step == "Euler":
            return lambda x, t, model, **kw: x + self.drift(x, t, model, **kw) * last_step_size
        raise NotImplementedError(f"last step {last_step!r}; choose None or one of {LAST_STEPS}")

    def sample_sde(self, *, sampling_method="Euler", diffusion_form="SBDM", diffusion_norm=1.0,
                   last_step="Mean", last_step_size=0.04, num_steps=250):
        """SDE sampling function ``fn(init, model, *, rng=None, noise=None, **model_kwargs)``.

        Integrates over ``linspace(t0, t1, num_steps)`` (``check_interval`` with ``sde=True``:
        t1 = 1 - last_step_size) with ``num_steps - 1`` stochastic steps, then takes the last
        step to t = 1. Returns ``[num_steps, B, ...]``: the state after each stochastic step
        and, last, the final sample (the initial point is not included).

        ``noise`` (``[num_steps - 1, *init.shape]``) injects the standard-normal draws; else
        ``rng`` draws them. The defaults are the reference function's; note its default
        ``diffusion_form="SBDM"`` divides by t and gives NaN for velocity Linear/GVP models
        (their t0 is 0): its command line uses "sigma".
        """
        if last_step is None:
            last_step_size = 0.0
        sde_drift, sde_diffusion = self.get_sde_diffusion_and_drift(
            diffusion_form=diffusion_form, diffusion_norm=diffusion_norm)
        t0, t1 = self.transport.check_interval(
            self.transport.train_eps, self.transport.sample_eps, diffusion_form=diffusion_form,
            sde=True, eval=True, reverse=False, last_step_size=last_step_size)
        if diffusion_form == "SBDM" and t0 == 0 and self.transport.path_type != PathType.VP:
            logging.warning("sample_sde: diffusion_form='SBDM' with t0=0 divides by zero "
                            "(non-finite samples); use diffusion_form='sigma'")
        _sde = sde(sde_drift, sde_diffusion, t0=t0, t1=t1, num_steps=num_steps,
                   sampler_type=sampling_method)
        last_step_fn = self.get_last_step(sde_drift, last_step=last_step,
                                          last_step_size=last_step_size)

        def _sample(init, model, *, rng=None, noise=None, **model_kwargs):
            xs = _sde.sample(init, model, rng=rng, noise=noise, **model_kwargs)
            ts = jnp.full((init.shape[0],), _sde.grid(compute_dtype(init))[-1])
            x = last_step_fn(xs[-1], ts, model, **model_kwargs).astype(xs.dtype)
            return jnp.concatenate([xs, x[None]], axis=0)

        _sample.time_grid = _sde.grid
        return _sample

    def sample_ode(self, *, sampling_method="dopri5", num_steps=50, atol=1e-6, rtol=1e-3,
                   reverse=False, max_steps=4096):
        """ODE sampling function ``fn(init, model, **model_kwargs) -> [num_steps, B, ...]``.

        The grid is ``linspace(t0, t1, num_steps)`` from ``check_interval(eval=True)``: noise
        (t ~ 0) to data (t ~ 1), or data to noise with ``reverse``. Entry 0 is ``init``. Fixed
        methods ("euler", "heun2", "midpoint", "heun3", "rk4") take ``num_steps - 1`` steps;
        adaptive ones ("dopri5", ...; diffrax) save ``num_steps`` points.
        ``fn.with_stats(init, model, **model_kwargs)`` returns ``(states, stats)`` with the
        accepted and rejected step counts (``ode.sample_with_stats``).
        """
        t0, t1 = self.transport.check_interval(
            self.transport.train_eps, self.transport.sample_eps, sde=False, eval=True,
            reverse=reverse, last_step_size=0.0)
        _ode = ode(drift=self.drift, t0=t0, t1=t1, sampler_type=sampling_method,
                   num_steps=num_steps, atol=atol, rtol=rtol, max_steps=max_steps)
        sample = _with_grid(_ode.sample, _ode.grid)
        sample.with_stats = _ode.sample_with_stats  # (states, solver step counts)
        return sample

    def sample_ode_likelihood(self, *, sampling_method="dopri5", num_steps=50, atol=1e-6,
                              rtol=1e-3, max_steps=4096):
        """Log-likelihood function ``fn(x, model, *, rng=None, eps=None, **model_kwargs)``.

        Integrates data -> noise together with the divergence of the drift (Hutchinson's
        estimator with a Rademacher probe) and returns ``(logp [B], z)`` with z the noise end.
        The reference draws a fresh probe at every drift evaluation; here one probe ``eps``
        (given, or drawn from ``rng``) is used for the whole solve, so the integrand is a
        deterministic function of time (what the adaptive solver assumes).
        """
        drift = self.drift

        def likelihood_drift(state, t, model, *, eps, **kwargs):
            x, _ = state
            t = jnp.ones_like(t) * (1 - t)
            value, vjp = jax.vjp(lambda x_: drift(x_, t, model, **kwargs), x)
            grad = vjp(eps)[0]
            logp_grad = jnp.sum(grad * eps, axis=tuple(range(1, x.ndim)))
            return (-value, logp_grad)

        t0, t1 = self.transport.check_interval(
            self.transport.train_eps, self.transport.sample_eps, sde=False, eval=True,
            reverse=False, last_step_size=0.0)
        _ode = ode(drift=likelihood_drift, t0=t0, t1=t1, sampler_type=sampling_method,
                   num_steps=num_steps, atol=atol, rtol=rtol, max_steps=max_steps)

        def _sample_fn(x, model, *, rng=None, eps=None, **model_kwargs):
            if eps is None:
                if rng is None:
                    raise ValueError("pass `rng` (or the Rademacher probe `eps`)")
                eps = jax.random.rademacher(rng, x.shape, compute_dtype(x))
            init_logp = jnp.zeros((x.shape[0],), compute_dtype(x))
            z, delta_logp = _ode.sample((x, init_logp), model, eps=eps, **model_kwargs)
            z, delta_logp = z[-1], delta_logp[-1]
            logp = self.transport.prior_logp(z) - delta_logp
            return logp, z

        return _sample_fn


def _with_grid(fn, grid):
    def sample(init, model, **model_kwargs):
        return fn(init, model, **model_kwargs)

    sample.__doc__ = fn.__doc__
    sample.time_grid = grid
    return sample
