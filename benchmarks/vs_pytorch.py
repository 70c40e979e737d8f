"""The official PyTorch DiT (facebookresearch/DiT) against dydit_jax, side by side on the CPU.

Same shapes for both codes, float32, 256 px latents (32x32x4, `input_size=32`), 1000 classes,
batch B (`--batch`), synthetic data already in memory. Jobs per model (`--models`):

- forward: `model(x, t, y)` on B rows (torch: `eval()` under `inference_mode`; ours:
  `model.apply(variables, x, t, y)`).
- sample: `--ddim-steps` DDIM steps with classifier-free guidance (scale 4.0) for B samples,
  i.e. 2B model rows per step. Reference: its `create_diffusion(f"ddim{steps}")`,
  `ddim_sample_loop(model.forward_with_cfg, ...)` laid out as its sample.py does (z drawn once
  and duplicated, labels [y; 1000]). Ours: `dydit_jax.diffusion.create_diffusion(f"ddim{steps}")`
  and `dydit_jax.sampling.make_sample_fn(model, diffusion, sampler="ddim")`, the program that
  `fn(variables, jax.random.PRNGKey(0), labels, 4.0)` runs.
- train: the step of the official train.py (t ~ U{0..999}, `training_losses(model, x, t,
  dict(y=y))["loss"].mean()`, `zero_grad`, backward, AdamW(lr=1e-4, weight_decay=0) step, EMA
  update with decay 0.9999; `model.train()`, so label dropout is on) against the package's own
  step (`dydit_jax.train.make_train_step(build_loss_fn(...))`, jitted with the old state
  donated, as `dydit_jax.train` and benchmarks/train_throughput.py compile it). Our model is the
  plain DiT (unscanned, no remat, float32) unless `--scan-layers` / `--remat`.

Method: the torch model is built once per model (seeded), its zero-initialised parameters
(adaLN modulations, final layer) are given small random values so that the forward exercises
every branch, and its `state_dict()` is copied into ours (`dydit_jax.convert.from_pytorch`).
Before timing, the two forwards are checked to agree (max |torch - ours| / max |torch| <=
`--check-tol`, 1e-4), so both codes compute the same thing. Every jax job is compiled ahead of
time (`jax.jit(...).lower(...).compile()`, reported as compile s) and every job of both codes
runs `--warmup` untimed calls (reported as warm-up s). Then `--rounds` rounds: each round runs
every job of one code, then every job of the other, the order of the codes alternating from
round to round, so that load drifts of a shared machine hit both. Each call is timed in wall
seconds (`time.perf_counter`) and in CPU seconds of the process (`time.process_time`, all
threads), jax calls to `jax.block_until_ready` of their outputs (torch on the CPU is
synchronous). Reported: the best of the rounds per job and code, and torch / jax (> 1: ours is
faster) for wall and CPU time. torch runs with `torch.set_num_threads(--threads)` (default
`os.cpu_count()`); jax runs with its defaults (XLA:CPU's own thread pool), on the CPU
(`JAX_PLATFORMS=cpu` unless set). Run it on a quiet machine: with other processes on the
cores, torch's OpenMP team (one thread per core, meeting at barriers) slowed down much more
than XLA's pool in the runs made while writing this (DiT-S/2 batch 2 forward: torch 0.17 ->
0.94 s, ours 0.08 -> 0.14 s, CPU seconds up as well), which inflates torch / jax; the JSON
records the load average at the start and the end.

`--memory`: the train step's memory. Peak RSS cannot be split between two frameworks in one
process, so each code's train step runs in a subprocess of its own (this script with a hidden
`--child torch|jax`): RSS after building the model, the train state and the data, then
`ru_maxrss` after `--memory-steps` steps; reported as the absolute peak and as peak minus that
RSS. For jax also XLA's `compiled.memory_analysis()` of the train step (temp, argument, output,
alias and XLA's peak estimate). Two caveats for reading it: jax's peak also covers the XLA
compilation, which happens after the build (the child also reports `ru_maxrss` just after
compiling); torch's AdamW allocates its two moment buffers in the first step, so its delta
includes them while jax's train state holds them from the start (the train-state size is
reported for both). `--scan-layers` / `--remat` apply to the jax child as well.

`--remat-policies none,full,dots_saveable,...`: extra jax-only train jobs, one per remat
policy, set through `config.model.remat_policy` (a `jax.checkpoint_policies` name, see
`dit.REMAT_POLICIES`: "nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable",
...); "none" is no remat and "full" is remat keeping nothing (= "nothing_saveable"). Each is
compared with torch's train step, and its XLA memory analysis is in the JSON. Skipped with a
message where `config.model` has no `remat_policy` key.

`--dydit-dir DIR`: the released DyDiT code (alibaba-damo-academy/DyDiT; DIR is the folder
holding its models.py, diffusion/ and loss.py): its stage-1 train step (dynamic loss + the
complete model's loss + the FLOPs loss, `dydit_torch_train_job`, written against the release's
train.py API) against ours (`config.dynamic.enabled=True`, the stage-1 objective of
`dydit_jax/dydit_loss.py`), timed the same way in a subprocess (its `models.py` and
`diffusion/` have the module names of the DiT reference's). Skipped with a message when not
given, or when the release cannot be imported or built (the reason is printed and saved).

Nothing of the reference is copied here: `--reference-dir` is a local checkout of
facebookresearch/DiT whose `models.py` and `diffusion/` are imported from `sys.path` at run time.

Install (benchmark-time extras, not dependencies of the package), in the venv that has torch:

    pip install --no-deps timm       # models.py imports timm's PatchEmbed, Attention, Mlp
    pip install pyyaml safetensors   # timm's other imports, if missing (not huggingface_hub)
    git clone https://github.com/facebookresearch/DiT /tmp/DiT   # or any checkout of it

timm imports torchvision when it loads (`timm.data`: datasets and transforms; `timm.layers`:
`FrozenBatchNorm2d`), though DiT only uses timm's PatchEmbed, Attention and Mlp (plain torch).
Install the torchvision that pairs with your torch if there is one for your build (torch 2.13
-> torchvision 0.28, 2.14 -> 0.29). A CPU (`+cpu`) torch needs the CPU build of torchvision:
PyPI's torchvision is built against CUDA torch and fails to import beside it ("operator
torchvision::nms does not exist"); do not let pip replace torch to fix that. Where no working
torchvision can be imported, this script installs a stand-in for the `torchvision` package
(an import hook whose modules hand out placeholder classes that raise if called), so that
timm imports; nothing DiT runs touches torchvision, and the JSON records
`"torchvision": "stand-in"`.

Commands (from the repository root):

    python benchmarks/vs_pytorch.py --reference-dir /tmp/DiT          # DiT-S/2, DiT-B/2, batch 8
    python benchmarks/vs_pytorch.py --reference-dir /tmp/DiT --memory # + peak memory per code
    python benchmarks/vs_pytorch.py --reference-dir /tmp/DiT --scan-layers --remat
    python benchmarks/vs_pytorch.py --reference-dir /tmp/DiT \
        --remat-policies none,full,dots_with_no_batch_dims_saveable,dots_saveable
    python benchmarks/vs_pytorch.py --reference-dir /tmp/DiT --dydit-dir /tmp/DyDiT
    # smoke test (a minute or two on 2 cores):
    python benchmarks/vs_pytorch.py --reference-dir /tmp/DiT --models DiT-S/2 --batch 2 \\
        --rounds 1 --ddim-steps 2 --out /tmp/vs_pytorch_smoke.json
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.machinery
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "results", "vs_pytorch.json")
sys.path.insert(0, ROOT)   # dydit_jax
sys.path.insert(0, HERE)   # forward_throughput (the shared table formatter)
# Both codes on the CPU, whatever else the machine has (set before jax is imported).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

LATENT, CHANNELS, NUM_CLASSES, CFG_SCALE = 32, 4, 1000, 4.0
# --remat-policies names: "none", "full" and the model's policy names (dit.REMAT_POLICIES).
REMAT_POLICIES = ("none", "full", "nothing_saveable", "dots_with_no_batch_dims_saveable",
                  "dots_saveable")


# --------------------------------------------------------------------------------------------
# Importing the reference
# --------------------------------------------------------------------------------------------

class _StandInMeta(type):
    """Placeholder classes: any attribute is another placeholder, calling one raises."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StandInMeta(f"{cls.__name__}.{name}", (), {})

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"torchvision stand-in: {cls.__name__} is not available (no "
                           f"working torchvision is installed)")


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _StandInMeta(f"{self.__name__}.{name}", (), {})
        setattr(self, name, value)
        return value


