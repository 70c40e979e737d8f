"""Dynamic inference speedup: static DiT vs masked DyDiT vs the gathered engine, side by side.

`--family latte` runs it for video (DyDiT++): a dynamic Latte of the same size (`Latte-S/2` for
`DiT-S/2`) on clips of `--frames` latent frames of `--input-size`^2 (static = the static Latte
path), width rows only (token rows are DiT-only); results go to dynamic_speedup_latte.json.
`--family flux` runs static FLUX / masked DyFLUX / the FLUX engine on a reduced FLUX
(`flux_speedup.py` says how); results go to dynamic_speedup_flux.json.
`--family sit` runs the same comparison for flow matching (DyDiT++): a dynamic SiT sampled with
a fixed-grid ODE (`--method`, default Euler; `--steps` solver steps, CFG as the SiT release),
static/masked = `make_flow_sample_fn(..., complete=True/False)`, engine = `FlowEngine`; router
calibration then runs on the solver's times (`engine.solver_times`) instead of DDIM timesteps.

One process, one model per (config, dtype), random weights (latent `--input-size`^2 x 4,
default 32x32x4; 1000 classes).
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
0.005 of the target. In these width rows the token router is left at its init (last bias 35:
every token kept), so the token routing costs its router but skips nothing: they measure the
width (TDW) part only (token skipping: the token rows below). The reported FLOPs ratio is `plan.macs_ratio(model, grid=engine grid)`, i.e.
the bucketed widths the engine actually computes.

efficiency = (static time / engine time) / (static MACs / engine MACs); 1.0 means the engine
turns every saved MAC into saved time.

Token rows (SDT token skipping; `--token-keep`, default 0.7 0.5, x `--token-widths`, default
100 50; DiT family only): engine rows whose token routers are calibrated to keep a fraction k
of the tokens in the MLP, at width plan w (100 = the width routers at init: every head and
group on; 50 / 70 = the width plans above). Calibration: `CALIB_TRAJECTORIES` masked DDIM
sampling runs of `CALIB_BATCH` samples (CFG, the benchmark's schedule, other seeds and labels
than the timed runs) at width plan w record every block's token-router logits on x_t at every
step; per block, the router's last kernel is scaled so that its pre-bias output has std
`TOKEN_LOGIT_STD` over those tokens (so decisions are not a hair's breadth from 0), and its
bias set to -quantile(scaled output, 1 - k): a fraction k of the calibration tokens has logit
> 0 (the eval gate, kept). One bias per block serves all steps, so the kept fraction varies
from step to step (with random weights, x_t grows towards t = 0 and with it the logit spread).
k = 1.0 keeps the routers at init (every token kept): the same-width reference row, always
added (`<executor><w>-k100`) except where the width-only row `<executor><w>` is that row. Only engine rows: the masked
path's cost does not depend on its masks (it is the `masked<w>` row).
The engine's token capacities (`--token-capacities`): "engine" (default: the engine's
`DEFAULT_CAPACITIES`, eighths of the 2B*N rows, "1/8 grid" in the table), "auto"
(k + 0.1, 1.0), or fractions.
Reported per token row: the kept fraction the engine saw on the timed run
(`Engine.sample(..., return_stats=True)`, tokens that ran the MLP / (2B * N), mean over steps
and blocks; also per step, min and max over (step, block)); MACs ratio =
`plan.macs_ratio(model, grid, token_counts=kept per sample [S, L])` (the kept tokens, token
router counted); cap MACs ratio = the same with the capacity bucket each (step, block) ran
instead of the kept count (what the engine computes: the padding slots run the MLP too), and
`dense_fallback` = the share of (step, block) that ran the full-capacity (dense) branch with
tokens skipped. efficiency (vs static) as above with the kept-token MACs ratio; token
efficiency = (reference row time / this time) / (reference MACs / these MACs), the reference
being the same width with every token kept: how much of the token saving itself turns into
saved time.

Peak memory: `resource.getrusage(RUSAGE_SELF).ru_maxrss` (the process high-water mark, KiB on
Linux) before and after each variant's compile + timed calls; the delta is 0 when the variant
stayed under an earlier high-water mark, so read it as "raised the peak by", not as the
variant's footprint. (JAX's CPU device reports no `memory_stats`.)

    python benchmarks/dynamic_speedup.py                                  # full default set
    python benchmarks/dynamic_speedup.py --models DiT-S/2 --batches 8 32 --dtypes float32 \
        --plans 50 70 --steps 2 --rounds 2                                # reduced
    python benchmarks/dynamic_speedup.py --models DiT-S/2 --batches 8 --dtypes float32 \
        --plans 50 --steps 2 --rounds 1 --token-keep 0.7 0.5 --token-widths 100 50 \
        --out /tmp/smoke.json                                             # token smoke run
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
from dydit_jax.diffusion import create_diffusion, split_loop_key  # noqa: E402
from dydit_jax.engine import Engine, FlowEngine, WidthPlan, solver_times  # noqa: E402
from dydit_jax.engine import gathered  # noqa: E402
from dydit_jax.engine.sampler import DEFAULT_CAPACITIES  # noqa: E402
from dydit_jax.engine.plan import schedule_timesteps  # noqa: E402
from dydit_jax.models import DiT_models, Latte_models  # noqa: E402
from dydit_jax.models.dit import DiT  # noqa: E402
from dydit_jax.models.sit import SiT_models  # noqa: E402
from dydit_jax.sampling import make_flow_sample_fn, make_flow_solver, make_sample_fn  # noqa
from dydit_jax.transport import create_transport  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CFG_SCALE = 4.0
CALIB_TRAJECTORIES, CALIB_BATCH, CALIB_SEED = 2, 8, 1000  # token-router calibration runs
TOKEN_LOGIT_STD = 3.0  # pre-bias token-router output std after calibration


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


def token_router_outputs(model, variables, diffusion):
    """Pre-bias token-router outputs [L, T] of every block on the x_t of `CALIB_TRAJECTORIES`
    masked DDIM runs (CFG, `CALIB_BATCH` samples each, both CFG halves, all steps: T tokens)."""
    @jax.jit
    def step(v, x2, i, y):
        t = jnp.full((x2.shape[0],), i, jnp.int32)
        box = {}

        def model_fn(x, tt):
            out, aux = model.apply(v, x, tt, y, CFG_SCALE, method="forward_with_cfg",
                                   complete=False)
            box["logits"] = aux["token_logits"]  # [2B, L, N]
            return out
        out = diffusion.ddim_sample(model_fn, x2, t, clip_denoised=False, eta=0.0)
        return out["sample"].astype(x2.dtype), box["logits"]

    b = CALIB_BATCH
    logits = []
    for j in range(CALIB_TRAJECTORIES):
        rng = jax.random.PRNGKey(CALIB_SEED + j)
        labels = np.random.RandomState(CALIB_SEED + j).randint(0, 1000, size=b)
        y = jnp.asarray(np.concatenate([labels, np.full(b, 1000)]), jnp.int32)
        z = jax.random.normal(split_loop_key(rng)[0], (b, 32, 32, 4), jnp.float32)
        x2 = jnp.concatenate([z, z], axis=0)
        for i in range(len(diffusion.timestep_map) - 1, -1, -1):
            x2, l = step(variables, x2, i, y)
            logits.append(np.asarray(l))
    logits = np.stack(logits)                                        # [runs*S, 2B, L, N]
    logits = np.moveaxis(logits, 2, 0).reshape(model.depth, -1)      # [L, T]
    bias = np.array([float(variables["params"][f"blocks_{l}"]["token_router"]["fc2"]["bias"][0])
                     for l in range(model.depth)])
    return logits - bias[:, None]


def token_calibrated(variables, raw, keep):
    """Copy of variables whose token routers keep a fraction `keep` of the calibration tokens
    (see module docstring); keep 1.0: the variables themselves (routers at init)."""
    if keep >= 1.0:
        return variables
    params = dict(variables["params"])
    for l in range(raw.shape[0]):
        name = f"blocks_{l}"
        blk = dict(params[name])
        router = dict(blk["token_router"])
        fc2 = dict(router["fc2"])
        scale = TOKEN_LOGIT_STD / max(float(raw[l].std()), 1e-12)
        q = float(np.quantile(scale * raw[l], 1.0 - keep))
        fc2["kernel"] = fc2["kernel"] * scale
        fc2["bias"] = jnp.full_like(fc2["bias"], -q)
        router["fc2"] = fc2
        blk["token_router"] = router
        params[name] = blk
    return {"params": params}


def capacity_fractions(spec, keep):
    """--token-capacities -> (fractions for `Engine(token_capacities=...)`, short label)."""
    if spec == ["engine"]:
        fr = tuple(DEFAULT_CAPACITIES)
    elif spec == ["auto"]:
        fr = (min(1.0, round(keep + 0.1, 6)), 1.0)
    else:
        fr = tuple(sorted({float(f) for f in spec} | {1.0}))
    n = len(fr)
    if n > 2 and np.allclose(fr, np.arange(1, n + 1) / n):
        return fr, f"1/{n} grid"
    return fr, ",".join(f"{f:g}" for f in fr)


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - w0, time.process_time() - c0


def run_config(args, name, dtype_name, results, out_path, meta):
    dtype = DTYPES[dtype_name]
    flow = args.family == "sit"
    video = args.family == "latte"
    if video:
        name = name.replace("DiT", "Latte")
        model = Latte_models[name](num_classes=1000, input_size=args.input_size,
                                   num_frames=args.frames, extras=2, dynamic=True, dtype=dtype,
                                   dynamic_tokens=not args.no_token_router)
    else:
        presets = SiT_models if flow else DiT_models
        name = name.replace("DiT", "SiT") if flow else name
        model = presets[name](num_classes=1000, input_size=args.input_size, dynamic=True,
                              dtype=dtype, dynamic_tokens=not args.no_token_router)
    latent = tuple(model.dummy_inputs(1)[0].shape[1:])
    if flow:  # the solver's times are the schedule; num_steps counts grid points
        transport = create_transport("Linear", "velocity")
        flow_kw = dict(sampler="ode", method=args.method, num_steps=args.steps + 1)
        schedule = solver_times(make_flow_solver(transport, **flow_kw), latent, False)[0]
    else:
        schedule = create_diffusion(f"ddim{args.steps}")
    rng = jax.random.PRNGKey(0)
    x = jnp.zeros((1,) + latent, jnp.float32)
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

    # Token rows: (width plan, keep) -> calibrated variables (DiT family only).
    token_rows = {}
    if args.token_keep and (flow or video or args.no_token_router):
        print(f"[{name} {dtype_name}] token rows skipped: calibrated token rows are for DiT "
              "models with token routers", flush=True)
    elif args.token_keep:
        for w in args.token_widths:
            if w not in plans:
                t0 = time.perf_counter()
                if w == 100:  # width routers at init
                    wp = WidthPlan.build(model, variables, schedule)
                    f = float(np.concatenate([wp.head_masks[..., 1:],
                                              wp.group_masks[..., 1:]]).mean())
                    ratio, v = wp.macs_ratio(model), variables
                else:
                    f, ratio, v = calibrate(model, variables, schedule, w / 100.0)
                print(f"[{name} {dtype_name}] token-row width plan {w}: fraction on {f:.3f}, "
                      f"exact macs ratio {ratio:.3f} ({time.perf_counter() - t0:.1f}s)",
                      flush=True)
                plans[w] = dict(f=f, exact_ratio=ratio, variables=v)
            t0 = time.perf_counter()
            raw = token_router_outputs(model, plans[w]["variables"], schedule)
            print(f"[{name} {dtype_name}] width plan {w}: token-router outputs on "
                  f"{raw.shape[1]} calibration tokens per block, std per block "
                  f"{np.round(raw.std(axis=1), 2).tolist()} "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)
            # k = 1.0: the same-width, all-tokens reference of the token efficiency.
            for k in sorted(set(args.token_keep) | {1.0}, reverse=True):
                if k >= 1.0 and w in args.plans:
                    continue  # the width-only engine row is this row
                token_rows[(w, min(k, 1.0))] = token_calibrated(plans[w]["variables"], raw, k)

    for b in args.batches:
        labels = jnp.asarray(np.random.RandomState(b).randint(0, 1000, size=b), jnp.int32)
        cfg = jnp.float32(CFG_SCALE)
        variants = {}  # key -> dict(call, compile_s, compiles, rss, kind, plan, token_keep)

        def add(key, build, kind, plan=None, token_keep=None):
            r0 = maxrss_kib()
            t0 = time.perf_counter()
            call, compiles, extra = build()
            variants[key] = dict(call=call, compile_s=time.perf_counter() - t0,
                                 compiles=compiles, rss0=r0, rss1=maxrss_kib(),
                                 wall=[], cpu=[], kind=kind, plan=plan,
                                 token_keep=token_keep, **extra)

        def build_sample_fn(v, complete):
            def build():
                if flow:
                    fn = make_flow_sample_fn(model, transport, complete=complete, **flow_kw)
                else:
                    fn = make_sample_fn(model, schedule, sampler="ddim", complete=complete)
                exe = fn.jitted.lower(v, rng, labels, cfg).compile()
                return (lambda: exe(v, rng, labels, cfg)), 1, {}
            return build

        def build_engine(v, executor, capacities=DEFAULT_CAPACITIES):
            def build():
                if flow:
                    eng = FlowEngine(model, v, transport, grid=args.grid, **flow_kw)
                    weights = eng.eval_counts / eng.eval_counts.sum()  # calls per plan time
                    ratio = eng.macs_ratio(include_routers=True)
                else:
                    eng = Engine(model, v, schedule, sampler="ddim", grid=args.grid,
                                 executor=executor, token_capacities=capacities)
                    weights = np.full(eng.plan.num_steps, 1.0 / eng.plan.num_steps)
                    ratio = eng.plan.macs_ratio(model, grid=args.grid)
                n = eng.warmup(b)
                extra = dict(macs_ratio=ratio,
                             compiled_macs_ratio=float((eng.step_macs() * weights).sum()
                                                       / static_macs),
                             block_signatures=len(eng.buckets.block_signatures()),
                             engine=eng)
                return (lambda: eng.sample(rng, labels, CFG_SCALE)), n, extra
            return build

        def token_stats(var):
            """Kept tokens the engine saw on the timed run's arguments -> the row's token
            fields and its MACs ratios (kept tokens; capacity slots)."""
            eng = var["engine"]
            _, st = eng.sample(rng, labels, CFG_SCALE, return_stats=True)
            kept = np.asarray(st["kept_tokens"], np.float64)             # [S, L], 2B rows
            rows, n = 2 * b, model.tokens_per_sample
            caps = np.asarray(gathered.token_capacities(eng.capacities, rows * n))
            ran = caps[np.searchsorted(caps, kept)]                      # slots that ran
            frac = kept / (rows * n)
            ratio = eng.plan.macs_ratio(model, grid=args.grid, token_counts=kept / rows)
            return dict(macs_ratio=ratio,
                        capacity_macs_ratio=eng.plan.macs_ratio(model, grid=args.grid,
                                                                token_counts=ran / rows),
                        token_kept_fraction=float(frac.mean()),
                        token_kept_per_step=frac.mean(axis=1).tolist(),
                        token_kept_fractions=frac.tolist(),                # [S][L]
                        token_kept_min=float(frac.min()), token_kept_max=float(frac.max()),
                        token_slot_fraction=float((ran / (rows * n)).mean()),
                        dense_fallback=float(((ran == rows * n) & (kept < rows * n)).mean()))

        add("static", build_sample_fn(variables, True), "static")
        for p in args.plans:
            v = plans[p]["variables"]
            add(f"masked{p}", build_sample_fn(v, False), "masked", p)
            for ex in (["fused"] if flow else args.executors):
                add(f"{ex}{p}", build_engine(v, ex), ex, p)
        for (w, k), v in token_rows.items():
            caps, caps_label = capacity_fractions(args.token_capacities, k)
            for ex in args.executors:
                add(f"{ex}{w}-k{round(100 * k)}", build_engine(v, ex, caps), ex, w, k)
                variants[f"{ex}{w}-k{round(100 * k)}"]["capacities"] = caps_label
        for r in range(args.rounds):
            for key, var in variants.items():
                w, c = timed(var["call"])
                var["wall"].append(w)
                var["cpu"].append(c)
                var["rss1"] = max(var["rss1"], maxrss_kib())
            print(f"[{name} {dtype_name} b{b}] round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v['wall'][-1]:.2f}s" for k, v in variants.items()), flush=True)

        for var in variants.values():  # after the timed rounds: every variant equally warm
            if var["token_keep"] is not None:
                var.update(token_stats(var))
        st = variants["static"]
        sw, sc = statistics.median(st["wall"]), statistics.median(st["cpu"])
        for key, var in variants.items():
            kind, p, k = var["kind"], var["plan"], var["token_keep"]
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
            if k is not None:
                row.update(token_keep=k, token_capacities=var["capacities"],
                           **{f: var[f] for f in (
                               "capacity_macs_ratio", "token_kept_fraction",
                               "token_kept_per_step", "token_kept_fractions",
                               "token_kept_min", "token_kept_max",
                               "token_slot_fraction", "dense_fallback")})
                # Reference: the same width with every token kept (routers at init).
                ref = variants.get(f"{kind}{p}") if p in args.plans else \
                    variants.get(f"{kind}{p}-k100")
                if ref is not None and ref is not var:
                    rw, rc = statistics.median(ref["wall"]), statistics.median(ref["cpu"])
                    mr = var["macs_ratio"] / ref["macs_ratio"]
                    row.update(token_reference=f"{kind}{p}" if p in args.plans
                               else f"{kind}{p}-k100",
                               token_efficiency_wall=(rw / w) * mr,
                               token_efficiency_cpu=(rc / c) * mr)
            results.append(row)
        write(out_path, meta, results)
        print_table(results)


def write(path, meta, results):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(dict(meta, results=results), fh, indent=1)


def print_table(results):
    hdr = ("model", "dtype", "B", "variant", "plan", "keep tgt/seen", "caps", "MACs",
           "cap MACs", "wall s", "cpu s", "static/x wall", "static/x cpu", "eff wall", "eff cpu",
           "tok eff wall", "tok eff cpu", "exes", "compile s", "dRSS MiB")
    print(" | ".join(hdr))
    for r in results:
        def g(k, fmt="{:.2f}"):
            v = r.get(k)
            return "-" if v is None else fmt.format(v)
        keep = "-" if r.get("token_keep") is None else \
            f"{r['token_keep']:.2f}/{r['token_kept_fraction']:.3f}"
        print(" | ".join([r["model"], r["dtype"], str(r["batch"]), r["variant"],
                          "-" if r["plan"] is None else str(r["plan"]), keep,
                          r.get("token_capacities", "-"), g("macs_ratio", "{:.3f}"),
                          g("capacity_macs_ratio", "{:.3f}"),
                          g("wall_s"), g("cpu_s"), g("speedup_wall"), g("speedup_cpu"),
                          g("efficiency_wall"), g("efficiency_cpu"),
                          g("token_efficiency_wall"), g("token_efficiency_cpu"),
                          str(r["compiles"]), g("compile_s", "{:.1f}"),
                          g("maxrss_delta_mib", "{:.0f}")]), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["DiT-S/2", "DiT-B/2"])
    ap.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    ap.add_argument("--plans", nargs="+", type=int, default=[50, 70],
                    help="target whole-model MACs ratios, percent")
    ap.add_argument("--executors", nargs="+", default=["fused"], choices=["fused", "blocks"])
    ap.add_argument("--grid", default="exact", help='"exact" (default) only')
    ap.add_argument("--family", default="dit", choices=["dit", "sit", "latte", "flux"],
                    help="dit: DDIM on a DyDiT; sit: flow-matching ODE on a dynamic SiT; "
                         "latte: video; flux: DyFLUX token routing (flux_speedup.py)")
    ap.add_argument("--flux-hidden", type=int, default=1024,
                    help="--family flux: hidden size (heads of 128)")
    ap.add_argument("--flux-depth", nargs=2, type=int, default=[2, 4],
                    help="--family flux: double and single blocks")
    ap.add_argument("--flux-tdw", type=float, default=0.0,
                    help="--family flux: > 0 adds TDW routers keeping this fraction of the "
                         "heads and MLP groups of every block (0: token routing only)")
    ap.add_argument("--image-tokens", type=int, default=1024, help="--family flux")
    ap.add_argument("--text-tokens", type=int, default=256, help="--family flux")
    ap.add_argument("--method", default="euler",
                    help="--family sit: fixed-grid ODE method (euler, heun2, midpoint, rk4)")
    ap.add_argument("--steps", type=int, default=5, help="DDIM steps / ODE solver steps")
    ap.add_argument("--input-size", type=int, default=32, help="latent side (32: 256 px)")
    ap.add_argument("--frames", type=int, default=16, help="--family latte: frames per clip")
    ap.add_argument("--no-token-router", action="store_true",
                    help="width-only models (dynamic_tokens=False): no SDT router cost")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--token-keep", nargs="*", type=float, default=[0.7, 0.5],
                    help="token rows: target fractions of tokens kept in the MLP (the 1.0 "
                         "reference, token routers at init, is always added); none: no token "
                         "rows")
    ap.add_argument("--token-widths", nargs="+", type=int, default=[100, 50],
                    help="token rows: width plans, percent (100: width routers at init, all "
                         "heads and groups on; others as --plans)")
    ap.add_argument("--token-capacities", nargs="+", default=["engine"],
                    help='token rows: engine token capacities: "engine" (its default, eighths), '
                         '"auto" (keep + 0.1, 1.0) or fractions of the 2B*N rows')
    ap.add_argument("--out", default=None,
                    help="default: results/dynamic_speedup.json (_sit.json for --family sit)")
    args = ap.parse_args()
    if any(not 0.0 < k <= 1.0 for k in args.token_keep):
        ap.error(f"--token-keep fractions must lie in (0, 1], got {args.token_keep}")
    if args.out is None:
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                "dynamic_speedup" + ("" if args.family == "dit"
                                                     else "_" + args.family) + ".json")
    meta = dict(command="python " + " ".join(sys.argv),
                date=datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z",
                environment=dict(jax=jax.__version__, backend=jax.default_backend(),
                                 devices=[str(d) for d in jax.devices()],
                                 cpu_count=os.cpu_count(), platform=platform.platform(),
                                 loadavg_start=os.getloadavg()),
                cfg_scale=CFG_SCALE, family=args.family, input_size=args.input_size,
                token_router=not args.no_token_router,
                frames=args.frames if args.family == "latte" else None,
                sampler=f"ode-{args.method}" if args.family == "sit" else "ddim",
                steps=args.steps, grid=args.grid, token_keep=args.token_keep,
                token_widths=args.token_widths, token_capacities=args.token_capacities,
                token_calibration=dict(trajectories=CALIB_TRAJECTORIES, batch=CALIB_BATCH,
                                       seed=CALIB_SEED, logit_std=TOKEN_LOGIT_STD),
                peak_memory="ru_maxrss delta (process high-water mark), MiB")
    if args.family == "flux":
        import flux_speedup
        flux_speedup.run(args, meta, write, args.out)
        return
    results = []
    for name in args.models:
        for dt in args.dtypes:
            run_config(args, name, dt, results, args.out, meta)
    meta["environment"]["loadavg_end"] = os.getloadavg()
    write(args.out, meta, results)


if __name__ == "__main__":
    main()
