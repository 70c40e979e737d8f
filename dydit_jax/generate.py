"""The sample mode: load weights, sample N images per class, write a PNG grid and an `.npz`.

Weights come from `config.sample.checkpoint`: empty for the workdir's latest training
checkpoint (EMA by default), an orbax params directory (the converter's output) or an official
`.pt` / `.safetensors` file. Sampling is sharded over the batch (the mesh's data and fsdp axes),
parameters replicated; one compile per run (the last batch is padded, not recompiled).
Flow-matching models (`config.transport.enabled`) sample with the transport's ODE or SDE
(`config.transport.sampler`, `method`, `num_steps`, ...); the ADM samplers otherwise.

Pixel-space models write images; latent-space models write their latents (`latents.npz`) for
the VAE decoder of the evaluation tooling.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dydit_jax import sampling
from dydit_jax import sharding as sharding_lib
from dydit_jax.checkpointing import TrainCheckpointer, load_params
from dydit_jax.train import (build_diffusion, build_model, build_optimizer, build_transport,
                             init_state)


def load_sampling_params(config, workdir: str, model):
    """Parameters to sample with (see the module docstring for the sources)."""
    source = config.sample.checkpoint
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
        return state["ema"] if config.sample.use_ema else state["params"]
    if os.path.isdir(source):
        return load_params(source)
    from dydit_jax.convert import from_pytorch
    return from_pytorch(source, model, which="ema" if config.sample.use_ema else "model")["params"]


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


def build_sample_fn(config, model, mesh, params, sampler: str, num_steps: int,
                    cfg_scale: float):
    """`sample(params, rng, labels, cfg_scale)` for sample and evaluate modes, sharded over the
    mesh's batch axes: `config.sample.engine` masked | static (`sampling.make_sample_fn` or, for
    flow models, `make_flow_sample_fn` on config.transport's solver) or gathered (the dynamic
    inference engine, `Engine` / `FlowEngine`, built for `params`: same noise, same samples as
    the masked path). `sampler`, `num_steps` (diffusion models) and `cfg_scale` (> 1 guides)
    come from the caller's section (`sample` or `evaluate`)."""
    sc = config.sample
    if sc.engine not in ("masked", "static", "gathered"):
        raise ValueError(f"config.sample.engine={sc.engine!r}; valid: masked, static, gathered")
    common = dict(guide_channels=None if sc.guide_channels < 0 else sc.guide_channels,
                  use_cfg=cfg_scale > 1.0)
    diffusion = None if config.transport.enabled else build_diffusion(
        config, f"ddim{num_steps}" if sampler == "ddim" else str(num_steps))
    if sc.engine != "gathered":
        common.update(complete=sc.engine == "static",
                      **sampling.sample_shardings(mesh, batch_axes=sharding_lib.BATCH_AXES))
        if diffusion is None:
            return sampling.make_flow_sample_fn(model, build_transport(config),
                                                **_flow_solver_kwargs(config), **common)
        return sampling.make_sample_fn(model, diffusion, sampler=sampler, eta=sc.eta,
                                       clip_denoised=sc.clip_denoised, **common)

    from dydit_jax.engine import Engine, FlowEngine
    if not model.dynamic:
        raise ValueError("config.sample.engine=gathered needs a dynamic model "
                         "(config.dynamic.enabled=True)")
    common.update(mesh=mesh, batch_axes=sharding_lib.BATCH_AXES,
                  compilation_cache_dir=config.compilation_cache_dir or None)
    if diffusion is None:
        engine = FlowEngine(model, {"params": params}, build_transport(config),
                            **_flow_solver_kwargs(config), **common)
        ratio = engine.macs_ratio()
        if engine.adaptive:
            print(f"gathered engine: adaptive {engine.method}: widths decided on device per "
                  f"model call; FLOPs ratio estimated on its saved points")
    else:
        engine = Engine(model, {"params": params}, diffusion, sampler=sampler, eta=sc.eta,
                        clip_denoised=sc.clip_denoised, **common)
        ratio = engine.plan.macs_ratio(model, grid=engine.grid, include_routers=False)
    print(f"gathered engine: whole-model FLOPs ratio of the plan {float(ratio):.3f} "
          "(tokens all kept)")
    return lambda _params, rng, labels, cfg_scale: engine.sample(rng, labels, cfg_scale)


def sample_from_workdir(config, workdir: str, params=None) -> np.ndarray:
    """Samples `config.sample.per_class` images of each class; returns them (uint8 or latents)."""
    sc = config.sample
    model = build_model(config)
    if params is None:
        params = load_sampling_params(config, workdir, model)
    mesh = sharding_lib.create_mesh(config.mesh.data, config.mesh.fsdp)
    n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = -(-min(sc.batch_size, len(sample_labels(config))) // n_shards) * n_shards
    sample = build_sample_fn(config, model, mesh, params, sc.sampler, sc.num_steps,
                             sc.cfg_scale)
    params = jax.device_put(params, sharding_lib.replicated(mesh))

    labels = sample_labels(config)
    rng = jax.random.PRNGKey(config.seed)
    chunks = []
    for i, start in enumerate(tqdm(range(0, len(labels), batch), desc="sample",
                                   disable=jax.process_index() != 0)):
        chunk = labels[start:start + batch]
        padded = np.pad(chunk, (0, batch - len(chunk)), mode="edge")
        x = sample(params, jax.random.fold_in(rng, i), padded, sc.cfg_scale)
        chunks.append(np.asarray(jax.device_get(x))[:len(chunk)])
    samples = sampling.check_finite(np.concatenate(chunks), config)

    out_dir = os.path.join(workdir, "samples")
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        if config.data.name in ("latents",):
            np.savez(os.path.join(out_dir, "latents.npz"), latents=samples, labels=labels)
        else:
            images = np.asarray(sampling.to_uint8(jnp.asarray(samples)))
            sampling.save_grid_png(images, os.path.join(out_dir, "grid.png"), nrow=sc.per_class)
            sampling.save_npz(images, os.path.join(out_dir, "samples.npz"), labels=labels)
        print(f"wrote {len(samples)} samples to {out_dir}")
    return samples
