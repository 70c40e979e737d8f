"""LoRA and TD-LoRA adapters on named Dense layers, for every model family.

An adapter is a parameter transformation, not a change of the model classes: the base
parameters stay as they are, the adapter leaves sit beside each target Dense's kernel in the
same tree (`blocks_3/attn/qkv/lora_A`, ...), and `PeftModel.apply` runs the unmodified model
under a Flax method interceptor that adds the low-rank delta to every Dense that has adapter
leaves in its scope. Because the leaves live in the Dense's own scope, `nn.scan` slices them
per layer like the kernel (scanned targets get a leading depth axis), and the same code adapts
DiT, SiT and any family whose layers are `nn.Dense` and whose timestep embedding is one
submodule (`LoraSpec.time_module`).

TD-LoRA ("timestep-based dynamic LoRA", DyDiT++) is our formulation; the exact published one
is not available (DESIGN.md 5). Per target layer, K experts (A_k [Din, r], B_k [r, Dout]) are
mixed per sample by weights from the timestep embedding E_t, the same E_t the width routers
read:
    delta W(t) = (alpha / r) sum_k a_k(t) A_k B_k        (kernel layout [Din, Dout])
    a(t) = softmax(E_t W_r / tau)   or   sigmoid(E_t W_r / tau)   (`mixing`)
W_r [D_t, K] has no bias and is zero-initialised (the experts start evenly mixed); every B_k
is zero-initialised, so the adapted model starts equal to the base. The A_k are drawn
independently (PEFT's kaiming-uniform bound 1/sqrt(Din)): with equal A_k the experts would get
equal gradients and never separate. `scope="layer"` gives every target its own router (at
`<target>/lora_router`); `scope="block"` shares one per block (at `<block>/lora_router`, the
block being the path prefix `block_pattern` matches). Plain LoRA is K = 1 without a router.

Two ways to compute the same function (`PeftModel(mode=...)`):
- "rows" (training): per-sample mixing, low-rank path x A_k (r columns per expert) scaled by
  a_k of the row's sample, then B_k: no per-sample weight matrix is ever formed. Rows are
  taken sample-major (a Dense input [R, ...] with R = B * m holds sample b in rows
  b*m .. b*m + m - 1), as every family's token reshapes produce.
- "merged" (sampling): all rows of one forward share one t (every sampler step does), so each
  target computes W + delta W(t) once per forward and runs one plain matmul: a TD-LoRA model
  then samples at the speed of a fully fine-tuned one. `merge_params` does the same on a
  parameter tree for the inference engine. The two agree to float32 rounding (tested).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

LEAVES = ("lora_A", "lora_B", "lora_router")
METHODS = ("lora", "tdlora")
MIXINGS = ("softmax", "sigmoid")
SCOPES = ("layer", "block")
MODES = ("rows", "merged")

# Attention qkv/proj and MLP fc1/fc2 of every block (DiT and SiT names; a family with other
# names passes its own regex). adaLN is opt-in: `ADALN_TARGETS`.
DEFAULT_TARGETS = r"blocks(_\d+)?/(attn/(qkv|proj)|mlp/(fc1|fc2))$"
ADALN_TARGETS = r"blocks(_\d+)?/adaLN_modulation$"
# Layers whose output decides the width plan: adapting them would make the plan (computed from
# the base parameters) wrong, and adapting the time module would make E_t depend on itself.
UNADAPTABLE = r"(^|/)(t_embedder|head_router|group_router)(/|$)"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how (`config.peft`; see the module docstring for the formula).

    :param method: "lora" (K = 1, no router) or "tdlora" (K experts mixed by E_t).
    :param rank: r of every expert; `alpha` scales the delta by alpha / r (default alpha = r).
    :param experts: K (TD-LoRA only; plain LoRA is always 1).
    :param mixing: "softmax" or "sigmoid" over the K router logits, at temperature `tau`.
    :param scope: "layer" (a router per target) or "block" (one router per block).
    :param targets: regex searched in each Dense's parameter path ("blocks_3/attn/qkv").
    :param block_pattern: regex whose match at the start of a target path names its block.
    :param time_module: name of the submodule whose output is E_t (DiT/SiT: "t_embedder").
    :param trainable: regex of base leaves that train too ("" for none); the DyDiT routers by
        default, as the DyDiT++ PEFT recipe trains them with the adapters.
    """
    method: str = "tdlora"
    rank: int = 4
    alpha: Optional[float] = None
    experts: int = 3
    mixing: str = "softmax"
    scope: str = "layer"
    tau: float = 1.0
    targets: str = DEFAULT_TARGETS
    block_pattern: str = r"^[^/]*blocks(_\d+)?"
    time_module: str = "t_embedder"
    trainable: str = r"(head_router|group_router|token_router)/"

    def __post_init__(self):
        checks = (("method", self.method, METHODS), ("mixing", self.mixing, MIXINGS),
                  ("scope", self.scope, SCOPES))
        for name, value, valid in checks:
            if value not in valid:
                raise ValueError(f"peft.{name}={value!r}; valid: {valid}")
        if self.rank < 1 or self.experts < 1:
            raise ValueError(f"peft.rank={self.rank} and peft.experts={self.experts} must be "
                             f">= 1")
        if self.tau <= 0:
            raise ValueError(f"peft.tau={self.tau} must be > 0")
        for name in ("targets", "block_pattern", "trainable"):
            try:
                re.compile(getattr(self, name))
            except re.error as e:
                raise ValueError(f"peft.{name}={getattr(self, name)!r} is not a regex: {e}")

    @property
    def num_experts(self) -> int:
        return 1 if self.method == "lora" else self.experts

    @property
    def routed(self) -> bool:
        return self.method == "tdlora"

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    @classmethod
    def from_config(cls, pc) -> "LoraSpec":
        """From `config.peft` (its `method` "lora" / "tdlora"; "none" is not a spec)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in pc.to_dict().items() if k in fields}
        if values.get("alpha") is not None and values["alpha"] <= 0:
            values["alpha"] = None
        return cls(**values)


def _name(path) -> str:
    return "/".join(str(p) for p in path)


def _is_kernel(path, leaf) -> bool:
    return path[-1] == "kernel" and leaf.ndim in (2, 3)


def target_paths(params, spec: LoraSpec) -> Tuple[str, ...]:
    """The Dense scopes ("blocks_3/attn/qkv") that `spec.targets` selects in `params`.

    Raises if nothing matches, if a match is not a Dense kernel ([Din, Dout], or [L, Din, Dout]
    stacked by scan_layers: a conv or embedding cannot take a low-rank delta here) or if it
    feeds the width plan (`UNADAPTABLE`).
    """
    pattern = re.compile(spec.targets)
    flat = traverse_util.flatten_dict(params)
    scopes = {}
    for path, leaf in flat.items():
        scope = _name(path[:-1])
        if path[-1] in LEAVES or not pattern.search(scope):
            continue
        if path[-1] != "kernel":
            continue
        if re.search(UNADAPTABLE, scope):
            raise ValueError(f"peft.targets={spec.targets!r} selects {scope!r}, which feeds "
                             f"the timestep embedding or the width routers: leave it out")
        if not _is_kernel(path, leaf):
            raise ValueError(f"peft.targets selects {scope!r} whose kernel has shape "
                             f"{tuple(leaf.shape)}: only Dense layers ([Din, Dout], stacked "
                             f"[L, Din, Dout]) can be adapted")
        scopes[scope] = True
    if not scopes:
        raise ValueError(f"peft.targets={spec.targets!r} matches no Dense layer; parameter "
                         f"scopes look like {sorted({_name(p[:-1]) for p in flat})[:6]}")
    return tuple(sorted(scopes))


def block_of(scope: str, spec: LoraSpec) -> str:
    """The block path of a target scope (the `block_pattern` prefix), for scope="block"."""
    m = re.match(spec.block_pattern, scope)
    if not m or not m.group(0):
        raise ValueError(f"peft.scope='block': target {scope!r} is in no block "
                         f"(peft.block_pattern={spec.block_pattern!r} does not match it)")
    return m.group(0)


def init_adapters(params, spec: LoraSpec, rng, time_dim: int) -> Dict[str, Any]:
    """A fresh adapter tree for `params` (nested like it, adapter leaves only).

    Per target with kernel [*lead, Din, Dout]: lora_A [*lead, K, Din, r] ~ U(+-1/sqrt(Din)),
    lora_B [*lead, K, r, Dout] = 0 and, for TD-LoRA, lora_router [*lead, time_dim, K] = 0 (per
    block with scope="block"). `time_dim`: width of E_t (the model's hidden size).
    """
    flat = traverse_util.flatten_dict(params)
    k, r = spec.num_experts, spec.rank
    out = {}
    scopes = target_paths(params, spec)
    for i, scope in enumerate(scopes):
        kernel = flat[tuple(scope.split("/")) + ("kernel",)]
        *lead, d_in, d_out = kernel.shape
        bound = 1.0 / math.sqrt(d_in)
        key = tuple(scope.split("/"))
        out[key + ("lora_A",)] = jax.random.uniform(
            jax.random.fold_in(rng, i), (*lead, k, d_in, r), jnp.float32, -bound, bound)
        out[key + ("lora_B",)] = jnp.zeros((*lead, k, r, d_out), jnp.float32)
        if spec.routed:
            owner = key if spec.scope == "layer" else tuple(block_of(scope, spec).split("/"))
            out[owner + ("lora_router",)] = jnp.zeros((*lead, time_dim, k), jnp.float32)
    return traverse_util.unflatten_dict(out)


def is_adapter_path(path) -> bool:
    return any(str(p) in LEAVES for p in path)


def split_adapters(params):
    """(base, adapters): a combined tree split into its base leaves and its adapter leaves."""
    flat = traverse_util.flatten_dict(params)
    base = {p: v for p, v in flat.items() if not is_adapter_path(p)}
    adapters = {p: v for p, v in flat.items() if is_adapter_path(p)}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def combine(*trees):
    """Deep merge of parameter trees with disjoint leaves (base, adapters, trainable ...)."""
    out = {}
    for tree in trees:
        for path, leaf in traverse_util.flatten_dict(tree).items():
            if path in out:
                raise ValueError(f"parameter {_name(path)} is in two of the trees combined")
            out[path] = leaf
    return traverse_util.unflatten_dict(out)


def has_adapters(params) -> bool:
    return any(is_adapter_path(p) for p in traverse_util.flatten_dict(params))


# ----------------------------------------------------------------------------------------------
# The math (shared by the interceptor and the tree merge)
# ----------------------------------------------------------------------------------------------

def mixing_weights(router, t_emb, spec: LoraSpec):
    """a(t): router [*lead, D_t, K] and t_emb [B, D_t] -> [*lead, B, K], or t_emb [D_t] ->
    [*lead, K] (float32)."""
    logits = jnp.einsum("...dk,bd->...bk", router.astype(jnp.float32),
                        jnp.atleast_2d(t_emb).astype(jnp.float32)) / spec.tau
    a = jax.nn.softmax(logits, -1) if spec.mixing == "softmax" else jax.nn.sigmoid(logits)
    return a if t_emb.ndim == 2 else a[..., 0, :]


def kernel_delta(lora_a, lora_b, mix, scale: float):
    """(alpha/r) sum_k a_k A_k B_k: A [*lead, K, Din, r], B [*lead, K, r, Dout], a [*lead, K]
    (None: K = 1, weight 1) -> [*lead, Din, Dout]."""
    lora_a = lora_a.astype(jnp.float32)
    if mix is not None:
        lora_a = lora_a * mix.astype(jnp.float32)[..., :, None, None]
    # One contraction over (k, r) jointly: K*r columns, no [K, Din, Dout] intermediate.
    return scale * jnp.einsum("...kir,...kro->...io", lora_a, lora_b.astype(jnp.float32))


def merge_params(params, t_emb, spec: LoraSpec):
    """Plain parameters at one time: every adapted kernel replaced by W + delta W(t), adapter
    leaves dropped. `t_emb` [D_t] (one t for all rows, as in a sampler step). Works on any
    subtree that holds whole targets (the engine's stacked block tree, leading depth axes)."""
    flat = traverse_util.flatten_dict(params)
    out = {p: v for p, v in flat.items() if not is_adapter_path(p)}
    for path in [p for p in flat if p[-1] == "lora_A"]:
        scope = path[:-1]
        router = _router_for(flat, scope)
        mix = None if router is None else mixing_weights(router, t_emb, spec)
        kernel = flat[scope + ("kernel",)]
        delta = kernel_delta(flat[path], flat[scope + ("lora_B",)], mix, spec.scale)
        out[scope + ("kernel",)] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(out)


def _router_for(flat, scope):
    """The nearest lora_router at or above `scope` (per layer, else per block), or None."""
    for n in range(len(scope), -1, -1):
        router = flat.get(scope[:n] + ("lora_router",))
        if router is not None:
            return router
    return None


# ----------------------------------------------------------------------------------------------
# The interceptor
# ----------------------------------------------------------------------------------------------

class _Run:
    """Per-apply state: the E_t captured from the time module, which forward mode."""

    def __init__(self, spec: LoraSpec, mode: str):
        self.spec, self.mode = spec, mode
        self.t_emb = None
        self.applied = set()


def _module_router(module):
    m = module
    while isinstance(m, nn.Module):
        if m.has_variable("params", "lora_router"):
            return m.get_variable("params", "lora_router")
        m = m.parent
    return None


def _sample_rows(mix, rows: int):
    """Per-sample mixing [B, K] -> per leading row [R, K] (R = B * m, sample-major)."""
    b = mix.shape[0]
    if rows == b:
        return mix
    if rows % b:
        raise ValueError(f"an adapted Dense got {rows} rows for a batch of {b}: rows must be "
                         f"the batch's samples in equal, sample-major groups")
    return jnp.repeat(mix, rows // b, axis=0)


def _merged_dense(run: _Run, module: nn.Dense, x, router):
    """The Dense on W + delta W(t) for the forward's one t (E_t of row 0): one matmul, as
    `nn.Dense.__call__` computes it (same dtype promotion and dot)."""
    spec = run.spec
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    mix = None if router is None else mixing_weights(router, run.t_emb[0], spec)
    delta = kernel_delta(module.get_variable("params", "lora_A"),
                         module.get_variable("params", "lora_B"), mix, spec.scale)
    w = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    x, w, bias = module.promote_dtype(x, w, bias, dtype=module.dtype)
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=module.precision)
    return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


def _rows_delta(run: _Run, module: nn.Dense, x, router, lora_a, lora_b):
    """Per-sample low-rank delta of one Dense input x [R, ..., Din] -> [R, ..., Dout]."""
    spec = run.spec
    dtype = module.dtype or x.dtype
    u = jnp.einsum("...i,kir->...kr", x.astype(dtype), lora_a.astype(dtype))
    if router is not None:
        mix = _sample_rows(mixing_weights(router, run.t_emb, spec), x.shape[0])
        mix = mix.reshape(mix.shape[:1] + (1,) * (x.ndim - 2) + mix.shape[1:])
        u = u * mix[..., None].astype(dtype)
    return spec.scale * jnp.einsum("...kr,kro->...o", u, lora_b.astype(dtype))


def _interceptor(run: _Run):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if module.name == run.spec.time_module:
            out = next_fun(*args, **kwargs)
            run.t_emb = out
            return out
        if isinstance(module, nn.Dense) and module.has_variable("params", "lora_A"):
            (x,) = args
            router = _module_router(module) if run.spec.routed else None
            if router is not None and run.t_emb is None:
                raise ValueError(f"TD-LoRA needs E_t, but no module named "
                                 f"{run.spec.time_module!r} ran before {module.path}: set "
                                 f"peft.time_module to the model's timestep embedder")
            run.applied.add("/".join(module.path))
            if run.mode == "merged":
                return _merged_dense(run, module, x, router)
            base = next_fun(*args, **kwargs)
            delta = _rows_delta(run, module, x, router,
                                module.get_variable("params", "lora_A"),
                                module.get_variable("params", "lora_B"))
            return base + delta.astype(base.dtype)
        return next_fun(*args, **kwargs)
    return intercept


class PeftModel:
    """A model whose `apply` adds the adapters found in its params (`model.apply` semantics
    otherwise; every other attribute is the wrapped model's).

        model = PeftModel(DiT(...), spec)                # mode "rows": training
        out = model.apply({"params": combine(base, adapters)}, x, t, y)
        sampler_model = model.with_mode("merged")       # one t per forward: merged weights
    """

    def __init__(self, model, spec: LoraSpec, mode: str = "rows"):
        if mode not in MODES:
            raise ValueError(f"unknown adapter mode {mode!r}; valid: {MODES}")
        self.module, self.spec, self.mode = model, spec, mode
        self.last_applied: Tuple[str, ...] = ()

    def with_mode(self, mode: str) -> "PeftModel":
        return PeftModel(self.module, self.spec, mode)

    def __getattr__(self, name):
        if name == "module":   # not set yet (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)

    def apply(self, variables, *args, **kwargs):
        run = _Run(self.spec, self.mode)
        with nn.intercept_methods(_interceptor(run)):
            out = self.module.apply(variables, *args, **kwargs)
        self.last_applied = tuple(sorted(run.applied))
        return out

    def init(self, *args, **kwargs):
        return self.module.init(*args, **kwargs)

    def __hash__(self):
        return hash((self.module, self.spec, self.mode))

    def __eq__(self, other):
        return (isinstance(other, PeftModel) and self.module == other.module
                and self.spec == other.spec and self.mode == other.mode)


def time_embedding(model, params, t, spec: LoraSpec):
    """E_t of the (unwrapped) model at timesteps t [B] -> [B, D_t], by its time module."""
    module = model.module if isinstance(model, PeftModel) else model
    return module.apply({"params": params}, t,
                        method=lambda m, t: getattr(m, spec.time_module)(t))
