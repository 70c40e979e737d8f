"""Training: one jitted, sharded train step; exact resume; metrics; samples at the end.

The same code runs on one CPU, on 8 simulated devices and on a TPU pod:
- parameters, EMA and optimizer state are born sharded (`jax.eval_shape`, then a jitted init
  with `out_shardings` from the regex rules of `config.mesh.rules`);
- each host feeds its slice of the global batch (`sharding.global_batch`);
- the train step is compiled once with explicit in/out shardings and donates the old state;
- the step's randomness is `fold_in(state.rng, step)`, so a resumed run draws the same numbers;
- the data cursor is saved with each checkpoint, so a resumed run sees the same batches.
With `config.peft` (LoRA / TD-LoRA, dydit_jax/peft) the state holds only the trainable tree
(adapters, routers): the frozen base is a separate, non-donated input of the train step, has no
EMA or optimizer moments and is not checkpointed (its fingerprint is).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from tqdm import tqdm

from dydit_jax import data as data_lib
from dydit_jax import sharding as sharding_lib
from dydit_jax.checkpointing import TrainCheckpointer, load_params
from dydit_jax.diffusion import create_diffusion
from dydit_jax.metrics import MetricWriter
from dydit_jax.models.dit import DiT
from dydit_jax.models.sit import SiT

State = Dict[str, Any]


def build_model(config: ml_collections.ConfigDict) -> DiT:
    """The model of `config.model` in its family (`families.family_of`: DiT, SiT, Latte; named
    size or "custom"), dynamic if `config.dynamic.enabled`."""
    from dydit_jax import families
    mc = config.model
    family = families.family_of(config)
    if family.build is not None:
        return family.build(config)
    if family.flow and not config.transport.enabled:
        raise ValueError(f"config.model.name={mc.name!r} is a flow-matching model: set "
                         f"config.transport.enabled=True")
    cls, kwargs = families.model_kwargs(config)
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if mc.dtype not in dtypes:
        raise ValueError(f"config.model.dtype={mc.dtype!r}; valid: {sorted(dtypes)}")
    if config.transport.enabled and not family.flow:
        cls = SiT   # a DiT trained with flow matching is a SiT (same parameters)
    return cls(input_size=mc.input_size, in_channels=mc.in_channels,
               num_classes=mc.num_classes, learn_sigma=mc.learn_sigma,
               class_dropout_prob=mc.class_dropout_prob, mlp_ratio=mc.mlp_ratio,
               scan_layers=mc.scan_layers, remat=mc.remat, remat_policy=mc.remat_policy,
               dtype=dtypes[mc.dtype], numerics=mc.numerics,
               dynamic=config.dynamic.enabled, dynamic_tokens=config.dynamic.tokens, **kwargs)


def build_diffusion(config, timestep_respacing=""):
    dc = config.diffusion
    return create_diffusion(timestep_respacing, noise_schedule=dc.noise_schedule,
                            learn_sigma=dc.learn_sigma, diffusion_steps=dc.diffusion_steps)


def build_transport(config):
    """The flow-matching transport of `config.transport` (SiT's `create_transport`)."""
    from dydit_jax.transport import create_transport
    tc = config.transport
    return create_transport(tc.path_type, tc.prediction, tc.loss_weight, tc.train_eps,
                            tc.sample_eps)


def build_optimizer(tc: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with a constant learning rate (the DiT/DyDiT recipe), optional global-norm clip."""
    adamw = optax.adamw(tc.lr, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay)
    if tc.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw)
    return adamw


def dummy_inputs(model: DiT, batch: int = 1):
    return model.dummy_inputs(batch)


def init_state(model: DiT, tx, rng) -> State:
    """Fresh state: params, EMA (= params), optimizer state, step 0, the run's rng."""
    init_rng, run_rng = jax.random.split(rng)
    params = model.init(init_rng, *dummy_inputs(model))["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "ema": jax.tree_util.tree_map(jnp.copy, params), "opt_state": tx.init(params),
            "rng": run_rng}


def diffusion_loss_fn(model: DiT, diffusion) -> Callable:
    """loss(params, batch, rng, step) -> (scalar, metrics) for the plain DiT objective."""

    def loss_fn(params, batch, rng, step):
        k_t, k_noise, k_drop = jax.random.split(rng, 3)
        x, y = batch["image"], (batch["label"] if model.conditional else None)
        t = jax.random.randint(k_t, (x.shape[0],), 0, diffusion.num_timesteps)

        def model_fn(x_t, t_model, y):
            return model.apply({"params": params}, x_t, t_model, y, train=True,
                               rngs={"label_dropout": k_drop})

        terms = diffusion.training_losses(model_fn, x, t, model_kwargs={"y": y}, rng=k_noise)
        metrics = {k: jnp.mean(v) for k, v in terms.items() if k in ("loss", "mse", "vb")}
        return metrics["loss"], metrics

    return loss_fn


def build_loss_fn(config, model: DiT, diffusion=None) -> Callable:
    """The plain objective, or the DyDiT one when `config.dynamic.enabled`: of the ADM
    `diffusion` (built from the config when None), or of the flow-matching transport when
    `config.transport.enabled` (then `diffusion` is unused); a family's own objective (FLUX)
    when its registry entry names one."""
    from dydit_jax import families
    family = families.family_of(config)
    if family.loss is not None:
        return family.loss(config, model)
    if config.transport.enabled:
        from dydit_jax import flow_loss
        transport = build_transport(config)
        if not config.dynamic.enabled:
            return flow_loss.flow_loss_fn(model, transport)
        per_sample_loss = flow_loss.transport_per_sample_loss(transport)
    else:
        diffusion = build_diffusion(config) if diffusion is None else diffusion
        if not config.dynamic.enabled:
            return diffusion_loss_fn(model, diffusion)
        per_sample_loss = diffusion
    from dydit_jax.dydit_loss import dydit_loss_fn
    return dydit_loss_fn(model, per_sample_loss, config.dynamic)


def make_train_step(loss_fn: Callable, tx, ema_decay: float) -> Callable:
    """(state, batch[, frozen]) -> (state, metrics). Metrics are means over the global batch.

    With `frozen` (a PEFT run's frozen base), `state["params"]` is the trainable tree and the
    loss sees both (`peft.combine`); gradients exist for the trainable leaves only.
    """

    def train_step(state: State, batch, frozen=None) -> tuple:
        rng = jax.random.fold_in(state["rng"], state["step"])
        if frozen is None:
            objective = loss_fn
        else:
            from dydit_jax.peft import combine

            def objective(trainable, *args):
                return loss_fn(combine(frozen, trainable), *args)
        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
            state["params"], batch, rng, state["step"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                                     state["ema"], params)
        step = state["step"] + 1
        metrics = dict(metrics, loss=loss)
        metrics["grad_norm"] = optax.tree.norm(grads)
        # Step number of a non-finite loss (int32 max if finite): read at log time, so the
        # run can stop naming the exact step without a host sync per step.
        metrics["nonfinite_step"] = jnp.where(jnp.isfinite(loss), jnp.iinfo(jnp.int32).max, step)
        new_state = {"step": step, "params": params, "ema": ema, "opt_state": opt_state,
                     "rng": state["rng"]}
        return new_state, metrics

    return train_step


def accumulate(acc, metrics):
    """Sums metrics over a log interval on device (min for nonfinite_step)."""
    if acc is None:
        return metrics
    return {k: jnp.minimum(acc[k], v) if k == "nonfinite_step" else acc[k] + v
            for k, v in metrics.items()}


class NonFiniteLossError(FloatingPointError):
    pass


def setup_state(config, model, tx, mesh, checkpointer):
    """Sharded train state restored from the workdir's latest checkpoint or freshly made.

    Returns (state, data_state or None, state_shardings).
    """
    rng = jax.random.PRNGKey(config.seed)
    init_fn = functools.partial(init_state, model, tx)
    abstract = jax.eval_shape(init_fn, rng)
    shardings = sharding_lib.tree_shardings(abstract, mesh, config.mesh.rules)
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    restored = checkpointer.restore_latest(target)
    if restored is not None:
        state, data_state, step = restored
        logging.info("resumed from step %d", step)
        return state, data_state, shardings
    state = jax.jit(init_fn, out_shardings=shardings)(rng)
    if config.train.init_from:
        params = jax.device_put(initial_params(config, model, jax.device_get(state["params"])),
                                shardings["params"])
        state = dict(state, params=params, ema=jax.tree_util.tree_map(jnp.copy, params),
                     opt_state=jax.jit(tx.init, out_shardings=shardings["opt_state"])(params))
    return state, None, shardings


@dataclasses.dataclass
class PeftSetup:
    """A PEFT run's frozen base on the mesh, its shardings and the checkpoint's base record."""
    spec: Any
    frozen: Any
    shardings: Any
    record: dict


def base_params(config, model):
    """The base of a PEFT run on the host: the model's init at `config.seed` overwritten by
    `train.init_from` (reordered for DyDiT as `initial_params` does). Deterministic: the same
    config gives the same base, in training, on resume and in sample mode."""
    init_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))
    fresh = jax.device_get(jax.jit(lambda r: model.init(r, *dummy_inputs(model))["params"])(
        init_rng))
    if not config.train.init_from:
        logging.warning("peft without train.init_from: the frozen base is a fresh init")
        return fresh
    return initial_params(config, model, fresh)


