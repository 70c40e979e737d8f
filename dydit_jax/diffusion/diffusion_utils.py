"""Elementwise helpers of the ADM / DiT Gaussian diffusion, in JAX.

Semantics follow facebookresearch/DiT (commit ed81ce2) ``diffusion/diffusion_utils.py``.
Arrays may have any layout; only ``mean_flat`` assumes that axis 0 is the batch axis.
"""
import math

import jax.numpy as jnp

LOG2 = math.log(2.0)


def mean_flat(x):
    """Mean over all non-batch axes (axis 0 is the batch)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise; broadcasts.

    Python scalars are allowed for any argument (they stay weakly typed, so the result
    keeps the dtype of the array arguments).
    """
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF used by ADM."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def continuous_gaussian_log_likelihood(x, *, means, log_scales):
    """Log density (nats) of x under N(means, exp(log_scales)^2), elementwise."""
    z = (x - means) * jnp.exp(-log_scales)
    # log N(z; 0, 1): the reference evaluates the standard normal at the normalized x.
    return -0.5 * z * z - 0.5 * math.log(2.0 * math.pi)


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-likelihood (nats) of a Gaussian discretized to 8-bit bins of data in [-1, 1].

    :param x: targets, assumed to be uint8 values rescaled to [-1, 1].
    :param means: Gaussian means, same shape as x.
    :param log_scales: log standard deviations, same shape as x.
    """
    assert x.shape == means.shape == log_scales.shape, (x.shape, means.shape, log_scales.shape)
    centered_x = x - means
    inv_stdv = jnp.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    cdf_plus = approx_standard_normal_cdf(plus_in)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    cdf_min = approx_standard_normal_cdf(min_in)
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    cdf_delta = cdf_plus - cdf_min
    log_probs = jnp.where(
        x < -0.999,
        log_cdf_plus,
        jnp.where(x > 0.999, log_one_minus_cdf_min, jnp.log(jnp.maximum(cdf_delta, 1e-12))),
    )
    assert log_probs.shape == x.shape
    return log_probs
