"""Plain LoRA adapters in the PEFT / diffusers safetensors format, both ways.

`export_peft` writes a folder like PEFT's `save_pretrained`: `adapter_model.safetensors`
(float32, torch layout) and `adapter_config.json` (a PEFT `LoraConfig`: `peft_type` "LORA",
`r`, `lora_alpha`, `target_modules` as full module names, `rank_pattern` / `alpha_pattern`
where a layer's rank is not `r`). `import_peft` reads such a folder (or the .safetensors file
alone) into an adapter tree of ours for a given model. Key names, as checked against the
installed peft 0.21.2 and diffusers 0.42.1:

- naming="official": the official DiT (facebookresearch/DiT `models.py`) wrapped by
  `peft.get_peft_model`; `PeftModel.save_pretrained` / `get_peft_model_state_dict` write
  `base_model.model.blocks.0.attn.qkv.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]
  (the adapter name, `.lora_A.default.weight` in the live module, is dropped when saved).
- naming="diffusers": `DiTTransformer2DModel`. Its modules (`convert._DIFFUSERS_MODULES`):
  `transformer_blocks.{i}.attn1.to_q/to_k/to_v`, `attn1.to_out.0`, `ff.net.0.proj`, `ff.net.2`,
  `norm1.linear` (adaLN). The default prefix is `transformer.`, the one diffusers' pipeline
  LoRA loaders use (`save_lora_weights` packs each component's `get_peft_model_state_dict`
  under its component name; `load_lora_adapter(prefix="transformer")` strips it). Note that
  in diffusers 0.42.1 neither `DiTTransformer2DModel` (a plain `ModelMixin`, no
  `PeftAdapterMixin`: no `add_adapter` / `load_lora_adapter`) nor `DiTPipeline` (no LoRA loader
  mixin) loads LoRAs itself; in torch use peft directly: `inject_adapter_in_model(config,
  transformer)` + `set_peft_model_state_dict(transformer, state)` with the prefix removed
  (bare keys, what `get_peft_model_state_dict` of such a model gives), or
  `get_peft_model(transformer, config)` with `prefix="base_model.model."`.
  `export_peft(prefix=...)` writes any of the three.

Our fused qkv LoRA (A [Din, r], B [r, 3D]) is exactly three diffusers LoRAs sharing A: to_q,
to_k, to_v get the same lora_A and their rows of lora_B. Importing separate q/k/v LoRAs fuses
them to rank r when their lora_A are equal, and otherwise builds the exact rank-3r LoRA (A
concatenated, B block-diagonal); all qkv leaves then have rank 3r. Ranks that differ across
blocks (a file's `rank_pattern`) are zero-padded to the largest, which keeps every delta exact
and lets scanned blocks stack.

Scale: a file's layer computes (lora_alpha / r) B A (`use_rslora`: lora_alpha / sqrt(r);
`alpha_pattern` / `rank_pattern` per layer; lora_alpha = r when there is no config at all).
We compute `spec.scale` A B, so import multiplies lora_B by file scale / `spec.scale`, and
export writes lora_alpha = `spec.scale` * r: the delta is the same either way.

Only plain LoRA (one expert, no router) has this format: a TD-LoRA tree is refused (merge it
at a timestep with `merge_params` for a full-weight export instead). Import is strict like the
DiT converter: one `CheckpointMismatchError` (a ValueError) names every unexpected, missing
and misshaped key.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dydit_jax import convert
from dydit_jax.peft.adapters import LoraSpec, split_adapters, target_paths

NAMINGS = ("official", "diffusers")
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
# Weight files we read in a folder: PEFT's save_pretrained, diffusers' save_lora_weights.
_WEIGHT_FILES = (WEIGHTS, "pytorch_lora_weights.safetensors")
# Key prefixes of the files we read (PEFT's wrapper, a diffusers pipeline component).
_PREFIXES = ("base_model.model.", "transformer.")
_DEFAULT_PREFIX = {"official": "base_model.model.", "diffusers": "transformer."}
# module.lora_A[.adapter_name].weight
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<leaf>lora_A|lora_B)(?:\.(?P<name>[^.]+))?"
                       r"\.weight$")
_TO_QKV = re.compile(r"^transformer_blocks\.(\d+)\.attn1\.to_([qkv])$")
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv$")
_PEFT_DEFAULT_ALPHA = 8  # LoraConfig's default lora_alpha, for a config that omits it


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------

def _official_module(scope: Tuple[str, ...]) -> str:
    """('blocks_0', 'attn', 'qkv') -> 'blocks.0.attn.qkv' (convert's torch names)."""
    return convert._flax_to_torch_name(scope + ("kernel",))[:-len(".weight")]


def _our_scope(module: str) -> Tuple[str, ...]:
    path, layout = convert.torch_key_to_flax(module + ".weight")
    return path[:-1] if layout == "linear" else ()


def _diffusers_modules(official: str, depth: int) -> Tuple[str, ...]:
    """The diffusers module(s) of an official one: qkv is to_q, to_k, to_v."""
    qkv = _QKV.match(official)
    if qkv:
        return tuple(f"transformer_blocks.{qkv[1]}.attn1.to_{c}" for c in "qkv")
    inverse = {theirs: ours for ours, theirs in convert._module_map(depth).items()}
    if official not in inverse:
        raise ValueError(f"{official} has no counterpart in diffusers' DiTTransformer2DModel")
    return (inverse[official],)


def _model_targets(model, spec: LoraSpec, params=None) -> Dict[Tuple[str, ...], Tuple[int, int]]:
    """Per-block target scope (blocks_i/..., scanned models unstacked) -> (Din, Dout)."""
    if params is None:
        params = convert._abstract_params(model)
    params = params["params"] if "params" in params else params
    base, _ = split_adapters(params)
    flat = traverse_util.flatten_dict(base)
    out = {}
    for scope in target_paths(base, spec):
        path = tuple(scope.split("/"))
        shape = tuple(flat[path + ("kernel",)].shape)
        if len(shape) == 3:  # stacked by scan_layers: [L, Din, Dout]
            if path[0] != "blocks":
                raise ValueError(f"{scope}: a stacked kernel outside blocks/ is not supported")
            for i in range(shape[0]):
                out[(f"blocks_{i}",) + path[1:]] = shape[1:]
        else:
            out[path] = shape
    return out


def _unscanned(tree) -> Dict[Tuple[str, ...], np.ndarray]:
    tree = tree["params"] if "params" in tree else tree
    return traverse_util.flatten_dict(convert.to_layout(tree, scan_layers=False))


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------

def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def export_peft(adapters, model, out_dir, spec: LoraSpec, naming: str = "official",
                overwrite: bool = False, prefix: Optional[str] = None,
                base_model: Optional[str] = None) -> str:
    """Writes plain LoRA `adapters` of `model` as a PEFT adapter folder; returns out_dir.

    :param adapters: our adapter tree (scanned or per-block; a combined base + adapter tree or
        `{"params": ...}` works too: only the adapter leaves are read).
    :param naming: "official" (the official DiT's module names) or "diffusers"
        (DiTTransformer2DModel's; qkv split into to_q/to_k/to_v).
    :param prefix: key prefix; default "base_model.model." (official: PEFT's save_pretrained)
        or "transformer." (diffusers: a pipeline's LoRA file). "" writes bare module names.
    :param base_model: `base_model_name_or_path` of the config (default: a note naming the
        model and layout, as there is no hub id to give).
    The folder is written beside out_dir and renamed into place; a non-empty out_dir is
    replaced only with `overwrite`.
    """
    if naming not in NAMINGS:
        raise ValueError(f"naming={naming!r}; valid: {NAMINGS}")
    prefix = _DEFAULT_PREFIX[naming] if prefix is None else prefix
    out_dir = convert.check_out_dir(out_dir, overwrite, "the adapter")
    _, adapters = split_adapters(adapters["params"] if "params" in adapters else adapters)
    flat = _unscanned(adapters)
    routers = sorted("/".join(p) for p in flat if p[-1] == "lora_router")
    experts = sorted({flat[p].shape[-3] for p in flat if p[-1] == "lora_A"})
    if routers or experts not in ([], [1]):
        raise ValueError(
            f"these are TD-LoRA adapters ({len(routers)} timestep routers, experts per target "
            f"{experts}): the PEFT/diffusers format holds plain LoRA only (one expert, no "
            f"router), so a TD-LoRA cannot be written as one. Train with method='lora' to "
            f"export adapters, or merge a TD-LoRA at one timestep (merge_params) and export "
            f"full weights.")
    scopes = sorted(p[:-1] for p in flat if p[-1] == "lora_A")
    if not scopes:
        raise ValueError("no LoRA adapters (lora_A leaves) in the tree given")
    expected = _model_targets(model, spec)
    problems = []
    tensors, ranks = {}, {}
    for scope in scopes:
        a, b = flat.get(scope + ("lora_A",)), flat.get(scope + ("lora_B",))
        name = "/".join(scope)
        if b is None:
            problems.append(f"{name} has lora_A but no lora_B")
            continue
        a, b = np.asarray(a, np.float32)[0], np.asarray(b, np.float32)[0]  # [Din, r], [r, Dout]
        want = expected.get(scope)
        if want is None or (a.shape[0], b.shape[1]) != want or a.shape[1] != b.shape[0]:
            problems.append(f"{name}: lora_A {a.shape}, lora_B {b.shape} do not fit "
                            + (f"the model's kernel {want}" if want else "the model (no such "
                               "target: check the model and spec.targets)"))
            continue
        official = _official_module(scope)
        a_t, b_t = np.ascontiguousarray(a.T), b.T                   # [r, Din], [Dout, r]
        if naming == "official":
            parts = {official: b_t}
        else:
            modules = _diffusers_modules(official, model.depth)
            parts = dict(zip(modules, np.split(b_t, len(modules))))
        for module, rows in parts.items():
            tensors[f"{prefix}{module}.lora_A.weight"] = a_t
            tensors[f"{prefix}{module}.lora_B.weight"] = np.ascontiguousarray(rows)
            ranks[module] = a.shape[1]
    if problems:
        raise ValueError("adapters do not match the model: " + "; ".join(problems))

    alpha = spec.rank if spec.alpha is None else spec.alpha
    config = {
        "peft_type": "LORA", "task_type": None, "r": spec.rank, "lora_alpha": _number(alpha),
        "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {m: r for m, r in sorted(ranks.items()) if r != spec.rank},
        "alpha_pattern": {m: _number(spec.scale * r) for m, r in sorted(ranks.items())
                          if r != spec.rank},
        "base_model_name_or_path": base_model or (
            f"{type(model).__name__} ({naming} module names{', prefix ' + prefix if prefix else ''}"
            f"; depth {model.depth}, hidden_size {model.hidden_size}, patch_size "
            f"{model.patch_size}; written by dydit_jax.peft.formats)"),
    }

    return convert.write_folder(out_dir, {CONFIG: config}, WEIGHTS, tensors)


# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------

def _read(path) -> Tuple[Dict[str, np.ndarray], Optional[dict], str]:
    """(tensors, LoRA config or None, file read) of a PEFT folder or .safetensors file."""
    from safetensors import safe_open
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"adapter {path!r} does not exist")
    if os.path.isdir(path):
        found = [os.path.join(path, w) for w in _WEIGHT_FILES
                 if os.path.isfile(os.path.join(path, w))]
        if not found:
            raise ValueError(f"{path!r} holds none of {', '.join(_WEIGHT_FILES)}; it has "
                             f"{sorted(os.listdir(path))[:8]}")
        file = found[0]
    else:
        file = path
    try:
        with safe_open(file, framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"could not read {file!r} as safetensors ({type(e).__name__}: {e})"
                         ) from e
    config = None
    beside = os.path.join(os.path.dirname(file), CONFIG)
    if os.path.isfile(beside):
        with open(beside) as f:
            config = json.load(f)
    elif "lora_adapter_metadata" in metadata:  # diffusers' save_lora_adapter / _weights
        config = json.loads(metadata["lora_adapter_metadata"])
        for p in _PREFIXES:  # a pipeline's packs the component's keys under its name
            if any(k.startswith(p) for k in config):
                config = {k[len(p):]: v for k, v in config.items() if k.startswith(p)}
    return tensors, config, file


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's `get_pattern_key`: the first pattern that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _file_scale(config: Optional[dict], module: str, rank: int) -> float:
    if config is None:
        return 1.0  # alpha = r
    if config.get("use_dora"):
        raise ValueError("the adapter is DoRA (use_dora=true): only plain LoRA can be imported")
    alpha = _pattern_value(config.get("alpha_pattern"), module,
                           config.get("lora_alpha", _PEFT_DEFAULT_ALPHA))
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def import_peft(path, model, spec: LoraSpec, params=None) -> Dict[str, Any]:
    """The plain LoRA adapter tree of `model` (scanned when `model.scan_layers`) from a PEFT
    adapter folder or .safetensors file, in either naming (detected), with or without the
    `base_model.model.` / `transformer.` prefix and the adapter name (`lora_A.default.weight`).

    `spec` says which targets to expect (`spec.targets`) and the scale we compute with: each
    lora_B is multiplied by the file's lora_alpha / r over `spec.scale`. `params`: the model's
    parameters (or their shapes), else taken from `model.init`'s shapes. Raises
    `convert.CheckpointMismatchError` naming every unexpected, missing and misshaped key.
    """
    tensors, config, file = _read(path)
    if config is not None and config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type {config['peft_type']!r}, not a LoRA")
    expected = _model_targets(model, spec, params)
    depth = model.depth

    # Key -> (module in its naming, leaf); adapter names and prefixes dropped.
    names = {m["name"] for m in map(_LORA_KEY.match, tensors) if m and m["name"]}
    if len(names) > 1:
        raise ValueError(f"{file} holds several adapters ({sorted(names)}); save one of them")
    unexpected, entries = [], {}
    for key in sorted(tensors):
        m = _LORA_KEY.match(key)
        if not m:
            unexpected.append(key)
            continue
        module = m["module"]
        for p in _PREFIXES:
            module = module[len(p):] if module.startswith(p) else module
        if (module, m["leaf"]) in entries:
            raise ValueError(f"{file} holds two tensors for {module}.{m['leaf']} (keys "
                             f"{entries[(module, m['leaf'])][0]} and {key})")
        entries[(module, m["leaf"])] = (key, np.asarray(tensors[key], np.float32))
    diffusers = any(mod.startswith("transformer_blocks.") or mod.startswith("proj_out_")
                    for mod, _ in entries)

    # Our scope -> per file module: (A [r, Din], B [Dout_part, r] scaled, file module)
    expect_modules = {}  # file module -> (our scope, part index, number of parts, Din, Dout)
    for scope, (d_in, d_out) in expected.items():
        official = _official_module(scope)
        modules = _diffusers_modules(official, depth) if diffusers else (official,)
        for j, module in enumerate(modules):
            expect_modules[module] = (scope, j, len(modules), d_in, d_out // len(modules))

    mismatched, missing, pieces = [], [], {}
    for (module, leaf), (key, _) in entries.items():
        if module not in expect_modules:
            unexpected.append(key)
    for module, (scope, j, n, d_in, d_out) in expect_modules.items():
        got = {leaf: entries.get((module, leaf)) for leaf in ("lora_A", "lora_B")}
        for leaf, entry in got.items():
            if entry is None:
                missing.append(f"{module}.{leaf}.weight")
        if None in got.values():
            continue
        (ka, a), (kb, b) = got["lora_A"], got["lora_B"]
        rank = a.shape[0] if a.ndim == 2 else None
        ok = True
        if a.ndim != 2 or a.shape[1] != d_in:
            mismatched.append((ka, ("r", d_in), tuple(a.shape)))
            ok = False
        if b.ndim != 2 or b.shape != (d_out, rank if rank else b.shape[-1]):
            mismatched.append((kb, (d_out, rank or "r"), tuple(b.shape)))
            ok = False
        if ok:
            factor = _file_scale(config, module, rank) / spec.scale
            pieces.setdefault(scope, {})[j] = (a, b if factor == 1.0 else b * factor, n)
    if unexpected or missing or mismatched:
        raise convert.CheckpointMismatchError(
            sorted(missing), sorted(unexpected), mismatched,
            f"(the {'diffusers' if diffusers else 'official'} module names of {file}; expected "
            f"plain LoRA on the targets of peft.targets={spec.targets!r})")

    # Fuse q/k/v: shared A -> rank r; otherwise block-diagonal rank 3r, for every block.
    split = [s for s, p in pieces.items() if len(p) > 1]
    shared = all(all(np.array_equal(pieces[s][0][0], pieces[s][j][0]) for j in pieces[s])
                 for s in split)
    flat = {}
    for scope, parts in pieces.items():
        parts = [parts[j] for j in sorted(parts)]
        if len(parts) == 1:
            a, b = parts[0][0].T, parts[0][1].T                       # [Din, r], [r, Dout]
        elif shared:
            a = parts[0][0].T
            b = np.concatenate([p[1].T for p in parts], axis=1)
        else:
            a = np.concatenate([p[0].T for p in parts], axis=1)        # [Din, sum r]
            b = np.zeros((a.shape[1], sum(p[1].shape[0] for p in parts)), np.float32)
            r0 = c0 = 0
            for pa, pb, _ in parts:
                b[r0:r0 + pa.shape[0], c0:c0 + pb.shape[0]] = pb.T
                r0, c0 = r0 + pa.shape[0], c0 + pb.shape[0]
        flat[scope] = (a, b)
    # Zero-pad each target kind (the same module in every block) to its largest rank.
    def kind(scope):
        return (re.sub(r"^blocks_\d+$", "blocks", scope[0]),) + scope[1:]
    top = {}
    for scope, (a, _) in flat.items():
        top[kind(scope)] = max(top.get(kind(scope), 0), a.shape[1])
    out = {}
    for scope, (a, b) in flat.items():
        pad = top[kind(scope)] - a.shape[1]
        if pad:
            a = np.pad(a, ((0, 0), (0, pad)))
            b = np.pad(b, ((0, pad), (0, 0)))
        out[scope + ("lora_A",)] = np.ascontiguousarray(a[None])
        out[scope + ("lora_B",)] = np.ascontiguousarray(b[None])
    tree = traverse_util.unflatten_dict(out)
    if getattr(model, "scan_layers", False):
        tree = convert.to_layout(tree, scan_layers=True)
    return jax.tree_util.tree_map(jnp.asarray, tree)
