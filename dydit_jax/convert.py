"""Official PyTorch checkpoints -> Flax variables, with strict key and shape checks.

Reads
- the released plain state_dict (`DiT-XL-2-256x256.pt`: an OrderedDict name -> tensor),
- training checkpoints `{"model", "ema", "opt", "args"}` ("ema" by default, "model" on request),
- `.safetensors` and `.npz` files holding the same flat names,
- an already loaded flat mapping name -> array,
- a diffusers folder (the hub's `facebook/DiT-XL-2-256`, or its `transformer/`:
  `DiTTransformer2DModel` config.json + safetensors, sharded or .bin): its names are mapped to
  the official ones (to_q/to_k/to_v -> qkv, the per-block embedder copies checked equal and
  dropped); `dit_from_diffusers_config` builds the model it describes,
- an orbax params directory (this module's `--out`).

The other way, `to_diffusers` writes a diffusers folder (`--to-diffusers`). The same weights
compute slightly different functions in the two codebases: `DiT(numerics="diffusers")`
reproduces diffusers' model, the default "official" the official one (dit.NUMERICS).

`.pt` files are read with `torch.load(weights_only=True)`: tensors and plain containers only,
never arbitrary pickled objects. torch is imported only for `.pt` files (the `torch` extra).

Every leaf of the model (from `jax.eval_shape` of its init, so nothing is allocated twice) must
be found with the right shape; otherwise one `CheckpointMismatchError` lists the missing keys,
the unexpected keys and each shape mismatch with the expected and found shapes.

Command line: write an orbax checkpoint so TPU runs never need torch:
    python -m dydit_jax.convert --checkpoint DiT-XL-2-256x256.pt --model DiT-XL/2 \
        --image-size 256 --out /path/to/converted
SiT checkpoints (flow matching: DiT's parameters under the same names) take their own names,
`--model SiT-XL/2`, and are checked against a SiT. `--dynamic` builds the DyDiT version of
either, for checkpoints with routers (a plain checkpoint then gets fresh routers, logged).
A diffusers folder needs no `--model` (its config.json says which DiT it is):
    python -m dydit_jax.convert --checkpoint DiT-XL-2-256/ --out /path/to/converted
    python -m dydit_jax.convert --checkpoint /path/to/converted --to-diffusers DiT-export/
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import uuid
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dydit_jax import convert_flux
from dydit_jax.models.dit import DiT
from dydit_jax.sharding import STACKED_BLOCKS

# Module renames from the PyTorch names to ours (applied to the dotted module path).
_MODULE_RENAMES = (
    (r"^t_embedder\.mlp\.0$", "t_embedder.mlp_0"),
    (r"^t_embedder\.mlp\.2$", "t_embedder.mlp_2"),
    (r"^blocks\.(\d+)\.", r"blocks_\1."),
    (r"\.adaLN_modulation\.1$", ".adaLN_modulation"),
    (r"\.attn_rate\.router$", ".head_router"),
    (r"\.mlp_rate\.router$", ".group_router"),
    (r"\.token_selection\.mlp_head\.0$", ".token_router.fc1"),
    (r"\.token_selection\.mlp_head\.2$", ".token_router.fc2"),
)

# DyDiT router parameters: a plain DiT checkpoint loaded into a dynamic model leaves these fresh.
ROUTER_PATTERN = r"/(head_router|group_router|txt_group_router|token_router)/"

# Keys of official checkpoints that hold no parameter of ours: they are checked, not loaded.
_FIXED_BUFFERS = ("pos_embed", "temp_embed")


class CheckpointMismatchError(ValueError):
    """The checkpoint does not match the model: lists every missing, unexpected or misshaped key."""

    def __init__(self, missing, unexpected, mismatched, hint=""):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        self.hint = hint
        lines = ["checkpoint does not match the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        for key, expected, found in mismatched:
            lines.append(f"  shape mismatch for {key}: model expects {expected} (PyTorch layout),"
                         f" checkpoint has {found}")
        if hint:
            lines.append("  " + hint)
        super().__init__("\n".join(lines))


def torch_key_to_flax(key: str) -> Tuple[Tuple[str, ...], str]:
    """'blocks.3.attn.qkv.weight' -> (('blocks_3', 'attn', 'qkv', 'kernel'), 'linear').

    The second value says how to lay the tensor out: 'linear' (transpose), 'conv' (OIHW ->
    HWIO), 'embed' or 'none'.
    """
    module, _, leaf = key.rpartition(".")
    for pattern, repl in _MODULE_RENAMES:
        module = re.sub(pattern, repl, module)
    path = tuple(module.split("."))
    if leaf == "bias":
        return path + ("bias",), "none"
    if leaf != "weight":
        return path + (leaf,), "none"
    if path[-1] == "embedding_table":
        return path + ("embedding",), "embed"
    if path[-1] == "proj" and path[0] == "x_embedder":
        return path + ("kernel",), "conv"
    return path + ("kernel",), "linear"


def to_flax_layout(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return array.T
    if layout == "conv":
        return array.transpose(2, 3, 1, 0)
    return array


def _torch_shape(shape: Tuple[int, ...], layout: str) -> Tuple[int, ...]:
    """Our Flax leaf shape expressed in the PyTorch layout (for error messages)."""
    if layout == "linear":
        return tuple(reversed(shape))
    if layout == "conv":
        h, w, i, o = shape
        return (o, i, h, w)
    return tuple(shape)


def load_state_dict(source: Any, which: str = "ema") -> Dict[str, np.ndarray]:
    """A flat name -> float numpy mapping from a path or an in-memory state_dict.

    `which` picks "ema" (default) or "model" from a training checkpoint. A wrapper with only
    "model" (Latte's released checkpoints) is read for "ema" too, with a warning, as the
    releases' `find_model` reads it (EMA if present, else the model).
    """
    if isinstance(source, (str, os.PathLike)):
        source = _read_file(os.fspath(source))
    if not isinstance(source, Mapping):
        raise TypeError(f"expected a path or a mapping of name -> tensor, got {type(source)}")
    if isinstance(source.get("module"), Mapping):   # DyFLUX's transformer_*.pt, DeepSpeed
        source = source["module"]
    if "model" in source and isinstance(source["model"], Mapping):
        if which == "ema" and "ema" not in source:
            logging.warning("the checkpoint has no EMA weights: reading its 'model' entry")
            which = "model"
        if which not in source:
            raise KeyError(f"training checkpoint has no {which!r} entry; it has "
                           f"{sorted(k for k in source if isinstance(source[k], Mapping))}. "
                           f"Pass which='model' or which='ema'.")
        source = source[which]
    return {k: _to_numpy(v) for k, v in source.items()}


def _read_file(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        return _read_dir(path)
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".safetensors":
            from safetensors.numpy import load_file
            return load_file(path)
        if ext == ".npz":
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        if ext in (".pt", ".pth", ".bin", ".ckpt"):
            try:
                import torch
            except ImportError as e:
                raise ImportError("reading PyTorch .pt files needs torch: "
                                  "pip install 'dydit_jax[torch]'") from e
            return torch.load(path, map_location="cpu", weights_only=True)
    except (ImportError, FileNotFoundError):
        raise
    except Exception as e:  # corrupt, truncated, or carrying pickled objects
        raise ValueError(f"could not read checkpoint {path!r} ({type(e).__name__}: {e}). The "
                         f"file may be truncated or corrupt, or contain objects other than "
                         f"tensors (only weights_only state_dicts are accepted).") from e
    raise ValueError(f"unknown checkpoint format {ext!r} for {path!r}; "
                     f"use .pt/.pth, .safetensors or .npz")


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor; bfloat16/float16 go through float32
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.float()
        v = v.numpy()
    return np.asarray(v)


def from_pytorch(source: Any, model: DiT, which: str = "ema",
                 allow_missing: Optional[str] = None) -> Dict[str, Any]:
    """Flax variables `{"params": ...}` for `model` from an official checkpoint.

    `allow_missing`: a regex of our parameter paths ("blocks_0/head_router/kernel") that may
    be absent from the checkpoint; those keep a fresh init from `model.init`. For a dynamic
    model it defaults to the routers, so a plain DiT checkpoint loads into a DyDiT with fresh
    routers; the fresh parameters are logged as a warning (and returned by `load_report`).
    Everything else must match exactly.
    """
    variables, fresh = load_report(source, model, which=which, allow_missing=allow_missing)
    if fresh:
        logging.warning("%d parameters were not in the checkpoint and are freshly initialised: "
                        "%s", len(fresh), ", ".join(fresh))
    return variables


def load_report(source: Any, model: DiT, which: str = "ema",
                allow_missing: Optional[str] = None):
    """Like `from_pytorch` but also returns the list of parameter paths freshly initialised."""
    if allow_missing is None and getattr(model, "dynamic", False):
        allow_missing = ROUTER_PATTERN
    state = load_state_dict(source, which=which)
    flux = _is_flux(model)
    if flux and convert_flux.is_diffusers_named(state):
        state = convert_flux.diffusers_to_bfl(state)
    try:
        # A scanned FLUX is matched per block, then stacked (`to_layout`).
        params, fresh = _match(state, convert_flux.per_block(model) if flux else model,
                               allow_missing)
    except CheckpointMismatchError as e:
        folder = _diffusers_folder(source)
        if folder is None or flux:
            raise
        depth = model.depth
        hint = " ".join(filter(None, [e.hint, f"(names as in the diffusers folder {folder})"]))
        raise CheckpointMismatchError(
            sorted(_diffusers_name(k, depth) for k in e.missing), e.unexpected,
            [(_diffusers_name(k, depth), want, got) for k, want, got in e.mismatched],
            hint) from None
    if flux and model.scan_layers:
        params = jax.tree_util.tree_map(jnp.asarray, to_layout(params, scan_layers=True))
    return {"params": params}, fresh


def _is_flux(model) -> bool:
    from dydit_jax.models.flux import FLUX
    return isinstance(model, FLUX)


def _abstract_params(model: DiT):
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             *_dummy_inputs(model))["params"])


def _match_shapes(state: Mapping[str, Any], model, abstract) -> None:
    """The strict name and shape check of `_match` alone (arrays or zero-stride stand-ins;
    nothing is converted): raises `CheckpointMismatchError` listing every bad key."""
    _match(state, model, None, abstract=abstract, check_only=True)


def _match(state: Dict[str, np.ndarray], model: DiT, allow_missing: Optional[str],
           abstract=None, check_only: bool = False):
    if abstract is None:
        abstract = traverse_util.flatten_dict(_abstract_params(model))
    scanned = bool(getattr(model, "scan_layers", False))
    # Expected leaves in the unscanned naming; scanned models stack blocks_i/... into blocks/...
    expected: Dict[Tuple[str, ...], Any] = {}
    for path, leaf in abstract.items():
        if scanned and path[0] == "blocks":
            for i in range(leaf.shape[0]):
                expected[(f"blocks_{i}",) + path[1:]] = jax.ShapeDtypeStruct(leaf.shape[1:],
                                                                            leaf.dtype)
        else:
            expected[path] = leaf

    flux = _is_flux(model)
    to_flax = convert_flux.bfl_key_to_flax if flux else torch_key_to_flax
    to_torch = convert_flux.flax_to_bfl_key if flux else _flax_to_torch_name
    found: Dict[Tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched = [], []
    seen_misshaped = set()
    for key, value in state.items():
        if key in _FIXED_BUFFERS and hasattr(model, key):   # e.g. no temp_embed in a DiT
            _check_fixed_buffer(key, value, model, mismatched)
            continue
        path, layout = to_flax(key)
        if path not in expected:
            unexpected.append(key)
            continue
        want = tuple(expected[path].shape)
        if to_flax_layout(value, layout).shape != want:
            mismatched.append((key, _torch_shape(want, layout), tuple(value.shape)))
            seen_misshaped.add(path)
            continue
        found[path] = (None if check_only
                       else to_flax_layout(value, layout).astype(expected[path].dtype))

    allowed = re.compile(allow_missing) if allow_missing else None
    missing, fresh = [], []
    for path in expected:
        if path in found or path in seen_misshaped:
            continue
        name = "/".join(path)
        if allowed is not None and allowed.search(name):
            fresh.append(name)
        else:
            missing.append(to_torch(path))
    if (missing or unexpected or mismatched) and flux:
        raise CheckpointMismatchError(sorted(missing), sorted(unexpected), mismatched,
                                      convert_flux.mismatch_hint(unexpected, mismatched))
    if check_only and not (missing or unexpected or mismatched):
        return None
    if missing or unexpected or mismatched:
        hint = ""
        if any(".attn_rate.router" in k or ".token_selection." in k for k in unexpected):
            hint = ("the checkpoint has DyDiT routers: build the model with dynamic=True "
                    "(the command line's --dynamic).")
        if any(k.endswith(("attn_rate.router.weight", "mlp_rate.router.weight"))
               and found[0] == model.num_heads for k, _, found in mismatched):
            hint = ("the routers have num_heads outputs, not num_heads - 1: this is the older "
                    "DyDiT release (NUS-HPC-AI-Lab, 'DiffRate' routers without an always-on "
                    "first head), which is not supported; use a checkpoint of the "
                    "alibaba-damo-academy/DyDiT release.")
        raise CheckpointMismatchError(sorted(missing), sorted(unexpected), mismatched, hint)

    if fresh:
        init = model.init(jax.random.PRNGKey(0), *_dummy_inputs(model))["params"]
        flat_init = traverse_util.flatten_dict(init)
        for name in fresh:
            path = tuple(name.split("/"))
            found[path] = np.asarray(_lookup_unscanned(flat_init, path, scanned))
    if scanned:
        found = _stack_blocks(found, model.depth)
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in found.items()}), fresh


def _check_fixed_buffer(key, value, model, mismatched):
    """A fixed sin-cos table of the checkpoint (pos_embed; Latte's temp_embed) against the
    model's own: not loaded, but a table for other sizes means another model."""
    want = getattr(model, key)()
    if tuple(value.shape) != tuple(want.shape):
        mismatched.append((key, tuple(want.shape), tuple(value.shape)))
    elif not np.allclose(value, np.asarray(want, np.float64), atol=1e-2):  # bf16 files too
        what = "frame count" if key == "temp_embed" else "input/patch size"
        raise ValueError(f"checkpoint {key} differs from the model's fixed sin-cos table: it "
                         f"was made for another {what} or hidden size")


def _flax_to_torch_name(path: Tuple[str, ...]) -> str:
    """Best-effort inverse of `torch_key_to_flax`, for listing missing keys by their torch name."""
    inverse = {
        "mlp_0": "mlp.0", "mlp_2": "mlp.2", "adaLN_modulation": "adaLN_modulation.1",
        "head_router": "attn_rate.router", "group_router": "mlp_rate.router",
        "kernel": "weight", "embedding": "weight",
    }
    parts = []
    for i, p in enumerate(path):
        if p.startswith("blocks_"):
            parts.append("blocks." + p[len("blocks_"):])
        elif p == "token_router":
            parts.append("token_selection.mlp_head")
        elif i > 0 and path[i - 1] == "token_router":
            parts.append({"fc1": "0", "fc2": "2"}[p])
        else:
            parts.append(inverse.get(p, p))
    return ".".join(parts)


def _dummy_inputs(model: DiT):
    return model.dummy_inputs(1, model.param_dtype)


def _lookup_unscanned(flat, path, scanned):
    if scanned and path[0].startswith("blocks_"):
        i = int(path[0][len("blocks_"):])
        return flat[("blocks",) + path[1:]][i]
    return flat[path]


def _stack_blocks(found, depth):
    out = {k: v for k, v in found.items() if not k[0].startswith("blocks_")}
    leaves = {k[1:] for k in found if k[0] == "blocks_0"}
    for leaf in leaves:
        out[("blocks",) + leaf] = np.stack([found[(f"blocks_{i}",) + leaf] for i in range(depth)])
    return out


def to_layout(params, scan_layers: bool):
    """Params in the scanned (each kind of `STACKED_BLOCKS` stacked on a depth axis: DiT's
    and Latte's "blocks", FLUX's "double_blocks" and "single_blocks") or per-block
    ("blocks_i", "double_blocks_i", ...) layout, whichever `scan_layers` asks for, from
    either."""
    params = dict(params)
    for kind in STACKED_BLOCKS:
        if scan_layers and f"{kind}_0" in params:
            depth = sum(1 for k in params if re.fullmatch(rf"{kind}_\d+", k))
            blocks = [params.pop(f"{kind}_{i}") for i in range(depth)]
            params[kind] = jax.tree_util.tree_map(lambda *a: np.stack(a), *blocks)
        elif not scan_layers and kind in params:
            blocks = params.pop(kind)
            depth = jax.tree_util.tree_leaves(blocks)[0].shape[0]
            for i in range(depth):
                params[f"{kind}_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], blocks)
    return params


# ----------------------------------------------------------------------------------------------
# Our params as official names, and the orbax params directory
# ----------------------------------------------------------------------------------------------

def to_official_state(params) -> Dict[str, np.ndarray]:
    """Our params (per-block or scanned, `{"params": ...}` or the tree itself) -> a flat float32
    state_dict under the official names and PyTorch layouts (`torch_key_to_flax`'s inverse)."""
    params = params["params"] if "params" in params else params
    out = {}
    for path, value in traverse_util.flatten_dict(to_layout(params, scan_layers=False)).items():
        v = np.asarray(value).astype(np.float32)
        if path[-1] == "kernel":
            v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
        out[_flax_to_torch_name(path)] = np.ascontiguousarray(v)
    return out


def _is_orbax_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA"))


def _read_dir(path: str) -> Dict[str, np.ndarray]:
    """A diffusers folder or an orbax params directory, as official names."""
    folder = _diffusers_folder(path)
    if folder is not None:
        return _read_diffusers(folder)
    if convert_flux.is_streamed(path):
        return convert_flux.streamed_state(path)
    if _is_orbax_dir(path):
        from dydit_jax.checkpointing import load_params
        return to_official_state(load_params(path))
    raise ValueError(
        f"{path!r} is a directory but neither a diffusers model folder (config.json and one of "
        f"{', '.join(_DIFFUSERS_WEIGHTS)}, there or in its transformer/) nor an orbax params "
        f"directory (written by `python -m dydit_jax.convert --out`); it holds "
        f"{sorted(os.listdir(path))[:8]}")


# ----------------------------------------------------------------------------------------------
# The diffusers layout: DiTTransformer2DModel folders (the hub's facebook/DiT-XL-2-256)
# ----------------------------------------------------------------------------------------------

# Weight files of `save_pretrained`, in the order diffusers prefers them.
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors",
                      "diffusion_pytorch_model.safetensors.index.json",
                      "diffusion_pytorch_model.bin")
# The diffusers version whose layout and function tests/data/dit_diffusers was made with.
DIFFUSERS_VERSION = "0.42.1"
# diffusers module -> official module; "{i}" is the block index. Two things are not one to one:
# attn1.to_q/to_k/to_v are the rows of attn.qkv, and every diffusers block holds a copy of the
# timestep and label embedders (norm1.emb.*) where the official model has one.
_DIFFUSERS_MODULES = (
    ("pos_embed.proj", "x_embedder.proj"),
    ("transformer_blocks.0.norm1.emb.timestep_embedder.linear_1", "t_embedder.mlp.0"),
    ("transformer_blocks.0.norm1.emb.timestep_embedder.linear_2", "t_embedder.mlp.2"),
    ("transformer_blocks.0.norm1.emb.class_embedder.embedding_table",
     "y_embedder.embedding_table"),
    ("transformer_blocks.{i}.norm1.linear", "blocks.{i}.adaLN_modulation.1"),
    ("transformer_blocks.{i}.attn1.to_out.0", "blocks.{i}.attn.proj"),
    ("transformer_blocks.{i}.ff.net.0.proj", "blocks.{i}.mlp.fc1"),
    ("transformer_blocks.{i}.ff.net.2", "blocks.{i}.mlp.fc2"),
    ("proj_out_1", "final_layer.adaLN_modulation.1"),
    ("proj_out_2", "final_layer.linear"),
)
_EMBEDDER_COPY = re.compile(r"^transformer_blocks\.(\d+)\.norm1\.emb\.(.+)$")
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv$")
# config.json options other than these describe a model that is not the official DiT.
_DIFFUSERS_FIXED = (("activation_fn", "gelu-approximate"), ("norm_type", "ada_norm_zero"),
                    ("attention_bias", True), ("norm_elementwise_affine", False),
                    ("cross_attention_dim", None), ("num_vector_embeds", None))


def _module_map(depth: int) -> Dict[str, str]:
    """diffusers module name -> official module name, for `depth` blocks."""
    out = {}
    for ours, theirs in _DIFFUSERS_MODULES:
        for i in (range(depth) if "{i}" in ours else (0,)):
            out[ours.format(i=i)] = theirs.format(i=i)
    return out


def _diffusers_folder(path) -> Optional[str]:
    """The folder holding a diffusers model's config.json and weights: `path` itself or the
    transformer/ of a pipeline folder; None when `path` is neither."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    path = os.fspath(path)
    for folder in (path, os.path.join(path, "transformer")):
        if os.path.isfile(os.path.join(folder, "config.json")) and any(
                os.path.isfile(os.path.join(folder, w)) for w in _DIFFUSERS_WEIGHTS):
            return folder
    return None


def is_diffusers_dir(path) -> bool:
    """True for a diffusers model folder (config.json + diffusion_pytorch_model.*) or a pipeline
    folder with one in transformer/: what `from_pytorch` reads as the diffusers layout."""
    return _diffusers_folder(path) is not None


def read_diffusers_config(path) -> dict:
    """The config.json of a diffusers DiT folder (or pipeline folder), checked to be a DiT."""
    folder = _diffusers_folder(path)
    if folder is None:
        raise FileNotFoundError(f"{path!r} is not a diffusers model folder: expected config.json "
                                f"and one of {', '.join(_DIFFUSERS_WEIGHTS)} there or in its "
                                f"transformer/")
    where = os.path.join(folder, "config.json")
    with open(where) as f:
        config = json.load(f)
    name = config.get("_class_name")
    legacy_dit = name == "Transformer2DModel" and config.get("norm_type") == "ada_norm_zero"
    if name != "DiTTransformer2DModel" and not legacy_dit:
        kind = (f"{name} with norm_type {config.get('norm_type')!r}"
                if name == "Transformer2DModel" else name)
        raise ValueError(f"{where} holds a {kind}, not a DiT: expected _class_name "
                         f"'DiTTransformer2DModel' (or the older 'Transformer2DModel' with "
                         f"norm_type 'ada_norm_zero')")
    for key, want in _DIFFUSERS_FIXED:
        if config.get(key, want) != want:
            raise ValueError(f"{where} has {key}={config[key]!r}: only {want!r} is the official "
                             f"DiT, which is what this converter loads")
    return config


def _diffusers_model_args(config: dict) -> dict:
    """DiT constructor arguments of a checked DiT config.json."""
    def need(key):
        if key not in config:
            raise ValueError(f"diffusers config.json has no {key!r}, which fixes the model size")
        return config[key]
    c, out = need("in_channels"), config.get("out_channels") or config["in_channels"]
    if out not in (c, 2 * c):
        raise ValueError(f"diffusers config.json has out_channels={out} for in_channels={c}: a DiT "
                         f"outputs in_channels (eps) or twice that (eps and learned sigma)")
    heads = need("num_attention_heads")
    return dict(input_size=need("sample_size"), patch_size=need("patch_size"), in_channels=c,
                hidden_size=heads * need("attention_head_dim"), depth=need("num_layers"),
                num_heads=heads, num_classes=need("num_embeds_ada_norm"),
                learn_sigma=out == 2 * c, mlp_ratio=4.0, class_dropout_prob=0.1)


def dit_from_diffusers_config(path, **overrides) -> DiT:
    """The DiT that a diffusers folder's config.json describes (sample_size -> input_size,
    num_layers -> depth, heads x head_dim -> hidden_size, num_embeds_ada_norm -> num_classes,
    out_channels == 2 in_channels -> learn_sigma).

    numerics defaults to "official": the hub's weights are the official DiT's, and this
    reproduces the official model; numerics="diffusers" reproduces DiTTransformer2DModel.
    `overrides` (numerics, dynamic, scan_layers, dtype, ...) go to the constructor.
    """
    return DiT(**{**_diffusers_model_args(read_diffusers_config(path)), "numerics": "official",
                  **overrides})


def _read_diffusers_weights(folder: str) -> Dict[str, np.ndarray]:
    for name in _DIFFUSERS_WEIGHTS:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return {k: _to_numpy(v) for k, v in _read_file(path).items()}
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update({k: _to_numpy(v)
                          for k, v in _read_file(os.path.join(folder, shard)).items()})
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise ValueError(f"{path} lists {len(absent)} tensors that its shards do not hold: "
                             f"{', '.join(absent[:5])}")
        return state


def _read_diffusers(folder: str) -> Dict[str, np.ndarray]:
    with open(os.path.join(folder, "config.json")) as f:
        if json.load(f).get("_class_name") in convert_flux.DIFFUSERS_CLASSES:
            return convert_flux.diffusers_to_bfl(_read_diffusers_weights(folder))
    config = read_diffusers_config(folder)
    depth = _diffusers_model_args(config)["depth"]
    return diffusers_to_official(_read_diffusers_weights(folder), depth)


def diffusers_to_official(state: Mapping[str, np.ndarray], depth: int) -> Dict[str, np.ndarray]:
    """DiTTransformer2DModel names -> official DiT names (tests/data/dit_diffusers' mapping).

    to_q/to_k/to_v are concatenated into qkv; the embedder copies of blocks 1.. must equal
    block 0's (the model has one embedder) and are dropped. Names that map to nothing pass
    through unchanged, so that `_match` lists them as unexpected.
    """
    rest = dict(state)
    out = {}
    for i in range(depth):
        for leaf in ("weight", "bias"):
            parts = [f"transformer_blocks.{i}.attn1.to_{c}.{leaf}" for c in "qkv"]
            if all(p in rest for p in parts):
                out[f"blocks.{i}.attn.qkv.{leaf}"] = np.concatenate([rest.pop(p) for p in parts])
    for key in list(rest):
        copy = _EMBEDDER_COPY.match(key)
        first = f"transformer_blocks.0.norm1.emb.{copy[2]}" if copy else None
        if not copy or copy[1] == "0" or first not in state:
            continue
        a, b = np.asarray(rest[key], np.float64), np.asarray(state[first], np.float64)
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-5, atol=1e-6):
            diff = f"max |diff| {np.abs(a - b).max():.3g}" if a.shape == b.shape else \
                f"shape {a.shape} vs {b.shape}"
            raise ValueError(
                f"{key} differs from block 0's copy {first} ({diff}). diffusers' DiT keeps one "
                f"timestep/label embedder per block; the official DiT (and this model) has one "
                f"for all blocks, so only checkpoints whose copies are equal can be loaded "
                f"(every converted official checkpoint has equal copies).")
        del rest[key]
    modules = _module_map(depth)
    for key in list(rest):
        module, _, leaf = key.rpartition(".")
        if module in modules:
            out[f"{modules[module]}.{leaf}"] = rest.pop(key)
    out.update(rest)
    return out


def _diffusers_name(name: str, depth: int) -> str:
    """An official name as the diffusers name(s) it is made from (for error messages)."""
    module, _, leaf = name.rpartition(".")
    qkv = _QKV.match(module)
    if qkv:
        return f"transformer_blocks.{qkv[1]}.attn1.to_{{q,k,v}}.{leaf}"
    inverse = {theirs: ours for ours, theirs in _module_map(depth).items()}
    return f"{inverse[module]}.{leaf}" if module in inverse else name


def official_to_diffusers(state: Mapping[str, np.ndarray], depth: int) -> Dict[str, np.ndarray]:
    """Official DiT names -> DiTTransformer2DModel names: qkv split into to_q/to_k/to_v, the
    embedders copied into every block; pos_embed dropped (diffusers recomputes it)."""
    inverse = {theirs: ours for ours, theirs in _module_map(depth).items()}
    out = {}
    for key, value in state.items():
        if key in _FIXED_BUFFERS:
            continue
        module, _, leaf = key.rpartition(".")
        qkv = _QKV.match(module)
        if qkv:
            for c, part in zip("qkv", np.split(value, 3)):
                out[f"transformer_blocks.{qkv[1]}.attn1.to_{c}.{leaf}"] = np.ascontiguousarray(part)
        elif module in inverse:
            name = f"{inverse[module]}.{leaf}"
            out[name] = value
            copy = _EMBEDDER_COPY.match(name)
            for i in range(1, depth if copy else 0):
                out[f"transformer_blocks.{i}.norm1.emb.{copy[2]}"] = value
        else:
            raise ValueError(f"{key} has no counterpart in diffusers' DiTTransformer2DModel")
    return out


def diffusers_config(model: DiT) -> dict:
    """The DiTTransformer2DModel config.json of `model`; refuses what diffusers cannot express."""
    h, w = (g * model.patch_size for g in model.grid_size)
    problems = []
    if h != w:
        problems.append(f"input_size {(h, w)} is not square (sample_size is one number)")
    if model.mlp_ratio != 4.0:
        problems.append(f"mlp_ratio is {model.mlp_ratio} (diffusers' MLP is 4x wide)")
    if model.class_dropout_prob <= 0:
        problems.append("class_dropout_prob is 0, so there is no null-label row (diffusers' "
                        "label table always has one)")
    if problems:
        raise ValueError("cannot export to diffusers' DiTTransformer2DModel: "
                         + "; ".join(problems))
    return {
        "_class_name": "DiTTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "activation_fn": "gelu-approximate", "attention_bias": True,
        "attention_head_dim": model.hidden_size // model.num_heads, "dropout": 0.0,
        "in_channels": model.in_channels, "norm_elementwise_affine": False, "norm_eps": 1e-5,
        "norm_num_groups": 32, "norm_type": "ada_norm_zero",
        "num_attention_heads": model.num_heads, "num_embeds_ada_norm": model.num_classes,
        "num_layers": model.depth, "out_channels": model.out_channels,
        "patch_size": model.patch_size, "sample_size": h, "upcast_attention": False,
    }


def _check_static_params(state: Mapping[str, np.ndarray], model: DiT) -> None:
    """`state` (official names) holds exactly the static parameters of `model`."""
    static = model.clone(dynamic=False, scan_layers=False, remat=False)
    expected = {}
    for path, leaf in traverse_util.flatten_dict(_abstract_params(static)).items():
        name = _flax_to_torch_name(path)
        expected[name] = _torch_shape(tuple(leaf.shape), torch_key_to_flax(name)[1])
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [(k, expected[k], tuple(v.shape)) for k, v in state.items()
                  if k in expected and tuple(v.shape) != expected[k]]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched,
                                      "these params are not those of the model given")


def to_diffusers(params, model: DiT, out_dir, overwrite: bool = False) -> str:
    """Writes `params` of `model` as a diffusers DiTTransformer2DModel folder: config.json and
    diffusion_pytorch_model.safetensors (float32). Returns out_dir.

    `DiTTransformer2DModel.from_pretrained(out_dir)` loads it (a DiTPipeline takes it as its
    transformer/), and so does `from_pytorch`. diffusers then computes with its own numerics
    (this model's numerics="diffusers", up to ~1e-3 from the official function).
    A dynamic model's routers have no place there: only the static weights are written, with
    a warning; the folder computes the model's complete (all heads, groups, tokens) path.
    The folder is written beside out_dir and renamed into place (a failed export leaves
    nothing); an existing non-empty out_dir is replaced only with `overwrite`.
    """
    out_dir = check_out_dir(out_dir, overwrite, "the model", " (--overwrite)")
    config = diffusers_config(model)
    params = params["params"] if "params" in params else params
    flat = traverse_util.flatten_dict(to_layout(params, scan_layers=False))
    routers = [p for p in flat if re.search(ROUTER_PATTERN, "/".join(p))]
    if routers:
        logging.warning("exporting the static weights only: diffusers' DiT has no routers, so "
                        "the %d router tensors are dropped and the folder computes this model's "
                        "complete path (every head, MLP group and token)", len(routers))
        flat = {p: v for p, v in flat.items() if p not in routers}
    state = to_official_state(traverse_util.unflatten_dict(flat))
    _check_static_params(state, model)
    tensors = official_to_diffusers(state, model.depth)

    return write_folder(out_dir, {"config.json": config}, _DIFFUSERS_WEIGHTS[0], tensors)


def check_out_dir(out_dir, overwrite: bool, what: str, flag: str = "") -> str:
    """The absolute `out_dir` to write `what` into; refuses a file, and a non-empty folder
    unless `overwrite` (nothing is replaced silently)."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir} is a file; give a directory to write {what} into")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True{flag} "
                              f"to replace it")
    return out_dir


def write_folder(out_dir: str, json_files: dict, weights_name: str, tensors: dict) -> str:
    """Writes `json_files` ({file name: object}) and the numpy `tensors` as the safetensors
    file `weights_name` into `out_dir`, atomically: everything goes into a temporary sibling
    folder that replaces `out_dir` by rename once complete (an old `out_dir` is moved aside
    first and restored if anything fails), so a crash leaves either the old folder or the
    whole new one. Returns out_dir."""
    from safetensors.numpy import save_file
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    # os.mkdir, not mkdtemp: its mode 0700 would survive the rename.
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex[:12]}")
    os.mkdir(tmp)
    old = None
    try:
        for name, obj in json_files.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        save_file(tensors, os.path.join(tmp, weights_name), metadata={"format": "pt"})
        if os.path.exists(out_dir):
            old = tmp + "-old"
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    except BaseException:
        if old and not os.path.exists(out_dir):
            os.rename(old, out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old)
    return out_dir


