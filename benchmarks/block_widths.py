"""One gathered block at every width against the full-width block: where a width plan's time goes.

The engine's efficiency (speedup x MACs ratio, `dynamic_speedup.py`) sums over blocks of
different widths. This script times one block per kind (a DiT's block; a Latte's spatial and
temporal block) of a random-weight dynamic model at every width k = 1..H heads and MLP groups
(`gathered.block_forward` with one head size and one group size, jitted alone), on the rows a
sampling step feeds it (2B model rows with CFG), and reports per k:

  ms          median wall time of one call (after a warm-up call, `--calls` calls),
  MACs ratio  the block's MACs at width k over its MACs at width H (`flops.jaxpr_macs` of the
              same gathered block: every matmul, attention included, adaLN per sample),
  efficiency  (ms at H / ms at k) x MACs ratio: 1.0 when the block turns every saved MAC into
              saved time. A plan's efficiency is a MACs-weighted mean of these.

Token routers stay at their init (every token kept, as in dynamic_speedup's width rows).

    python benchmarks/block_widths.py --family latte --model Latte-S/2 --batch 4 \
        --input-size 16 --frames 16
    python benchmarks/block_widths.py --family dit --model DiT-S/2 --batch 8 --input-size 32

Writes benchmarks/results/block_widths_<family>.json (`--out`).
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_json  # noqa: E402

from dydit_jax import flops  # noqa: E402
from dydit_jax.engine import gathered  # noqa: E402
from dydit_jax.engine.plan import bucket_arrays  # noqa: E402
from dydit_jax.engine.sampler import DEFAULT_CAPACITIES  # noqa: E402
from dydit_jax.models import DiT_models, Latte_models  # noqa: E402


def build(args):
    if args.family == "latte":
        model = Latte_models[args.model](num_classes=1000, input_size=args.input_size,
                                         num_frames=args.frames, extras=2, dynamic=True)
    else:
        model = DiT_models[args.model](num_classes=1000, input_size=args.input_size,
                                       dynamic=True)
    x, t, y = model.dummy_inputs(1)
    params = jax.jit(model.init)(jax.random.PRNGKey(args.seed), x, t, y)["params"]
    return model, params


def width_arrays(k: int, heads: int):
    """One block's width arrays with heads / groups 0..k-1 active and a single bucket k."""
    mask = np.zeros((1, heads), bool)
    mask[0, :k] = True
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]),
                                  bucket_arrays(mask, mask, (k,)))


def timed(fn, *operands, calls: int) -> float:
    jax.block_until_ready(fn(*operands))
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*operands))
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="latte", choices=["dit", "latte"])
    ap.add_argument("--model", default="Latte-S/2")
    ap.add_argument("--batch", type=int, default=4, help="samples (2x model rows with CFG)")
    ap.add_argument("--input-size", type=int, default=16)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--calls", type=int, default=9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"block_widths_{args.family}.json")

    model, params = build(args)
    blocks = gathered.stacked_blocks(model, {"params": params})
    blocks = blocks if isinstance(blocks, tuple) else (blocks,)
    rows, heads, d = 2 * args.batch, model.num_heads, model.hidden_size
    frames = model.tokens_per_sample // model.num_patches
    tokens = jax.random.normal(jax.random.PRNGKey(1), (rows * frames, model.num_patches, d))
    c = jax.random.normal(jax.random.PRNGKey(2), (rows, d))
    results = []
    for p, kind in enumerate(model.block_kinds):
        bp = jax.tree_util.tree_map(lambda a: a[0], blocks[p])
        x = model.to_block_rows(tokens, kind, rows)
        per_k = {}
        for k in range(1, heads + 1):
            width = width_arrays(k, heads)
            fn = functools.partial(gathered.block_forward, model, head_sizes=(k,),
                                   group_sizes=(k,), capacities=DEFAULT_CAPACITIES, index=p)
            call = jax.jit(lambda bp, x, c, w, fn=fn: fn(bp, x, c, w)[0])
            ms = timed(call, bp, x, c, width, calls=args.calls)
            # MACs of one sample's rows (one clip for a Latte: its F or N rows).
            sample_rows = x.shape[0] // rows
            macs = flops.jaxpr_macs(lambda bp, x, c, w, fn=fn: fn(bp, x, c, w)[0], bp,
                                    x[:sample_rows], c[:1], width)
            per_k[k] = (ms, macs)
            print(f"[{args.model} {kind}] k={k}: {ms:.1f} ms, {macs / 1e6:.1f} MMACs per "
                  f"sample", flush=True)
        full_ms, full_macs = per_k[heads]
        for k, (ms, macs) in per_k.items():
            ratio = macs / full_macs
            results.append(dict(model=args.model, kind=kind, batch=args.batch, rows=rows,
                                tokens=int(np.prod(x.shape[:2])), k=k, heads=heads, ms=ms,
                                macs_per_sample=int(macs), macs_ratio=ratio,
                                efficiency=(full_ms / ms) * ratio))
    print("model | kind | B | k | ms | MACs ratio | efficiency")
    for r in results:
        print(f"{r['model']} | {r['kind']} | {r['batch']} | {r['k']}/{r['heads']} | "
              f"{r['ms']:.1f} | {r['macs_ratio']:.3f} | {r['efficiency']:.2f}")
    write_json(out, __file__, argv, family=args.family, input_size=args.input_size,
               frames=args.frames if args.family == "latte" else None,
               devices=str(jax.devices()), results=results)


if __name__ == "__main__":
    main()