class _StandInFinder:
    """Meta-path finder and loader: every `torchvision[.x.y]` is a `_StandInModule` package."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        if spec.name == "torchvision":
            module.__version__ = "stand-in"
        return module

    def exec_module(self, module):
        pass


def _ensure_torchvision() -> str:
    """Makes `import torchvision` work for timm; returns its version or "stand-in".

    timm imports torchvision when it loads (`timm.data`: datasets and transforms;
    `timm.layers`: `FrozenBatchNorm2d`), although DiT's models.py only uses timm's PatchEmbed,
    Attention and Mlp, which are plain torch. Where torchvision is missing or broken (PyPI's
    CUDA build beside a CPU torch), a stand-in answers every `torchvision.*` import with
    placeholder classes that raise if ever called; nothing DiT runs touches them.
    """
    try:
        import torchvision
        return torchvision.__version__
    except Exception:  # noqa: BLE001 - missing (ImportError) or broken (RuntimeError)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    sys.meta_path.insert(0, _StandInFinder())
    print("torchvision is not importable here: a stand-in answers timm's torchvision imports "
          "(DiT uses none of them)", flush=True)
    return "stand-in"


def _git_commit(path):
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001 - an archive without .git
        return None


def import_checkout(path, modules):
    """Imports top-level `modules` ("models", "diffusion", ...) from the checkout at `path`.

    Returns {name: module} plus "torchvision" and "commit". The checkout goes first on
    sys.path; each module must come from it (not from an installed package of that name).
    """
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, "models.py")):
        raise FileNotFoundError(f"{path} has no models.py: pass the folder of a checkout "
                                f"that holds models.py and diffusion/ (for DiT: git clone "
                                f"https://github.com/facebookresearch/DiT)")
    tv = _ensure_torchvision()
    sys.path.insert(0, path)
    out = {"torchvision": tv, "commit": _git_commit(path), "path": path}
    for name in modules:
        mod = __import__(name)
        if not os.path.abspath(mod.__file__).startswith(path + os.sep):
            raise ImportError(f"'{name}' was imported from {mod.__file__}, not from {path}")
        out[name] = mod
    return out


# --------------------------------------------------------------------------------------------
# Shared inputs and timing
# --------------------------------------------------------------------------------------------

def make_inputs(batch, seed=0):
    """Synthetic latents (NHWC), timesteps and labels, as numpy (each code converts them)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    return dict(x=rng.standard_normal((batch, LATENT, LATENT, CHANNELS)).astype(np.float32),
                t=rng.integers(0, 1000, (batch,)).astype(np.int64),
                y=rng.integers(0, NUM_CLASSES, (batch,)).astype(np.int64),
                labels=rng.integers(0, NUM_CLASSES, (batch,)).astype(np.int64))


