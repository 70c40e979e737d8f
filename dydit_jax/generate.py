"""The sample mode: load weights, sample N images per class, write a PNG grid and an `.npz`.

Weights come from `config.sample.checkpoint`: empty for the workdir's latest training
checkpoint (EMA by default), an orbax params directory (the converter's output) or an official
`.pt` / `.safetensors` file. Sampling is sharded over the batch (the mesh's data and fsdp axes),
parameters replicated; one compile per run (the last batch is padded, not recompiled).
Flow-matching models (`config.transport.enabled`) sample with the transport's ODE or SDE
(`config.transport.sampler`, `method`, `num_steps`, ...); the ADM samplers otherwise.

Outputs go to `<workdir>/samples/<weights>-<sampler>-cfg<scale>[-<engine>]` (`output_name`;
or `sample.output_dir`): `grid.png` and the ADM `samples.npz` of uint8 pictures; latent-space
models decode with the SD-VAE (`sample.vae_dir`, else `evaluate.vae_dir`) and also keep their
`latents.npz` (only that, and a note on how to get pictures, without a VAE). Each folder's
`settings.json` records what made its samples: a run with the same settings finds them and
does not resample, other settings get another folder; nothing is rewritten silently. Each
run prints its compile time, warm sampling time, samples/s and FLOPs ratio (`timing_line`);
the width plans are cached in `<workdir>/plans`.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import tempfile
import time
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dydit_jax import sampling
from dydit_jax import sharding as sharding_lib
from dydit_jax.checkpointing import TrainCheckpointer, load_params
from dydit_jax.compile_clock import CompileClock
from dydit_jax.train import (build_diffusion, build_model, build_optimizer, build_transport,
                             init_state)


@dataclasses.dataclass
class SamplingWeights:
    """Parameters to sample with and where they came from: `name` names the output folder
    ("step002000" for a workdir checkpoint, the file or folder name otherwise)."""
    params: Any
    name: str
    step: Optional[int] = None


def load_weights(config, workdir: str, model) -> SamplingWeights:
    """The `config.sample.checkpoint` weights: empty for the workdir's latest training
    checkpoint (EMA unless `sample.use_ema=False`), else an orbax params directory (the
    converter's output), a diffusers folder or an official `.pt` / `.safetensors` file."""
    source = config.sample.checkpoint
    from dydit_jax.config_lib import peft_spec
    spec = peft_spec(config)
    if not source and spec is not None:
        return _peft_weights(config, workdir, model, spec)
    if not source:
        tx = build_optimizer(config.train)
        abstract = jax.eval_shape(functools.partial(init_state, model, tx),
                                  jax.random.PRNGKey(0))
        checkpointer = TrainCheckpointer(os.path.join(workdir, "checkpoints"))
        restored = checkpointer.restore_latest(abstract)
        checkpointer.close()
        if restored is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first, or "
                                    f"set --config.sample.checkpoint=<params dir or .pt file>")
        state, _, step = restored
        print(f"sampling with {'EMA' if config.sample.use_ema else 'raw'} params of step {step}")
        return SamplingWeights(state["ema"] if config.sample.use_ema else state["params"],
                               step_name(step), step)
    name = os.path.splitext(os.path.basename(os.path.normpath(source)))[0]
    from dydit_jax import convert
    scanned = getattr(model, "scan_layers", False)
    if os.path.isdir(os.path.join(source, "checkpoints")):   # another run's workdir: its EMA
        from dydit_jax.train import _latest_ema
        weights = SamplingWeights(convert.to_layout(_latest_ema(source), scanned), name)
    elif os.path.isdir(source) and not convert.is_diffusers_dir(source):
        # The converter writes per-block params; scanned configs (the ImageNet ones) stack them.
        weights = SamplingWeights(convert.to_layout(load_params(source), scanned), name)
    else:
        which = "ema" if config.sample.use_ema else "model"
        weights = SamplingWeights(convert.from_pytorch(source, model, which=which)["params"],
                                  name)
    if config.sample.adapters:
        weights = with_peft_file(config, model, weights)
    return weights


