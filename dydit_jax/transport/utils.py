"""Small helpers of the transport package."""
import jax
import jax.numpy as jnp
import numpy as np

from dydit_jax.diffusion.diffusion_utils import mean_flat  # noqa: F401  (re-exported)


def time_grid(t0, t1, num_steps, dtype=np.float32):
    """``torch.linspace(t0, t1, num_steps)`` bit for bit, as a numpy array of ``dtype``.

    The reference builds every sampler's time grid with ``torch.linspace`` in float32; torch
    computes the first half as ``t0 + step * i`` and the second half as
    ``t1 - step * (n - 1 - i)`` with fused multiply-adds, which ``numpy.linspace`` does not
    reproduce to the last bit. The grid is a constant of the sampler (Python floats in, numpy
    out), so it never depends on traced values.
    """
    dtype = np.dtype(dtype)
    n = int(num_steps)
    if n < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    a, b = dtype.type(t0), dtype.type(t1)
    if n == 1:
        return np.array([a], dtype)
    step = (b - a) / dtype.type(n - 1)
    i = np.arange(n)
    # One rounding of the exact a + step * i (an FMA), done in a wider type.
    wide = np.longdouble if dtype == np.float64 else np.float64
    lo = (wide(a) + wide(step) * i).astype(dtype)
    hi = (wide(b) - wide(step) * (n - 1 - i)).astype(dtype)
    return np.where(i < n // 2, lo, hi).astype(dtype)


def compute_dtype(x):
    """float32 for float32 / half inputs, float64 for float64 inputs."""
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def split_model_output(model_output):
    """``out`` or ``(out, extra)`` -> ``(out, extra or None)`` (dynamic models return aux)."""
    if isinstance(model_output, tuple):
        out, extra = model_output
        return out, extra
    return model_output, None


def step_noise(rng, i, shape, dtype=jnp.float32):
    """The standard-normal draw the SDE samplers use at step ``i`` (``fold_in(rng, i)``)."""
    return jax.random.normal(jax.random.fold_in(rng, i), shape, dtype)
