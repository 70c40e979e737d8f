"""Dynamic inference speedup: static DiT vs masked DyDiT vs the gathered engine, side by side.

`--family sit` runs the same comparison for flow matching (DyDiT++): a dynamic SiT sampled with
a fixed-grid ODE (`--method`, default Euler; `--steps` solver steps, CFG as the SiT release),
static/masked = `make_flow_sample_fn(..., complete=True/False)`, engine = `FlowEngine`; router
calibration then runs on the solver's times (`engine.solver_times`) instead of DDIM timesteps.

One process, one model per (config, dtype), random weights (latent 32x32x4, 1000 classes).
For every batch size, interleaved rounds time, in order:
  static  - `make_sample_fn(model, ..., complete=True)`: the plain DiT path (routers unused);
  masked  - `make_sample_fn(model, ..., complete=False)`: DyDiT as the release runs it (full
            width matmuls, heads / groups / tokens multiplied by 0/1 masks), per FLOPs plan;
  engine  - `Engine(model, variables, diffusion, sampler="ddim", grid=..., executor=...)`:
            gathered active heads / groups / kept tokens, per FLOPs plan.
All three sample the same DDIM schedule with classifier-free guidance (2B model rows).
Every callable is compiled before timing (`jitted.lower(...).compile()` for static and masked,
`Engine.warmup` for the engine), compile seconds are recorded, then `--rounds` rounds call each
variant once, ending in `block_until_ready`. Reported per variant: the median wall seconds and
the median process CPU seconds (`time.process_time`, all threads of this process; steadier than
wall time on a shared, loaded machine).

Router calibration (plans "50" and "70" = target whole-model MACs ratio 0.50 / 0.70):
the width routers keep their random (xavier) kernels; their logits are evaluated on the
schedule's timesteps with `DiT.width_logits`. For a fraction f, every block's head-router
biases are shifted by one common constant, -quantile(logits of that block over all steps and
all H-1 routed heads, 1 - f), so that a fraction f of the routed heads is on across the
schedule (the same for the group router; head/group 0 is always on). f is bisected until
`WidthPlan.macs_ratio(model)` (our counter: whole model, routers counted, all tokens) is within
0.005 of the target. The token router is left at its init (last bias 35: every token kept),
so the token routing costs its router but skips nothing: the speedup measured here is the width
(TDW) part only. The reported FLOPs ratio is `plan.macs_ratio(model, grid=engine grid)`, i.e.
the bucketed widths the engine actually computes.

efficiency = (static time / engine time) / (static MACs / engine MACs); 1.0 means the engine
turns every saved MAC into saved time.

Peak memory: `resource.getrusage(RUSAGE_SELF).ru_maxrss` (the process high-water mark, KiB on
Linux) before and after each variant's compile + timed calls; the delta is 0 when the variant
stayed under an earlier high-water mark, so read it as "raised the peak by", not as the
variant's footprint. (JAX's CPU device reports no `memory_stats`.)

    python benchmarks/dynamic_speedup.py                                  # full default set
    python benchmarks/dynamic_speedup.py --models DiT-S/2 --batches 8 32 --dtypes float32 \
        --plans 50 70 --steps 2 --rounds 2                                # reduced
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dydit_jax import flops  # noqa: E402
from dydit_jax.diffusion import create_diffusion  # noqa: E402
from dydit_jax.engine import Engine, FlowEngine, WidthPlan, solver_times  # noqa: E402
from dydit_jax.engine.plan import schedule_timesteps  # noqa: E402
from dydit_jax.models import DiT_models  # noqa: E402
from dydit_jax.models.dit import DiT  # noqa: E402
from dydit_jax.models.sit import SiT_models  # noqa: E402
from dydit_jax.sampling import make_flow_sample_fn, make_flow_solver, make_sample_fn  # noqa
from dydit_jax.transport import create_transport  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CFG_SCALE = 4.0


def maxrss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def router_logits(model, variables, schedule):
    """Width-router logits on a schedule: a diffusion's timesteps or a flow solver's times."""
    t = schedule_timesteps(schedule)
    t = jnp.asarray(t, jnp.float32 if t.dtype.kind == "f" else jnp.int32)
    head, group = model.apply(variables, t, method=DiT.width_logits)
    return np.asarray(head), np.asarray(group)  # [S, L, H-1]


def shifted(variables, head, group, f):
    """Copy of variables with every block's width-router biases shifted so a fraction f of
    the routed heads / groups is on over the schedule (see module docstring)."""
    params = dict(variables["params"])
    for l in range(head.shape[1]):
        name = f"blocks_{l}"
        blk = dict(params[name])
        for router, logits in (("head_router", head[:, l]), ("group_router", group[:, l])):
            q = float(np.quantile(logits.ravel(), 1.0 - f)) if f > 0 else float(logits.max()) + 1
            r = dict(blk[router])
            r["bias"] = r["bias"] - q
            blk[router] = r
        params[name] = blk
    return {"params": params}


def calibrate(model, variables, schedule, target, tol=0.005, iters=14):
    head, group = router_logits(model, variables, schedule)
    lo, hi = 0.0, 1.0
    best = None
    for _ in range(iters):
        f = 0.5 * (lo + hi)
        v = shifted(variables, head, group, f)
        ratio = WidthPlan.build(model, v, schedule).macs_ratio(model)
        if best is None or abs(ratio - target) < abs(best[1] - target):
            best = (f, ratio, v)
        if abs(ratio - target) <= tol:
            break
        lo, hi = (f, hi) if ratio < target else (lo, f)
    return best


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - w0, time.process_time() - c0


def run_config(args, name, dtype_name, results, out_path, meta):
    dtype = DTYPES[dtype_name]
    flow = args.family == "sit"
    presets = SiT_models if flow else DiT_models
    name = name.replace("DiT", "SiT") if flow else name
    model = presets[name](num_classes=1000, input_size=32, dynamic=True, dtype=dtype)
    if flow:  # the solver's times are the schedule; num_steps counts grid points
        transport = create_transport("Linear", "velocity")
        flow_kw = dict(sampler="ode", method=args.method, num_steps=args.steps + 1)
        schedule = solver_times(make_flow_solver(transport, **flow_kw), (32, 32, 4), False)[0]
    else:
        schedule = create_diffusion(f"ddim{args.steps}")
    rng = jax.random.PRNGKey(0)
    x = jnp.zeros((1, 32, 32, 4), jnp.float32)
    t = jnp.zeros((1,), jnp.float32 if flow else jnp.int32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(args.seed), x, t,
                                    jnp.zeros((1,), jnp.int32))
    variables = {"params": variables["params"]}
    static_macs = flops.static_macs(model)["total"]

    plans = {}
    for p in args.plans:
        t0 = time.perf_counter()
        f, ratio, v = calibrate(model, variables, schedule, p / 100.0)
        print(f"[{name} {dtype_name}] plan {p}: fraction on {f:.3f}, exact macs ratio "
              f"{ratio:.3f} ({time.perf_counter() - t0:.1f}s)", flush=True)
        plans[p] = dict(f=f, exact_ratio=ratio, variables=v)

    for b in args.batches:
        labels = jnp.asarray(np.random.RandomState(b).randint(0, 1000, size=b), jnp.int32)
        cfg = jnp.float32(CFG_SCALE)
        variants = {}  # key -> dict(call, compile_s, compiles, rss)

        def add(key, build):
            r0 = maxrss_kib()
            t0 = time.perf_counter()
            call, compiles, extra = build()
            variants[key] = dict(call=call, compile_s=time.perf_counter() - t0,
                                 compiles=compiles, rss0=r0, rss1=maxrss_kib(),
                                 wall=[], cpu=[], **extra)

        def build_sample_fn(v, complete):
            def build():
                if flow:
                    fn = make_flow_sample_fn(model, transport, complete=complete, **flow_kw)
                else:
                    fn = make_sample_fn(model, schedule, sampler="ddim", complete=complete)
                exe = fn.jitted.lower(v, rng, labels, cfg).compile()
                return (lambda: exe(v, rng, labels, cfg)), 1, {}
            return build

        def build_engine(v, executor):
            def build():
                if flow:
                    eng = FlowEngine(model, v, transport, grid=args.grid, **flow_kw)
                    weights = eng.eval_counts / eng.eval_counts.sum()  # calls per plan time
                    ratio = eng.macs_ratio(include_routers=True)
                else:
                    eng = Engine(model, v, schedule, sampler="ddim", grid=args.grid,
                                 executor=executor)
                    weights = np.full(eng.plan.num_steps, 1.0 / eng.plan.num_steps)
                    ratio = eng.plan.macs_ratio(model, grid=args.grid)
                n = eng.warmup(b)
                extra = dict(macs_ratio=ratio,
                             compiled_macs_ratio=float((eng.step_macs() * weights).sum()
                                                       / static_macs),
                             block_signatures=len(eng.buckets.block_signatures()))
                return (lambda: eng.sample(rng, labels, CFG_SCALE)), n, extra
            return build

        add("static", build_sample_fn(variables, True))
        for p in args.plans:
            v = plans[p]["variables"]
            add(f"masked{p}", build_sample_fn(v, False))
            for ex in (["fused"] if flow else args.executors):
                add(f"{ex}{p}", build_engine(v, ex))
        for r in range(args.rounds):
            for key, var in variants.items():
                w, c = timed(var["call"])
                var["wall"].append(w)
                var["cpu"].append(c)
                var["rss1"] = max(var["rss1"], maxrss_kib())
            print(f"[{name} {dtype_name} b{b}] round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v['wall'][-1]:.2f}s" for k, v in variants.items()), flush=True)

        st = variants["static"]
        sw, sc = statistics.median(st["wall"]), statistics.median(st["cpu"])
        for key, var in variants.items():
            if key == "static":
                kind, p = "static", None
            else:
                p = int("".join(ch for ch in key if ch.isdigit()))
                kind = key[: -len(str(p))]
            w, c = statistics.median(var["wall"]), statistics.median(var["cpu"])
            row = dict(model=name, dtype=dtype_name, batch=b, steps=args.steps, variant=kind,
                       sampler=f"ode-{args.method}" if flow else "ddim",
                       plan=p, target_macs_ratio=None if p is None else p / 100.0,
                       fraction_on=None if p is None else plans[p]["f"],
                       macs_ratio=(1.0 if p is None else var.get("macs_ratio",
                                                                   plans[p]["exact_ratio"])),
                       wall_s=w, cpu_s=c, wall_all=var["wall"], cpu_all=var["cpu"],
                       speedup_wall=sw / w, speedup_cpu=sc / c,
                       compiles=var["compiles"], compile_s=var["compile_s"],
                       maxrss_delta_mib=(var["rss1"] - var["rss0"]) / 1024.0,
                       maxrss_mib=var["rss1"] / 1024.0)
            if kind in ("fused", "blocks"):
                row.update(compiled_macs_ratio=var["compiled_macs_ratio"],
                           block_signatures=var["block_signatures"],
                           efficiency_wall=(sw / w) * var["macs_ratio"],
                           efficiency_cpu=(sc / c) * var["macs_ratio"])
            results.append(row)
        write(out_path, meta, results)
        print_table(results)


def write(path, meta, results):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(dict(meta, results=results), fh, indent=1)


def print_table(results):
    hdr = ("model", "dtype", "B", "variant", "plan", "MACs", "wall s", "cpu s", "static/x wall",
           "static/x cpu", "eff wall", "eff cpu", "exes", "compile s", "dRSS MiB")
    print(" | ".join(hdr))
    for r in results:
        def g(k, fmt="{:.2f}"):
            v = r.get(k)
            return "-" if v is None else fmt.format(v)
        print(" | ".join([r["model"], r["dtype"], str(r["batch"]), r["variant"],
                          "-" if r["plan"] is None else str(r["plan"]), g("macs_ratio", "{:.3f}"),
                          g("wall_s"), g("cpu_s"), g("speedup_wall"), g("speedup_cpu"),
                          g("efficiency_wall"), g("efficiency_cpu"), str(r["compiles"]),
                          g("compile_s", "{:.1f}"), g("maxrss_delta_mib", "{:.0f}")]), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["DiT-S/2", "DiT-B/2"])
    ap.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    ap.add_argument("--plans", nargs="+", type=int, default=[50, 70],
                    help="target whole-model MACs ratios, percent")
    ap.add_argument("--executors", nargs="+", default=["fused"], choices=["fused", "blocks"])
    ap.add_argument("--grid", default="exact", help='"exact" (default) only')
    ap.add_argument("--family", default="dit", choices=["dit", "sit"],
                    help="dit: DDIM on a DyDiT; sit: flow-matching ODE on a dynamic SiT")
    ap.add_argument("--method", default="euler",
                    help="--family sit: fixed-grid ODE method (euler, heun2, midpoint, rk4)")
    ap.add_argument("--steps", type=int, default=5, help="DDIM steps / ODE solver steps")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None,
                    help="default: results/dynamic_speedup.json (_sit.json for --family sit)")
    args = ap.parse_args()
    if args.out is None:
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                "dynamic_speedup" + ("_sit" if args.family == "sit" else "")
                                + ".json")
    meta = dict(command="python " + " ".join(sys.argv),
                date=datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z",
                environment=dict(jax=jax.__version__, backend=jax.default_backend(),
                                 devices=[str(d) for d in jax.devices()],
                                 cpu_count=os.cpu_count(), platform=platform.platform(),
                                 loadavg_start=os.getloadavg()),
                cfg_scale=CFG_SCALE, family=args.family,
                sampler=f"ode-{args.method}" if args.family == "sit" else "ddim",
                steps=args.steps, grid=args.grid,
                peak_memory="ru_maxrss delta (process high-water mark), MiB")
    results = []
    for name in args.models:
        for dt in args.dtypes:
            run_config(args, name, dt, results, args.out, meta)
    meta["environment"]["loadavg_end"] = os.getloadavg()
    write(args.out, meta, results)


if __name__ == "__main__":
    main()