def peft_state_fn(model, spec, tx, base) -> Callable:
    """(rng, trainable_base) -> a fresh PEFT train state: adapters initialised for the targets
    of `base`, with `trainable_base` (`split_trainable(base)[0]`) beside them; EMA and
    optimizer state of that trainable tree only."""
    from dydit_jax.peft import combine, init_adapters

    def init_fn(rng, trainable_base):
        run_rng, adapter_rng = jax.random.split(rng)
        adapters = init_adapters(base, spec, jax.random.fold_in(adapter_rng, 1),
                                 model.hidden_size)
        trainable = combine(adapters, trainable_base)
        return {"step": jnp.zeros((), jnp.int32), "params": trainable,
                "ema": jax.tree_util.tree_map(jnp.copy, trainable),
                "opt_state": tx.init(trainable), "rng": run_rng}

    return init_fn


@dataclasses.dataclass
class PeftRestore:
    """What `restore_peft` finds: the rebuilt base split into its trainable and frozen parts,
    the state's init function and shardings (None without a mesh), and the latest
    checkpoint's state, data cursor, step and base record (None when there is none)."""
    base: Any
    trainable_base: Any
    frozen: Any
    init_fn: Callable
    shardings: Any
    state: Any = None
    data_state: Any = None
    step: Any = None
    record: Any = None


