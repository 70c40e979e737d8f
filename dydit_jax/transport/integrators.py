"""ODE and SDE integrators of SiT's transport (willisma/SiT ``transport/integrators.py``), in JAX.

Drift and diffusion functions follow the reference signatures:
``drift(x, t, model, **model_kwargs)`` and ``diffusion(x, t)`` with ``t`` of shape ``[B]``.

* :class:`ode`: the time grid is ``torch.linspace(t0, t1, num_steps)`` (bit for bit, see
  :func:`~dydit_jax.transport.utils.time_grid`) and the result holds the state at every grid
  point, the initial one first (``[num_steps, B, ...]``), as ``torchdiffeq.odeint`` returns it.

  - Fixed-grid methods (``"euler"``, ``"midpoint"``, ``"heun2"``, ``"heun3"``, ``"rk4"``) step
    from grid point to grid point with torchdiffeq's update formulas, as one ``lax.scan``, so
    a fixed solver over ``num_steps`` points takes ``num_steps - 1`` steps and compiles once.
  - Adaptive methods (``"dopri5"`` (the reference default), ``"dopri8"``, ``"bosh3"``,
    ``"tsit5"``, ``"adaptive_heun"``) go through diffrax with a PID step-size controller and
    the same ``atol`` / ``rtol`` semantics (RMS error norm); ``num_steps`` is then the number
    of saved points. Decreasing grids (``reverse=True``) integrate backwards in time.
    A solve that runs out of steps (``max_steps``) returns inf for the points it did not reach
    (``throw=False``): diffrax's runtime error check is a host callback inside the solve, which
    made XLA's partitioner gather the saved states of a batch-sharded solve onto one device.
  The state may be a pytree (the likelihood ODE integrates ``(x, logp)``).

* :class:`sde`: Euler-Maruyama (``"Euler"``) or the stochastic Heun step (``"Heun"``) over
  ``linspace(t0, t1, num_steps)``, ``num_steps - 1`` stochastic steps as one ``lax.scan``;
  ``dw = w * sqrt(dt)`` with ``w`` standard normal. ``w`` is either given (``noise``,
  ``[num_steps - 1, B, ...]``; e.g. recorded draws) or drawn from ``rng`` as
  ``normal(fold_in(rng, i))`` at step ``i``. Returns the ``num_steps - 1`` states after each
  step (not the initial one), as the reference's list does.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .utils import compute_dtype, step_noise, time_grid

_tmap = jax.tree_util.tree_map

FIXED_GRID_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4")
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "tsit5", "adaptive_heun")
SDE_METHODS = ("Euler", "Heun")


def _leaves(tree):
    return jax.tree_util.tree_leaves(tree)


def _batch_time(t, y):
    """Scalar ``t`` -> ``[B]`` in the dtype of the state (``th.ones(B) * t``)."""
    x = _leaves(y)[0]
    return jnp.full((x.shape[0],), t, dtype=compute_dtype(x))


# torchdiffeq's fixed-grid updates: each returns dy for one step t0 -> t1 = t0 + dt.
def _euler(f, t0, dt, t1, y):
    return _tmap(lambda k: dt * k, f(t0, y))


def _midpoint(f, t0, dt, t1, y):
    half_dt = 0.5 * dt
    k1 = f(t0, y)
    y_mid = _tmap(lambda a, k: a + k * half_dt, y, k1)
    return _tmap(lambda k: dt * k, f(t0 + half_dt, y_mid))


def _heun2(f, t0, dt, t1, y):
    # Butcher tableau [[0, 0, 0], [1, 1, 0], [0, 1/2, 1/2]] (torchdiffeq ``rk2_step_func``).
    k1 = f(t0, y)
    k2 = f(t0 + dt * 1.0, _tmap(lambda a, k: a + dt * k * 1.0, y, k1))
    return _tmap(lambda a, b: dt * (a * 0.5 + b * 0.5), k1, k2)


def _heun3(f, t0, dt, t1, y):
    # Butcher tableau [[0]*4, [1/3, 1/3, 0, 0], [2/3, 0, 2/3, 0], [0, 1/4, 0, 3/4]].
    k1 = f(t0, y)
    k2 = f(t0 + dt * (1 / 3), _tmap(lambda a, k: a + dt * k * (1 / 3), y, k1))
    k3 = f(t0 + dt * (2 / 3),
           _tmap(lambda a, p, q: a + dt * (p * 0.0 + q * (2 / 3)), y, k1, k2))
    return _tmap(lambda p, q, r: dt * (p * 0.25 + q * 0.0 + r * 0.75), k1, k2, k3)


def _rk4(f, t0, dt, t1, y):
    # torchdiffeq's "rk4": the 3/8-rule variant (``rk4_alt_step_func``).
    k1 = f(t0, y)
    k2 = f(t0 + dt * (1 / 3), _tmap(lambda a, p: a + dt * p * (1 / 3), y, k1))
    k3 = f(t0 + dt * (2 / 3), _tmap(lambda a, p, q: a + dt * (q - p * (1 / 3)), y, k1, k2))
    k4 = f(t1, _tmap(lambda a, p, q, r: a + dt * (p - q + r), y, k1, k2, k3))
    return _tmap(lambda p, q, r, s: (p + 3 * (q + r) + s) * dt * 0.125, k1, k2, k3, k4)


_FIXED_STEPS = {"euler": _euler, "midpoint": _midpoint, "heun2": _heun2, "heun3": _heun3,
                "rk4": _rk4}


def _diffrax_solver(name):
    import diffrax

    return {
        "dopri5": diffrax.Dopri5,
        "dopri8": diffrax.Dopri8,
        "bosh3": diffrax.Bosh3,
        "tsit5": diffrax.Tsit5,
        "adaptive_heun": diffrax.Heun,
    }[name]()


class ode:
    """ODE solver over ``linspace(t0, t1, num_steps)`` (see the module docstring)."""

    def __init__(self, drift, *, t0, t1, sampler_type, num_steps, atol=1e-6, rtol=1e-3,
                 max_steps=4096):
        if sampler_type not in FIXED_GRID_METHODS + ADAPTIVE_METHODS:
            raise NotImplementedError(
                f"ODE method {sampler_type!r}; choose one of {FIXED_GRID_METHODS} (fixed grid) "
                f"or {ADAPTIVE_METHODS} (adaptive, diffrax)")
        if int(num_steps) < 2:
            raise ValueError(f"num_steps counts grid points and must be >= 2, got {num_steps}")
        self.drift = drift
        self.t0, self.t1 = t0, t1
        self.num_steps = int(num_steps)
        self.atol, self.rtol = atol, rtol
        self.sampler_type = sampler_type
        self.max_steps = max_steps

    def grid(self, dtype=np.float32):
        return time_grid(self.t0, self.t1, self.num_steps, dtype)

    def sample(self, x, model, **model_kwargs):
        """Integrate from the state ``x`` (array or pytree) -> states at every grid point."""
        return self.sample_with_stats(x, model, **model_kwargs)[0]

    def sample_with_stats(self, x, model, **model_kwargs):
        """``(states at every grid point, stats)``; stats: int32 scalars
        ``num_accepted_steps`` and ``num_rejected_steps`` (a fixed grid: ``num_steps - 1``
        and 0; an adaptive method: its step-size controller's counts)."""
        ts = self.grid(np.dtype(compute_dtype(_leaves(x)[0])))

        def f(t, y):
            return self.drift(y, _batch_time(t, y), model, **model_kwargs)

        if self.sampler_type in _FIXED_STEPS:
            ys = integrate_fixed_grid(_FIXED_STEPS[self.sampler_type], f, x, ts)
            return ys, {"num_accepted_steps": jnp.int32(len(ts) - 1),
                        "num_rejected_steps": jnp.int32(0)}
        return self._adaptive(f, x, ts)

    def _adaptive(self, f, x, ts):
        import diffrax

        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: f(t, y)),
            _diffrax_solver(self.sampler_type),
            t0=ts[0], t1=ts[-1], dt0=None, y0=x,
            saveat=diffrax.SaveAt(ts=jnp.asarray(ts)),
            stepsize_controller=diffrax.PIDController(rtol=self.rtol, atol=self.atol),
            max_steps=self.max_steps,
            throw=False,
        )
        stats = {k: jnp.asarray(sol.stats[k], jnp.int32)
                 for k in ("num_accepted_steps", "num_rejected_steps")}
        return sol.ys, stats