def timed(fn, sync):
    """(wall s, CPU s) of one call; `sync` (jax) blocks until the outputs are computed."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if sync:
        import jax
        jax.block_until_ready(out)
    return time.perf_counter() - t0, time.process_time() - c0


def run_rounds(jobs, rounds, warmup, call=None):
    """jobs: {code: {job: (fn, sync)}}. Warm-up, then interleaved rounds (see the docstring).
    `call(code, job) -> (wall s, CPU s)` times one call (default: `timed` of jobs' entry; the
    worker mode passes one that asks the code's worker process).

    Returns {code: {job: {"warmup_s": [...], "wall_s": [...], "cpu_s": [...]}}}.
    """
    call = call or (lambda code, name: timed(*jobs[code][name]))
    times = {code: {name: {"warmup_s": [], "wall_s": [], "cpu_s": []} for name in js}
             for code, js in jobs.items()}
    codes = list(jobs)
    for code in codes:
        for name in jobs[code]:
            for _ in range(warmup):
                times[code][name]["warmup_s"].append(call(code, name)[0])
            print(f"  warm-up {code} {name}: {sum(times[code][name]['warmup_s']):.2f} s",
                  flush=True)
    for r in range(rounds):
        order = codes if r % 2 == 0 else codes[::-1]
        for code in order:
            for name in jobs[code]:
                wall, cpu = call(code, name)
                times[code][name]["wall_s"].append(wall)
                times[code][name]["cpu_s"].append(cpu)
                print(f"  round {r + 1}/{rounds} {code} {name}: {wall:.3f} s wall, "
                      f"{cpu:.3f} s CPU", flush=True)
    return times


def comparison_rows(name, args, params, torch_jobs, jax_jobs, times, jinfo, **extra):
    """One result row per jax job against the torch job of the same name (the jax-only remat
    policy jobs against torch's "train")."""
    rows = []
    for job in jax_jobs:
        info = jinfo.get(job) or {}
        row = dict(model=name, job=job, batch=args.batch, params=params,
                   images_per_call=args.batch,   # sample: B samples (2B rows per step)
                   torch=_summary(times["torch"][job if job in torch_jobs else "train"]),
                   jax=dict(_summary(times["jax"][job]), **info),
                   flops_per_call=info.get("flops"), **extra)
        row["ratio_wall"] = row["torch"]["best_wall_s"] / row["jax"]["best_wall_s"]
        row["ratio_cpu"] = row["torch"]["best_cpu_s"] / row["jax"]["best_cpu_s"]
        if job not in torch_jobs:
            row["torch_job"] = "train"
        rows.append(row)
    return rows


def _rss_mib():
    """Current resident set size (Linux /proc), else the peak so far."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _maxrss_mib()


def _maxrss_mib():
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / (1024 * 1024) if sys.platform == "darwin" else kib / 1024


# --------------------------------------------------------------------------------------------
# The reference (PyTorch)
# --------------------------------------------------------------------------------------------

def torch_model(ref, name, seed=0):
    """The reference DiT, seeded; its zero-initialised parameters get N(0, 0.02) values.

    DiT zero-initialises the adaLN modulations and the final layer (the model outputs zeros),
    which would make the numerics check vacuous; the values do not change the timings.
    """
    import torch
    torch.manual_seed(seed)
    model = ref["models"].DiT_models[name](input_size=LATENT, num_classes=NUM_CLASSES)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not torch.count_nonzero(p):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model


def update_ema(ema_model, model, decay=0.9999):
    """train.py's update_ema: ema = decay * ema + (1 - decay) * param, over named parameters."""
    import torch
    with torch.no_grad():
        ema = dict(ema_model.named_parameters())
        for name, p in model.named_parameters():
            ema[name].mul_(decay).add_(p.data, alpha=1 - decay)


def torch_train_job(ref, model, inputs):
    """The official train.py's step on a copy of `model` and the batch `inputs`.

    Returns (step, train state bytes); `step()` runs one step and returns the loss tensor.
    """
    import copy

    import torch
    model = copy.deepcopy(model).train()   # train mode: label dropout, as train.py
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    diffusion = ref["diffusion"].create_diffusion(timestep_respacing="")  # 1000 steps, linear
    x = torch.from_numpy(inputs["x"]).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(inputs["y"])
    # Train state: params, EMA and AdamW's two moments (allocated by the first opt.step()).
    state_bytes = 4 * 4 * sum(p.numel() for p in model.parameters())

    def step():
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],))
        loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_ema(ema, model)
        step.loss = loss.detach()
        return loss

    step.loss = None
    return step, state_bytes


def torch_jobs(ref, model, inputs, ddim_steps):
    """{job: (fn, sync=False)} for the reference."""
    import torch
    model = model.eval()
    x = torch.from_numpy(inputs["x"]).permute(0, 3, 1, 2).contiguous()   # NCHW
    t, y = torch.from_numpy(inputs["t"]), torch.from_numpy(inputs["y"])
    b = x.shape[0]

    def forward():
        with torch.inference_mode():
            return model(x, t, y)

    ddim = ref["diffusion"].create_diffusion(f"ddim{ddim_steps}")
    labels = torch.from_numpy(inputs["labels"])
    z = torch.randn(b, CHANNELS, LATENT, LATENT, generator=torch.Generator().manual_seed(0))

    def sample():
        # Laid out as the reference's sample.py: z duplicated, labels [y; null].
        zz = torch.cat([z, z], 0)
        yy = torch.cat([labels, torch.full((b,), NUM_CLASSES, dtype=labels.dtype)], 0)
        with torch.inference_mode():
            out = ddim.ddim_sample_loop(model.forward_with_cfg, zz.shape, zz,
                                        clip_denoised=False,
                                        model_kwargs=dict(y=yy, cfg_scale=CFG_SCALE),
                                        progress=False, device="cpu")
        return out[:b]

    train_step, _ = torch_train_job(ref, model, inputs)
    return {"forward": (forward, False), "sample": (sample, False), "train": (train_step, False)}


# --------------------------------------------------------------------------------------------
# Ours (JAX)
# --------------------------------------------------------------------------------------------

