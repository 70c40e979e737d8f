"""Width plans: which heads and MLP groups every block runs at every step of a sampler.

DyDiT's TDW masks depend on the timestep only (the routers read `t_embedder(t)`), so for a
sampler schedule they are data, computed once on the host (DESIGN.md section 3):

    plan = WidthPlan.build(model, variables, diffusion)   # diffusion.timestep_map -> masks
    buckets = plan.bucketize((0.25, 0.5, 0.75, 1.0))      # or "exact"
    plan.save("ckpt/width_plan.npz"); WidthPlan.load("ckpt/width_plan.npz")
    plan.macs_ratio(model, grid="exact")                  # whole-model MACs ratio of the run

Steps are indexed like the sampler's step index s = 0..S-1 (the loops run s = S-1 down to 0);
step s calls the model at timestep `timesteps[s] = diffusion.timestep_map[s]`.

Flow-matching models (SiT, continuous t in [0, 1]) plan for float times instead: the times at
which a fixed-grid ODE / SDE solver calls the model (`engine.flow.solver_times`), one plan row
per distinct time, ascending; `WidthPlan.build(model, variables, times)` with a float array.

Masks are computed with the model's own `DiT.width_logits` and `gumbel_sigmoid_gate` (eval
mode: on <=> sigmoid(logit / tau) > 0.5), exactly as the masked path decides them.

Buckets. Active counts are rounded up to a grid of widths: "exact" (every count 1..H is its own
bucket) or fractions of H, e.g. (0.25, 0.5, 0.75, 1.0) -> widths {ceil(f*H)} plus H. Each
block at each step gets an index order of length H: its active indices ascending, then its
inactive ones ascending. A bucket of width k takes the first k entries; slots at positions
>= count are padding and are zeroed by the gathered block (their proj rows / fc2 rows are 0).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from dydit_jax import flops
from dydit_jax.models.dit import DiTBlock, eval_width_masks

Grid = Union[str, Sequence[float]]
PLAN_FORMAT = 1


def fraction_sizes(fractions: Sequence[float], total: int, what: str) -> Tuple[int, ...]:
    """Sizes ceil(f * total) (at least 1) for fractions f in (0, 1], plus `total`, ascending.
    `what` names the setting in the error (width buckets, token capacities)."""
    sizes = {total}
    for f in fractions:
        f = float(f)
        if not 0.0 < f <= 1.0:
            raise ValueError(f"{what} fractions must lie in (0, 1], got {f} in "
                             f"{tuple(fractions)!r}")
        sizes.add(max(1, math.ceil(f * total - 1e-9)))
    return tuple(sorted(sizes))


def bucket_sizes(grid: Grid, num_heads: int) -> Tuple[int, ...]:
    """Allowed widths (ascending, the last is num_heads) of a bucket grid.

    "exact": 1..H. A sequence of fractions f in (0, 1]: ceil(f * H) each (at least 1), plus H.
    """
    if isinstance(grid, str):
        if grid != "exact":
            raise ValueError(f"unknown bucket grid {grid!r}; use 'exact' or a list of fractions "
                             "of the heads such as (0.25, 0.5, 0.75, 1.0)")
        return tuple(range(1, num_heads + 1))
    return fraction_sizes(grid, num_heads, "bucket grid")


def bucket_arrays(head_masks, group_masks, sizes: Sequence[int]) -> Dict[str, jax.Array]:
    """Width masks [..., H] (bool, any leading axes) -> the index data a gathered block reads
    (`Buckets.arrays()` names): per mask its order (active indices ascending, then inactive
    ones ascending: a stable argsort of "not active"), active count and bucket (index into
    `sizes` of the smallest width >= count). Traceable: the plan runs it on the host once,
    the engine on device for adaptive solvers."""
    table = jnp.asarray(sizes, jnp.int32)
    out = {}
    for name, masks in (("head", head_masks), ("group", group_masks)):
        masks = jnp.asarray(masks, bool)
        count = jnp.sum(masks, axis=-1).astype(jnp.int32)
        out[f"{name}_order"] = jnp.argsort(~masks, axis=-1, stable=True).astype(jnp.int32)
        out[f"{name}_count"] = count
        out[f"{name}_bucket"] = jnp.searchsorted(table, count).astype(jnp.int32)
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Buckets:
    """A width plan rounded up to a bucket grid. Arrays are indexed [step, block(, slot)].

    sizes: the allowed widths (for heads and groups alike).
    head_order / group_order [S, L, H] int32: indices, active first (see module docstring).
    head_count / group_count [S, L] int32: exact active counts (index 0 included).
    head_bucket / group_bucket [S, L] int32: index into `sizes` of the bucket in use.
    """
    sizes: Tuple[int, ...]
    head_order: np.ndarray
    head_count: np.ndarray
    head_bucket: np.ndarray
    group_order: np.ndarray
    group_count: np.ndarray
    group_bucket: np.ndarray

    @property
    def head_width(self) -> np.ndarray:
        """Bucketed head counts [S, L] (what the gathered attention computes)."""
        return np.asarray(self.sizes)[self.head_bucket]

    @property
    def group_width(self) -> np.ndarray:
        """Bucketed group counts [S, L] (what the gathered MLP computes)."""
        return np.asarray(self.sizes)[self.group_bucket]

    def block_signature(self, step: int, block: int) -> Tuple[int, int]:
        """(head width, group width) of one block at one step."""
        return (int(self.head_width[step, block]), int(self.group_width[step, block]))

    def block_signatures(self) -> Tuple[Tuple[int, int], ...]:
        """The distinct (head width, group width) pairs the plan uses, sorted."""
        pairs = np.stack([self.head_width, self.group_width], -1).reshape(-1, 2)
        return tuple(sorted({(int(h), int(g)) for h, g in pairs}))

    def arrays(self) -> Dict[str, np.ndarray]:
        """The per-step arrays an executable reads (all int32)."""
        return {name: getattr(self, name) for name in
                ("head_order", "head_count", "head_bucket",
                 "group_order", "group_count", "group_bucket")}


@dataclasses.dataclass(frozen=True, eq=False)
class WidthPlan:
    """Active heads and MLP groups per step and block of one sampler schedule.

    timesteps [S]: the model timestep of step index s (int64 for a diffusion, float32 for a
    flow model's continuous times). head_masks, group_masks
    [S, L, H] bool (index 0 always on). `fingerprint`: hash of everything the masks depend on
    (model config, tau, t_embedder and width-router parameters); `schedule` describes it.
    """
    timesteps: np.ndarray
    head_masks: np.ndarray
    group_masks: np.ndarray
    fingerprint: str = ""
    schedule: str = ""

    # -- construction --------------------------------------------------------------------

    @classmethod
    def build(cls, model, variables, schedule) -> "WidthPlan":
        """Plan of `model` (a dynamic DiT or SiT) for `schedule`: a diffusion (its
        `timestep_map`), a 1-D array of integer model timesteps (one per step index) or of
        float times (a flow model's continuous t, passed to the model as float32)."""
        if not getattr(model, "dynamic", False):
            raise ValueError("a width plan needs a dynamic model: construct DiT(..., "
                             "dynamic=True)")
        timesteps = schedule_timesteps(schedule)

        @jax.jit
        def gates(variables, t):  # the masked path's eval decision
            return eval_width_masks(*model.apply(variables, t, method=model.width_logits),
                                    tau=DiTBlock.tau)

        head, group = jax.device_get(gates(variables, _model_times(timesteps)))
        return cls(timesteps=timesteps, head_masks=np.asarray(head),
                   group_masks=np.asarray(group),
                   fingerprint=plan_fingerprint(model, variables),
                   schedule=_describe(schedule, timesteps))

    # -- shape ---------------------------------------------------------------------------

    @property
    def num_steps(self) -> int:
        return int(self.head_masks.shape[0])

    @property
    def depth(self) -> int:
        return int(self.head_masks.shape[1])

    @property
    def num_heads(self) -> int:
        return int(self.head_masks.shape[2])

    @property
    def head_counts(self) -> np.ndarray:
        """Active heads [S, L] (index 0 included)."""
        return self.head_masks.sum(-1).astype(np.int32)

    @property
    def group_counts(self) -> np.ndarray:
        """Active MLP groups [S, L] (index 0 included)."""
        return self.group_masks.sum(-1).astype(np.int32)

    # -- buckets -------------------------------------------------------------------------

    def bucketize(self, grid: Grid = "exact") -> Buckets:
        """Round the active counts up to `grid` (see :func:`bucket_sizes`)."""
        sizes = bucket_sizes(grid, self.num_heads)
        arrays = jax.device_get(bucket_arrays(self.head_masks, self.group_masks, sizes))
        return Buckets(sizes=sizes, **{k: np.asarray(v) for k, v in arrays.items()})

    # -- cost ----------------------------------------------------------------------------

    def step_macs(self, model, grid: Optional[Grid] = None, token_counts=None,
                  include_routers: bool = True) -> np.ndarray:
        """Whole-model MACs per sample of every step [S] by `flops.dynamic_macs`.

        grid None counts the exact active widths; a grid counts the bucketed widths the
        gathered engine actually computes. token_counts: tokens that run the MLP, [S, L] (or
        anything `dynamic_macs` broadcasts, e.g. a scalar); None = all tokens. With
        `include_routers` the width routers are counted as the masked path runs them; the
        engine itself never runs them (the plan replaces them), so its compiled MACs are
        this minus `dynamic_macs(...)["width_routers"]`.
        """
        if grid is None:
            heads, groups = self.head_counts, self.group_counts
        else:
            b = self.bucketize(grid)
            heads, groups = b.head_width, b.group_width
        if token_counts is not None:
            token_counts = np.broadcast_to(np.asarray(token_counts, np.float64), heads.shape)
        return np.asarray(flops.dynamic_macs(model, heads, groups, token_counts,
                                             include_routers=include_routers)["total"])

    def macs_ratio(self, model, grid: Optional[Grid] = None, token_counts=None,
                   include_routers: bool = True) -> float:
        """Whole-model MACs of the sampling run / the static model's (our counter, MACs):
        mean over steps of :meth:`step_macs` divided by `flops.static_macs(model)`."""
        per_step = self.step_macs(model, grid, token_counts, include_routers)
        return float(per_step.mean() / flops.static_macs(model)["total"])

    # -- persistence ---------------------------------------------------------------------

    def save(self, path: Union[str, os.PathLike]) -> str:
        """Write the plan as one .npz (arrays + a JSON `meta` entry). Returns the path."""
        path = os.fspath(path)
        if not path.endswith(".npz"):
            path += ".npz"
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        meta = dict(format=PLAN_FORMAT, fingerprint=self.fingerprint, schedule=self.schedule,
                    num_steps=self.num_steps, depth=self.depth, num_heads=self.num_heads,
                    mean_head_fraction=float(self.head_masks.mean()),
                    mean_group_fraction=float(self.group_masks.mean()))
        tmp = path + ".tmp.npz"
        np.savez(tmp, timesteps=self.timesteps, head_masks=self.head_masks,
                 group_masks=self.group_masks, meta=np.asarray(json.dumps(meta)))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "WidthPlan":
        with np.load(os.fspath(path), allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            if meta.get("format") != PLAN_FORMAT:
                raise ValueError(f"{path}: width plan format {meta.get('format')!r}, this code "
                                 f"reads format {PLAN_FORMAT}; rebuild it with WidthPlan.build")
            return cls(timesteps=f["timesteps"], head_masks=f["head_masks"].astype(bool),
                       group_masks=f["group_masks"].astype(bool),
                       fingerprint=meta["fingerprint"], schedule=meta["schedule"])

    def check(self, model, variables, schedule) -> None:
        """Raise ValueError unless this plan belongs to (model, variables, schedule)."""
        timesteps = schedule_timesteps(schedule)
        if not _same_times(timesteps, self.timesteps):
            raise ValueError(f"width plan for schedule {self.schedule!r} ({self.num_steps} "
                             f"steps) does not match the sampler's {len(timesteps)} timesteps; "
                             "build a plan for this schedule")
        if (self.depth, self.num_heads) != (model.depth, model.num_heads):
            raise ValueError(f"width plan has depth {self.depth} and {self.num_heads} heads, "
                             f"the model {model.depth} and {model.num_heads}")
        fp = plan_fingerprint(model, variables)
        if self.fingerprint and fp != self.fingerprint:
            raise ValueError("width plan fingerprint does not match these parameters (the "
                             "t_embedder or width routers differ); rebuild the plan")


# ----------------------------------------------------------------------------------------------
# Helpers and the per-(parameters, schedule) cache
# ----------------------------------------------------------------------------------------------

def schedule_timesteps(schedule) -> np.ndarray:
    """A diffusion (`timestep_map`) or an array of model timesteps -> int64 [S]; an array of
    float times (flow models) -> float32 [S]."""
    timesteps = np.asarray(getattr(schedule, "timestep_map", schedule))
    timesteps = timesteps.astype(np.float32 if np.issubdtype(timesteps.dtype, np.floating)
                                 else np.int64)
    if timesteps.ndim != 1 or timesteps.size == 0:
        raise ValueError(f"schedule timesteps must be a non-empty 1-D array, got shape "
                         f"{timesteps.shape}")
    return timesteps


def _same_times(a: np.ndarray, b: np.ndarray) -> bool:
    """Same times of the same kind (integer diffusion timesteps vs float flow times)."""
    return a.dtype.kind == b.dtype.kind and np.array_equal(a, b)


def _model_times(timesteps: np.ndarray) -> np.ndarray:
    """The model's t input: int32 diffusion timesteps or float32 flow times."""
    return timesteps.astype(np.float32 if timesteps.dtype.kind == "f" else np.int32)


def _describe(schedule, timesteps: np.ndarray) -> str:
    if hasattr(schedule, "timestep_map"):
        return (f"{type(schedule).__name__}({len(timesteps)} steps, "
                f"t {timesteps[0]}..{timesteps[-1]})")
    if timesteps.dtype.kind == "f":
        return f"times({len(timesteps)}, t {timesteps[0]:.6g}..{timesteps[-1]:.6g})"
    return f"timesteps({len(timesteps)})"


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def plan_fingerprint(model, variables) -> str:
    """sha256 of what the width masks depend on: the model's shape fields, tau, and the
    t_embedder and width-router parameters (a few small arrays copied to the host)."""
    h = hashlib.sha256()
    fields = dict(hidden_size=model.hidden_size, depth=model.depth, num_heads=model.num_heads,
                  tau=DiTBlock.tau)
    # `numerics` changes the timestep features, hence the masks. Left out for "official" so
    # that plans saved before the field existed stay valid.
    if model.numerics != "official":
        fields["numerics"] = model.numerics
    h.update(json.dumps(fields, sort_keys=True).encode())
    params = variables["params"] if "params" in variables else variables
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda pl: _path_name(pl[0])):
        name = _path_name(path)
        if name.startswith("t_embedder/") or "/head_router/" in name or \
                "/group_router/" in name:
            arr = np.ascontiguousarray(jax.device_get(leaf))
            h.update(name.encode())
            h.update(str(arr.dtype).encode() + str(arr.shape).encode())
            h.update(arr.tobytes())
    return h.hexdigest()


_PLANS: Dict[Tuple[str, bytes], WidthPlan] = {}


def get_plan(model, variables, schedule, cache_dir: Optional[Union[str, os.PathLike]] = None
             ) -> WidthPlan:
    """The width plan of (parameters, schedule), built once per process and, with `cache_dir`
    (e.g. beside the checkpoint), saved there as `width_plan-<hash>.npz` and reused."""
    timesteps = schedule_timesteps(schedule)
    fp = plan_fingerprint(model, variables)
    key = (fp, str(timesteps.dtype).encode() + timesteps.tobytes())
    path = None
    if cache_dir is not None:
        tag = hashlib.sha256(fp.encode() + key[1]).hexdigest()[:16]
        path = os.path.join(os.fspath(cache_dir), f"width_plan-{tag}.npz")
    if key in _PLANS:
        # Built earlier in this process (perhaps for another workdir): still leave the file
        # beside this checkpoint, so the next process finds it.
        if path is not None and not os.path.exists(path):
            _PLANS[key].save(path)
        return _PLANS[key]
    if path is not None and os.path.exists(path):
        plan = WidthPlan.load(path)
        if plan.fingerprint != fp or not _same_times(plan.timesteps, timesteps):
            plan = None
    else:
        plan = None
    if plan is None:
        plan = WidthPlan.build(model, variables, schedule)
        if path is not None:
            plan.save(path)
    _PLANS[key] = plan
    return plan


__all__ = ["WidthPlan", "Buckets", "bucket_sizes", "bucket_arrays", "fraction_sizes", "get_plan", "plan_fingerprint",
           "schedule_timesteps"]
