"""`dynamic_speedup.py --family flux`: static FLUX vs masked DyFLUX vs the FLUX engine.

One reduced FLUX with FLUX.1's block design (head size 128, axes_dim (16, 56, 56), MLP ratio
4, T5/CLIP input widths 4096/768, 64 packed channels) but `--flux-hidden` wide (default 1024 =
8 heads) and `--flux-depth` double + single blocks (default 2 + 4), on `--image-tokens` image
tokens (default 1024: a 64x64 latent, 512 px) and `--text-tokens` (default 256) text tokens;
random (xavier, FLUX's init) weights. Each variant runs the FLUX sampler (`--steps` Euler steps
of the shifted schedule, guidance embedding 3.5) on the same noise and text inputs:
  static - `flux_sampling.denoise` with `route=False` weights-equal model (the plain FLUX
           computation: no routers);
  masked - `flux_sampling.denoise` on the dynamic model: every token computed, skipped
           updates multiplied by 0 (as the masked formulation of the release);
  engine - `FluxEngine.denoise` (kept tokens gathered into capacity buckets, eighths).
Router calibration per keep ratio k (`--token-keep`, default 0.5 0.7): block by block in
execution order, each token router's bias is set so that a fraction k of the image tokens of
the first step's inputs has a positive logit (threshold at the midpoint between two sorted
logits); later steps route as the model does, so the kept fraction the engine saw is reported
("keep seen", from its per-step kept counts).
MACs ratio = `flops.flux_macs_ratio` of the kept counts the engine saw (mean over steps and
samples), routers included: the token-FLOPs reduction. efficiency = (static time / engine
time) x MACs ratio, that reduction turned into time. "cap MACs" counts the rows the engine
really computes (kept counts rounded up to its capacity buckets: a double block's batch
total, a single block's per sample; `capacity_rows`), and "cap eff" divides by that instead: the
part of the gap due to bucketing vs. the part due to the gathered blocks themselves.

`--flux-tdw f` (> 0) adds TDW: the width routers of every block get zero kernels and biases
that switch on ceil(f H) heads and as many MLP groups of each router (the same at every t),
the engine gathers them (width buckets: quarters), and the MACs ratio counts heads and groups
too ("cap MACs" then counts the tokens only at full width: read "MACs" for TDW rows).
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from dydit_jax import flops, flux_sampling
from dydit_jax.engine.flux import FluxEngine
from dydit_jax.models import FLUX
from dydit_jax.models.flux import image_ids


def reduced_flux(hidden: int, depth: int, single: int, dtype, tdw: bool = False) -> FLUX:
    return FLUX(in_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=hidden,
                mlp_ratio=4.0, num_heads=hidden // 128, depth=depth, depth_single_blocks=single,
                axes_dim=(16, 56, 56), dynamic=True, dynamic_width=tdw, dtype=dtype)


def set_widths(model, params, fraction: float):
    """Width routers that switch on ceil(fraction H) of each router's heads / groups."""
    import math
    on = max(1, math.ceil(fraction * model.num_heads - 1e-9))
    bias = np.where(np.arange(model.num_heads - 1) < on - 1, 30.0, -30.0).astype(np.float32)
    params = jax.tree_util.tree_map(lambda a: a, params)
    for name, block in params.items():
        for router in ("head_router", "group_router", "txt_group_router"):
            if router in block:
                block[router] = {"kernel": np.zeros_like(block[router]["kernel"]),
                                 "bias": bias}
    return params


def inputs(batch: int, n_img: int, n_txt: int, seed: int):
    side = int(round(np.sqrt(n_img)))
    if side * side != n_img:
        raise SystemExit(f"--image-tokens must be a square (packed latent side^2), got {n_img}")
    rng = np.random.default_rng(seed)
    return dict(img=rng.standard_normal((batch, n_img, 64)).astype(np.float32),
                img_ids=image_ids(batch, 2 * side, 2 * side),
                txt=rng.standard_normal((batch, n_txt, 4096)).astype(np.float32),
                txt_ids=np.zeros((batch, n_txt, 3), np.float32),
                vec=rng.standard_normal((batch, 768)).astype(np.float32))