def with_peft_file(config, model, weights: SamplingWeights) -> SamplingWeights:
    """`weights` with the plain LoRA of `config.sample.adapters` (a PEFT / diffusers
    safetensors folder or file, `peft.import_peft`) beside them; named base+adapters."""
    from dydit_jax.config_lib import peft_spec
    from dydit_jax.peft import combine, import_peft
    path = config.sample.adapters
    adapters = import_peft(path, model, peft_spec(config), params=weights.params)
    name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    print(f"sampling {weights.name} with the LoRA adapters of {path}")
    return SamplingWeights(combine(weights.params, adapters), f"{weights.name}+{name}",
                           weights.step)


def export_adapters(config, workdir: str) -> str:
    """mode=export: the plain-LoRA adapters of the workdir's latest checkpoint (EMA unless
    `sample.use_ema=False`) as a PEFT folder (`peft.export_peft`, `peft.export_naming` names).
    Returns the folder."""
    from dydit_jax.config_lib import peft_spec
    from dydit_jax.peft import export_peft, split_adapters
    if config.dynamic.enabled:
        raise ValueError("mode=export writes LoRA adapters for an unchanged base; a DyDiT run "
                         "also trains routers (and reorders the base's heads), which the PEFT "
                         "format cannot carry: sample it here, or export a plain DiT's LoRA")
    model = build_model(config)
    weights = load_weights(config, workdir, model)
    _, adapters = split_adapters(weights.params)
    naming = config.peft.export_naming
    out = config.peft.export_dir or os.path.join(workdir, "adapters", f"{weights.name}-{naming}")
    export_peft(adapters, model, out, peft_spec(config), naming=naming,
                overwrite=config.sample.overwrite,
                base_model=config.train.init_from or None)
    print(f"wrote the {naming}-named LoRA adapters of {weights.name} to {out}")
    return out


def _peft_weights(config, workdir: str, model, spec) -> SamplingWeights:
    """A PEFT workdir's weights: its base (`train.init_from`, checked against the base the
    adapters were trained on) with the latest checkpoint's trainable tree (EMA by default)."""
    from dydit_jax.peft import combine
    from dydit_jax.train import restore_peft
    checkpointer = TrainCheckpointer(os.path.join(workdir, "checkpoints"))
    try:
        found = restore_peft(config, model, spec, build_optimizer(config.train), checkpointer)
    finally:
        checkpointer.close()
    if found.state is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first, or "
                                f"set --config.sample.checkpoint=<params dir or .pt file>")
    which = "EMA" if config.sample.use_ema else "raw"
    print(f"sampling with the {which} {spec.method} adapters of step {found.step} on the base "
          f"{config.train.init_from or '(fresh init)'}")
    trainable = found.state["ema"] if config.sample.use_ema else found.state["params"]
    return SamplingWeights(combine(found.frozen, jax.device_get(trainable)),
                           step_name(found.step), found.step)


def load_sampling_params(config, workdir: str, model):
    """Parameters to sample with (see `load_weights` for the sources)."""
    return load_weights(config, workdir, model).params


def step_name(step: int) -> str:
    return f"step{int(step):06d}"


def sample_labels(config) -> np.ndarray:
    sc = config.sample
    classes = list(sc.classes) or list(range(min(config.model.num_classes, 10)))
    return np.repeat(np.asarray(classes, np.int32), sc.per_class)


def _flow_solver_kwargs(config) -> dict:
    """The `config.transport` sampler settings, as `make_flow_sample_fn` and `FlowEngine`
    take them."""
    tc = config.transport
    return dict(sampler=tc.sampler, method=tc.method, num_steps=tc.num_steps, atol=tc.atol,
                rtol=tc.rtol, diffusion_form=tc.diffusion_form,
                diffusion_norm=tc.diffusion_norm, last_step=tc.last_step,
                last_step_size=tc.last_step_size)


