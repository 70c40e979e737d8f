"""Interpolation paths ("coupling plans") of SiT's flow matching, in JAX.

Semantics follow willisma/SiT (commit 947f95b) ``transport/path.py``:
x_t = alpha_t * x1 + sigma_t * x0 with x1 the data, x0 the Gaussian noise and t = 1 the data end.

* :class:`ICPlan` (``"Linear"``): alpha = t, sigma = 1 - t.
* :class:`GVPCPlan` (``"GVP"``): alpha = sin(pi t / 2), sigma = cos(pi t / 2).
* :class:`VPCPlan` (``"VP"``): the VP-SDE path with beta from ``sigma_min`` to ``sigma_max``
  (t = 1 is the data end, so beta(t) = sigma_min + (1 - t) (sigma_max - sigma_min)).

``t`` is ``[B]``; the functions that mix ``t`` with an ``x`` of shape ``[B, ...]`` reshape it to
``[B, 1, ..., 1]`` first (:func:`expand_t_like_x`; already expanded ``t`` passes through). The
endpoints give what the reference gives: ``inf`` for 1/t at t = 0 and for VP's d_sigma at t = 1.
Layout does not matter here (NHWC or NCHW): only axis 0 is special.
"""
import math

import jax.numpy as jnp

# Diffusion-coefficient forms of :meth:`ICPlan.compute_diffusion`. The reference spells the
# last one "inccreasing-decreasing" (its CLI's "increasing-decreasing" therefore fails there);
# both spellings are accepted here.
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing",
                   "increasing-decreasing", "inccreasing-decreasing")


def expand_t_like_x(t, x):
    """``t`` [B] (or already [B, 1, ..., 1]) -> [B, 1, ..., 1] broadcastable against ``x``."""
    t = jnp.asarray(t)
    return t.reshape((t.shape[0],) + (1,) * (jnp.ndim(x) - 1))


class ICPlan:
    """Linear coupling plan: alpha_t = t, sigma_t = 1 - t."""

    def __init__(self, sigma=0.0):
        self.sigma = sigma

    # -- coefficients (t may have any shape) -----------------------------------------------

    def compute_alpha_t(self, t):
        """(alpha_t, d alpha_t / dt): the data coefficient and its derivative."""
        return t, 1

    def compute_sigma_t(self, t):
        """(sigma_t, d sigma_t / dt): the noise coefficient and its derivative."""
        return 1 - t, -1

    def compute_d_alpha_alpha_ratio_t(self, t):
        """d_alpha_t / alpha_t (inf at t = 0)."""
        return 1 / t

    # -- SDE pieces ---------------------------------------------------------------------------

    def compute_drift(self, x, t):
        """The score-parametrised drift pieces ``(drift_mean, drift_var)``.

        The probability-flow velocity is ``-drift_mean + drift_var * score``:
        drift_mean = -(d_alpha/alpha) x and drift_var = (d_alpha/alpha) sigma^2 - sigma d_sigma,
        shaped like ``x`` and ``[B, 1, ..., 1]``.
        """
        t = expand_t_like_x(t, x)
        alpha_ratio = self.compute_d_alpha_alpha_ratio_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        drift = alpha_ratio * x
        diffusion = alpha_ratio * (sigma_t ** 2) - sigma_t * d_sigma_t
        return -drift, diffusion

    def compute_diffusion(self, x, t, form="constant", norm=1.0):
        """The SDE diffusion coefficient w(t), ``[B, 1, ..., 1]``.

        ``form``: "constant" (norm), "SBDM" (norm * drift_var), "sigma" (norm * sigma_t),
        "linear" (norm * (1 - t)), "decreasing" (0.25 (norm cos(pi t) + 1)^2) or
        "increasing-decreasing" (norm sin(pi t)^2; the reference's key is
        "inccreasing-decreasing", accepted too). "constant" is broadcast to ``[B, 1, ..., 1]``
        (the reference returns the bare Python float).
        """
        t = expand_t_like_x(t, x)
        if form == "constant":
            return jnp.broadcast_to(jnp.asarray(norm, _float_dtype(t, x)), t.shape)
        if form == "SBDM":
            return norm * self.compute_drift(x, t)[1]
        if form == "sigma":
            return norm * self.compute_sigma_t(t)[0]
        if form == "linear":
            return norm * (1 - t)
        if form == "decreasing":
            return 0.25 * (norm * jnp.cos(math.pi * t) + 1) ** 2
        if form in ("increasing-decreasing", "inccreasing-decreasing"):
            return norm * jnp.sin(math.pi * t) ** 2
        raise NotImplementedError(f"Diffusion form {form} not implemented; choose one of "
                                  f"{DIFFUSION_FORMS}")

    # -- conversions between parametrisations --------------------------------------------------

    def get_score_from_velocity(self, velocity, x, t):
        """Score of p_t at x from a velocity prediction."""
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        reverse_alpha_ratio = alpha_t / d_alpha_t
        var = sigma_t ** 2 - reverse_alpha_ratio * d_sigma_t * sigma_t
        return (reverse_alpha_ratio * velocity - x) / var

    def get_noise_from_velocity(self, velocity, x, t):
        """The noise x0 (denoiser's eps) from a velocity prediction."""
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        reverse_alpha_ratio = alpha_t / d_alpha_t
        var = reverse_alpha_ratio * d_sigma_t - sigma_t
        return (reverse_alpha_ratio * velocity - x) / var

    def get_velocity_from_score(self, score, x, t):
        """Probability-flow velocity from a score prediction."""
        t = expand_t_like_x(t, x)
        drift, var = self.compute_drift(x, t)
        return var * score - drift

    # -- sampling the path --------------------------------------------------------------------

    def compute_mu_t(self, t, x0, x1):
        """Mean of p_t given the pair: alpha_t x1 + sigma_t x0."""
        t = expand_t_like_x(t, x1)
        alpha_t, _ = self.compute_alpha_t(t)
        sigma_t, _ = self.compute_sigma_t(t)
        return alpha_t * x1 + sigma_t * x0

    def compute_xt(self, t, x0, x1):
        """A point of the path (deterministic given x0 and x1)."""
        return self.compute_mu_t(t, x0, x1)

    def compute_ut(self, t, x0, x1, xt):
        """The conditional velocity d_alpha_t x1 + d_sigma_t x0."""
        t = expand_t_like_x(t, x1)
        _, d_alpha_t = self.compute_alpha_t(t)
        _, d_sigma_t = self.compute_sigma_t(t)
        return d_alpha_t * x1 + d_sigma_t * x0

    def plan(self, t, x0, x1):
        """(t, x_t, u_t)."""
        xt = self.compute_xt(t, x0, x1)
        ut = self.compute_ut(t, x0, x1, xt)
        return t, xt, ut