def integrate_fixed_grid(step, f, y0, ts):
    """``y`` at every point of the numpy grid ``ts`` (``ts[0]`` first), one ``lax.scan``.

    ``step(f, t0, dt, t1, y) -> dy``; ``dt = t1 - t0`` is computed on the host in the grid's
    dtype (as torchdiffeq does), so time values are constants of the compiled loop.
    """
    ts = np.asarray(ts)
    t0s, t1s = ts[:-1], ts[1:]
    dts = (t1s - t0s).astype(ts.dtype)

    def body(y, tdt):
        t0, dt, t1 = tdt
        dy = step(f, t0, dt, t1, y)
        y1 = _tmap(lambda a, d: (a + d).astype(a.dtype), y, dy)
        return y1, y1

    _, ys = lax.scan(body, y0, (jnp.asarray(t0s), jnp.asarray(dts), jnp.asarray(t1s)))
    return _tmap(lambda a, b: jnp.concatenate([a[None], b], axis=0), y0, ys)


class sde:
    """SDE solver over ``linspace(t0, t1, num_steps)`` (see the module docstring)."""

    def __init__(self, drift, diffusion, *, t0, t1, num_steps, sampler_type):
        if not t0 < t1:
            raise ValueError("SDE sampler has to be in forward time")
        if sampler_type not in SDE_METHODS:
            raise NotImplementedError(f"SDE method {sampler_type!r}; choose one of {SDE_METHODS}")
        if int(num_steps) < 2:
            raise ValueError(f"num_steps counts grid points and must be >= 2, got {num_steps}")
        self.num_timesteps = int(num_steps)
        self.t0, self.t1 = t0, t1
        self.drift = drift
        self.diffusion = diffusion
        self.sampler_type = sampler_type

    def grid(self, dtype=np.float32):
        return time_grid(self.t0, self.t1, self.num_timesteps, dtype)

    def _euler_maruyama_step(self, x, t, dt, sqrt_dt, w, model, model_kwargs):
        t = _batch_time(t, x)
        dw = w * sqrt_dt
        drift = self.drift(x, t, model, **model_kwargs)
        diffusion = self.diffusion(x, t)
        mean_x = x + drift * dt
        return mean_x + jnp.sqrt(2 * diffusion) * dw

    def _heun_step(self, x, t, dt, sqrt_dt, w, model, model_kwargs):
        dw = w * sqrt_dt
        t_cur = _batch_time(t, x)
        diffusion = self.diffusion(x, t_cur)
        xhat = x + jnp.sqrt(2 * diffusion) * dw
        k1 = self.drift(xhat, t_cur, model, **model_kwargs)
        xp = xhat + dt * k1
        k2 = self.drift(xp, t_cur + dt, model, **model_kwargs)
        return xhat + 0.5 * dt * (k1 + k2)

    def sample(self, init, model, *, rng=None, noise=None, **model_kwargs):
        """The ``num_steps - 1`` states after each step, ``[num_steps - 1, B, ...]``.

        :param noise: the standard-normal draws ``w``, ``[num_steps - 1, *init.shape]``.
        :param rng: a ``jax.random`` key used when ``noise`` is None (step ``i`` draws
            ``normal(fold_in(rng, i))``).
        """
        dtype = compute_dtype(init)
        ts = self.grid(np.dtype(dtype))
        dt = (ts[1] - ts[0]).astype(ts.dtype)
        sqrt_dt = np.sqrt(dt).astype(ts.dtype)
        n = self.num_timesteps - 1
        if noise is not None:
            noise = jnp.asarray(noise)
            if tuple(noise.shape) != (n,) + tuple(init.shape):
                raise ValueError(f"noise must have shape {(n,) + tuple(init.shape)}, got "
                                 f"{tuple(noise.shape)}")
        elif rng is None:
            raise ValueError("the SDE sampler draws noise at every step: pass `rng` or `noise`")
        step = self._euler_maruyama_step if self.sampler_type == "Euler" else self._heun_step

        def body(x, inputs):
            i, t, w = inputs
            if w is None:
                w = step_noise(rng, i, x.shape, x.dtype)
            x = step(x, t, dt, sqrt_dt, w, model, model_kwargs).astype(x.dtype)
            return x, x

        _, xs = lax.scan(body, init, (jnp.arange(n), jnp.asarray(ts[:-1]), noise))
        return xs