class SampleFn:
    """`sample(params, rng, labels, cfg_scale)` of one engine plus the FLOPs it runs:
    `flops_ratio()` (whole-model MACs / the static model's, our counter) and `flops_note`
    (what the ratio counts)."""

    def __init__(self, fn, engine: str, flops_ratio: float, flops_note: str):
        self.fn, self.engine = fn, engine
        self._ratio, self.flops_note = float(flops_ratio), flops_note

    def __call__(self, params, rng, labels, cfg_scale):
        return self.fn(params, rng, labels, cfg_scale)

    def flops_ratio(self) -> float:
        return self._ratio


class _EngineSampleFn(SampleFn):
    """The diffusion engine: the ratio counts the plan's bucketed widths and the tokens that
    the routers actually kept in this run's batches (collected from the engine's stats)."""

    def __init__(self, engine, model):
        super().__init__(None, "gathered", 1.0, "plan widths, tokens as routed in this run")
        self._engine, self._model = engine, model
        self._kept = []   # per batch: (tokens that ran the MLP per model row [S, L], rows)

    def __call__(self, params, rng, labels, cfg_scale):
        x, stats = self._engine.sample(rng, labels, cfg_scale, return_stats=True)
        self._kept.append((stats["token_fraction"] * self._model.tokens_per_sample, len(labels)))
        return x

    def flops_ratio(self) -> float:
        engine = self._engine
        if not self._kept:
            return engine.plan.macs_ratio(self._model, grid=engine.grid, include_routers=False)
        rows = sum(n for _, n in self._kept)
        tokens = sum(t * n for t, n in self._kept) / rows
        return engine.plan.macs_ratio(self._model, grid=engine.grid, token_counts=tokens,
                                      include_routers=False)


def build_sample_fn(config, model, mesh, params, sampler: str, num_steps: int,
                    cfg_scale: float, plan_dir: Optional[str] = None) -> SampleFn:
    """`sample(params, rng, labels, cfg_scale)` for sample and evaluate modes, sharded over the
    mesh's batch axes: `config.sample.engine` masked | static (`sampling.make_sample_fn` or, for
    flow models, `make_flow_sample_fn` on config.transport's solver) or gathered (the dynamic
    inference engine, `Engine` / `FlowEngine`, built for `params`: same noise, same samples as
    the masked path). `sampler`, `num_steps` (diffusion models) and `cfg_scale` (> 1 guides)
    come from the caller's section (`sample` or `evaluate`). `plan_dir`: where width plans are
    cached (the workdir's `plans/`), so a second run does not rebuild them."""
    sc = config.sample
    if sc.engine not in sampling.SAMPLE_ENGINES:
        raise ValueError(f"config.sample.engine={sc.engine!r}; valid: {sampling.SAMPLE_ENGINES}")
    # PEFT weights (adapter leaves beside the base): the samplers run W + delta W(t) merged
    # once per step (`PeftModel` "merged", the engine's `peft=`), never per token.
    from dydit_jax.config_lib import peft_spec
    from dydit_jax.peft import PeftModel, has_adapters
    spec = peft_spec(config) if has_adapters(params) else None
    if has_adapters(params) and spec is None:
        raise ValueError("these weights hold LoRA adapters: set config.peft to the method "
                         "they were trained with")
    # The masked and static samplers run the model through the adapters; the engine merges
    # them itself (`peft=`) and, like the width plan, takes the plain model.
    adapted = model if spec is None else PeftModel(model, spec, mode="merged")
    common = dict(guide_channels=None if sc.guide_channels < 0 else sc.guide_channels,
                  use_cfg=cfg_scale > 1.0)
    diffusion = None if config.transport.enabled else build_diffusion(
        config, f"ddim{num_steps}" if sampler == "ddim" else str(num_steps))
    if sc.engine != "gathered":
        common.update(complete=sc.engine == "static",
                      **sampling.sample_shardings(mesh, batch_axes=sharding_lib.BATCH_AXES))
        if diffusion is None:
            fn = sampling.make_flow_sample_fn(adapted, build_transport(config),
                                              **_flow_solver_kwargs(config), **common)
        else:
            fn = sampling.make_sample_fn(adapted, diffusion, sampler=sampler, eta=sc.eta,
                                         clip_denoised=sc.clip_denoised, **common)
        if sc.engine == "static" or not model.dynamic:
            return SampleFn(fn, sc.engine, 1.0, "the complete model")
        note = "masks on the full widths: every head and group is computed"
        if diffusion is not None:
            from dydit_jax.engine.plan import get_plan
            routed = get_plan(model, {"params": params}, diffusion, cache_dir=plan_dir)
            note += (f"; the routers keep {routed.macs_ratio(model, include_routers=False):.3f}"
                     f" of the FLOPs (tokens all kept), which engine=gathered runs")
        return SampleFn(fn, "masked", 1.0, note)

    from dydit_jax.engine import Engine, FlowEngine
    if not model.dynamic:
        raise ValueError("config.sample.engine=gathered needs a dynamic model "
                         "(config.dynamic.enabled=True)")
    common.update(mesh=mesh, batch_axes=sharding_lib.BATCH_AXES, plan_dir=plan_dir, peft=spec)
    if diffusion is None:
        engine = FlowEngine(model, {"params": params}, build_transport(config),
                            **_flow_solver_kwargs(config), **common)
        note = "plan widths, tokens all kept"
        if engine.adaptive:
            note += (f"; adaptive {engine.method}: widths decided on device per model call, "
                     f"ratio estimated on its saved points")
        return SampleFn(lambda _p, rng, labels, cfg: engine.sample(rng, labels, cfg),
                        "gathered", engine.macs_ratio(), note)
    engine = Engine(model, {"params": params}, diffusion, sampler=sampler, eta=sc.eta,
                    clip_denoised=sc.clip_denoised, **common)
    return _EngineSampleFn(engine, model)