class VPCPlan(ICPlan):
    """VP path: alpha_t = exp(m(t)), sigma_t = sqrt(1 - exp(2 m(t))) with
    m(t) = -(1-t)^2 (sigma_max - sigma_min) / 4 - (1-t) sigma_min / 2."""

    def __init__(self, sigma_min=0.1, sigma_max=20.0):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def log_mean_coeff(self, t):
        return (-0.25 * ((1 - t) ** 2) * (self.sigma_max - self.sigma_min)
                - 0.5 * (1 - t) * self.sigma_min)

    def d_log_mean_coeff(self, t):
        return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

    def compute_alpha_t(self, t):
        alpha_t = jnp.exp(self.log_mean_coeff(t))
        d_alpha_t = alpha_t * self.d_log_mean_coeff(t)
        return alpha_t, d_alpha_t

    def compute_sigma_t(self, t):
        p_sigma_t = 2 * self.log_mean_coeff(t)
        sigma_t = jnp.sqrt(1 - jnp.exp(p_sigma_t))
        d_sigma_t = jnp.exp(p_sigma_t) * (2 * self.d_log_mean_coeff(t)) / (-2 * sigma_t)
        return sigma_t, d_sigma_t

    def compute_d_alpha_alpha_ratio_t(self, t):
        """d_alpha / alpha in closed form (finite everywhere)."""
        return self.d_log_mean_coeff(t)

    def compute_drift(self, x, t):
        """(-beta_t x / 2, beta_t / 2) with beta_t = sigma_min + (1 - t)(sigma_max - sigma_min)."""
        t = expand_t_like_x(t, x)
        beta_t = self.sigma_min + (1 - t) * (self.sigma_max - self.sigma_min)
        return -0.5 * beta_t * x, beta_t / 2


class GVPCPlan(ICPlan):
    """Generalised VP (trigonometric) path: alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2)."""

    def __init__(self, sigma=0.0):
        super().__init__(sigma)

    def compute_alpha_t(self, t):
        alpha_t = jnp.sin(t * math.pi / 2)
        d_alpha_t = math.pi / 2 * jnp.cos(t * math.pi / 2)
        return alpha_t, d_alpha_t

    def compute_sigma_t(self, t):
        sigma_t = jnp.cos(t * math.pi / 2)
        d_sigma_t = -math.pi / 2 * jnp.sin(t * math.pi / 2)
        return sigma_t, d_sigma_t

    def compute_d_alpha_alpha_ratio_t(self, t):
        return math.pi / (2 * jnp.tan(t * math.pi / 2))


def _float_dtype(*arrays):
    """float32 for float32 / half inputs, float64 for float64 inputs."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)