def restore_peft(config, model, spec, tx, checkpointer, mesh=None) -> PeftRestore:
    """A PEFT workdir: the base rebuilt (`base_params`), the latest checkpoint's trainable
    state restored (placed by the mesh's rules, or on the default device without a mesh) and
    checked against that base."""
    from dydit_jax.peft.trainable import check_base, split_trainable
    base = base_params(config, model)
    trainable_base, frozen = split_trainable(base, spec)
    init_fn = peft_state_fn(model, spec, tx, base)
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed), trainable_base)
    shardings = None
    if mesh is not None:
        shardings = sharding_lib.tree_shardings(abstract, mesh, config.mesh.rules)
        abstract = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    found = PeftRestore(base, trainable_base, frozen, init_fn, shardings)
    restored = checkpointer.restore_latest(abstract)
    if restored is None:
        return found
    found.state, found.data_state, found.step = restored
    found.record = checkpointer.base_record(found.step)
    check_base(found.record, base, config.train.init_from)
    return found


def cast_frozen(frozen, config):
    """The frozen base in `config.peft.base_dtype` ("compute": the model's compute dtype).

    The Dense, conv and embedding layers cast their parameters to the compute dtype before
    use (Flax's `promote_dtype`), so a bfloat16-compute model computes the same with a
    bfloat16-stored base and the step's arguments hold half the bytes for it; XLA:CPU then
    assigns more temporary memory than it saves (BENCHMARKS.md "PEFT"), so the default is
    float32. (Merged sampling adds delta W(t) to the stored kernel: a bfloat16 base rounds W
    once more there.)
    """
    name = config.peft.base_dtype
    if name == "compute":
        name = config.model.dtype
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, frozen)


