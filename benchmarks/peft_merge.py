"""TD-LoRA at inference: the cost of merging W + delta W(t) once per step, next to the step.

A TD-LoRA DyDiT's adapters depend on t only, so the engine (`Engine(..., peft=spec)`) merges
every adapted kernel once per sampling step (`peft.merge_params`, inside the fused executable)
and gathers from the merged weights. This benchmark runs, side by side in one process on the
same shapes, schedule, plan and rng:
- "merged-away": the same DyDiT with the adapters folded in at one t beforehand (what a fully
  fine-tuned DyDiT of this architecture costs: no adapters at sampling time);
- "tdlora": the engine with the adapters, merging every step;
- "merge": the per-step merge alone (E_t, the mixing weights, every kernel's delta), jitted.
Each sampling run is timed `--repeats` times, interleaved, after a warm-up run (compiles not
counted); medians are reported, and the ratio tdlora / merged-away. Model: a DyDiT at DiT-S/2
shapes (32x32x4 latents, 12 blocks, D=384) by default, random weights with the width routers'
biases drawn so that the plan switches heads and groups off; the default `config.peft`
TD-LoRA (rank 4, 3 experts, qkv/proj/fc1/fc2) with nonzero adapters.

    python benchmarks/peft_merge.py                      # the BENCHMARKS.md run
    python benchmarks/peft_merge.py --model DiT-B/2 --batch 4 --steps 10
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "peft_merge.json")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import traverse_util

    from dydit_jax import config_lib, peft
    from dydit_jax.diffusion import create_diffusion
    from dydit_jax.engine import Engine
    from dydit_jax.models.dit import DiT, dit_config

    model = DiT(input_size=args.latent, in_channels=4, num_classes=1000, dynamic=True,
                **dit_config(args.model))
    x = jnp.zeros((1, args.latent, args.latent, 4))
    base = model.init(jax.random.PRNGKey(0), x, jnp.zeros(1), jnp.zeros(1, jnp.int32))["params"]
    flat = traverse_util.flatten_dict(base)
    rng = np.random.default_rng(0)
    for path in flat:
        if path[-1] == "bias" and path[-2] in ("head_router", "group_router"):
            flat[path] = jnp.asarray(rng.normal(0.0, 5.0, flat[path].shape), jnp.float32)
        elif path[-1] in ("kernel", "embedding") and "router" not in "/".join(path):
            flat[path] = jnp.asarray(rng.normal(0.0, 0.02, flat[path].shape), jnp.float32)
    base = traverse_util.unflatten_dict(flat)
    spec = config_lib.peft_spec(_peft_config())
    adapters = peft.init_adapters(base, spec, jax.random.PRNGKey(1), model.hidden_size)
    adapters = _nonzero(adapters)
    full = peft.combine(base, adapters)
    t_emb = peft.time_embedding(model, base, jnp.array([500.0]), spec)[0]
    merged_away = peft.merge_params(full, t_emb, spec)

    diffusion = create_diffusion(f"ddim{args.steps}")
    labels = np.arange(args.batch, dtype=np.int32)
    kw = dict(sampler="ddim", grid=(0.25, 0.5, 0.75, 1.0))
    engines = {"merged-away": Engine(model, {"params": merged_away}, diffusion, **kw),
               "tdlora": Engine(model, {"params": full}, diffusion, peft=spec, **kw)}
    eng = engines["tdlora"]
    merge = jax.jit(lambda rest, blocks, t: eng._merged(rest, blocks, t))
    t_model = jnp.full((args.batch,), 500.0, jnp.float32)

    def run(name):
        start = time.perf_counter()
        out = engines[name].sample(jax.random.PRNGKey(0), labels, 4.0)
        jax.block_until_ready(out)
        return time.perf_counter() - start

    def run_merge():
        start = time.perf_counter()
        jax.block_until_ready(merge(eng._rest, eng._blocks, t_model))
        return time.perf_counter() - start

    for name in engines:
        run(name)
    run_merge()
    times = {name: [] for name in engines}
    times["merge"] = []
    for r in range(args.repeats):
        order = list(engines)[r % 2:] + list(engines)[:r % 2]
        for name in order:
            times[name].append(run(name))
        for _ in range(3):
            times["merge"].append(run_merge())
    med = {k: statistics.median(v) for k, v in times.items()}
    per_step = {k: med[k] / args.steps for k in engines}
    same = np.abs(np.asarray(engines["tdlora"].sample(jax.random.PRNGKey(0), labels, 4.0))
                  - np.asarray(engines["merged-away"].sample(jax.random.PRNGKey(0), labels,
                                                             4.0))).max()
    flat_full = traverse_util.flatten_dict(full)
    adapted = sum(int(np.prod(v.shape)) for p, v in flat_full.items()
                  if p[-1] == "kernel" and (p[:-1] + ("lora_A",)) in flat_full)
    result = {
        "command": "python benchmarks/peft_merge.py " + " ".join(argv or sys.argv[1:]),
        "model": args.model, "latent": args.latent, "batch": args.batch, "steps": args.steps,
        "cfg_rows": 2 * args.batch, "repeats": args.repeats, "peft": spec.__dict__,
        "adapted_kernel_params": adapted,
        "plan_macs_ratio": float(eng.plan.macs_ratio(model, grid=eng.grid)),
        "run_s": med, "per_step_ms": {k: 1e3 * v for k, v in per_step.items()},
        "merge_ms": 1e3 * med["merge"],
        "merge_share_of_step": med["merge"] / per_step["tdlora"],
        "tdlora_vs_merged_away": med["tdlora"] / med["merged-away"],
        "max_abs_diff_vs_merged_at_t500": float(same),
        "devices": [d.device_kind for d in jax.devices()],
        "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
    }
    print(f"{args.model} DyDiT, {args.latent}x{args.latent}x4, batch {args.batch} (CFG: "
          f"{2 * args.batch} rows), DDIM {args.steps}, plan ratio "
          f"{result['plan_macs_ratio']:.3f}, TD-LoRA r{spec.rank} K{spec.experts} on "
          f"{adapted:,} kernel parameters")
    print(f"{'variant':<14}{'run s':>9}{'ms / step':>12}")
    for k in engines:
        print(f"{k:<14}{med[k]:>9.3f}{1e3 * per_step[k]:>12.1f}")
    print(f"{'merge alone':<14}{'':>9}{1e3 * med['merge']:>12.1f}  "
          f"({100 * result['merge_share_of_step']:.1f} % of a TD-LoRA step)")
    print(f"tdlora / merged-away: {result['tdlora_vs_merged_away']:.3f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    print(f"wrote {args.out}")


def _peft_config():
    from dydit_jax import config_lib
    c = config_lib.base_config()
    c.peft.method = "tdlora"
    return c


def _nonzero(adapters):
    """lora_B and routers drawn, as after training (fresh ones are zero)."""
    import jax
    from flax import traverse_util
    flat = traverse_util.flatten_dict(adapters)
    for i, path in enumerate(sorted(flat)):
        if path[-1] in ("lora_B", "lora_router"):
            flat[path] = 0.01 * jax.random.normal(jax.random.PRNGKey(100 + i), flat[path].shape)
    return traverse_util.unflatten_dict(flat)


if __name__ == "__main__":
    main()
