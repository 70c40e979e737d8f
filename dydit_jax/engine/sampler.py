"""The engine's sampler: DDPM / DDIM with classifier-free guidance on the gathered model.

    eng = Engine(model, variables, create_diffusion("250"), sampler="ddpm", grid="exact")
    eng.warmup(batch_size=8)                       # compiles everything the plan needs
    x0 = eng.sample(jax.random.PRNGKey(0), labels, cfg_scale=1.5)
    eng.compile_count                              # executables compiled so far

Samples equal `sampling.make_sample_fn(model, diffusion, ...)`'s masked-path samples (same
arguments, same rng): x_T = normal(split_loop_key(rng)[0], [B, ...]) and step i draws
`loop_step_noise(step_key, i, [B, ...])`, which under partitionable threefry equals the first B
rows of the masked sampler's [2B, ...] CFG draw. Guidance follows `DiT.forward_with_cfg` (rows
[x; x], labels [y; null]); the engine carries only the conditional half, which is all the
masked sampler returns. Both halves share the step's width plan (width masks depend on t only);
token masks are per row.

Executors (`executor=`), both with an explicit executable cache and compile counter:
- "fused" (default): ONE executable per (batch size, rng key type) for the whole run: a
  `lax.scan` over steps; inside, a scan over the (stacked) blocks where each block
  `lax.switch`es over the head widths and over (group width x token capacity) buckets.
  The plan's index arrays are device-resident arguments; nothing goes back to the host.
- "blocks": one executable per block bucket signature (head width, group width), shared by all
  blocks and steps that use it, plus four small ones (init, embed, final+guidance, diffusion
  update); a host loop dispatches L + 3 executables per step (asynchronously, no host sync).
The per-step whole-model signature (the widths of all L blocks) is not used as a key: it can
change at most steps (the tiny test model has 102 distinct ones in 250 DDPM steps), which would
compile almost once per step.

Mesh: with `mesh`, labels, x and samples are split over `batch_axes` (default: the mesh's
"data"/"fsdp" axes), parameters and the plan are replicated. The gathered model runs inside
`shard_map`, so each device gathers its own rows: token capacity buckets are fractions of the
device's B_local*N rows and the capacity `lax.switch` is taken per device; CFG pairs [x; x]
are formed per device, so guidance needs no communication.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from dydit_jax import flops
from dydit_jax.diffusion import loop_step_noise, split_loop_key
from dydit_jax.engine import gathered
from dydit_jax.engine.plan import Grid, WidthPlan, get_plan
from dydit_jax.models.dit import check_labels
from dydit_jax.sampling import model_latent_shape

SAMPLERS = ("ddpm", "ddim")
EXECUTORS = ("fused", "blocks")
DEFAULT_CAPACITIES = tuple(i / 8 for i in range(1, 9))  # eighths of B*N


class ExecutableCache:
    """AOT-compiled executables keyed by signature. `compiles` counts cache misses (each one
    a `jax.jit(...).lower(...).compile()`); a persistent compilation cache, if configured,
    may make a miss cheap but it is still counted."""

    def __init__(self):
        self._executables: Dict[Any, Any] = {}
        self.compiles = 0

    def get(self, key, lower):
        """The executable for `key`, compiling `lower()` (a `jax.stages.Lowered`) on a miss."""
        exe = self._executables.get(key)
        if exe is None:
            exe = lower().compile()
            self._executables[key] = exe
            self.compiles += 1
        return exe

    def keys(self):
        """The signatures compiled so far, e.g. ("block", batch, (heads, groups), None)."""
        return list(self._executables)


def enable_persistent_cache(directory: Union[str, os.PathLike]) -> None:
    """Point JAX's persistent compilation cache at `directory` (process-global setting) and
    let it store every executable, however small or fast to compile."""
    jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class Engine:
    """Dynamic-width sampler of one (model, parameters, schedule, sampler).

    :param model: a dynamic DiT (`DiT(..., dynamic=True)`; `dynamic_tokens` on or off) or
        a dynamic Latte (clips [B, F, H, W, C]; fused executor).
    :param variables: its variables `{"params": ...}` (or the bare params).
    :param diffusion: the sampler's diffusion (`create_diffusion("250")`, `"ddim50"`, ...).
    :param sampler: "ddpm" (`p_sample`) or "ddim" (`ddim_sample` with `eta`).
    :param grid: width bucket grid: "exact" or fractions of the heads, e.g. (0.25, 0.5, 0.75, 1).
    :param token_capacities: token capacity buckets, fractions of a device's B*N rows (1.0 is
        always added, so every kept count fits).
    :param executor: "fused" (one executable for the whole run) or "blocks" (one per block
        bucket signature); see the module docstring.
    :param use_cfg, guide_channels, eta, clip_denoised, latent_shape: as in
        `sampling.make_sample_fn`.
    :param mesh, batch_axes: sample on a `jax.sharding.Mesh`, batch split over `batch_axes`.
    :param plan: a `WidthPlan` (checked against model, parameters and schedule); default
        `get_plan(model, variables, diffusion, cache_dir=plan_dir)`.
    :param compilation_cache_dir: enables JAX's persistent compilation cache there (global).
    :param peft: the `LoraSpec` of LoRA / TD-LoRA adapters in `variables` (adapter leaves
        beside the base, `peft.combine`): each step merges W + delta W(t) once, for all rows
        (a step has one t), and gathers from the merged weights. Fused executor only.
    """

    def __init__(self, model, variables, diffusion, *, sampler: str = "ddpm", eta: float = 0.0,
                 clip_denoised: bool = False, use_cfg: bool = True,
                 guide_channels: Optional[int] = 3, grid: Grid = "exact",
                 token_capacities: Sequence[float] = DEFAULT_CAPACITIES,
                 executor: str = "fused", mesh=None, batch_axes=None,
                 latent_shape: Optional[Sequence[int]] = None,
                 plan: Optional[WidthPlan] = None, plan_dir=None, compilation_cache_dir=None,
                 peft=None):
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
        self.diffusion = diffusion
        self.sampler, self.eta, self.clip_denoised = sampler, eta, clip_denoised
        self._setup(model, variables, diffusion, plan=plan, plan_dir=plan_dir, grid=grid,
                    token_capacities=token_capacities, executor=executor, mesh=mesh,
                    batch_axes=batch_axes, latent_shape=latent_shape, use_cfg=use_cfg,
                    guide_channels=guide_channels,
                    compilation_cache_dir=compilation_cache_dir, peft=peft)

    def _setup(self, model, variables, schedule, *, plan, plan_dir, grid, token_capacities,
               executor, mesh, batch_axes, latent_shape, use_cfg, guide_channels,
               compilation_cache_dir, peft=None):
        """What every engine holds: the plan of `schedule` and its buckets, the mesh, the
        parameters split into non-block and (stacked) block trees, the executable cache."""
        if executor not in EXECUTORS:
            raise ValueError(f"unknown executor {executor!r}; expected one of {EXECUTORS}")
        if not getattr(model, "dynamic", False):
            raise ValueError("the engine runs dynamic models: construct the model with "
                             "dynamic=True")
        if compilation_cache_dir is not None:
            enable_persistent_cache(compilation_cache_dir)
        if "params" not in variables:
            variables = {"params": variables}
        from dydit_jax.peft import has_adapters
        if has_adapters(variables["params"]) and peft is None:
            raise ValueError("these variables hold LoRA adapters: pass peft=<their LoraSpec> "
                             "(or merge them first with peft.merge_params)")
        if executor == "blocks" and len(model.block_kinds) > 1:
            raise ValueError(f"the blocks executor runs models whose blocks all group tokens "
                             f"alike; {type(model).__name__}'s blocks are {model.block_kinds}: "
                             f"use executor='fused'")
        if peft is not None and executor != "fused":
            raise ValueError("adapters are merged per step inside the fused executor: use "
                             "executor='fused' with peft")
        self.peft = peft
        self.model = model
        self.use_cfg, self.guide_channels = use_cfg, guide_channels
        self.executor = executor
        self.capacities = tuple(float(f) for f in token_capacities)
        self.latent_shape = model_latent_shape(model, latent_shape)

        if plan is None:
            plan = get_plan(model, variables, schedule, cache_dir=plan_dir)
        else:
            plan.check(model, variables, schedule)
        self.plan = plan
        self.grid = grid
        self.buckets = plan.bucketize(grid)
        self.cache = ExecutableCache()

        self.mesh = mesh
        if mesh is not None:
            if batch_axes is None:
                batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names) or \
                    tuple(mesh.axis_names)
            batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
            self.batch_axes = batch_axes
            self.num_shards = int(np.prod([mesh.shape[a] for a in batch_axes]))
            self._repl = NamedSharding(mesh, P())
            self._batch = NamedSharding(mesh, P(batch_axes))
        else:
            self.batch_axes, self.num_shards = None, 1
            self._repl = self._batch = None

        rest, block_list = gathered.split_params(model, variables)
        self._rest = self._put(rest)
        if executor == "fused":
            self._blocks = self._put(gathered.stacked_blocks(model, variables))
        else:
            self._blocks = [self._put(bp) for bp in block_list]
        self._plan_arrays = self._put(self.buckets.arrays())
        self._indices = [self._put(np.int32(i)) for i in
                         range(max(plan.num_steps, model.depth))]

    # -- placement -----------------------------------------------------------------------

    def _put(self, tree, batch: bool = False):
        # device_put, not jnp.asarray: no compile, also for a new shape (a jnp.asarray of a
        # numpy array compiles a small program per shape).
        return jax.device_put(tree, self._batch if batch else self._repl)

    def _aval(self, shape, dtype, batch: bool = False):
        sharding = self._batch if batch else self._repl
        return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)

    def _jit(self, fn, in_shardings, out_shardings):
        if self.mesh is None:
            return jax.jit(fn)
        return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings)

    def _per_device(self, fn, in_specs, out_specs):
        """`fn` on each device's rows (shard_map over the batch axes); itself without mesh."""
        if self.mesh is None:
            return fn
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)

    def _check_batch(self, batch_size: int):
        if batch_size % self.num_shards:
            raise ValueError(f"batch size {batch_size} must be divisible by the "
                             f"{self.num_shards} devices of the batch axes {self.batch_axes}")

    def _labels(self, labels):
        labels = np.asarray(jax.device_get(labels)).astype(np.int32)
        if labels.ndim != 1:
            raise ValueError(f"labels must have shape [B], got {labels.shape}")
        check_labels(labels, self.model.num_classes, self.model.class_dropout_prob > 0)
        self._check_batch(labels.shape[0])
        return self._put(labels, batch=True)

    # -- the model and the diffusion step --------------------------------------------------

    @property
    def _spec(self):
        return P(self.batch_axes) if self.mesh is not None else None

    def _model_out(self, rest, blocks, widths, x, t, y, cfg_scale, both_halves=False):
        """Gathered model output for x [B] at model timesteps t [B]: the guided conditional
        half with CFG (with `both_halves`, a pair: also the unconditional half, see
        `gathered.guide`). Returns (out [B, ...], kept [L] summed over all devices' rows)."""
        both_halves = both_halves and self.use_cfg
        if self.peft is not None:
            rest, blocks = self._merged(rest, blocks, t)

        def local(rest, blocks, widths, x, t, y, cfg_scale):
            out, kept = gathered.forward(
                self.model, rest, blocks, x, t, y, widths, self.buckets.sizes,
                self.capacities, cfg_scale=cfg_scale if self.use_cfg else None,
                guide_channels=self.guide_channels, both_halves=both_halves)
            return out, kept[None]
        r, b = P(), self._spec
        out, kept = self._per_device(local, (r, r, r, b, b, b, r),
                                     ((b, b) if both_halves else b, b))(
            rest, blocks, widths, x, t, y, cfg_scale)
        return out, jnp.sum(kept, axis=0)

    def _merged(self, rest, blocks, t):
        """The step's weights W + delta W(t) (t [B] model timesteps, one value per step):
        E_t once, then every adapted kernel merged (depth-stacked in `blocks`; a model with
        several block kinds has one stack per kind, `gathered.stacked_blocks`)."""
        from dydit_jax.peft import merge_params, time_embedding
        t_emb = time_embedding(self.model, rest, t[:1], self.peft)[0]
        if isinstance(blocks, tuple):
            merged = tuple(merge_params(stack, t_emb, self.peft) for stack in blocks)
        else:
            merged = merge_params(blocks, t_emb, self.peft)
        return merge_params(rest, t_emb, self.peft), merged

    def _step(self, model_fn, x, i, step_key):
        """One sampler step at step index i (traced), exactly as the masked sampler's loop."""
        t = jnp.full((x.shape[0],), i, jnp.int32)
        kw = dict(clip_denoised=self.clip_denoised)
        if self.sampler == "ddpm":
            noise = loop_step_noise(step_key, i, x.shape, x.dtype)
            out = self.diffusion.p_sample(model_fn, x, t, noise=noise, **kw)
        else:
            noise = None
            if not (isinstance(self.eta, (int, float)) and self.eta == 0):
                noise = loop_step_noise(step_key, i, x.shape, x.dtype)
            out = self.diffusion.ddim_sample(model_fn, x, t, noise=noise, eta=self.eta, **kw)
        return out["sample"].astype(x.dtype)

    # -- fused executor ------------------------------------------------------------------

    def _fused_sample(self, rest, blocks, plan, rng, labels, cfg_scale):
        b = labels.shape[0]
        init_key, step_key = split_loop_key(rng)
        x_T = jax.random.normal(init_key, (b,) + self.latent_shape, jnp.float32)

        def body(x, i):
            widths = jax.tree_util.tree_map(lambda a: a[i], plan)
            box = {}

            def model_fn(x_, t_):
                out, box["kept"] = self._model_out(rest, blocks, widths, x_, t_, labels,
                                                   cfg_scale)
                return out
            return self._step(model_fn, x, i, step_key), box["kept"]

        steps = jnp.arange(self.plan.num_steps - 1, -1, -1, dtype=jnp.int32)
        x0, kept = lax.scan(body, x_T, steps)
        return x0, kept[::-1]  # kept[s]: step index s

    def _fused_forward(self, rest, blocks, plan, x, i, labels, cfg_scale):
        widths = jax.tree_util.tree_map(lambda a: a[i], plan)
        t = self.diffusion.model_timesteps(jnp.full((x.shape[0],), i, jnp.int32))
        return self._model_out(rest, blocks, widths, x, t, labels, cfg_scale)

    def _fused_executable(self, kind: str, batch_size: int, rng_aval=None):
        self._check_batch(batch_size)
        r, bt = self._repl, self._batch
        params = (self._rest, self._blocks, self._plan_arrays)
        labels = self._aval((batch_size,), jnp.int32, batch=True)
        cfg = self._aval((), jnp.float32)
        if kind == "sample":
            key = ("sample", batch_size, rng_aval.shape, str(rng_aval.dtype))
            fn, ins = self._fused_sample, (r, r, r, r, bt, r)
            args = params + (self._aval(rng_aval.shape, rng_aval.dtype), labels, cfg)
        else:
            key = ("forward", batch_size)
            fn, ins = self._fused_forward, (r, r, r, bt, r, bt, r)
            x = self._aval((batch_size,) + self.latent_shape, jnp.float32, batch=True)
            args = params + (x, self._aval((), jnp.int32), labels, cfg)
        return self.cache.get(key, lambda: self._jit(fn, ins, (bt, r)).lower(*args))

    # -- blocks executor -----------------------------------------------------------------

    def _rows(self, batch_size: int) -> int:
        return 2 * batch_size if self.use_cfg else batch_size

    def _blocks_executable(self, kind, batch_size: int, signature=None, rng_aval=None):
        self._check_batch(batch_size)
        model, r, bt = self.model, self._repl, self._batch
        rs, bs = P(), self._spec
        rows, n, d = self._rows(batch_size), model.num_patches, model.hidden_size
        x = self._aval((batch_size,) + self.latent_shape, jnp.float32, batch=True)
        tokens = self._aval((rows, n, d), model.dtype, batch=True)
        c = self._aval((rows, d), model.dtype, batch=True)
        index = self._aval((), jnp.int32)
        labels = self._aval((batch_size,), jnp.int32, batch=True)
        cfg = self._aval((), jnp.float32)

        if kind == "init":
            def fn(rng):
                init_key, step_key = split_loop_key(rng)
                return (jax.random.normal(init_key, (batch_size,) + self.latent_shape,
                                          jnp.float32), step_key)
            args, ins, outs = (self._aval(rng_aval.shape, rng_aval.dtype),), (r,), (bt, r)
        elif kind == "embed":
            def local(rest, x, t, y):
                if self.use_cfg:
                    x = jnp.concatenate([x, x], axis=0)
                    t = jnp.concatenate([t, t], axis=0)
                    y = jnp.concatenate([y, jnp.full_like(y, model.num_classes)], axis=0)
                return gathered.embed(model, rest, x, t, y)

            def fn(rest, x, i, y):
                t = self.diffusion.model_timesteps(jnp.full((x.shape[0],), i, jnp.int32))
                return self._per_device(local, (rs, bs, bs, bs), (bs, bs))(rest, x, t, y)
            args, ins, outs = (self._rest, x, index, labels), (r, bt, r, bt), (bt, bt)
        elif kind == "block":
            kh, kg = signature

            def local(bp, tokens, c, plan, i, l):
                width = jax.tree_util.tree_map(lambda a: a[i, l], plan)
                tokens, kept = gathered.block_forward(model, bp, tokens, c, width, (kh,),
                                                      (kg,), self.capacities)
                return tokens, kept[None]

            def fn(bp, tokens, c, plan, i, l):
                tokens, kept = self._per_device(local, (rs, bs, bs, rs, rs, rs), (bs, bs))(
                    bp, tokens, c, plan, i, l)
                return tokens, jnp.sum(kept)
            args = (self._blocks[0], tokens, c, self._plan_arrays, index, index)
            ins, outs = (r, bt, bt, r, r, r), (bt, r)
        elif kind == "head":
            def local(rest, tokens, c, cfg_scale):
                out = gathered.final(model, rest, tokens, c)
                if self.use_cfg:
                    out = gathered.guide(out, cfg_scale, model.in_channels, self.guide_channels)
                return out

            def fn(rest, tokens, c, cfg_scale):
                return self._per_device(local, (rs, bs, bs, rs), bs)(rest, tokens, c, cfg_scale)
            args, ins, outs = (self._rest, tokens, c, cfg), (r, bt, bt, r), bt
        elif kind == "update":
            def fn(x, out, i, step_key):
                return self._step(lambda x_, t_: out, x, i, step_key)
            out = self._aval((batch_size,) + self.latent_shape[:-1] +
                             (model.out_channels,), jnp.float32, batch=True)
            key_aval = jax.eval_shape(lambda k: split_loop_key(k)[1], rng_aval)
            args = (x, out, index, self._aval(key_aval.shape, key_aval.dtype))
            ins, outs = (bt, bt, r, r), bt
        else:
            raise ValueError(kind)
        key = (kind, batch_size, signature,
               None if rng_aval is None else (rng_aval.shape, str(rng_aval.dtype)))
        return self.cache.get(key, lambda: self._jit(fn, ins, outs).lower(*args))

    def _blocks_forward(self, x, i: int, labels, cfg_scale, with_kept: bool = False):
        """Host loop over one step's executables: tokens -> L blocks -> guided output."""
        b = x.shape[0]
        ii = self._indices[i]
        tokens, c = self._blocks_executable("embed", b)(self._rest, x, ii, labels)
        kept = []
        for l in range(self.model.depth):
            sig = self.buckets.block_signature(i, l)
            tokens, k = self._blocks_executable("block", b, sig)(
                self._blocks[l], tokens, c, self._plan_arrays, ii, self._indices[l])
            kept.append(k)
        out = self._blocks_executable("head", b)(self._rest, tokens, c, cfg_scale)
        return (out, kept) if with_kept else out

    def _blocks_sample(self, rng, labels, cfg_scale):
        b = labels.shape[0]
        rng_aval = jax.ShapeDtypeStruct(rng.shape, rng.dtype)
        x, step_key = self._blocks_executable("init", b, rng_aval=rng_aval)(rng)
        update = self._blocks_executable("update", b, rng_aval=rng_aval)
        kept = [None] * self.plan.num_steps
        for i in range(self.plan.num_steps - 1, -1, -1):
            out, kept[i] = self._blocks_forward(x, i, labels, cfg_scale, with_kept=True)
            x = update(x, out, self._indices[i], step_key)
        return x, kept  # [S][L] device scalars, stacked on the host only for stats

    # -- public API ------------------------------------------------------------------------

    @property
    def compile_count(self) -> int:
        """Executables compiled by this engine so far."""
        return self.cache.compiles

    def warmup(self, batch_size: int, rng=None) -> int:
        """Compile everything a sampling run of `batch_size` needs (for this plan). Returns
        the number of new compiles. `rng`: an example key (default `PRNGKey(0)`'s type)."""
        before = self.cache.compiles
        rng = jax.random.PRNGKey(0) if rng is None else rng
        rng_aval = jax.ShapeDtypeStruct(rng.shape, rng.dtype)
        if self.executor == "fused":
            self._fused_executable("sample", batch_size, rng_aval)
        else:
            for kind in ("init", "update"):
                self._blocks_executable(kind, batch_size, rng_aval=rng_aval)
            for kind in ("embed", "head"):
                self._blocks_executable(kind, batch_size)
            for sig in self.buckets.block_signatures():
                self._blocks_executable("block", batch_size, sig)
        return self.cache.compiles - before

    def sample(self, rng, labels, cfg_scale: float = 1.0, return_stats: bool = False):
        """Samples x0 [B, H, W, C] (float32) for int labels [B], as `make_sample_fn`'s sampler
        with the same arguments. `cfg_scale` never recompiles (ignored without CFG).

        With `return_stats`, returns (x0, stats): stats["kept_tokens"] [S, L] (tokens that ran
        the MLP, summed over the model batch, step index order) and
        stats["token_fraction"] [S, L] (kept / (rows * N))."""
        labels = self._labels(labels)
        b = labels.shape[0]
        if self.executor == "fused":
            x0, kept = self._run_fused_sample(rng, labels, cfg_scale)
        else:
            rng, cfg_scale = self._put(rng), self._put(np.float32(cfg_scale))
            x0, kept = self._blocks_sample(rng, labels, cfg_scale)
        if not return_stats:
            return x0
        kept = np.asarray(jax.device_get(kept))
        frac = kept / float(self._rows(b) * self.model.tokens_per_sample)
        return x0, {"kept_tokens": kept, "token_fraction": frac}

    def _run_fused_sample(self, rng, labels, cfg_scale):
        """The fused sampling executable on checked labels: (samples, its second output)."""
        rng, cfg_scale = self._put(rng), self._put(np.float32(cfg_scale))
        exe = self._fused_executable("sample", labels.shape[0],
                                     jax.ShapeDtypeStruct(rng.shape, rng.dtype))
        return exe(self._rest, self._blocks, self._plan_arrays, rng, labels, cfg_scale)

    def forward(self, x, step: int, labels, cfg_scale: Optional[float] = None):
        """The gathered model output at sampler step index `step` (model timestep
        `plan.timesteps[step]` for every row): [B, H, W, C_out] for x [B, H, W, C], or with CFG
        (`use_cfg`) the guided conditional half of `DiT.forward_with_cfg` on [x; x],
        [labels; null]. Compiled once per batch size, whatever the step."""
        if not 0 <= step < self.plan.num_steps:
            raise ValueError(f"step {step} outside the plan's 0..{self.plan.num_steps - 1}")
        labels = self._labels(labels)
        cfg = self._put(np.float32(1.0 if cfg_scale is None else cfg_scale))
        x = self._put(np.asarray(jax.device_get(x), np.float32), batch=True)
        if self.executor == "fused":
            exe = self._fused_executable("forward", x.shape[0])
            return exe(self._rest, self._blocks, self._plan_arrays, x, self._indices[step],
                       labels, cfg)[0]
        return self._blocks_forward(x, step, labels, cfg)

    # -- cost ------------------------------------------------------------------------------

    def _token_avals(self):
        """One sample's tokens in the canonical layout ([1, N, D]; a Latte clip [F, N, D]) and
        its conditioning [1, D], as abstract values."""
        model = self.model
        frames = model.tokens_per_sample // model.num_patches
        return (jax.ShapeDtypeStruct((frames, model.num_patches, model.hidden_size),
                                     model.dtype),
                jax.ShapeDtypeStruct((1, model.hidden_size), model.dtype))

    def bucket_macs(self) -> Dict[Tuple[int, int], int]:
        """MACs per sample of one gathered block of every bucket signature (head width,
        group width) the plan uses, counted by `flops.jaxpr_macs` from the block's jaxpr (the
        capacity switch counts its largest branch: all tokens run the MLP). A model with
        several block kinds (Latte) is keyed (kind index, head width, group width)."""
        model = self.model
        kinds = model.block_kinds
        blocks = self._blocks if isinstance(self._blocks, tuple) else (self._blocks,)
        tokens, c = self._token_avals()
        width = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0, 0]), self.buckets.arrays())
        out = {}
        for p, kind in enumerate(kinds):
            bp = (jax.tree_util.tree_map(lambda a: a[0], blocks[p])
                  if self.executor == "fused" else self._blocks[0])
            rows = jax.eval_shape(lambda x: model.to_block_rows(x, kind, 1), tokens)
            for kh, kg in self.buckets.block_signatures():
                fn = functools.partial(gathered.block_forward, model, head_sizes=(kh,),
                                       group_sizes=(kg,), capacities=self.capacities,
                                       index=p)
                macs = flops.jaxpr_macs(lambda bp, x, c: fn(bp, x, c, width), bp, rows, c)
                out[(kh, kg) if len(kinds) == 1 else (p, kh, kg)] = macs
        return out

    def step_macs(self) -> np.ndarray:
        """Whole-model MACs per sample of every step [S] as the engine computes them (bucketed
        widths, all tokens), from `bucket_macs` plus the embedders and final layer counted from
        their jaxprs. Equals `plan.step_macs(model, grid) - width routers` (the engine never
        runs the width routers)."""
        model = self.model
        x = jax.ShapeDtypeStruct((1,) + self.latent_shape, jnp.float32)
        i1 = jax.ShapeDtypeStruct((1,), jnp.int32)
        tokens, c = self._token_avals()
        outer = (flops.jaxpr_macs(lambda x, t, y: gathered.embed(model, self._rest, x, t, y),
                                  x, i1, i1)
                 + flops.jaxpr_macs(lambda tk, c: gathered.final(model, self._rest, tk, c),
                                    tokens, c))
        per_bucket = self.bucket_macs()
        heads, groups = self.buckets.head_width, self.buckets.group_width
        cycle = len(model.block_kinds)
        if cycle == 1:
            blocks = np.vectorize(lambda h, g: per_bucket[(int(h), int(g))])(heads, groups)
        else:
            kind = np.broadcast_to(np.arange(heads.shape[-1]) % cycle, heads.shape)
            blocks = np.vectorize(lambda p, h, g: per_bucket[(int(p), int(h), int(g))])(
                kind, heads, groups)
        return outer + blocks.sum(-1)


__all__ = ["Engine", "ExecutableCache", "enable_persistent_cache", "SAMPLERS", "EXECUTORS",
           "DEFAULT_CAPACITIES"]