def setup_peft_state(config, model, spec, tx, mesh, checkpointer):
    """`setup_state` for a PEFT run: (state, data_state or None, state_shardings, PeftSetup).

    The state's params are the trainable tree only; the frozen base is placed by the same
    sharding rules. A restored checkpoint must name this base (`trainable.check_base`).
    """
    from dydit_jax.peft.trainable import base_record
    found = restore_peft(config, model, spec, tx, checkpointer, mesh)
    frozen = cast_frozen(found.frozen, config)
    frozen_sh = sharding_lib.tree_shardings(frozen, mesh, config.mesh.rules)
    frozen = jax.device_put(frozen, frozen_sh)
    if found.state is not None:
        logging.info("resumed PEFT adapters from step %d", found.step)
        return (found.state, found.data_state, found.shardings,
                PeftSetup(spec, frozen, frozen_sh, found.record))
    state = jax.jit(found.init_fn, out_shardings=found.shardings)(
        jax.random.PRNGKey(config.seed), found.trainable_base)
    record = base_record(found.base, spec, state["params"], config.train.init_from)
    return state, None, found.shardings, PeftSetup(spec, frozen, frozen_sh, record)


def initial_params(config, model: DiT, fresh_params):
    """Params to fine-tune from (`config.train.init_from`), on the host.

    Sources: a training workdir (its latest checkpoint's EMA), an orbax params directory (the
    converter's output), an official `.pt`/`.safetensors` file or a diffusers folder. Leaves
    the source lacks (DyDiT routers when starting from a DiT) keep `fresh_params` and are
    logged. With `config.dynamic.reorder`, heads and MLP groups are then sorted by importance
    so that the always-on index 0 is the most important one (DESIGN.md 1).
    """
    source = config.train.init_from
    from dydit_jax.convert import is_diffusers_dir
    if os.path.isdir(os.path.join(source, "checkpoints")):
        loaded = _latest_ema(source)
    elif os.path.isdir(source) and not is_diffusers_dir(source):
        loaded = load_params(source)
    else:
        from dydit_jax.convert import from_pytorch
        loaded = from_pytorch(source, model)["params"]
    from dydit_jax.convert import to_layout
    params = merge_params(fresh_params, to_layout(loaded, getattr(model, "scan_layers", False)))
    if config.dynamic.enabled and config.dynamic.reorder:
        from dydit_jax.reorder import reorder_by_importance
        params, _ = reorder_by_importance(params, model.num_heads,
                                          scan_layers=model.scan_layers,
                                          allow_fresh_routers=True)
    return params


def _latest_ema(workdir: str):
    """The EMA params of a training workdir's newest checkpoint (structure read from disk)."""
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                    item_names=("state",))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"init_from={workdir!r} has no checkpoint")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    logging.warning("initialising from the EMA params of %s at step %d", workdir, step)
    return restored["state"]["ema"]