def jax_config(name, batch, scan_layers=False, remat=False, dynamic=False, remat_policy=None):
    """The package's ImageNet-256 latent config with synthetic data, float32, B = `batch`.

    `remat_policy`: the hook for `config.model.remat_policy` (what a rematerialised block
    keeps: a `jax.checkpoint_policies` name, `dit.REMAT_POLICIES`). Here "none" means no remat
    and "full" remat that keeps nothing ("nothing_saveable"); any other name turns remat on
    with that policy. Returns None when the config has no such key.
    """
    from dydit_jax import config_lib
    config = config_lib.imagenet_config(
        name, f"data=synthetic,batch={batch},dtype=float32,steps=1000")
    # imagenet_config scans and rematerialises (memory at scale); the default here is the
    # plain DiT, as the reference runs it.
    config.model.update(scan_layers=scan_layers, remat=remat)
    if remat_policy is not None:
        if "remat_policy" not in config.model:
            return None
        if remat_policy == "none":
            config.model.remat = False
        else:
            config.model.update(remat=True, remat_policy="nothing_saveable"
                                if remat_policy == "full" else remat_policy)
    config.dynamic.enabled = dynamic          # stage 1 by default (config.dynamic.stage)
    config_lib.validate(config)
    return config


def memory_stats(compiled):
    """The int fields of XLA's `memory_analysis()` (bytes), plus temp + argument + output."""
    try:
        stats = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001 - not every backend has it
        return {"unavailable": str(e)}
    if stats is None:
        return {"unavailable": "memory_analysis() returned None"}
    out = {k: getattr(stats, k) for k in dir(stats)
           if not k.startswith("_") and isinstance(getattr(stats, k), int)}
    if {"temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"} <= set(out):
        out["temp_plus_argument_plus_output_bytes"] = (out["temp_size_in_bytes"]
                                                       + out["argument_size_in_bytes"]
                                                       + out["output_size_in_bytes"])
    return out


def jax_train_job(config, inputs, variables=None, on_built=None):
    """The package's train step for `config`, compiled with the old state donated.

    `variables`: {"params": ...} to start from (else the fresh init). `on_built()` is called
    once the train state and the batch exist, before compiling (the memory child reads the
    RSS there). Returns
    (fn, info) with info = compile_s, memory (XLA), flops (cost analysis), state_bytes, and
    fn() running one step (keeping the donated state in a closure).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dydit_jax import train
    from forward_throughput import _flops

    model = train.build_model(config)
    diffusion = train.build_diffusion(config)
    tx = train.build_optimizer(config.train)
    state = jax.jit(lambda k: train.init_state(model, tx, k))(jax.random.PRNGKey(config.seed))
    if variables is not None:
        # Copies: the step donates its state, and `variables` also serve forward and sample.
        params = jax.tree_util.tree_map(jnp.copy, variables["params"])
        state = dict(state, params=params, ema=jax.tree_util.tree_map(jnp.copy, params),
                     opt_state=jax.jit(tx.init)(params))
    batch = jax.block_until_ready(
        jax.device_put({"image": inputs["x"], "label": inputs["y"].astype(np.int32)}))
    if on_built is not None:
        on_built(state)
    step = jax.jit(train.make_train_step(train.build_loss_fn(config, model, diffusion), tx,
                                         config.train.ema_decay), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    info = dict(compile_s=time.perf_counter() - t0, memory=memory_stats(compiled),
                # Cost analysis counts a scanned loop body once: only the unrolled count is kept.
                flops=None if config.model.scan_layers else _flops(compiled),
                state_bytes=sum(a.nbytes for a in jax.tree_util.tree_leaves(state)))
    holder = {"state": state, "metrics": None}

    def fn():
        holder["state"], holder["metrics"] = compiled(holder["state"], batch)
        return holder["state"], holder["metrics"]

    fn.holder = holder
    return fn, info


def jax_jobs(name, args, inputs, torch_state_dict, torch_forward_out):
    """{job: (fn, sync=True)} for ours, with {job: info} (compile s, flops, memory)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dydit_jax import convert, train
    from dydit_jax.diffusion import create_diffusion
    from dydit_jax.sampling import make_sample_fn
    from forward_throughput import _flops

    config = jax_config(name, args.batch, args.scan_layers, args.remat)
    model = train.build_model(config)
    variables = convert.from_pytorch(torch_state_dict, model)
    x = jnp.asarray(inputs["x"])
    t = jnp.asarray(inputs["t"].astype(np.int32))
    y = jnp.asarray(inputs["y"].astype(np.int32))
    jobs, info = {}, {}

    t0 = time.perf_counter()
    fwd = jax.jit(lambda v, x, t, y: model.apply(v, x, t, y)).lower(variables, x, t, y).compile()
    info["forward"] = dict(compile_s=time.perf_counter() - t0, flops=_flops(fwd))
    jobs["forward"] = (lambda: fwd(variables, x, t, y), True)

    # Same weights, same inputs: the two codes must compute the same forward.
    ours = np.asarray(fwd(variables, x, t, y))
    theirs = torch_forward_out.transpose(0, 2, 3, 1)          # NCHW -> NHWC
    rel = float(np.max(np.abs(ours - theirs)) / max(float(np.max(np.abs(theirs))), 1e-30))
    print(f"  numerics: max |torch - jax| / max |torch| = {rel:.2e} (tolerance "
          f"{args.check_tol:g})", flush=True)
    if args.check_tol > 0 and not rel <= args.check_tol:
        raise SystemExit(f"{name}: the forwards differ ({rel:.2e} > {args.check_tol:g}): the "
                         f"timings would not compare the same computation")
    info["forward"]["max_rel_diff_vs_torch"] = rel

    # Sampling: the program `fn(variables, key, labels, 4.0)` runs, called through its
    # ahead-of-time compiled executable so that the compile is timed and paid once (a
    # `jax.jit` call does not reuse an AOT compile). The arguments are normalised as fn does.
    fn = make_sample_fn(model, create_diffusion(f"ddim{args.ddim_steps}"), sampler="ddim")
    key, labels = jax.random.PRNGKey(0), jnp.asarray(inputs["labels"].astype(np.int32))
    cfg = np.float32(CFG_SCALE)
    t0 = time.perf_counter()
    sample = fn.jitted.lower(variables, key, labels, cfg).compile()
    info["sample"] = dict(compile_s=time.perf_counter() - t0, flops=None)
    jobs["sample"] = (lambda: sample(variables, key, labels, cfg), True)

    train_fn, info["train"] = jax_train_job(config, inputs, variables)
    jobs["train"] = (train_fn, True)

    for policy in args.remat_policies:
        pconfig = jax_config(name, args.batch, args.scan_layers, args.remat, remat_policy=policy)
        if pconfig is None:   # main() has said why
            continue
        job = f"train[remat_policy={policy}]"
        fn_p, info[job] = jax_train_job(pconfig, inputs, variables)
        jobs[job] = (fn_p, True)
    return jobs, info