def is_latent_model(config) -> bool:
    """Whether the model's samples are VAE latents (decoded to pictures when a VAE is set)."""
    return config.data.name == "latents" or bool(config.sample.vae_dir)


def vae_dir(config) -> Optional[str]:
    """The VAE that decodes samples: `sample.vae_dir`, else the evaluate section's."""
    return config.sample.vae_dir or config.evaluate.vae_dir or None


def output_name(config, weights: SamplingWeights) -> str:
    """The samples folder's readable name: the weights and the main sampler settings
    (`sample_settings` holds all of them; `output_dir` tells apart runs it does not name)."""
    sc = config.sample
    from dydit_jax import families
    cfg = sc.cfg_scale
    if families.family_of(config).text:   # FLUX: Euler over the shifted schedule, true CFG
        solver, cfg = f"euler{sc.num_steps}", config.flux.true_cfg
    elif config.transport.enabled:
        tc = config.transport
        solver = f"{tc.sampler}-{str(tc.method).lower()}{tc.num_steps}"
    else:
        solver = f"{sc.sampler}{sc.num_steps}" + (f"-eta{sc.eta:g}" if sc.eta else "")
    parts = [weights.name, solver, f"cfg{cfg:g}"]
    if sc.engine != "masked":
        parts.append(sc.engine)
    if config.seed:
        parts.append(f"seed{config.seed}")
    if not sc.use_ema and weights.step is not None:
        parts.append("raw")
    return "-".join(parts)


SAMPLE_FILES = ("grid.png", "samples.npz", "samples.gif", "latents.npz")
SETTINGS_FILE = "settings.json"
# Keys of config.sample that do not change the samples.
_OUTPUT_KEYS = ("output_dir", "overwrite")


def sample_settings(config, weights: SamplingWeights) -> dict:
    """Everything that decides the samples (the weights' name, seed, model, dynamic,
    diffusion / transport and sample sections, but not where they are written): stored as
    the folder's settings.json, so a run finds its own earlier samples and only those."""
    from dydit_jax import families
    sections = ("model", "dynamic", "transport" if config.transport.enabled else "diffusion")
    if families.family_of(config).text:
        sections = ("model", "dynamic", "flux", "text")
    settings = {name: config[name].to_dict() for name in sections}
    settings["sample"] = {k: v for k, v in config.sample.to_dict().items()
                          if k not in _OUTPUT_KEYS}
    settings.update(weights=weights.name, step=weights.step, seed=config.seed)
    return json.loads(json.dumps(settings, default=str))   # tuples -> lists, as read back


