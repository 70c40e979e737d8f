"""Host memory of the streaming FLUX conversion (`convert_flux.stream_to_orbax`).

Writes a synthetic FLUX checkpoint in the BFL layout (FLUX.1-dev widths: hidden 3072, 24
heads, T5/CLIP inputs 4096/768; `--double` + `--single` blocks, default 1 + 5: 4.4 GB in
float32) with random values, then converts it to orbax in a fresh process and reports that
process's peak RSS (ru_maxrss) above its RSS just before the conversion (imports, JAX and the
model's abstract shapes already loaded), next to the file size and the largest block.
Target: < 1.5 GB of extra host memory for a 4 GB file. Items of `stream_to_orbax`'s default
256 MiB. Writes a table and JSON
(results/convert_memory.json).

    python benchmarks/convert_memory.py --workdir /tmp/convert_memory
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONVERT = r"""
import json, os, resource, sys, time
import jax
from dydit_jax import convert_flux
from dydit_jax.models import FLUX
cfg = json.loads(sys.argv[1])
model = FLUX(**cfg["model"])
from dydit_jax import convert
convert._abstract_params(model)              # shapes only; also warms the tracing caches
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB -> GiB
current = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
t0 = time.perf_counter()
convert_flux.stream_to_orbax(cfg["file"], model, cfg["out"], overwrite=True)
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps(dict(rss_before_gib=current, peak_before_gib=before, peak_gib=peak,
                      extra_gib=peak - max(before, current), seconds=wall)))
"""

WRITE = r"""
import json, sys
import numpy as np
from safetensors.numpy import save_file
import jax
from flax import traverse_util
from dydit_jax import convert, convert_flux
from dydit_jax.models import FLUX
cfg = json.loads(sys.argv[1])
model = FLUX(**cfg["model"])
flat = traverse_util.flatten_dict(convert._abstract_params(model))
rng = np.random.default_rng(0)
state, biggest, groups = {}, 0, {}
for path, leaf in flat.items():
    shape = leaf.shape[::-1] if path[-1] == "kernel" else leaf.shape
    key = convert_flux.flax_to_bfl_key(path)
    state[key] = (rng.standard_normal(shape, dtype=np.float32) * 0.02)
    g = ".".join(key.split(".")[:2]) if key.startswith(("double_blocks.", "single_blocks.")) \
        else "rest"
    groups[g] = groups.get(g, 0) + state[key].nbytes
save_file(state, cfg["file"])
print(json.dumps(dict(bytes=sum(v.nbytes for v in state.values()),
                      largest_tensor=max(v.nbytes for v in state.values()),
                      largest_group=max(groups.values()))))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/convert_memory")
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "convert_memory.json"))
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    model = dict(in_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                 num_heads=24, depth=args.double, depth_single_blocks=args.single,
                 axes_dim=[16, 56, 56], guidance_embed=True)
    cfg = dict(model=model, file=os.path.join(args.workdir, "flux-synthetic.safetensors"),
               out=os.path.join(args.workdir, "converted"))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    wrote = json.loads(subprocess.run([sys.executable, "-c", WRITE, json.dumps(cfg)],
                                      check=True, capture_output=True, text=True,
                                      env=env).stdout.strip().splitlines()[-1])
    write_s = time.perf_counter() - t0
    run = json.loads(subprocess.run([sys.executable, "-c", CONVERT, json.dumps(cfg)],
                                    check=True, capture_output=True, text=True,
                                    env=env).stdout.strip().splitlines()[-1])
    gib = 2 ** 30
    rows = [("file (float32)", f"{wrote['bytes'] / gib:.2f} GiB"),
            ("largest tensor", f"{wrote['largest_tensor'] / gib:.3f} GiB"),
            ("largest block", f"{wrote['largest_group'] / gib:.3f} GiB"),
            ("RSS before conversion", f"{run['rss_before_gib']:.2f} GiB"),
            ("peak RSS during conversion", f"{run['peak_gib']:.2f} GiB"),
            ("extra host memory (peak - before)", f"{run['extra_gib']:.2f} GiB"),
            ("conversion time", f"{run['seconds']:.1f} s"),
            ("writing the synthetic file", f"{write_s:.1f} s")]
    print("| what | value |\n|---|---|")
    for what, value in rows:
        print(f"| {what} | {value} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(command="python " + " ".join(sys.argv), model=model, written=wrote,
                       conversion=run, write_seconds=write_s, target_extra_gib=1.5), f,
                  indent=1)


if __name__ == "__main__":
    main()
