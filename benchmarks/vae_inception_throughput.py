"""Throughput (images/s) of the evaluation networks: SD-VAE decode and encode, Inception features.

- VAE: `models.vae.AutoencoderKL` at the sd-vae-ft-ema size (83.7M parameters). decode:
  DiT latents [B, 32, 32, 4] -> images [B, 256, 256, 3] (`decode_latents`, the sampling path);
  encode: images [B, 256, 256, 3] -> posterior sample (`encode` + `sample`, latent extraction).
- Inception: `evaluation.inception.InceptionV3` on uint8 [B, 256, 256, 3] (resized to 299
  inside, as the ADM evaluator feeds ImageNet 256 samples), all three outputs.

Weights are random (kernels N(0, 1/fan_in), norms at the identity): throughput does not depend
on their values, and no weight file is needed. Each config is compiled ahead of time
(compile_s), called `--warmup` times untimed, then `--iters` times, each ending in
`block_until_ready`; images/s = batch / median seconds per call.

    python benchmarks/vae_inception_throughput.py \
        --out benchmarks/results/vae_inception_throughput.json
    python benchmarks/vae_inception_throughput.py --vae-batches 1 --inception-batches 8 --iters 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from forward_throughput import _flops, environment, format_table  # noqa: E402

from dydit_jax.convert_vae import abstract_params  # noqa: E402
from dydit_jax.evaluation.inception import InceptionV3, abstract_variables  # noqa: E402
from dydit_jax.models.vae import AutoencoderKL  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def random_variables(abstract, seed=0):
    """Kernels N(0, 1/fan_in); scales and variances 1; biases and means 0."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, np.prod(s.shape[:-1]) ** -0.5, s.shape).astype(np.float32)
        return (np.ones if name in ("scale", "var") else np.zeros)(s.shape, np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def time_compiled(fn, args, iters, warmup):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    flops = _flops(compiled)
    median = statistics.median(times)
    return dict(median_s=median, min_s=min(times), max_s=max(times), compile_s=compile_s,
                iters=iters, warmup=warmup, flops_per_call=flops,
                gflops_per_s=None if flops is None else flops / median / 1e9)


def bench_vae(batches, dtypes, iters, warmup, seed):
    variables = {"params": random_variables(abstract_params(AutoencoderKL()), seed)}
    rows = []
    for dtype_name in dtypes:
        vae = AutoencoderKL(dtype=DTYPES[dtype_name])
        for batch in batches:
            rng = np.random.default_rng(seed + batch)
            latents = jnp.asarray(rng.normal(size=(batch, 32, 32, 4)), jnp.float32)
            images = jnp.asarray(rng.uniform(-1, 1, (batch, 256, 256, 3)), jnp.float32)
            jobs = {
                "vae decode": (lambda v, z, vae=vae: vae.apply(v, z, method="decode_latents"),
                               latents),
                "vae encode": (lambda v, x, vae=vae: vae.apply(v, x, method="encode").sample(
                    jax.random.PRNGKey(0)), images),
            }
            for task, (fn, x) in jobs.items():
                r = time_compiled(fn, (variables, x), iters, warmup)
                rows.append(dict(task=task, batch=batch, dtype=dtype_name,
                                 images_per_s=batch / r["median_s"], **r))
                _print(rows[-1])
    return rows


def bench_inception(batches, dtypes, iters, warmup, seed):
    variables = random_variables(abstract_variables(), seed)
    rows = []
    for dtype_name in dtypes:
        model = InceptionV3(dtype=DTYPES[dtype_name])
        for batch in batches:
            images = np.random.default_rng(seed + batch).integers(
                0, 256, (batch, 256, 256, 3), dtype=np.uint8)
            r = time_compiled(model.apply, (variables, jnp.asarray(images)), iters, warmup)
            rows.append(dict(task="inception features", batch=batch, dtype=dtype_name,
                             images_per_s=batch / r["median_s"], **r))
            _print(rows[-1])
    return rows


def _print(r):
    print(f"  {r['task']:18s} batch {r['batch']:3d} {r['dtype']:8s}: "
          f"{r['images_per_s']:8.2f} images/s ({1e3 * r['median_s']:.0f} ms/call, "
          f"compile {r['compile_s']:.1f} s)", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vae-batches", default="1,2", help="comma-separated; empty to skip")
    p.add_argument("--inception-batches", default="8,16", help="comma-separated; empty to skip")
    p.add_argument("--dtypes", default="float32", help=f"comma-separated from {sorted(DTYPES)}")
    p.add_argument("--iters", type=int, default=2, help="timed calls per config")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    def ints(s):
        return [int(b) for b in s.split(",") if b.strip()]

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {sorted(DTYPES)}")
    if args.iters < 1:
        p.error("--iters must be >= 1")

    env = environment()
    print(f"jax {env['jax']} on {env['backend']} ({env['device']}, {env['cpu_count']} CPUs)",
          flush=True)
    rows = bench_vae(ints(args.vae_batches), dtypes, args.iters, args.warmup, args.seed)
    rows += bench_inception(ints(args.inception_batches), dtypes, args.iters, args.warmup,
                            args.seed)
    print()
    print(format_table(rows, first="task"))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(command=" ".join([os.path.basename(sys.executable)] + sys.argv),
                           environment=env, results=rows), f, indent=2)
        print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