# --------------------------------------------------------------------------------------------
# One model, both codes
# --------------------------------------------------------------------------------------------

def bench_model(name, args, ref):
    import numpy as np
    import torch

    inputs = make_inputs(args.batch, args.seed)
    t0 = time.perf_counter()
    tmodel = torch_model(ref, name, args.seed)
    n_params = sum(p.numel() for p in tmodel.parameters())
    with torch.inference_mode():
        x = torch.from_numpy(inputs["x"]).permute(0, 3, 1, 2).contiguous()
        t_out = tmodel.eval()(x, torch.from_numpy(inputs["t"]),
                              torch.from_numpy(inputs["y"])).numpy()
    tjobs = torch_jobs(ref, tmodel, inputs, args.ddim_steps)
    print(f"{name}: {n_params:,} parameters, torch built in {time.perf_counter() - t0:.1f} s",
          flush=True)
    jjobs, jinfo = jax_jobs(name, args, inputs, tmodel.state_dict(), t_out)
    for job, i in jinfo.items():
        if i:
            print(f"  jax compile {job}: {i['compile_s']:.1f} s", flush=True)
    if "memory" in jinfo["train"]:
        print("  jax train step memory_analysis (bytes): "
              + ", ".join(f"{k}={v:,}" for k, v in jinfo["train"]["memory"].items()
                          if isinstance(v, int)), flush=True)

    times = run_rounds({"torch": tjobs, "jax": jjobs}, args.rounds, args.warmup)
    # A diverged step is not a timing: check the last losses (outside the timed calls).
    losses = {"torch": tjobs["train"][0].loss}
    losses.update({f"jax {job}": fn.holder["metrics"]["loss"]
                   for job, (fn, _) in jjobs.items() if job.startswith("train")})
    for code, loss in losses.items():
        if not np.isfinite(float(loss)):
            raise FloatingPointError(f"{name} {code}: non-finite training loss")

    rows = comparison_rows(name, args, n_params, tjobs, jjobs, times, jinfo)
    del tjobs, jjobs
    gc.collect()
    return rows


def _summary(t):
    return dict(best_wall_s=min(t["wall_s"]), best_cpu_s=min(t["cpu_s"]),
                median_wall_s=statistics.median(t["wall_s"]),
                median_cpu_s=statistics.median(t["cpu_s"]),
                wall_s=t["wall_s"], cpu_s=t["cpu_s"], warmup_s=t["warmup_s"])


# --------------------------------------------------------------------------------------------
# Isolated timing: one long-lived worker process per code (the default)
# --------------------------------------------------------------------------------------------

def _worker(code, name, args, conn):
    """A worker process holding one code's jobs for `name`; answers "job" -> (wall, CPU s).

    torch builds the reference model, saves its weights and forward output for the jax worker
    (same weights, numerics check), then serves; jax loads them, compiles, then serves. Each
    process imports only its own framework (the weights travel as an .npz file)."""
    try:
        inputs = make_inputs(args.batch, args.seed)
        if code == "torch":
            import numpy as np
            import torch
            torch.set_num_threads(args.threads)
            ref = import_checkout(args.reference_dir, ("models", "diffusion"))
            tmodel = torch_model(ref, name, args.seed)
            with torch.inference_mode():
                x = torch.from_numpy(inputs["x"]).permute(0, 3, 1, 2).contiguous()
                out = tmodel.eval()(x, torch.from_numpy(inputs["t"]),
                                    torch.from_numpy(inputs["y"])).numpy()
            np.savez(args.weights_path, **{k: v.numpy() for k, v in tmodel.state_dict().items()})
            np.save(args.weights_path + ".out.npy", out)
            jobs, info = torch_jobs(ref, tmodel, inputs, args.ddim_steps), {}
            extra = dict(params=sum(p.numel() for p in tmodel.parameters()))
        else:
            import numpy as np
            with np.load(args.weights_path) as f:
                state_dict = dict(f)
            out = np.load(args.weights_path + ".out.npy")
            jobs, info = jax_jobs(name, args, inputs, state_dict, out)
            del state_dict
            gc.collect()
            extra = {}
        conn.send(("ready", dict(info=info, **extra)))
        while True:
            job = conn.recv()
            if job is None:
                break
            fn, sync = jobs[job]
            result = timed(fn, sync)
            if job.startswith("train"):   # a diverged step is not a timing
                loss = fn.loss if code == "torch" else fn.holder["metrics"]["loss"]
                if not np.isfinite(float(loss)):
                    raise FloatingPointError(f"{name} {code} {job}: non-finite loss")
            conn.send(("timed", result))
    except BaseException as e:  # noqa: BLE001 - report to the parent, then exit
        import traceback
        conn.send(("error", f"{code} worker: {type(e).__name__}: {e}\n"
                            f"{traceback.format_exc()}"))
    finally:
        conn.close()