def calibrate(model, params, x, keep: float):
    """Router biases so that each block keeps ~`keep` of the image tokens at t = 1."""
    params = jax.tree_util.tree_map(lambda a: a, params)
    b = x["img"].shape[0]
    args = (x["img"], x["img_ids"], x["txt"], x["txt_ids"], np.ones((b,), np.float32),
            x["vec"], np.full((b,), 3.5, np.float32))
    logits_of = jax.jit(lambda p: model.apply({"params": p}, *args)[1]["token_logits"])
    for i in range(model.num_blocks):
        z = np.sort(np.asarray(logits_of(params)[i]).reshape(-1))
        cut = min(max(int(round((1 - keep) * z.size)), 1), z.size - 1)
        threshold = float(z[cut - 1] + z[cut]) / 2
        name = f"double_blocks_{i}" if i < model.depth else f"single_blocks_{i - model.depth}"
        router = params[name]["token_router"]["router"]
        router["bias"] = router["bias"] - threshold
    return params


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - w0, time.process_time() - c0, out


def run(args, meta, write, out_path):
    dtype = jnp.bfloat16 if args.dtypes == ["bfloat16"] else jnp.float32
    tdw = getattr(args, "flux_tdw", 0.0)
    model = reduced_flux(args.flux_hidden, args.flux_depth[0], args.flux_depth[1], dtype,
                         tdw > 0)
    n_img, n_txt = args.image_tokens, args.text_tokens
    results = []
    meta = dict(meta, flux=dict(hidden=args.flux_hidden, heads=model.num_heads,
                                depth=args.flux_depth, image_tokens=n_img, text_tokens=n_txt,
                                guidance=3.5, sampler=f"euler-{args.steps}",
                                tdw_width=tdw or None))
    static_macs = flops.flux_macs(model, n_img, n_txt)["total"]
    spec = args.token_capacities
    capacities = None if spec == ["engine"] else tuple(float(f) for f in spec)
    meta["flux"]["token_capacities"] = "FLUX_CAPACITIES (sixteenths)" if capacities is None \
        else capacities
    for batch in args.batches:
        x = inputs(batch, n_img, n_txt, args.seed)
        schedule = flux_sampling.get_schedule(args.steps, n_img)
        params = model.init(jax.random.PRNGKey(args.seed),
                            *model.dummy_inputs(1, image_tokens=4, text_tokens=2))["params"]
        variants = {}

        def sampler(route: bool):
            def velocity_model(p):
                return functools.partial(model.apply, {"params": p}, route=route)

            @jax.jit
            def run_fn(p, img, ts):
                wrapped = _Wrapped(velocity_model(p), model.guidance_embed)
                return flux_sampling.denoise(wrapped, None, img, x["img_ids"], x["txt"],
                                             x["txt_ids"], x["vec"], ts, guidance=3.5)
            return run_fn

        static_fn = sampler(False)
        t0 = time.perf_counter()
        static_fn.lower(params, x["img"], schedule).compile()
        variants["static"] = dict(fn=lambda: static_fn(params, x["img"], schedule),
                                  compile_s=time.perf_counter() - t0, macs=1.0, keep=1.0)
        for keep in args.token_keep:
            p = set_widths(model, params, tdw) if tdw else params
            p = calibrate(model, p, x, keep)
            masked_fn = sampler(True)
            t0 = time.perf_counter()
            masked_fn.lower(p, x["img"], schedule).compile()
            variants[f"masked{round(keep * 100)}"] = dict(
                fn=functools.partial(masked_fn, p, x["img"], schedule),
                compile_s=time.perf_counter() - t0, macs=1.0, keep=keep)
            eng = FluxEngine(model, {"params": p}, capacities)
            t0 = time.perf_counter()
            _, kept = eng.denoise(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["vec"],
                                  schedule, guidance=3.5)
            per_sample = np.asarray(kept).mean(axis=(0, 2))
            cap_kept = capacity_rows(model, np.asarray(kept), eng.capacities, n_img)
            width = ({k: np.asarray(v).mean(axis=0) for k, v in eng.widths.items()}
                     if eng.widths is not None else {})
            variants[f"engine{round(keep * 100)}"] = dict(
                fn=functools.partial(eng.denoise, x["img"], x["img_ids"], x["txt"],
                                     x["txt_ids"], x["vec"], schedule, 3.5),
                compile_s=time.perf_counter() - t0, keep=keep,
                keep_seen=float(per_sample.mean() / n_img),
                macs=flops.flux_macs_ratio(model, n_img, n_txt, per_sample, **width),
                cap_macs=flops.flux_macs_ratio(model, n_img, n_txt, cap_kept),
                engine=eng)
        times = {name: [] for name in variants}
        for r in range(args.rounds):
            for name, v in variants.items():
                times[name].append(_timed(v["fn"])[:2])
            print(f"[FLUX b{batch}] round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {times[n][-1][0]:.2f}s" for n in variants), flush=True)
        med = {n: np.median(np.asarray(t), axis=0) for n, t in times.items()}
        for name, v in variants.items():
            wall, cpu = med[name]
            row = dict(model=f"FLUX-reduced-{args.flux_hidden}", batch=batch, variant=name,
                       keep_target=v["keep"], keep_seen=v.get("keep_seen"),
                       macs_ratio=v["macs"], wall_s=float(wall), cpu_s=float(cpu),
                       speedup_wall=float(med["static"][0] / wall),
                       speedup_cpu=float(med["static"][1] / cpu),
                       compile_s=v["compile_s"], static_gmacs_per_sample=static_macs / 1e9,
                       executables=(v["engine"].compile_count if "engine" in v else 1))
            if name.startswith("engine"):
                row["efficiency_wall"] = row["speedup_wall"] * v["macs"]
                row["efficiency_cpu"] = row["speedup_cpu"] * v["macs"]
                row["cap_macs_ratio"] = v["cap_macs"]
                row["bucket_efficiency_cpu"] = row["speedup_cpu"] * v["cap_macs"]
            results.append(row)
        write(out_path, meta, results)
    print_table(results)
    return results


