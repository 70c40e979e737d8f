"""Official PyTorch checkpoints -> Flax variables, with strict key and shape checks.

Reads
- the released plain state_dict (`DiT-XL-2-256x256.pt`: an OrderedDict name -> tensor),
- training checkpoints `{"model", "ema", "opt", "args"}` ("ema" by default, "model" on request),
- `.safetensors` and `.npz` files holding the same flat names,
- an already loaded flat mapping name -> array.

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
"""
from __future__ import annotations

import argparse
import logging
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dydit_jax.models.dit import DiT

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
ROUTER_PATTERN = r"/(head_router|group_router|token_router)/"

# Keys of official checkpoints that hold no parameter of ours: they are checked, not loaded.
_FIXED_BUFFERS = ("pos_embed",)


class CheckpointMismatchError(ValueError):
    """The checkpoint does not match the model: lists every missing, unexpected or misshaped key."""

    def __init__(self, missing, unexpected, mismatched, hint=""):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
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

    `which` picks "ema" (default) or "model" from a training checkpoint.
    """
    if isinstance(source, (str, os.PathLike)):
        source = _read_file(os.fspath(source))
    if not isinstance(source, Mapping):
        raise TypeError(f"expected a path or a mapping of name -> tensor, got {type(source)}")
    if "model" in source and isinstance(source["model"], Mapping):
        if which not in source:
            raise KeyError(f"training checkpoint has no {which!r} entry; it has "
                           f"{sorted(k for k in source if isinstance(source[k], Mapping))}. "
                           f"Pass which='model' or which='ema'.")
        source = source[which]
    return {k: _to_numpy(v) for k, v in source.items()}


def _read_file(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
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
    params, fresh = _match(state, model, allow_missing)
    return {"params": params}, fresh


def _abstract_params(model: DiT):
    h, w = model.grid_size
    p = model.patch_size
    x = jax.ShapeDtypeStruct((1, h * p, w * p, model.in_channels), model.param_dtype)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, y)["params"]


def _match(state: Dict[str, np.ndarray], model: DiT, allow_missing: Optional[str]):
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

    found: Dict[Tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched = [], []
    seen_misshaped = set()
    for key, value in state.items():
        if key in _FIXED_BUFFERS:
            _check_fixed_buffer(key, value, model, mismatched)
            continue
        path, layout = torch_key_to_flax(key)
        if path not in expected:
            unexpected.append(key)
            continue
        want = tuple(expected[path].shape)
        if to_flax_layout(value, layout).shape != want:
            mismatched.append((key, _torch_shape(want, layout), tuple(value.shape)))
            seen_misshaped.add(path)
            continue
        found[path] = to_flax_layout(value, layout).astype(expected[path].dtype)

    allowed = re.compile(allow_missing) if allow_missing else None
    missing, fresh = [], []
    for path in expected:
        if path in found or path in seen_misshaped:
            continue
        name = "/".join(path)
        if allowed is not None and allowed.search(name):
            fresh.append(name)
        else:
            missing.append(_flax_to_torch_name(path))
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
    want = model.pos_embed()
    if tuple(value.shape) != tuple(want.shape):
        mismatched.append((key, tuple(want.shape), tuple(value.shape)))
    elif not np.allclose(value, np.asarray(want, np.float64), atol=1e-2):  # bf16 files too
        raise ValueError("checkpoint pos_embed differs from the fixed 2-D sin-cos table of the "
                         "model: it was made for another input/patch size or hidden size")


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
    h, w = model.grid_size
    p = model.patch_size
    return (jnp.zeros((1, h * p, w * p, model.in_channels), model.param_dtype),
            jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.int32))


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
    """Params in the scanned ("blocks" stacked on a depth axis) or per-block ("blocks_i")
    layout, whichever `scan_layers` asks for, from either."""
    params = dict(params)
    if scan_layers and "blocks_0" in params:
        depth = sum(1 for k in params if k.startswith("blocks_"))
        blocks = [params.pop(f"blocks_{i}") for i in range(depth)]
        params["blocks"] = jax.tree_util.tree_map(lambda *a: np.stack(a), *blocks)
    elif not scan_layers and "blocks" in params:
        blocks = params.pop("blocks")
        depth = jax.tree_util.tree_leaves(blocks)[0].shape[0]
        for i in range(depth):
            params[f"blocks_{i}"] = jax.tree_util.tree_map(lambda a: a[i], blocks)
    return params


def main(argv=None):
    from dydit_jax.checkpointing import save_params

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help=".pt, .safetensors or .npz file")
    parser.add_argument("--model", default="DiT-XL/2",
                        help="DiT-{S,B,L,XL}/{2,4,8} or SiT-{S,B,L,XL}/{2,4,8}")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--latent-downsample", type=int, default=8,
                        help="VAE downsampling factor: input_size = image_size / this")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--no-learn-sigma", action="store_true")
    parser.add_argument("--dynamic", action="store_true",
                        help="a DyDiT checkpoint: the model gets head, MLP-group and token "
                             "routers (fresh ones where the checkpoint has none)")
    parser.add_argument("--which", default="ema", choices=["ema", "model"])
    parser.add_argument("--out", required=True, help="output directory of the orbax checkpoint")
    args = parser.parse_args(argv)

    from dydit_jax.models.dit import dit_config
    from dydit_jax.models.sit import SiT, sit_config
    cls, sizes = ((SiT, sit_config(args.model)) if args.model.startswith("SiT")
                  else (DiT, dit_config(args.model)))
    model = cls(input_size=args.image_size // args.latent_downsample,
                in_channels=args.in_channels, num_classes=args.num_classes,
                learn_sigma=not args.no_learn_sigma, dynamic=args.dynamic, **sizes)
    variables = from_pytorch(args.checkpoint, model, which=args.which)
    save_params(args.out, variables["params"])
    n = sum(x.size for x in jax.tree_util.tree_leaves(variables))
    print(f"converted {args.checkpoint} ({type(model).__name__}"
          f"{', dynamic' if args.dynamic else ''}, {n / 1e6:.2f}M parameters) -> {args.out}")


if __name__ == "__main__":
    main()