def merge_params(fresh, loaded):
    """`loaded` where it has a leaf of the same path and shape, else `fresh` (logged)."""
    flat_fresh = traverse_util.flatten_dict(fresh)
    flat_loaded = traverse_util.flatten_dict(loaded)
    unused = sorted("/".join(p) for p in flat_loaded if p not in flat_fresh)
    if unused:
        raise ValueError(f"init_from has parameters the model lacks ({', '.join(unused[:6])}"
                         f"...): is it the same architecture (size, patch, scan_layers)?")
    kept, out = [], {}
    for path, value in flat_fresh.items():
        if path not in flat_loaded:
            kept.append("/".join(path))
            out[path] = value
            continue
        if tuple(flat_loaded[path].shape) != tuple(value.shape):
            raise ValueError(f"init_from parameter {'/'.join(path)} has shape "
                             f"{tuple(flat_loaded[path].shape)}, the model expects "
                             f"{tuple(value.shape)}")
        out[path] = np.asarray(flat_loaded[path], value.dtype)
    if kept:
        logging.warning("%d parameters not in init_from keep their fresh init: %s",
                        len(kept), ", ".join(kept))
    return traverse_util.unflatten_dict(out)


def run_status(start_step: int, num_steps: int, workdir: str) -> str:
    """What this run will do, in one line: a re-run of a finished run says so instead of
    silently going on to sample, and a resumed run names the step it continues from."""
    if start_step >= num_steps:
        return (f"already at step {start_step} of {num_steps} in {workdir}: nothing to train "
                f"(raise --config.train.num_steps to train on)")
    if start_step > 0:
        return f"resuming from step {start_step} of {num_steps} ({workdir})"
    return f"training from step 0 to {num_steps} in {workdir}"