def _stored_settings(folder: str):
    try:
        with open(os.path.join(folder, SETTINGS_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def output_dir(config, workdir: str, weights: SamplingWeights) -> Tuple[str, bool]:
    """(folder, done): where this run's samples go and whether that folder already holds them
    (same `sample_settings`). `sample.output_dir` (relative paths are inside the workdir) is
    used as it is; otherwise `<workdir>/samples/<output_name>`, or `<output_name>-2`, `-3`,
    ... when a run with settings the name does not show (classes, per_class, guidance
    channels, ...) holds that one."""
    settings = sample_settings(config, weights)
    if config.sample.output_dir:
        folder = os.path.join(workdir, config.sample.output_dir)
        return folder, _stored_settings(folder) == settings
    base = os.path.join(workdir, "samples", output_name(config, weights))
    for k in itertools.count(1):
        folder = base if k == 1 else f"{base}-{k}"
        if not os.path.exists(folder):
            return folder, False
        if _stored_settings(folder) == settings:
            return folder, True


def sample_from_workdir(config, workdir: str, params=None, step: Optional[int] = None):
    """Samples `config.sample.per_class` images of each class into the run's samples folder
    (`output_dir`) and returns them (float samples: pixels in [-1, 1] or latents).

    Writes `grid.png` and the ADM `samples.npz` (uint8 [N, H, W, 3], labels) for pixel models
    and, decoded with the SD-VAE (`sample.vae_dir` or `evaluate.vae_dir`), for latent models,
    which also keep their `latents.npz`. A folder that already holds these samples is not
    rewritten (same weights and settings: the same samples) unless `sample.overwrite`;
    returns None then. `params`/`step`: weights already in memory (train mode passes its own).
    """
    sc = config.sample
    model = build_model(config)
    weights = (load_weights(config, workdir, model) if params is None else
               SamplingWeights(params, step_name(step) if step is not None else "params", step))
    out_dir, done = output_dir(config, workdir, weights)
    existing = [f for f in SAMPLE_FILES if os.path.exists(os.path.join(out_dir, f))]
    if done and not sc.overwrite:
        print(f"samples of these weights and settings are already in {out_dir} "
              f"({', '.join(existing)}): not resampling (set --config.sample.overwrite=True "
              f"to redo, or --config.sample.output_dir=<dir> to write elsewhere)")
        return None
    if existing and not done and not sc.overwrite:   # only a chosen output_dir gets here
        raise FileExistsError(f"config.sample.output_dir={sc.output_dir!r} holds samples of other "
                              f"weights or settings ({', '.join(existing)}): choose another "
                              f"folder, or set --config.sample.overwrite=True to replace them")
    from dydit_jax import families
    if families.family_of(config).text:
        from dydit_jax.flux_pipeline import sample_to_folder
        return sample_to_folder(config, model, weights, out_dir,
                                sample_settings(config, weights))
    latent = is_latent_model(config)
    vae = vae_dir(config) if latent else None
    if vae:   # loaded before sampling: a wrong VAE folder fails before the long part
        from dydit_jax.convert_vae import load_vae
        vae_model, vae_vars = load_vae(vae)
        _check_vae_channels(vae_model, model, vae)

    mesh = sharding_lib.create_mesh(config.mesh.data, config.mesh.fsdp)
    n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    labels = sample_labels(config)
    batch = -(-min(sc.batch_size, len(labels)) // n_shards) * n_shards
    plan_dir = os.path.join(workdir, "plans")
    with CompileClock() as clock:
        t0 = time.perf_counter()
        sample = build_sample_fn(config, model, mesh, weights.params, sc.sampler, sc.num_steps,
                                 sc.cfg_scale, plan_dir=plan_dir)
        params = jax.device_put(weights.params, sharding_lib.replicated(mesh))
        rng = jax.random.PRNGKey(config.seed)
        chunks = []
        for i, start in enumerate(tqdm(range(0, len(labels), batch), desc="sample",
                                       disable=jax.process_index() != 0)):
            chunk = labels[start:start + batch]
            padded = np.pad(chunk, (0, batch - len(chunk)), mode="edge")
            x = sample(params, jax.random.fold_in(rng, i), padded, sc.cfg_scale)
            chunks.append(np.asarray(jax.device_get(x))[:len(chunk)])
        wall = time.perf_counter() - t0
    samples = sampling.check_finite(np.concatenate(chunks), config)
    if jax.process_index() == 0:
        print(timing_line(sample, len(samples), wall, clock))

    images = None
    if not latent:
        images = np.asarray(sampling.to_uint8(jnp.asarray(samples)))
    elif vae:
        images = decode_latents(vae_model, vae_vars, samples, mesh, batch)
    if jax.process_index() == 0:
        _write_samples(out_dir, samples if latent else None, images, labels, sc.per_class,
                       sample_settings(config, weights))
        if latent and not vae:
            print("these are latents: to get pictures, decode them with the SD-VAE the model "
                  "was trained with: --config.sample.vae_dir=<diffusers AutoencoderKL folder> "
                  "(e.g. `huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir "
                  "sd-vae-ft-ema`; README 'The SD-VAE')")
    return samples


def _check_vae_channels(vae_model, model, path: str) -> None:
    latent_channels = int(vae_model.latent_channels)
    if latent_channels != int(model.in_channels):
        raise ValueError(f"the VAE in {path!r} has {latent_channels} latent channels, the model "
                         f"samples {model.in_channels}: set config.sample.vae_dir to the VAE "
                         f"the model's latents were made with")


def decode_latents(vae_model, vae_vars, latents: np.ndarray, mesh, batch: int) -> np.ndarray:
    """uint8 pictures [N, H, W, 3] of diffusion-space latents [N, h, w, c] (the VAE's
    `decode_latents`: / 0.18215, decode), `batch` at a time (one compile: the last batch is
    padded)."""
    from dydit_jax.evaluate import make_decode_fn
    vae_vars = jax.device_put(vae_vars, sharding_lib.replicated(mesh))
    decode = make_decode_fn(vae_model, mesh)
    out = []
    for start in range(0, len(latents), batch):
        z = latents[start:start + batch]
        padded = np.pad(z, [(0, batch - len(z))] + [(0, 0)] * (z.ndim - 1), mode="edge")
        out.append(np.asarray(jax.device_get(decode(vae_vars, jnp.asarray(padded))))[:len(z)])
    return np.concatenate(out)


def timing_line(sample: SampleFn, n: int, wall: float, clock: CompileClock) -> str:
    """One line per run: compile time, warm sampling time, images/s and the FLOPs ratio."""
    warm = max(wall - clock.seconds, 1e-3)
    cache = f", {clock.cache_hits} from the compilation cache" if clock.cache_hits else ""
    return (f"engine={sample.engine}: {n} samples in {wall:.1f} s = compile {clock.seconds:.1f} s"
            f" ({clock.compiles} compiled{cache}) + sampling {warm:.1f} s ({n / warm:.1f} "
            f"samples/s); FLOPs ratio {sample.flops_ratio():.3f} of the static model "
            f"({sample.flops_note})")


def _write_samples(out_dir: str, latents, images, labels, per_class: int,
                   settings: dict) -> None:
    """The files of one run, written to a temporary folder and renamed into place, so an
    interrupted run leaves either all of them or none."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-samples-", dir=parent)
    with open(os.path.join(tmp, SETTINGS_FILE), "w") as f:
        json.dump(settings, f, indent=1)
    if latents is not None:
        np.savez(os.path.join(tmp, "latents.npz"), latents=latents, labels=labels)
    if images is not None and images.ndim == 5:   # video clips [N, F, H, W, C]
        sampling.save_video_files(images, tmp, labels=labels, nrow=per_class)
    elif images is not None:
        sampling.save_grid_png(images, os.path.join(tmp, "grid.png"), nrow=per_class)
        sampling.save_npz(images, os.path.join(tmp, "samples.npz"), labels=labels)
    if os.path.isdir(out_dir):   # overwrite=True, or a user-chosen output_dir
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        os.rmdir(tmp)
    else:
        os.replace(tmp, out_dir)
    print(f"wrote {', '.join(sorted(os.listdir(out_dir)))} ({len(labels)} samples) to {out_dir}")
