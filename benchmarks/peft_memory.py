"""PEFT (LoRA / TD-LoRA) vs full fine-tuning: trainable parameters, train-step memory, step time.

Three measurements, each for full fine-tuning, LoRA and TD-LoRA (`dydit_jax/peft`) at the
default `config.peft` setting (rank 4, TD-LoRA 3 experts mixed by softmax per layer, targets
attn qkv/proj and mlp fc1/fc2 of every block; the DyDiT routers train with the adapters):

1. Trainable parameters of DyDiT-XL/2 (`dynamic=True`: width and token routers in the model),
   counted exactly from `jax.eval_shape` trees (no weights are made): full = every parameter;
   PEFT = the adapter leaves (`init_adapters`) + the base leaves that `LoraSpec.trainable`
   names (`split_trainable`: the DyDiT routers). Fractions are of the base model's parameters
   (what `train.py` prints). Plus TD-LoRA fractions for a grid of (rank, experts).

2. Peak train-step memory as XLA assigns it, for the `configs/dit_{xl,b}.py` shapes
   (`imagenet_config(name, "lam=0.5,data=synthetic,...")`: 32x32x4 latents, bfloat16 compute
   with float32 parameters, scanned + rematerialised blocks, the stage-1 DyDiT objective at
   lambda 0.5) at `--batch` per device (default 32 = the paper's 256 over 8 GPUs). The train
   step is `train.make_train_step(train.build_loss_fn(config, model), tx, ema)` jitted with
   `donate_argnums=(0,)` (as train.py), full: `step(state, batch)` with `train.init_state`'s
   state; PEFT: `step(state, batch, frozen)` with `train.peft_state_fn`'s state (trainable tree,
   its EMA and Adam moments) and the frozen base as a non-donated argument, the model wrapped
   in `PeftModel`. It is lowered with `jax.ShapeDtypeStruct` inputs and compiled
   (`.lower(...).compile()`: nothing is allocated) and `compiled.memory_analysis()` is read:
       peak = argument + output - alias + temp
   argument: every input buffer (state, batch, frozen base), live for the whole step;
   output: the new state and the metrics; alias: the part of output written in place into the
   donated input state (counted in argument already, so subtracted once); temp: XLA's scratch
   buffers (activations kept for the backward, gradients, optimizer temporaries) after its own
   buffer reuse. This is the size of XLA's buffer assignment on the backend it compiled for
   (here XLA:CPU), not a measured high-water mark; TPU/GPU buffer assignment (fusion, layout,
   rematerialisation decisions) can differ. `peak_memory_in_bytes` (XLA's own estimate, where
   the backend fills it; on XLA:CPU it is the argument size only) is recorded as well.
   `--remat config,off` (the default) adds the same rows without remat (every activation kept
   for the backward), the regime in which activations, which PEFT does not shrink, dominate.

3. Train-step time on the CPU for the digits DyDiT shapes (`configs/digits_dydit.py`: D=96,
   depth 4, 4 heads, 16x16x1 pixels, 10 classes, batch 32, float32, stage-1 objective, random
   weights): the three steps compiled ahead of time, `--warmup` untimed calls each, then
   `--steps` rounds calling each once (order rotated per round), each call ending in
   `block_until_ready`; median wall seconds and median process CPU seconds
   (`time.process_time`, all threads) per variant, and the ratio vs full.

    python benchmarks/peft_memory.py                                  # the BENCHMARKS.md run
    python benchmarks/peft_memory.py --models DiT-B/2 --remat config --steps 5   # quick
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "peft_memory.json")
sys.path.insert(0, ROOT)

METHODS = ("full", "lora", "tdlora")
GIB = 2.0 ** 30
# init_from is only checked in mode=train; the base weights are never read here (abstract or
# random), but lam>0 in imagenet_config asks for one.
DUMMY_INIT = "unused-by-benchmark"


def _imagenet_config(name: str, batch: int, method: str, remat: str = "config"):
    from dydit_jax import config_lib
    config = config_lib.imagenet_config(
        name, f"lam=0.5,data=synthetic,batch={batch},init={DUMMY_INIT}")
    method, _, base = method.partition("-")
    config.peft.method = "none" if method == "full" else method
    if base == "bf16base":   # the frozen base held in bfloat16 (config.peft.base_dtype)
        config.peft.base_dtype = "bfloat16"
    if remat == "off":
        config.model.remat = False
    return config


def _digits_config(method: str, batch: int):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "digits_dydit", os.path.join(ROOT, "configs", "digits_dydit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.train.batch_size = batch
    config.peft.method = "none" if method == "full" else method
    return config


def _abstract_base(model):
    import jax
    from dydit_jax import train
    return jax.eval_shape(lambda r: model.init(r, *train.dummy_inputs(model))["params"],
                          jax.random.PRNGKey(0))


def _counts(base, spec, hidden: int) -> dict:
    """Exact parameter counts of a PEFT setting on an (abstract) base tree."""
    import jax
    from dydit_jax.peft import init_adapters
    from dydit_jax.peft.trainable import num_params, split_trainable
    adapters = jax.eval_shape(lambda b, r: init_adapters(b, spec, r, hidden), base,
                              jax.random.PRNGKey(0))
    trainable_base, _ = split_trainable(base, spec)
    n_base, n_ad, n_tb = num_params(base), num_params(adapters), num_params(trainable_base)
    return dict(base_params=n_base, adapter_params=n_ad, trainable_base_params=n_tb,
                trainable_params=n_ad + n_tb,
                trainable_pct_of_base=100.0 * (n_ad + n_tb) / n_base,
                adapter_pct_of_base=100.0 * n_ad / n_base,
                trainable_pct_of_total=100.0 * (n_ad + n_tb) / (n_base + n_ad))


def param_counts(model_name: str, grid_ranks, grid_experts) -> dict:
    from dydit_jax import config_lib, train
    from dydit_jax.peft.trainable import num_params
    config = _imagenet_config(model_name, 32, "tdlora")
    model = train.build_model(config)
    base = _abstract_base(model)
    n = num_params(base)
    rows = [dict(method="full", base_params=n, adapter_params=0, trainable_base_params=n,
                 trainable_params=n, trainable_pct_of_base=100.0, adapter_pct_of_base=0.0,
                 trainable_pct_of_total=100.0)]
    default = config_lib.peft_spec(config)
    for method in ("lora", "tdlora"):
        spec = dataclasses.replace(default, method=method)
        rows.append(dict(method=method, rank=spec.rank, experts=spec.num_experts,
                         **_counts(base, spec, model.hidden_size)))
    grid = []
    for r in grid_ranks:
        for k in grid_experts:
            spec = dataclasses.replace(default, method="tdlora", rank=r, experts=k)
            grid.append(dict(rank=r, experts=k, **_counts(base, spec, model.hidden_size)))
    routers = rows[2]["trainable_base_params"]
    return dict(model=model_name, dynamic=True, spec={k: v for k, v in default.__dict__.items()},
                rows=rows, tdlora_grid=grid, dydit_router_params=routers)


# --------------------------------------------------------------------------------------------
# Memory: XLA's buffer assignment of the compiled train step (abstract inputs).
# --------------------------------------------------------------------------------------------

def _step_and_inputs(config, abstract: bool, rng_seed: int = 0):
    """(jitted step, args) for config's method: args abstract (ShapeDtypeStructs) or real."""
    import jax
    import jax.numpy as jnp
    from dydit_jax import config_lib, train
    from dydit_jax.peft import PeftModel
    from dydit_jax.peft.trainable import split_trainable

    model = train.build_model(config)
    tx = train.build_optimizer(config.train)
    spec = config_lib.peft_spec(config)
    rng = jax.random.PRNGKey(rng_seed)
    b, size, ch = config.train.batch_size, config.model.input_size, config.model.in_channels
    if abstract:
        batch = {"image": jax.ShapeDtypeStruct((b, size, size, ch), jnp.float32),
                 "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
    else:
        k_x, k_y = jax.random.split(jax.random.PRNGKey(rng_seed + 1))
        batch = {"image": jax.random.normal(k_x, (b, size, size, ch), jnp.float32),
                 "label": jax.random.randint(k_y, (b,), 0, config.model.num_classes)}
    if spec is None:
        init_fn = lambda r: train.init_state(model, tx, r)  # noqa: E731
        state = jax.eval_shape(init_fn, rng) if abstract else jax.jit(init_fn)(rng)
        loss_fn = train.build_loss_fn(config, model)
        args = (state, batch)
    else:
        if abstract:
            base = _abstract_base(model)
        else:
            base = jax.jit(lambda r: model.init(r, *train.dummy_inputs(model))["params"])(rng)
        trainable_base, frozen = split_trainable(base, spec)
        # As train.py holds it: in config.peft.base_dtype ("compute": bfloat16 here).
        cast = lambda f: train.cast_frozen(f, config)  # noqa: E731
        frozen = jax.eval_shape(cast, frozen) if abstract else cast(frozen)
        init_fn = train.peft_state_fn(model, spec, tx, base)
        state = (jax.eval_shape(init_fn, rng, trainable_base) if abstract
                 else jax.jit(init_fn)(rng, trainable_base))
        loss_fn = train.build_loss_fn(config, PeftModel(model, spec))
        args = (state, batch, frozen)
    step = jax.jit(train.make_train_step(loss_fn, tx, config.train.ema_decay),
                   donate_argnums=(0,))
    return step, args


def _tree_bytes(tree) -> int:
    import jax
    import numpy as np
    return int(sum(int(np.prod(a.shape)) * a.dtype.itemsize
                   for a in jax.tree_util.tree_leaves(tree)))


def memory_row(model_name: str, method: str, batch: int, remat: str = "config") -> dict:
    config = _imagenet_config(model_name, batch, method, remat)
    step, args = _step_and_inputs(config, abstract=True)
    t0 = time.perf_counter()
    lowered = step.lower(*args)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")
    raw = {k: int(getattr(m, k)) for k in fields}
    peak_est = getattr(m, "peak_memory_in_bytes", None)
    peak = (raw["argument_size_in_bytes"] + raw["output_size_in_bytes"]
            - raw["alias_size_in_bytes"] + raw["temp_size_in_bytes"])
    state = args[0]
    row = dict(model=model_name, method=method, batch=batch, compile_s=compile_s,
               dtype=config.model.dtype, scan_layers=config.model.scan_layers,
               remat=config.model.remat, remat_policy=config.model.remat_policy,
               state_bytes=_tree_bytes(state), batch_bytes=_tree_bytes(args[1]),
               frozen_bytes=_tree_bytes(args[2]) if len(args) > 2 else 0,
               peak_bytes=peak, xla_peak_memory_in_bytes=(None if peak_est is None
                                                          else int(peak_est)), **raw)
    print(f"  {model_name} {method} remat={config.model.remat}: compile {compile_s:.1f} s, "
          f"peak {peak / GIB:.2f} GiB "
          f"(arg {raw['argument_size_in_bytes'] / GIB:.2f} + out "
          f"{raw['output_size_in_bytes'] / GIB:.2f} - alias "
          f"{raw['alias_size_in_bytes'] / GIB:.2f} + temp "
          f"{raw['temp_size_in_bytes'] / GIB:.2f})", flush=True)
    return row


# --------------------------------------------------------------------------------------------
# Step time on the CPU (small model, real arrays).
# --------------------------------------------------------------------------------------------

def time_rows(batch: int, steps: int, warmup: int) -> list:
    import jax
    import numpy as np
    from dydit_jax.peft.trainable import num_params

    variants = []
    for method in METHODS:
        config = _digits_config(method, batch)
        step, args = _step_and_inputs(config, abstract=False)
        t0 = time.perf_counter()
        compiled = step.lower(*args).compile()
        compile_s = time.perf_counter() - t0
        variants.append(dict(method=method, compiled=compiled, state=args[0], rest=args[1:],
                             compile_s=compile_s, times=[], cpu_times=[],
                             trainable_params=num_params(args[0]["params"])))
        print(f"  digits DyDiT {method}: compile {compile_s:.1f} s", flush=True)

    def run_one(v):
        t0, c0 = time.perf_counter(), time.process_time()
        v["state"], metrics = jax.block_until_ready(v["compiled"](v["state"], *v["rest"]))
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if not np.isfinite(float(metrics["loss"])):
            raise FloatingPointError(f"non-finite loss for {v['method']}")
        return dt, dc

    for v in variants:
        for _ in range(warmup):
            run_one(v)
    for r in range(steps):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            dt, dc = run_one(v)
            v["times"].append(dt)
            v["cpu_times"].append(dc)
    full = variants[0]
    full_med, full_cpu = statistics.median(full["times"]), statistics.median(full["cpu_times"])
    rows = []
    for v in variants:
        med, cpu = statistics.median(v["times"]), statistics.median(v["cpu_times"])
        rows.append(dict(model="digits DyDiT (D=96, depth 4, 16x16x1, patch 2)",
                         method=v["method"], batch=batch, steps=steps, warmup=warmup,
                         median_s=med, min_s=min(v["times"]), max_s=max(v["times"]),
                         cpu_s=cpu, ratio_wall_vs_full=med / full_med,
                         ratio_cpu_vs_full=cpu / full_cpu, compile_s=v["compile_s"],
                         trainable_params=v["trainable_params"],
                         step_times_s=v["times"], step_cpu_times_s=v["cpu_times"]))
    return rows


# --------------------------------------------------------------------------------------------
# Tables and main.
# --------------------------------------------------------------------------------------------

def format_params(p) -> str:
    lines = [f"{p['model']} (dynamic): trainable parameters",
             "| method | rank | experts | adapter params | trainable base (routers) | "
             "trainable | % of base |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in p["rows"]:
        if r["method"] == "full":
            lines.append(f"| full | - | - | 0 | - | {r['trainable_params']:,} | 100.00 |")
            continue
        lines.append(f"| {r['method']} | {r['rank']} | {r['experts']} | "
                     f"{r['adapter_params']:,} | {r['trainable_base_params']:,} | "
                     f"{r['trainable_params']:,} | {r['trainable_pct_of_base']:.2f} |")
    return "\n".join(lines)


def format_grid(p) -> str:
    ranks = sorted({g["rank"] for g in p["tdlora_grid"]})
    experts = sorted({g["experts"] for g in p["tdlora_grid"]})
    by = {(g["rank"], g["experts"]): g for g in p["tdlora_grid"]}
    lines = [f"{p['model']} TD-LoRA trainable % of base (adapters + DyDiT routers), "
             f"rows rank, columns experts",
             "| rank | " + " | ".join(f"K={k}" for k in experts) + " |",
             "|---:|" + "---:|" * len(experts)]
    for r in ranks:
        lines.append(f"| {r} | " + " | ".join(f"{by[(r, k)]['trainable_pct_of_base']:.2f}"
                                             for k in experts) + " |")
    return "\n".join(lines)


def format_memory(rows) -> str:
    lines = ["| model | remat | method | batch | state GiB | frozen GiB | argument GiB | "
             "output GiB | alias GiB | temp GiB | peak GiB | peak / full | compile s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    full = {(r["model"], r["remat"]): r["peak_bytes"] for r in rows if r["method"] == "full"}
    for r in rows:
        key = (r["model"], r["remat"])
        ratio = f"{r['peak_bytes'] / full[key]:.3f}" if key in full else "-"
        remat = r["remat_policy"] if r["remat"] else "off"
        lines.append(
            f"| {r['model']} | {remat} | {r['method']} | {r['batch']} | "
            f"{r['state_bytes'] / GIB:.2f} | "
            f"{r['frozen_bytes'] / GIB:.2f} | {r['argument_size_in_bytes'] / GIB:.2f} | "
            f"{r['output_size_in_bytes'] / GIB:.2f} | {r['alias_size_in_bytes'] / GIB:.2f} | "
            f"{r['temp_size_in_bytes'] / GIB:.2f} | {r['peak_bytes'] / GIB:.2f} | {ratio} | "
            f"{r['compile_s']:.0f} |")
    return "\n".join(lines)


def format_time(rows) -> str:
    lines = ["| model | method | batch | trainable params | ms / step (median) | min-max ms | "
             "CPU s / step | wall / full | CPU / full | compile s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['batch']} | "
                     f"{r['trainable_params']:,} | {1e3 * r['median_s']:.0f} | "
                     f"{1e3 * r['min_s']:.0f}-{1e3 * r['max_s']:.0f} | {r['cpu_s']:.2f} | "
                     f"{r['ratio_wall_vs_full']:.2f} | {r['ratio_cpu_vs_full']:.2f} | "
                     f"{r['compile_s']:.1f} |")
    return "\n".join(lines)


def _environment():
    import datetime
    import platform

    import jax
    return dict(jax=jax.__version__, backend=jax.default_backend(),
                device=str(getattr(jax.devices()[0], "device_kind", jax.devices()[0])),
                cpu_count=os.cpu_count(), python=platform.python_version(),
                glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


PEAK_NOTE = ("peak_bytes = argument + output - alias + temp (memory_analysis() of the compiled, "
             "state-donating train step): argument = all inputs (state, batch, frozen base), "
             "live for the whole step; output = new state + metrics; alias = output bytes "
             "written in place into the donated state (already counted in argument); temp = "
             "XLA's scratch buffers after its buffer reuse. XLA's buffer assignment for the "
             "backend compiled for (XLA:CPU here), not a measured high-water mark; TPU/GPU "
             "assignment may differ.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="DiT-XL/2,DiT-B/2",
                   help="comma-separated DiT names for the memory analysis ('' to skip)")
    p.add_argument("--params-model", default="DiT-XL/2",
                   help="model whose trainable parameters are counted ('' to skip)")
    p.add_argument("--batch", type=int, default=32, help="per-device batch of the memory run")
    p.add_argument("--remat", default="config,off",
                   help="comma-separated: 'config' (the imagenet config's remat, on) and/or "
                        "'off' (no remat: activations kept, for comparison)")
    p.add_argument("--grid-ranks", default="1,2,4,8", help="TD-LoRA ranks of the grid")
    p.add_argument("--grid-experts", default="1,2,3,4,6", help="TD-LoRA experts of the grid")
    p.add_argument("--time-batch", type=int, default=32, help="batch of the digits timing")
    p.add_argument("--steps", type=int, default=30, help="timed rounds (0: skip the timing)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON results ('' to skip)")
    args = p.parse_args(argv)

    from dydit_jax import cpu_env
    cpu_env.reexec_with_malloc_tunables()   # as `python -m dydit_jax.main` runs
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    start = time.perf_counter()
    load_start = os.getloadavg()
    result = dict(peak_note=PEAK_NOTE)
    if args.params_model:
        t0 = time.perf_counter()
        params = param_counts(args.params_model,
                              [int(x) for x in args.grid_ranks.split(",") if x.strip()],
                              [int(x) for x in args.grid_experts.split(",") if x.strip()])
        params["wall_s"] = time.perf_counter() - t0
        result["params"] = params
        print(format_params(params), "\n", flush=True)
        print(format_grid(params), "\n", flush=True)
    mem = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        for remat in [x.strip() for x in args.remat.split(",") if x.strip()]:
            if remat not in ("config", "off"):
                p.error(f"--remat {remat!r}: valid are 'config' and 'off'")
            for method in METHODS + ("tdlora-bf16base",):
                mem.append(memory_row(name, method, args.batch, remat))
    if mem:
        result["memory"] = mem
        print()
        print(format_memory(mem), "\n", flush=True)
    if args.steps > 0:
        rows = time_rows(args.time_batch, args.steps, args.warmup)
        result["time"] = rows
        print()
        print(format_time(rows), flush=True)
    total_s = time.perf_counter() - start
    env = _environment()
    env.update(loadavg_1_5_15_start=load_start, loadavg_1_5_15_end=os.getloadavg())
    print(f"\ntotal wall time {total_s:.0f} s")
    if args.out:
        from results_io import write_json
        write_json(args.out, __file__, argv, total_wall_s=total_s, environment=env, **result)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