def bench_model_isolated(name, args):
    """As `bench_model`, each code in a worker process of its own, both alive throughout.

    Why: in one process the two frameworks share glibc's allocator and the address space, and
    XLA's large per-step temporary buffers then page-faulted several times more expensively
    after torch had run (DiT-B/2 batch 8 train step: 6.3 s in the shared process, 3.7 s alone,
    the difference all system time: 7.0 s against 1.2 s per step). A user runs one framework
    per process; so does this comparison. Rounds still alternate the codes."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        args.weights_path = os.path.join(tmp, "weights.npz")
        workers, ready = {}, {}
        for code in ("torch", "jax"):   # torch first: it writes the weights jax loads
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(code, name, args, child), daemon=True)
            proc.start()
            child.close()
            kind, payload = parent.recv()
            if kind == "error":
                raise RuntimeError(payload)
            workers[code], ready[code] = (proc, parent), payload
        jobs = {"torch": dict.fromkeys(("forward", "sample", "train")),
                "jax": dict.fromkeys(ready["jax"]["info"])}

        def call(code, job):
            conn = workers[code][1]
            conn.send(job)
            kind, payload = conn.recv()
            if kind == "error":
                raise RuntimeError(payload)
            return payload

        times = run_rounds(jobs, args.rounds, args.warmup, call=call)
        for proc, conn in workers.values():
            conn.send(None)
            proc.join(timeout=60)
    return comparison_rows(name, args, ready["torch"]["params"], jobs["torch"], jobs["jax"],
                           times, ready["jax"]["info"], processes="one per code")


# --------------------------------------------------------------------------------------------
# Subprocesses: --memory (one per code) and --dydit-dir
# --------------------------------------------------------------------------------------------

def memory_child(args):
    """--child torch|jax: RSS after building the train step's model, state and data, then the
    peak RSS after `--memory-steps` steps. Imports only the code it measures."""
    name = args.models[0]
    inputs = make_inputs(args.batch, args.seed)
    out = dict(model=name, code=args.child, batch=args.batch, steps=args.memory_steps,
               rss_at_start_mib=_rss_mib())
    if args.child == "torch":
        import torch
        torch.set_num_threads(args.threads)
        ref = import_checkout(args.reference_dir, ("models", "diffusion"))
        model = torch_model(ref, name, args.seed)
        step, state_bytes = torch_train_job(ref, model, inputs)
        del model                      # torch_train_job trains a copy
        gc.collect()
        out.update(rss_after_build_mib=_rss_mib(), maxrss_after_build_mib=_maxrss_mib())
        sync = False
    else:
        def on_built(state):
            gc.collect()
            out.update(rss_after_build_mib=_rss_mib(), maxrss_after_build_mib=_maxrss_mib())

        config = jax_config(name, args.batch, args.scan_layers, args.remat)
        step, info = jax_train_job(config, inputs, on_built=on_built)
        state_bytes = info["state_bytes"]
        out.update(maxrss_after_compile_mib=_maxrss_mib(), compile_s=info["compile_s"],
                   xla_memory_analysis=info["memory"])
        sync = True
    out["step_s"] = [timed(step, sync)[0] for _ in range(args.memory_steps)]
    out.update(peak_rss_mib=_maxrss_mib(), train_state_mib=state_bytes / 2**20)
    out["delta_mib"] = out["peak_rss_mib"] - out["rss_after_build_mib"]
    return out


def dydit_torch_train_job(ref, name, inputs, seed=0):
    """A stage-1 step of the DyDiT release (its train.py): the dynamic loss, the complete
    model's loss and the FLOPs loss (target 1.0: the first 100 steps, as ours at step 0).

    Written against the release's API (models.DiT_models, diffusion.training_losses returning
    (losses, attn masks, mlp masks, token masks), loss.DynamicLoss); the release also clips
    gradients, which our default config does not (grad_clip=0), so that is left out.
    """
    import copy

    import torch
    torch.manual_seed(seed)
    model = ref["models"].DiT_models[name](input_size=LATENT, num_classes=NUM_CLASSES).train()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    diffusion = ref["diffusion"].create_diffusion(timestep_respacing="")
    flops_loss = ref["loss"].DynamicLoss(token_target_ratio=1.0, token_loss_ratio=2.0,
                                         token_minimal=0.0, token_minimal_weight=0.0,
                                         model_name=name, model_depth=model.depth)
    x = torch.from_numpy(inputs["x"]).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(inputs["y"])

    def step():
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],))
        losses, attn_masks, mlp_masks, token_masks = diffusion.training_losses(
            model, x, t, dict(y=y))
        l_flops, _ = flops_loss(attn_masks, mlp_masks, token_masks)
        loss = (losses["loss"].mean() + (losses["complete_mse"] + losses["complete_vb"]).mean()
                + l_flops)
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_ema(ema, model)
        return loss

    return step, model


def dydit_child(args):
    """--child dydit: the release's stage-1 train step against ours, interleaved as the main
    benchmark. A separate process: the release's models.py / diffusion/ would shadow the DiT
    reference's modules of the same names."""
    import torch
    torch.set_num_threads(args.threads)
    name = args.models[0]
    inputs = make_inputs(args.batch, args.seed)
    try:
        ref = import_checkout(args.dydit_dir, ("models", "diffusion", "loss"))
        tstep, tmodel = dydit_torch_train_job(ref, name, inputs, args.seed)
    except Exception as e:  # noqa: BLE001 - an optional part: report, do not fail the run
        return dict(model=name, skipped=f"the DyDiT release at {args.dydit_dir} could not be "
                                        f"imported or built ({type(e).__name__}: {e})")
    from dydit_jax import convert, train
    config = jax_config(name, args.batch, args.scan_layers, args.remat, dynamic=True)
    try:   # the same starting weights, where our converter reads the release's layout
        variables = convert.from_pytorch(tmodel.state_dict(), train.build_model(config))
        weights = "the release's init, converted"
    except Exception as e:  # noqa: BLE001
        variables, weights = None, f"fresh init (conversion failed: {type(e).__name__})"
    jfn, info = jax_train_job(config, inputs, variables)
    times = run_rounds({"torch": {"train_stage1": (tstep, False)},
                        "jax": {"train_stage1": (jfn, True)}}, args.rounds, args.warmup)
    row = dict(model=name, job="dydit train stage 1", batch=args.batch, images_per_call=args.batch,
               weights=weights, torch=_summary(times["torch"]["train_stage1"]),
               jax=dict(_summary(times["jax"]["train_stage1"]), **info), flops_per_call=None)
    row["ratio_wall"] = row["torch"]["best_wall_s"] / row["jax"]["best_wall_s"]
    row["ratio_cpu"] = row["torch"]["best_cpu_s"] / row["jax"]["best_cpu_s"]
    return row


