"""Attention output layout: the DiT forward with `dit.dot_product_attention` as it is (second
product heads-first, then an explicit transpose) vs the earlier form (einsum emitting
[B, N, H, hd] directly), side by side in one process.

Both compute the same values (checked here on a model whose zero-initialised adaLN and final
layer are given random weights); only XLA's layout of the attention output before `proj`
differs. Each variant is compiled ahead of time, then `--rounds` interleaved rounds time one
call each (`time.process_time`, all threads, and wall time); medians are reported.

    python benchmarks/attention_layout.py                      # DiT-S/2, batch 16
    python benchmarks/attention_layout.py --models DiT-S/2 DiT-B/2 --batch 8 --rounds 5
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

from dydit_jax.models import DiT_models, dit  # noqa: E402


def interleaved_attention(q, k, v):
    """The earlier form: the second einsum asked for [B, N, H, hd] directly."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def randomise(params, seed):
    """Random weights for the zero-initialised leaves, so the outputs are not trivially 0."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 4096))
    return jax.tree_util.tree_map(
        lambda a: 0.02 * jax.random.normal(next(keys), a.shape, a.dtype)
        if not np.any(np.asarray(a)) else a, params)


def run(name, batch, rounds, seed):
    model = DiT_models[name](num_classes=1000, input_size=32)
    x = jax.random.normal(jax.random.PRNGKey(seed), (batch, 32, 32, 4))
    t = jnp.full((batch,), 500, jnp.int32)
    y = jnp.arange(batch, dtype=jnp.int32) % 1000
    variables = jax.jit(model.init)(jax.random.PRNGKey(seed), x[:1], t[:1], y[:1])
    variables = {"params": randomise(variables["params"], seed + 1)}
    current = dit.dot_product_attention
    exes, outs = {}, {}
    try:
        for variant, fn in (("heads-first (current)", current),
                            ("interleaved (before)", interleaved_attention)):
            dit.dot_product_attention = fn
            t0 = time.perf_counter()
            exes[variant] = jax.jit(lambda v, x: model.apply(v, x, t, y)).lower(
                variables, x).compile()
            outs[variant] = (time.perf_counter() - t0, np.asarray(exes[variant](variables, x)))
    finally:
        dit.dot_product_attention = current
    (_, a), (_, b) = outs.values()
    max_diff = float(np.abs(a - b).max())
    wall = {k: [] for k in exes}
    cpu = {k: [] for k in exes}
    for _ in range(rounds):
        for k, exe in exes.items():
            w0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(exe(variables, x))
            wall[k].append(time.perf_counter() - w0)
            cpu[k].append(time.process_time() - c0)
    rows = []
    base = statistics.median(cpu["interleaved (before)"])
    for k in exes:
        rows.append(dict(model=name, batch=batch, variant=k, wall_s=statistics.median(wall[k]),
                         cpu_s=statistics.median(cpu[k]), wall_all=wall[k], cpu_all=cpu[k],
                         speedup_cpu_vs_before=base / statistics.median(cpu[k]),
                         compile_s=outs[k][0], max_abs_diff=max_diff,
                         output_scale=float(np.abs(a).max())))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["DiT-S/2"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "attention_layout.json"))
    args = ap.parse_args()
    meta = dict(command="python " + " ".join(sys.argv),
                date=datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z",
                environment=dict(jax=jax.__version__, backend=jax.default_backend(),
                                 cpu_count=os.cpu_count(), platform=platform.platform(),
                                 loadavg_start=os.getloadavg()))
    results = []
    for name in args.models:
        results += run(name, args.batch, args.rounds, args.seed)
    meta["environment"]["loadavg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(dict(meta, results=results), fh, indent=1)
    print("| model | batch | attention output | wall s | CPU s | CPU speedup vs before | "
          "compile s | max abs diff (output scale) |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['wall_s']:.3f} | "
              f"{r['cpu_s']:.3f} | {r['speedup_cpu_vs_before']:.2f} | {r['compile_s']:.1f} | "
              f"{r['max_abs_diff']:.1e} ({r['output_scale']:.2f}) |")


if __name__ == "__main__":
    main()