def capacity_rows(model, kept, capacities, n_img):
    """Per block, the image rows per sample the engine computed (mean over steps): a double
    block rounds the batch's kept total up to a capacity of B*N, a single block each sample's
    count up to a capacity of N (`engine.flux`). kept: [steps, blocks, B]."""
    from dydit_jax.engine.plan import fraction_sizes
    b = kept.shape[2]
    out = []
    for block in range(kept.shape[1]):
        k = kept[:, block]
        if block < model.depth:
            caps = np.asarray(fraction_sizes(capacities, b * n_img, "token capacity"))
            rows = caps[np.searchsorted(caps, k.sum(axis=1))] / b
        else:
            caps = np.asarray(fraction_sizes(capacities, n_img, "token capacity"))
            rows = caps[np.searchsorted(caps, k)].mean(axis=1)
        out.append(float(np.mean(rows)))
    return out


class _Wrapped:
    """A model-like object whose `apply(None, ...)` calls a bound apply (for `denoise`)."""

    def __init__(self, bound, guidance_embed):
        self.bound, self.guidance_embed = bound, guidance_embed

    def apply(self, _, *args):
        return self.bound(*args)


def print_table(results):
    hdr = ("model", "B", "variant", "keep tgt/seen", "MACs", "cap MACs", "wall s", "cpu s",
           "static/x wall", "static/x cpu", "eff wall / cpu", "cap eff cpu", "exes",
           "compile s")
    print(" | ".join(hdr))
    for r in results:
        seen = f"{r['keep_target']:.2f}/{r['keep_seen']:.3f}" if r["keep_seen"] else "-"
        eff = (f"{r['efficiency_wall']:.2f} / {r['efficiency_cpu']:.2f}"
               if "efficiency_wall" in r else "-")
        cap = f"{r['cap_macs_ratio']:.3f}" if "cap_macs_ratio" in r else "-"
        cap_eff = (f"{r['bucket_efficiency_cpu']:.2f}" if "bucket_efficiency_cpu" in r
                   else "-")
        print(" | ".join([r["model"], str(r["batch"]), r["variant"], seen,
                          f"{r['macs_ratio']:.3f}", cap, f"{r['wall_s']:.2f}",
                          f"{r['cpu_s']:.2f}", f"{r['speedup_wall']:.2f}",
                          f"{r['speedup_cpu']:.2f}", eff, cap_eff, str(r["executables"]),
                          f"{r['compile_s']:.1f}"]), flush=True)