def run_child(kind, args, name):
    """Runs this script with `--child kind` for one model; returns its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "child.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--child-out", out,
               "--models", name, "--batch", str(args.batch), "--threads", str(args.threads),
               "--seed", str(args.seed), "--memory-steps", str(args.memory_steps),
               "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
        if args.reference_dir:
            cmd += ["--reference-dir", args.reference_dir]
        if args.dydit_dir:
            cmd += ["--dydit-dir", args.dydit_dir]
        cmd += ["--scan-layers"] * args.scan_layers + ["--remat"] * args.remat
        print(f"[child {kind} {name}]", flush=True)
        proc = subprocess.run(cmd)
        if proc.returncode or not os.path.exists(out):
            return dict(model=name, code=kind, error=f"child exited with {proc.returncode}")
        with open(out) as f:
            return json.load(f)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------

def markdown(headers, rows):
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def per_code_table(rows):
    """Each code's timings in the format of benchmarks/forward_throughput.py (medians over the
    rounds; GFLOP/s from XLA's cost analysis of our program, the same count for torch)."""
    from forward_throughput import format_table
    detail = []
    for r in rows:
        for code in ("torch", "jax"):
            if code == "torch" and r.get("torch_job"):
                continue  # torch's train step is listed once, under "train"
            s, flops = r[code], r.get("flops_per_call")
            detail.append(dict(
                job=f"{r['model']} {r['job']} ({code})", batch=r["batch"], dtype="float32",
                images_per_s=r["images_per_call"] / s["median_wall_s"],
                median_s=s["median_wall_s"], min_s=min(s["wall_s"]), max_s=max(s["wall_s"]),
                gflops_per_s=None if flops is None else flops / s["median_wall_s"] / 1e9,
                compile_s=s.get("compile_s", 0.0)))   # torch runs eagerly: nothing to compile
    return format_table(detail, first="job")


def comparison_table(rows):
    headers = ["model", "job", "batch", "torch s (best)", "jax s (best)", "torch/jax wall",
               "torch CPU s", "jax CPU s", "torch/jax CPU", "jax compile s",
               "warm-up s torch / jax"]
    body = []
    for r in rows:
        t, j = r["torch"], r["jax"]
        job = r["job"] + (f" (vs torch {r['torch_job']})" if r.get("torch_job") else "")
        body.append([r["model"], job, r["batch"], f"{t['best_wall_s']:.3f}",
                     f"{j['best_wall_s']:.3f}", f"{r['ratio_wall']:.2f}",
                     f"{t['best_cpu_s']:.2f}", f"{j['best_cpu_s']:.2f}",
                     f"{r['ratio_cpu']:.2f}", f"{j.get('compile_s', float('nan')):.1f}",
                     f"{sum(t['warmup_s']):.2f} / {sum(j['warmup_s']):.2f}"])
    return markdown(headers, body)


def memory_table(results):
    headers = ["model", "code", "RSS after build MiB", "peak RSS MiB", "peak - build MiB",
               "train state MiB", "jax peak after compile MiB", "XLA temp+arg+out MiB",
               "XLA alias MiB", "XLA peak MiB"]
    mib = lambda b: "-" if b is None else f"{b / 2**20:.0f}"  # noqa: E731
    body = []
    for r in results:
        if "error" in r:
            body.append([r["model"], r["code"], r["error"]] + ["-"] * 7)
            continue
        xla = r.get("xla_memory_analysis") or {}
        after_compile = r.get("maxrss_after_compile_mib")
        body.append([r["model"], r["code"], f"{r['rss_after_build_mib']:.0f}",
                     f"{r['peak_rss_mib']:.0f}", f"{r['delta_mib']:.0f}",
                     f"{r['train_state_mib']:.0f}",
                     "-" if after_compile is None else f"{after_compile:.0f}",
                     mib(xla.get("temp_plus_argument_plus_output_bytes")),
                     mib(xla.get("alias_size_in_bytes")), mib(xla.get("peak_memory_in_bytes"))])
    return markdown(headers, body)


def _portable_args(args):
    """The arguments for the JSON: paths inside the repository relative to it, no temporary
    paths (the results must not name this machine's directories)."""
    out = {k: v for k, v in vars(args).items() if k != "weights_path"}
    if out.get("out") and os.path.abspath(out["out"]).startswith(ROOT + os.sep):
        out["out"] = os.path.relpath(os.path.abspath(out["out"]), ROOT)
    return out