def main(argv=None):
    from dydit_jax.checkpointing import save_params

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help=".pt/.pth/.bin, .safetensors or .npz file; a diffusers folder (a DiT "
                             "pipeline or its transformer/); or an orbax params directory")
    parser.add_argument("--model", default=None,
                        help="DiT-, SiT- or Latte-{S,B,L,XL}/{2,4,8}, sized by the "
                             "flags below, or a diffusers folder whose config.json describes "
                             "the model (the flags are then unused). Default: the "
                             "--checkpoint's own config.json for a diffusers folder, else "
                             "DiT-XL/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--latent-downsample", type=int, default=8,
                        help="VAE downsampling factor: input_size = image_size / this")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--no-learn-sigma", action="store_true")
    parser.add_argument("--num-frames", type=int, default=16, help="Latte: frames per clip")
    parser.add_argument("--unconditional", action="store_true",
                        help="Latte: an unconditional model (the release's extras=1; its "
                             "checkpoints have no label table)")
    parser.add_argument("--dynamic", action="store_true",
                        help="a DyDiT checkpoint: the model gets head, MLP-group and token "
                             "routers (fresh ones where the checkpoint has none)")
    parser.add_argument("--which", default="ema", choices=["ema", "model"])
    parser.add_argument("--out", help="output directory of the orbax checkpoint")
    parser.add_argument("--to-diffusers", metavar="OUT",
                        help="output directory of a diffusers DiTTransformer2DModel folder "
                             "(config.json + safetensors; static weights only)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --to-diffusers directory")
    args = parser.parse_args(argv)
    if not (args.out or args.to_diffusers):
        parser.error("nothing to write: give --out (orbax) and/or --to-diffusers")

    spec = args.model
    if spec is None and is_diffusers_dir(args.checkpoint):
        spec = args.checkpoint
    if spec is not None and is_diffusers_dir(spec):
        model = dit_from_diffusers_config(spec, dynamic=args.dynamic)
    else:
        from dydit_jax import families
        name = spec or "DiT-XL/2"
        family = next((f for f in families.FAMILIES.values()
                       if name.startswith((f.prefix + "-", f.prefix + "_"))), None)
        if family is None:
            parser.error(f"--model {name!r}: valid are "
                         f"{', '.join(f.prefix + '-{S,B,L,XL}/{2,4,8}' for f in families.FAMILIES.values())}"
                         f" or a diffusers folder")
        extra = (dict(num_frames=args.num_frames, extras=1 if args.unconditional else 2)
                 if family.video else {})
        model = family.model_class()(
            input_size=args.image_size // args.latent_downsample, in_channels=args.in_channels,
            num_classes=args.num_classes, learn_sigma=not args.no_learn_sigma,
            dynamic=args.dynamic, **family.sizes(name), **extra)
    variables = from_pytorch(args.checkpoint, model, which=args.which)
    written = []
    if args.out:
        save_params(args.out, variables["params"])
        written.append(args.out)
    if args.to_diffusers:
        written.append(to_diffusers(variables, model, args.to_diffusers,
                                    overwrite=args.overwrite) + " (diffusers)")
    n = sum(x.size for x in jax.tree_util.tree_leaves(variables))
    print(f"converted {args.checkpoint} ({type(model).__name__}"
          f"{', dynamic' if args.dynamic else ''}, {n / 1e6:.2f}M parameters) -> "
          f"{', '.join(written)}")

if __name__ == "__main__":
    main()
