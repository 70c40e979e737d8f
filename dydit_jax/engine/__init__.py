"""DyDiT's dynamic inference engine: width plans, gathered blocks, bucketed executables.

    from dydit_jax.engine import Engine
    eng = Engine(model, variables, create_diffusion("250"), sampler="ddpm", grid="exact")
    eng.warmup(batch_size=8)                          # one executable for the whole run
    x0 = eng.sample(jax.random.PRNGKey(0), labels, cfg_scale=1.5)   # [8, H, W, C]
    eng.plan.macs_ratio(model, grid=eng.grid)         # whole-model MACs ratio, our counter

- `plan`: `WidthPlan` (active heads / MLP groups per step and block, from `DiT.width_logits`
  on the schedule's timesteps; save/load; cached per (parameters, schedule)) and `Buckets`.
- `gathered`: the forward pass that gathers active heads, groups and kept tokens.
- `sampler`: `Engine` (DDPM/DDIM, CFG, mesh, executable cache with a compile counter).
- `flow`: `FlowEngine` (a dynamic SiT's ODE / SDE samplers; plans for the fixed-grid solvers'
  continuous times, widths decided on device for adaptive ones).
"""
from dydit_jax.engine.plan import Buckets, WidthPlan, bucket_sizes, get_plan
from dydit_jax.engine.sampler import (DEFAULT_CAPACITIES, Engine, ExecutableCache,
                                      enable_persistent_cache)
from dydit_jax.engine.flow import FlowEngine, solver_times

__all__ = ["Buckets", "WidthPlan", "bucket_sizes", "get_plan", "DEFAULT_CAPACITIES", "Engine",
           "ExecutableCache", "enable_persistent_cache", "FlowEngine", "solver_times"]