def environment(args, ref):
    import torch

    from forward_throughput import environment as jax_environment
    env = jax_environment()
    try:
        import timm
        timm_version = timm.__version__
    except Exception:  # noqa: BLE001
        timm_version = None
    env.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
               timm=timm_version, torchvision=ref["torchvision"] if ref else None,
               reference_dir=ref["path"] if ref else None,
               reference_commit=ref["commit"] if ref else None,
               dydit_dir=args.dydit_dir, loadavg_1_5_15=os.getloadavg(),
               glibc_tunables=os.environ.get("GLIBC_TUNABLES"))
    return env


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference-dir", help="a local checkout of facebookresearch/DiT "
                                           "(models.py and diffusion/ are imported from it)")
    p.add_argument("--models", nargs="+", default=["DiT-S/2", "DiT-B/2"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ddim-steps", type=int, default=10, help="DDIM steps of the sample job")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (best of them reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per job (after compile)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scan-layers", action="store_true", help="ours: nn.scan over the blocks")
    p.add_argument("--remat", action="store_true", help="ours: rematerialise each block")
    p.add_argument("--remat-policies", nargs="*", default=[],
                   help=f"extra jax train jobs, one per remat policy (comma or space "
                        f"separated): none (no remat), full (= nothing_saveable) or a "
                        f"config.model.remat_policy name ({', '.join(REMAT_POLICIES[2:])}, ...)")
    p.add_argument("--check-tol", type=float, default=1e-4,
                   help="max |torch - jax| / max |torch| of the forwards (0: do not check)")
    p.add_argument("--memory", action="store_true",
                   help="also measure the train step's memory, one subprocess per code")
    p.add_argument("--memory-steps", type=int, default=3, help="train steps of --memory")
    p.add_argument("--no-timing", action="store_true", help="skip the timed comparison")
    p.add_argument("--same-process", action="store_true",
                   help="time both codes in this one process (default: one worker process "
                        "per code, see bench_model_isolated)")
    p.add_argument("--dydit-dir", default=None,
                   help="the released DyDiT code (the folder with its models.py, diffusion/, "
                        "loss.py): also time its stage-1 train step against ours")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON results ('' to skip)")
    p.add_argument("--child", choices=("torch", "jax", "dydit"), help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.remat_policies = [x for a in args.remat_policies for x in a.split(",") if x.strip()]

    if args.child:   # inside a subprocess
        result = dydit_child(args) if args.child == "dydit" else memory_child(args)
        with open(args.child_out, "w") as f:
            json.dump(result, f)
        return result

    if not args.reference_dir:
        p.error("--reference-dir is required: a checkout of facebookresearch/DiT")
    from dydit_jax.models import DiT_models
    for name in args.models:
        if name not in DiT_models:
            p.error(f"unknown model {name!r}; choose from {sorted(DiT_models)}")

    import torch
    torch.set_num_threads(args.threads)
    ref = import_checkout(args.reference_dir, ("models", "diffusion"))
    policies_status = None
    if args.remat_policies and jax_config(args.models[0], args.batch,
                                          remat_policy="none") is None:
        policies_status = ("skipped: config.model has no remat_policy key yet (the model "
                           "does not take a checkpoint policy)")
        print(f"--remat-policies {','.join(args.remat_policies)}: {policies_status}", flush=True)
        args.remat_policies = []
    from dydit_jax.models import dit
    known = ("none", "full") + tuple(getattr(dit, "REMAT_POLICIES", REMAT_POLICIES[2:]))
    for policy in args.remat_policies:
        if policy not in known:
            p.error(f"unknown remat policy {policy!r}; choose from {known}")
    env_start = os.getloadavg()

    rows = []
    if not args.no_timing:
        for name in args.models:
            rows += (bench_model(name, args, ref) if args.same_process
                     else bench_model_isolated(name, args))
    memory = [run_child(code, args, name) for name in args.models
              for code in ("torch", "jax")] if args.memory else None
    if args.dydit_dir:
        dydit = [run_child("dydit", args, name) for name in args.models]
    else:
        dydit = "skipped: no --dydit-dir (a checkout of the DyDiT release) given"
        print(f"DyDiT stage-1 train step: {dydit}", flush=True)

    print()
    if rows:
        print(f"torch {torch.__version__} ({torch.get_num_threads()} threads) vs jax, float32, "
              f"CPU; best of {args.rounds} round(s); torch/jax > 1: jax faster; "
              f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}\n")
        print(comparison_table(rows))
        print("\nPer code (medians over the rounds; torch runs eagerly: compile 0):\n")
        print(per_code_table(rows))
    if isinstance(dydit, list):
        timed_rows = [r for r in dydit if "ratio_wall" in r]
        for r in dydit:
            if "ratio_wall" not in r:
                print(f"\nDyDiT {r['model']}: {r.get('skipped') or r.get('error')}")
        if timed_rows:
            print("\nDyDiT stage-1 train step, the release vs ours:\n")
            print(comparison_table(timed_rows))
    if memory:
        print(f"\nTrain step memory ({args.memory_steps} steps, one process per code):\n")
        print(memory_table(memory))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        env = environment(args, ref)
        env["loadavg_1_5_15_start"] = env_start
        with open(args.out, "w") as f:
            json.dump(dict(command=" ".join([os.path.basename(sys.executable)] + sys.argv),
                           date=datetime.datetime.now(datetime.timezone.utc)
                           .isoformat(timespec="seconds"),
                           environment=env, args=_portable_args(args), results=rows,
                           memory=memory,
                           dydit=dydit, remat_policies=policies_status or args.remat_policies),
                      f, indent=1)
        print(f"\nwrote {args.out}")
    return dict(results=rows, memory=memory, dydit=dydit)


if __name__ == "__main__":
    # The allocator settings `python -m dydit_jax.main` runs with (dydit_jax/cpu_env.py), for
    # both codes alike (the workers inherit them); DYDIT_JAX_MALLOC_TUNABLES=0 to compare
    # without them.
    from dydit_jax import cpu_env
    cpu_env.reexec_with_malloc_tunables()
    main()
