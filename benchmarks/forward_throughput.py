"""Forward throughput of DiT (images/s) per model, batch size and compute dtype.

Each config: random init with `jax.jit(model.init)` (params float32), the forward
`model.apply(variables, x, t, y)` compiled ahead of time (`jax.jit(...).lower(...).compile()`,
timed as compile_s), `--warmup` untimed calls, then `--iters` timed calls, each ending in
`block_until_ready`. Reported: the median seconds per call and batch / median as images/s, plus
the XLA cost-analysis FLOPs of one call and the achieved GFLOP/s.

    python benchmarks/forward_throughput.py                      # the full table
    python benchmarks/forward_throughput.py --models DiT-S/2 --batches 8 --iters 3  # quick

Inputs are 256 px latents (32x32x4, NHWC), 1000 classes, t uniform in [0, 1000).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dydit_jax.models import DiT_models  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _flops(compiled):
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - cost analysis is optional
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def bench_one(name, batch, dtype_name, variables, iters, warmup, latent=32, num_classes=1000,
              seed=0):
    model = DiT_models[name](input_size=latent, num_classes=num_classes,
                             dtype=DTYPES[dtype_name], param_dtype=jnp.float32)
    kx, kt, ky = jax.random.split(jax.random.PRNGKey(seed + 1), 3)
    x = jax.random.normal(kx, (batch, latent, latent, 4), jnp.float32)
    t = jax.random.randint(kt, (batch,), 0, 1000)
    y = jax.random.randint(ky, (batch,), 0, num_classes)

    def forward(v, x, t, y):
        return model.apply(v, x, t, y)

    start = time.perf_counter()
    compiled = jax.jit(forward).lower(variables, x, t, y).compile()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        compiled(variables, x, t, y).block_until_ready()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        compiled(variables, x, t, y).block_until_ready()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    flops = _flops(compiled)
    return dict(model=name, batch=batch, dtype=dtype_name, param_dtype="float32",
                images_per_s=batch / median, median_s=median, min_s=min(times),
                max_s=max(times), iters=iters, warmup=warmup, compile_s=compile_s,
                flops_per_call=flops,
                gflops_per_s=None if flops is None else flops / median / 1e9)


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment():
    dev = jax.devices()[0]
    try:
        import jaxlib
        jaxlib_version = jaxlib.__version__
    except Exception:  # noqa: BLE001
        jaxlib_version = None
    return dict(jax=jax.__version__, jaxlib=jaxlib_version, backend=jax.default_backend(),
                device=str(getattr(dev, "device_kind", dev)), device_count=jax.device_count(),
                cpu_count=os.cpu_count(), machine=platform.machine(),
                cpu_model=_cpu_model(), python=platform.python_version(),
                xla_flags=os.environ.get("XLA_FLAGS", ""),
                matmul_precision=str(jax.config.jax_default_matmul_precision),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def format_table(rows, first="model"):
    """Markdown table of timing rows; `first` names the key of the first column."""
    lines = [f"| {first} | batch | compute dtype | images/s (median) | ms / call (median) | "
             "min-max ms | GFLOP/s | compile s |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        gf = "-" if r["gflops_per_s"] is None else f"{r['gflops_per_s']:.0f}"
        lines.append(f"| {r[first]} | {r['batch']} | {r['dtype']} | {r['images_per_s']:.2f} | "
                     f"{1e3 * r['median_s']:.0f} | {1e3 * r['min_s']:.0f}-"
                     f"{1e3 * r['max_s']:.0f} | {gf} | {r['compile_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="DiT-S/2,DiT-B/2",
                   help="comma-separated names from DiT_models")
    p.add_argument("--batches", default="8,32", help="comma-separated batch sizes")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help=f"comma-separated compute dtypes from {sorted(DTYPES)}")
    p.add_argument("--iters", type=int, default=5, help="timed calls per config")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for m in models:
        if m not in DiT_models:
            p.error(f"unknown model {m!r}; choose from {sorted(DiT_models)}")
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {sorted(DTYPES)}")
    if args.iters < 1:
        p.error("--iters must be >= 1")

    env = environment()
    print(f"jax {env['jax']} on {env['backend']} ({env['device']}, {env['cpu_count']} CPUs)",
          flush=True)
    rows = []
    for name in models:
        init_model = DiT_models[name](input_size=32, num_classes=1000)
        start = time.perf_counter()
        variables = jax.jit(init_model.init)(
            jax.random.PRNGKey(args.seed), jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,)),
            jnp.zeros((1,), jnp.int32))
        jax.block_until_ready(variables)
        n_params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(variables))
        print(f"{name}: {n_params:,} parameters, init {time.perf_counter() - start:.1f} s",
              flush=True)
        for batch in batches:
            for dtype_name in dtypes:
                r = bench_one(name, batch, dtype_name, variables, args.iters, args.warmup,
                              seed=args.seed)
                r["params"] = n_params
                rows.append(r)
                print(f"  batch {batch:3d} {dtype_name:8s}: {r['images_per_s']:8.2f} images/s "
                      f"({1e3 * r['median_s']:.0f} ms/call, compile {r['compile_s']:.1f} s)",
                      flush=True)
        del variables
    print()
    print(format_table(rows))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(command=" ".join([os.path.basename(sys.executable)] + sys.argv),
                           environment=env, results=rows), f, indent=2)
        print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