def text_conditioner(config, source):
    """For a text-conditioned family, the host-side step before each train step: on captioned
    data the one that adds the captions' T5 / CLIP embeddings (`text_conditioning.
    BatchConditioner`); on latent shards that carry them (mode=extract) the caption dropout
    to the stored empty prompt (`EmbeddingDropout`, None without dropout). None for class
    labels. Shards without text, or made by other text encoders than `config.text`'s (which
    encode the prompts at sampling time), are refused."""
    from dydit_jax import families, text_conditioning
    if not families.family_of(config).text:
        return None
    if hasattr(source, "captions"):
        encoders = text_conditioning.from_config(config.text)
        return text_conditioning.BatchConditioner(encoders, source.captions,
                                                  dropout=config.text.dropout, seed=config.seed)
    where = f"config.data.name={config.data.name}" + (
        f", data.path={config.data.path}" if config.data.name == "latents" else "")
    if not getattr(source, "has_text", False):
        raise ValueError(f"a text-to-image model trains on captioned images or on latent shards "
                         f"with text embeddings ('txt', 'vec'), and {where} has neither: "
                         f"re-extract the shards with the text family's config "
                         f"(--config.mode=extract with data.name=captioned_digits, "
                         f"caption_folder or tfds_captions; dydit_jax/extract_latents.py)")
    recorded = source.text_settings
    if recorded is not None:
        want = text_conditioning.text_settings(config.text)
        differ = sorted(k for k in set(want) | set(recorded) if recorded.get(k) != want.get(k))
        if differ:
            raise ValueError(f"{where}: the shards' text embeddings come from config.text "
                             f"{ {k: recorded.get(k) for k in differ} }, this run's config.text "
                             f"has { {k: want.get(k) for k in differ} }: set them alike (the "
                             f"prompts sampled after training go through config.text)")
    if not config.text.dropout:
        return None
    if source.empty_prompt is None:
        raise ValueError(f"{where}: config.text.dropout={config.text.dropout} replaces captions "
                         f"by the empty prompt, whose embeddings the shards lack (no "
                         f"empty_prompt.npz): set config.text.dropout=0 or re-extract them")
    return text_conditioning.EmbeddingDropout(source.empty_prompt, config.text.dropout,
                                              seed=config.seed)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> State:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one."""
    tc = config.train
    mesh = sharding_lib.create_mesh(config.mesh.data, config.mesh.fsdp)
    model = build_model(config)
    tx = build_optimizer(tc)
    checkpointer = TrainCheckpointer(os.path.join(workdir, "checkpoints"),
                                     max_to_keep=tc.keep_checkpoints, keep_period=tc.keep_period,
                                     async_save=tc.async_checkpointing)
    from dydit_jax.config_lib import peft_spec
    spec = peft_spec(config)
    peft = None
    if spec is None:
        state, data_state, state_shardings = setup_state(config, model, tx, mesh, checkpointer)
    else:
        from dydit_jax.peft import PeftModel
        state, data_state, state_shardings, peft = setup_peft_state(
            config, model, spec, tx, mesh, checkpointer)
        model = PeftModel(model, spec)
        if jax.process_index() == 0:
            r = peft.record
            print(f"peft {spec.method}: {r['trainable_params']:,} trainable of "
                  f"{r['base_params']:,} base parameters "
                  f"({100 * r['trainable_params'] / r['base_params']:.2f} %)", flush=True)

    local_bs = sharding_lib.local_batch_size(tc.batch_size, mesh)
    source = data_lib.create_source(config.data, process_index=jax.process_index(),
                                    process_count=jax.process_count(),
                                    local_batch_size=local_bs)
    if data_state is not None:
        source.set_state(data_state)
    condition = text_conditioner(config, source)

    in_shardings = (state_shardings, sharding_lib.batch_sharding(mesh))
    if peft is not None:
        in_shardings += (peft.shardings,)
    step_fn = jax.jit(
        make_train_step(build_loss_fn(config, model), tx, tc.ema_decay),
        in_shardings=in_shardings,
        out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
        donate_argnums=(0,))
    frozen = () if peft is None else (peft.frozen,)
    record = None if peft is None else peft.record

    def train_step(state, batch):
        return step_fn(state, batch, *frozen)

    writer = MetricWriter(workdir)
    start_step = int(state["step"])
    end_step = tc.num_steps
    if tc.max_steps_per_run:
        end_step = min(end_step, start_step + tc.max_steps_per_run)
    if jax.process_index() == 0:
        print(run_status(start_step, tc.num_steps, workdir), flush=True)
    acc, t_last, step_last = None, time.perf_counter(), start_step
    bar = tqdm(range(start_step, end_step), initial=start_step, total=tc.num_steps,
               desc="train", disable=jax.process_index() != 0, dynamic_ncols=True)
    for step in bar:
        host_batch = source.next()
        if condition is not None:
            host_batch = condition(host_batch, step)
        batch = sharding_lib.global_batch(host_batch, mesh)
        state, metrics = train_step(state, batch)
        acc = accumulate(acc, metrics)
        done = step + 1
        if done % tc.log_every == 0 or done == end_step:
            acc = jax.device_get(acc)
            n = done - step_last
            if acc["nonfinite_step"] != np.iinfo(np.int32).max:
                checkpointer.close()
                raise NonFiniteLossError(f"loss became NaN/inf at step {acc['nonfinite_step']}; "
                                         f"last good checkpoint steps: {checkpointer.all_steps()}")
            now = time.perf_counter()
            scalars = {k: v / n for k, v in acc.items() if k != "nonfinite_step"}
            scalars.update(lr=tc.lr, steps_per_sec=n / (now - t_last),
                           images_per_sec=n * tc.batch_size / (now - t_last),
                           examples_seen=done * tc.batch_size)
            writer.write(done, scalars)
            bar.set_postfix(loss=f"{scalars['loss']:.4f}")
            acc, t_last, step_last = None, now, done
        if done % tc.checkpoint_every == 0 or done == end_step:
            checkpointer.save(done, state, source.get_state(), config.to_dict(), record)
    checkpointer.close()
    writer.close()
    source.close()
    if peft is not None:
        state = dict(state, frozen=peft.frozen)   # so the caller can sample the whole model
    return state
