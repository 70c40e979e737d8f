"""The engine's flow-matching sampler: ODE / SDE sampling of a dynamic SiT on the gathered model.

    eng = FlowEngine(model, variables, create_transport("Linear", "velocity"), sampler="ode",
                     method="heun2", num_steps=50, grid=(0.25, 0.5, 0.75, 1.0))
    eng.warmup(batch_size=8)                          # one executable for the whole run
    x1 = eng.sample(jax.random.PRNGKey(0), labels, cfg_scale=4.0)
    eng.macs_ratio()                                  # whole-model MACs of the run / static

Samples equal `sampling.make_flow_sample_fn(model, transport, ...)`'s masked-path samples (same
arguments, same rng): both integrate with the same solver (`sampling.make_flow_solver`, the
transport's own ODE / SDE code); only the model function differs.

Plans for continuous time. TDW masks depend on t only, and a fixed-grid solver calls the model at
times fixed before it starts: the grid points and, for multi-stage methods, the stage times
(heun2: t and t + dt; rk4: t, t + dt/3, t + 2dt/3, t + dt; the SDE Heun step: t and t + dt; the
SDE's last step: the final grid point). :func:`solver_times` finds them by running the solver
once, jitted, on a probe model that records its t through a host callback, so the plan holds
the float32 times the sampler itself computes, one row per distinct time (ascending), and how
often each is evaluated (for the cost). Inside the executable the model function looks its
width row up by t (the nearest plan time; the solver's times are plan times, and an ulp of
difference from another fusion of the same arithmetic still finds the right row).

Adaptive ODE methods (dopri5, the release's default, ...) choose their times from the error
estimate while they run, so no plan can exist before the solve. For them the widths are decided
on device at every model call (`gathered.routed_widths`: the width routers on t_embedder(t),
the masked path's gate, then the same bucket indices a plan row holds): the same executable
shape (a `lax.switch` per block over the bucket grid), one compile, exact; the plan then only
describes the saved-points grid (`macs_ratio` is an estimate there). Executor: "fused" only
(the solver's loop is the step loop).

Classifier-free guidance is the release's (z duplicated, labels [y; null], the conditional half
returned); the engine carries only the B conditional rows, the masked sampler 2B (except for
adaptive solvers, whose step sizes depend on the whole state: there the engine carries 2B rows
too, and computes the model once per pair). The SDE draws its step noise for the state's rows:
under partitionable threefry a [B, ...] draw equals the first B rows of the masked sampler's
[2B, ...] draw.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dydit_jax import flops
from dydit_jax.engine import gathered
from dydit_jax.engine.plan import Grid, WidthPlan
from dydit_jax.engine.sampler import DEFAULT_CAPACITIES, Engine
from dydit_jax.sampling import (canonical_flow_method, make_flow_solver,
                                model_latent_shape)


def solver_times(solve, latent_shape: Sequence[int], stochastic: bool
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """The times at which `solve(init, model_fn, ...)` calls the model: (times [S] float32,
    ascending and distinct; counts [S] int64, calls per time for one sampling run).

    Runs the solver once (jitted, batch 1) on a model that returns zeros and records t with
    `jax.debug.callback`: the solver's own arithmetic, not a re-derivation of its formulas.
    """
    calls = []

    def record(t):
        t = np.asarray(t).reshape(-1)
        if not (t == t[0]).all():
            raise ValueError("a fixed-grid solver calls the model with one t for all rows")
        calls.append(np.float32(t[0]))

    def probe(x, t):
        jax.debug.callback(record, t)
        return jnp.zeros_like(x)

    kw = {"rng": jax.random.PRNGKey(0)} if stochastic else {}
    z = jnp.zeros((1,) + tuple(latent_shape), jnp.float32)
    jax.block_until_ready(jax.jit(lambda z: solve(z, probe, **kw))(z))
    jax.effects_barrier()
    if not calls:
        raise ValueError("the solver never called the model")
    times, counts = np.unique(np.asarray(calls, np.float32), return_counts=True)
    return times.astype(np.float32), counts.astype(np.int64)


class FlowEngine(Engine):
    """Dynamic-width ODE / SDE sampler of one (dynamic SiT, parameters, transport, solver).

    :param model: a dynamic SiT (`SiT(..., dynamic=True)`), t float in [0, 1].
    :param variables: its variables `{"params": ...}` (or the bare params).
    :param transport: `create_transport(...)` (the model's path and prediction).
    :param sampler: "ode" or "sde". :param method: ode: "euler", "heun2", "midpoint",
        "heun3", "rk4" (planned) or "dopri5", ... (adaptive: widths decided on device, see the
        module docstring); sde: "Euler" or "Heun".
    :param num_steps, atol, rtol, diffusion_form, diffusion_norm, last_step, last_step_size: as
        in `sampling.make_flow_sample_fn`.
    :param grid, token_capacities, use_cfg, guide_channels, latent_shape, mesh, batch_axes,
        plan_dir, compilation_cache_dir, peft: as in :class:`Engine` (adapters merged once per
        model call, at its t).
    :param plan: a `WidthPlan` of the solver's times (checked); default: built (and cached in
        `plan_dir`) from :func:`solver_times`.
    """

    def __init__(self, model, variables, transport, *, sampler: str = "ode",
                 method: str = "euler", num_steps: int = 50, atol: float = 1e-6,
                 rtol: float = 1e-3, diffusion_form: str = "sigma",
                 diffusion_norm: float = 1.0, last_step: Optional[str] = "Mean",
                 last_step_size: float = 0.04, use_cfg: bool = True,
                 guide_channels: Optional[int] = 3, grid: Grid = "exact",
                 token_capacities: Sequence[float] = DEFAULT_CAPACITIES, mesh=None,
                 batch_axes=None, latent_shape: Optional[Sequence[int]] = None,
                 plan: Optional[WidthPlan] = None, plan_dir=None, compilation_cache_dir=None,
                 peft=None):
        from dydit_jax.transport import ADAPTIVE_METHODS

        method = canonical_flow_method(sampler, method)
        self.transport, self.sampler, self.method = transport, sampler, method
        self.adaptive = method in ADAPTIVE_METHODS
        self.solve = make_flow_solver(
            transport, sampler=sampler, method=method, num_steps=num_steps, atol=atol,
            rtol=rtol, diffusion_form=diffusion_form, diffusion_norm=diffusion_norm,
            last_step=last_step, last_step_size=last_step_size)
        latent_shape = model_latent_shape(model, latent_shape)
        if self.adaptive:  # times unknown ahead: the plan describes the saved points only
            times = np.asarray(self.solve.time_grid(np.float32))
            self.eval_counts = np.ones(len(times), np.int64)
        else:
            times, self.eval_counts = solver_times(self.solve, latent_shape,
                                                   stochastic=sampler == "sde")
        self._setup(model, variables, times, plan=plan, plan_dir=plan_dir, grid=grid,
                    token_capacities=token_capacities, executor="fused", mesh=mesh,
                    batch_axes=batch_axes, latent_shape=latent_shape, use_cfg=use_cfg,
                    guide_channels=guide_channels,
                    compilation_cache_dir=compilation_cache_dir, peft=peft)

    # -- the fused executable's functions (see Engine._fused_executable) --------------------

    def _widths_at(self, plan, t):
        """The plan row of time t (a traced float32 scalar): the nearest plan time."""
        times = jnp.asarray(self.plan.timesteps, jnp.float32)
        i = jnp.argmin(jnp.abs(times - t.astype(jnp.float32)))
        return jax.tree_util.tree_map(lambda a: a[i], plan)

    def _fused_sample(self, rest, blocks, plan, rng, labels, cfg_scale):
        b = labels.shape[0]
        k_z, k_sde = jax.random.split(rng)
        z = jax.random.normal(k_z, (b,) + self.latent_shape, jnp.float32)

        def widths_at(t):  # t: a traced scalar
            if self.adaptive:
                return gathered.routed_widths(self.model, rest, blocks, t, self.buckets.sizes)
            return self._widths_at(plan, t)

        if self.adaptive and self.use_cfg:
            # An adaptive solver's step sizes come from an error norm over the whole state,
            # which in the release's CFG is the doubled batch [x; x'] (x' follows the
            # unconditional rows' unguided channels). Carry it too, so the steps are the same.
            z = jnp.concatenate([z, z], axis=0)

            def model_fn(x2, t2):
                (cond, uncond), _ = self._model_out(rest, blocks, widths_at(t2[0]), x2[:b],
                                                    t2[:b], labels, cfg_scale, both_halves=True)
                return jnp.concatenate([cond, uncond], axis=0)
        else:
            def model_fn(x, t):
                out, _ = self._model_out(rest, blocks, widths_at(t[0]), x, t, labels, cfg_scale)
                return out

        kw = {"rng": k_sde} if self.sampler == "sde" else {}
        # xs: [num_steps, rows, ...]; the last is the sample
        xs, stats = self.solve.with_stats(z, model_fn, **kw)
        return xs[-1][:b].astype(jnp.float32), stats

    def _routed_output(self, rest, blocks, x, t, labels, cfg_scale):
        """The gathered model output at any time t (a traced float32 scalar), widths decided
        on device: the adaptive solver's model function."""
        widths = gathered.routed_widths(self.model, rest, blocks, t, self.buckets.sizes)
        tb = jnp.full((x.shape[0],), t, jnp.float32)
        return self._model_out(rest, blocks, widths, x, tb, labels, cfg_scale)[0]

    def _fused_forward(self, rest, blocks, plan, x, i, labels, cfg_scale):
        times = jnp.asarray(self.plan.timesteps, jnp.float32)
        t = jnp.full((x.shape[0],), times[i], jnp.float32)
        widths = jax.tree_util.tree_map(lambda a: a[i], plan)
        return self._model_out(rest, blocks, widths, x, t, labels, cfg_scale)

    # -- public API ------------------------------------------------------------------------

    def sample(self, rng, labels, cfg_scale: float = 1.0, return_stats: bool = False):
        """Samples x1 [B, H, W, C] (float32, t = 1 is data) for int labels [B], as
        `make_flow_sample_fn`'s sampler with the same arguments. `cfg_scale` never recompiles.

        With `return_stats`, returns (x1, stats): the solver's `num_accepted_steps` and
        `num_rejected_steps` (ints; a fixed grid: num_steps - 1 and 0). Per-step token
        statistics are not collected for flow solvers (use `forward(x, step, labels)`)."""
        x1, stats = self._run_fused_sample(rng, self._labels(labels), cfg_scale)
        if not return_stats:
            return x1
        return x1, {k: int(v) for k, v in jax.device_get(stats).items()}

    def model_output(self, x, t: float, labels, cfg_scale: Optional[float] = None):
        """The gathered model output at ANY time t in [0, 1] with the widths decided on device
        (what an adaptive solver calls; at a plan time it equals `forward` there): [B, H, W, C]
        for x [B, H, W, C], or with CFG (`use_cfg`) the guided conditional half of
        `SiT.forward_with_cfg` on [x; x], [labels; null]. One executable per batch size."""
        labels = self._labels(labels)
        cfg = self._put(np.float32(1.0 if cfg_scale is None else cfg_scale))
        x = self._put(np.asarray(jax.device_get(x), np.float32), batch=True)
        r, bt = self._repl, self._batch
        b = x.shape[0]
        args = (self._rest, self._blocks, self._aval(x.shape, jnp.float32, batch=True),
                self._aval((), jnp.float32), self._aval((b,), jnp.int32, batch=True),
                self._aval((), jnp.float32))
        exe = self.cache.get(("model_output", b), lambda: self._jit(
            self._routed_output, (r, r, bt, r, bt, r), bt).lower(*args))
        return exe(self._rest, self._blocks, x, self._put(np.float32(t)), labels, cfg)

    def macs_ratio(self, grid: Optional[Grid] = "engine", token_counts=None,
                   include_routers: bool = False) -> float:
        """Whole-model MACs of one sampling run / the static model's (our counter): plan rows
        weighted by how often the solver evaluates them. grid "engine": the engine's buckets
        (what it computes); None: the exact widths. The planned engine runs no width router.
        Adaptive solvers: an estimate, the mean over the saved-points grid (their own times
        are only known during the solve)."""
        grid = self.grid if grid == "engine" else grid
        per_time = self.plan.step_macs(self.model, grid, token_counts, include_routers)
        weights = self.eval_counts / self.eval_counts.sum()
        return float((per_time * weights).sum() / flops.static_macs(self.model)["total"])


__all__ = ["FlowEngine", "solver_times"]
