"""Training throughput (images/s) and train-step compile time per model, device count, mesh, dtype.

The train step measured is the one `dydit_jax.train` runs
(`make_train_step(build_loss_fn(config, ...))`: forward + backward + AdamW + EMA, the plain DiT
objective), compiled with the state's regex shardings, the batch split over the mesh's
(data, fsdp) axes and the old state donated, on the configs of `configs/dit_{s,b}.py` with
synthetic latents (32x32x4, 1000 classes; scanned and rematerialised blocks, float32
parameters, compute dtype float32 or bfloat16).

The device count is process-global in JAX, so this script launches one subprocess per entry of
`--devices` (`XLA_FLAGS=--xla_force_host_platform_device_count=N` on CPU) and collects their
results. Inside a subprocess, for each model, every (mesh, dtype) configuration is first
compiled ahead of time (`jax.jit(step).lower(state, batch).compile()`, timed as compile_s),
then run once untimed (warm-up), then the timed steps are interleaved round-robin over the
configurations (one step of each per round, the order rotated each round), so that the machine's
load drifts hit all of them alike. A step is timed to `block_until_ready` of its outputs, in
wall-clock seconds and in CPU seconds of the process (all its threads; less sensitive to other
jobs on a shared machine); the batch is already on the devices (input pipeline not measured).
Meshes: 1 device -> data=1; N devices -> data=N/f,fsdp=f for each f of `--fsdp` (default 1,4:
data=8 and data=2,fsdp=4). Simulated devices share the host's memory, so a mesh whose train
state summed over the devices exceeds `--max-state-gb` is skipped (DiT-B/2 on data=8: 8
replicated copies, 16.7 GB).

    python benchmarks/train_throughput.py                      # the BENCHMARKS.md table
    python benchmarks/train_throughput.py --models DiT-S/2 --devices 1 --steps 2   # quick

Simulated CPU devices share the same cores: 8 of them on a 2-core machine cannot be faster than
one; their CPU seconds per step show the cost of sharding (partitioned programs, collectives,
smaller per-device matmuls), not a speedup.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "train_throughput.json")
sys.path.insert(0, ROOT)


def meshes_for(n_devices: int, fsdp_sizes=(1, 4)):
    """(data, fsdp) meshes benchmarked on `n_devices` devices: one per fsdp size dividing it."""
    if n_devices == 1:
        return [(1, 1)]
    return [(n_devices // f, f) for f in fsdp_sizes if f <= n_devices and n_devices % f == 0]


# --------------------------------------------------------------------------------------------
# Worker: one process, one device count.
# --------------------------------------------------------------------------------------------

def _worker(args) -> dict:
    import functools

    import jax
    import numpy as np

    from dydit_jax import train
    from dydit_jax import data as data_lib
    from dydit_jax import sharding as sharding_lib

    n = jax.device_count()
    load_start = os.getloadavg()
    fsdp_sizes = [int(f) for f in args.fsdp.split(",") if f.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        configs = []  # dicts: mesh shape, dtype, compiled step
        states = {}   # one train state per mesh, shared by the dtypes (same shapes, shardings)
        batches = {}
        for data_ax, fsdp_ax in meshes_for(n, fsdp_sizes):
            mesh = sharding_lib.create_mesh(data_ax, fsdp_ax)
            gb = _state_gb(name, mesh, args.batch)
            if gb > args.max_state_gb:
                print(f"[{n} dev] {name} data={data_ax},fsdp={fsdp_ax}: skipped, the train "
                      f"state takes {gb:.1f} GB of host memory over the {n} devices "
                      f"(> --max-state-gb {args.max_state_gb:g})", flush=True)
                rows.extend(dict(model=name, devices=n, mesh_data=data_ax, mesh_fsdp=fsdp_ax,
                                 dtype=dtype, batch=args.batch, state_gb=gb,
                                 skipped=f"state {gb:.1f} GB > --max-state-gb")
                            for dtype in dtypes)
                continue
            for dtype in dtypes:
                config = _config(name, args.batch, dtype, (data_ax, fsdp_ax))
                model = train.build_model(config)
                diffusion = train.build_diffusion(config)
                tx = train.build_optimizer(config.train)
                init_fn = functools.partial(train.init_state, model, tx)
                abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed))
                shardings = sharding_lib.tree_shardings(abstract, mesh, config.mesh.rules)
                key = (data_ax, fsdp_ax)
                if key not in states:
                    t0 = time.perf_counter()
                    states[key] = jax.block_until_ready(
                        jax.jit(init_fn, out_shardings=shardings)(jax.random.PRNGKey(0)))
                    init_s = time.perf_counter() - t0
                    local_bs = sharding_lib.local_batch_size(config.train.batch_size, mesh)
                    source = data_lib.create_source(config.data, local_batch_size=local_bs)
                    batches[key] = jax.block_until_ready(
                        sharding_lib.global_batch(source.next(), mesh))
                    source.close()
                    n_params = sum(int(np.prod(a.shape))
                                   for a in jax.tree_util.tree_leaves(abstract["params"]))
                    print(f"[{n} dev] {name} mesh data={data_ax},fsdp={fsdp_ax}: "
                          f"{n_params:,} params, state init {init_s:.1f} s", flush=True)
                step = jax.jit(
                    train.make_train_step(train.build_loss_fn(config, model, diffusion), tx,
                                          config.train.ema_decay),
                    in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
                    out_shardings=(shardings, sharding_lib.replicated(mesh)),
                    donate_argnums=(0,))
                t0 = time.perf_counter()
                compiled = step.lower(states[key], batches[key]).compile()
                compile_s = time.perf_counter() - t0
                print(f"[{n} dev] {name} data={data_ax},fsdp={fsdp_ax} {dtype}: "
                      f"compile {compile_s:.1f} s", flush=True)
                configs.append(dict(key=key, dtype=dtype, compiled=compiled, times=[],
                                    cpu_times=[],
                                    compile_s=compile_s, n_params=n_params, state_gb=gb,
                                    scan_layers=config.model.scan_layers,
                                    remat=config.model.remat))

        def run_one(c):
            t0, c0 = time.perf_counter(), time.process_time()
            states[c["key"]], metrics = jax.block_until_ready(
                c["compiled"](states[c["key"]], batches[c["key"]]))
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if not np.isfinite(float(metrics["loss"])):
                raise FloatingPointError(f"non-finite loss for {name} {c['key']} {c['dtype']}")
            return dt, dc

        for c in configs:                       # warm-up: first execution of each program
            for _ in range(args.warmup):
                run_one(c)
        for r in range(args.steps if configs else 0):  # timed, interleaved, rotated order
            k = r % len(configs)
            for c in configs[k:] + configs[:k]:
                dt, dc = run_one(c)
                c["times"].append(dt)
                c["cpu_times"].append(dc)
        for c in configs:
            med = statistics.median(c["times"])
            data_ax, fsdp_ax = c["key"]
            rows.append(dict(model=name, devices=n, mesh_data=data_ax, mesh_fsdp=fsdp_ax,
                             dtype=c["dtype"], param_dtype="float32", batch=args.batch,
                             images_per_s=args.batch / med, median_s=med,
                             min_s=min(c["times"]), max_s=max(c["times"]),
                             step_times_s=c["times"], cpu_s=statistics.median(c["cpu_times"]),
                             step_cpu_times_s=c["cpu_times"], steps=args.steps,
                             warmup=args.warmup,
                             compile_s=c["compile_s"], params=c["n_params"],
                             state_gb=c["state_gb"],
                             scan_layers=c["scan_layers"], remat=c["remat"]))
            print(f"[{n} dev] {name} data={data_ax},fsdp={fsdp_ax} {c['dtype']}: "
                  f"{args.batch / med:.2f} images/s ({1e3 * med:.0f} ms/step, "
                  f"{statistics.median(c['cpu_times']):.1f} CPU s/step)", flush=True)
        del configs, states, batches
    env = _environment()
    env.update(loadavg_1_5_15_start=load_start, loadavg_1_5_15_end=os.getloadavg())
    return dict(rows=rows, environment=env)


def _config(name, batch, dtype, mesh_shape=(-1, 1)):
    from dydit_jax import config_lib
    config = config_lib.imagenet_config(
        name, f"data=synthetic,batch={batch},dtype={dtype},steps=1000")
    config.mesh.update(data=mesh_shape[0], fsdp=mesh_shape[1])
    config_lib.validate(config)
    return config


def _state_gb(name, mesh, batch) -> float:
    """Host memory of the train state (params, EMA, Adam moments) summed over all devices.

    Simulated devices share the host's memory, so a replicated state costs N copies.
    """
    import functools

    import jax
    import numpy as np

    from dydit_jax import sharding as sharding_lib
    from dydit_jax import train
    config = _config(name, batch, "float32", (mesh.shape["data"], mesh.shape["fsdp"]))
    model = train.build_model(config)
    tx = train.build_optimizer(config.train)
    abstract = jax.eval_shape(functools.partial(train.init_state, model, tx),
                              jax.random.PRNGKey(0))
    shardings = sharding_lib.tree_shardings(abstract, mesh, config.mesh.rules)
    per_device = sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
                     for a, s in zip(jax.tree_util.tree_leaves(abstract),
                                     jax.tree_util.tree_leaves(shardings)))
    return per_device * mesh.size / 1e9


def _environment():
    import datetime
    import platform

    import jax
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), None)
    except OSError:
        pass
    return dict(jax=jax.__version__, backend=jax.default_backend(),
                device=str(getattr(jax.devices()[0], "device_kind", jax.devices()[0])),
                device_count=jax.device_count(), cpu_count=os.cpu_count(), cpu_model=cpu,
                python=platform.python_version(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


# --------------------------------------------------------------------------------------------
# Orchestrator: one subprocess per device count.
# --------------------------------------------------------------------------------------------

def _subprocess_env(n_devices: int) -> dict:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                   env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n_devices}".strip()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def format_table(rows):
    lines = ["| model | devices | mesh (data x fsdp) | compute dtype | images/s (median) | "
             "ms / step (median) | min-max ms | CPU s / step | compile s | "
             "state GB (all devices) |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['model']} | {r['devices']} | {r['mesh_data']} x "
                         f"{r['mesh_fsdp']} | {r['dtype']} | skipped | - | - | - | - | "
                         f"{r['state_gb']:.1f} |")
            continue
        lines.append(f"| {r['model']} | {r['devices']} | {r['mesh_data']} x {r['mesh_fsdp']} | "
                     f"{r['dtype']} | {r['images_per_s']:.2f} | {1e3 * r['median_s']:.0f} | "
                     f"{1e3 * r['min_s']:.0f}-{1e3 * r['max_s']:.0f} | "
                     f"{r['cpu_s']:.1f} | {r['compile_s']:.1f} | {r['state_gb']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="DiT-S/2,DiT-B/2", help="comma-separated DiT names")
    p.add_argument("--batch", type=int, default=8,
                   help="global batch (divisible by every device count)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    p.add_argument("--devices", default="1,8", help="comma-separated device counts")
    p.add_argument("--fsdp", default="1,4",
                   help="fsdp axis sizes of the multi-device meshes (data = devices / fsdp); "
                        "one device always runs data=1,fsdp=1")
    p.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes")
    p.add_argument("--max-state-gb", type=float, default=8.0,
                   help="skip a mesh whose train state (summed over the simulated devices, "
                        "which share host memory) exceeds this")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON results ('' to skip)")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker_out:  # inside a subprocess with the device count already set
        result = _worker(args)
        with open(args.worker_out, "w") as f:
            json.dump(result, f)
        return result

    from dydit_jax.models import DiT_models  # noqa: F401 - validates names early
    for m in args.models.split(","):
        if m.strip() and m.strip() not in DiT_models:
            p.error(f"unknown model {m!r}; choose from {sorted(DiT_models)}")
    devices = [int(d) for d in args.devices.split(",") if d.strip()]
    for n in devices:
        if n < 1 or args.batch % n:
            p.error(f"--batch {args.batch} must be divisible by every device count ({n})")
    if args.steps < 1:
        p.error("--steps must be >= 1")

    start = time.perf_counter()
    rows, environments = [], {}
    for n in devices:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--models", args.models,
                   "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--dtypes", args.dtypes, "--fsdp", args.fsdp,
                   "--max-state-gb", str(args.max_state_gb),
                   "--devices", str(n), "--worker-out", out]
            print(f"== {n} device(s): {' '.join(cmd[1:-2])}", flush=True)
            subprocess.run(cmd, env=_subprocess_env(n), cwd=ROOT, check=True)
            with open(out) as f:
                result = json.load(f)
        rows.extend(result["rows"])
        environments[str(n)] = result["environment"]
    total_s = time.perf_counter() - start
    print()
    print(format_table(rows))
    print(f"\ntotal wall time {total_s:.0f} s")
    if args.out:
        from results_io import write_json
        write_json(args.out, __file__, argv, total_wall_s=total_s, environment=environments,
                   results=rows)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
