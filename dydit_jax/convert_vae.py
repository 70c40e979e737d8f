"""diffusers `AutoencoderKL` folders -> `models.vae.AutoencoderKL` and its Flax variables.

    vae, variables = load_vae("/path/to/sd-vae-ft-ema")

The folder is what diffusers' `save_pretrained` writes and what the hub repos
stabilityai/sd-vae-ft-ema and -mse hold: `config.json` plus `diffusion_pytorch_model.safetensors`
(read with safetensors, no torch) or `diffusion_pytorch_model.bin` (needs torch). Nothing is
downloaded: fetch the folder once (e.g. `huggingface-cli download stabilityai/sd-vae-ft-ema`).

Both spellings of the mid-block attention are accepted: the current `to_q`, `to_k`, `to_v`,
`to_out.0` and the pre-2023 `query`, `key`, `value`, `proj_attn` that older SD-era VAEs ship
(diffusers renames them on load too). Every parameter of the model must be found exactly once
with the right shape; otherwise one `CheckpointMismatchError` lists the missing keys, the
unexpected keys and each shape mismatch (in the diffusers names and PyTorch layout).
Original LDM/CompVis `.ckpt` files (`encoder.down.0.block.0...`) are a different layout: convert
them to the diffusers format first (diffusers' scripts/convert_vae_pt_to_diffusers.py).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Mapping, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dydit_jax.convert import CheckpointMismatchError, load_state_dict
from dydit_jax.models.vae import AutoencoderKL

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# config.json keys that do not change the network (metadata, pipeline hints, input size).
_IGNORED_CONFIG_KEYS = ("sample_size", "force_upcast", "latents_mean", "latents_std")
_ARCH_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
              "latent_channels", "norm_num_groups", "scaling_factor", "shift_factor",
              "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")

# Pre-2023 attention names -> current ones (inside `*.attentions.N.`).
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")


def vae_from_config(config: Union[str, os.PathLike, Mapping[str, Any]],
                    dtype: Any = jnp.float32) -> AutoencoderKL:
    """An `AutoencoderKL` from a diffusers config.json (path, folder or loaded dict).

    Raises ValueError naming the key for block types, activations or options this port does not
    implement, and for unknown keys (add a key to `_IGNORED_CONFIG_KEYS` only if it does not
    change the network).
    """
    if not isinstance(config, Mapping):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            config = json.load(f)
    kwargs: Dict[str, Any] = {}
    for key, value in config.items():
        if key.startswith("_") or key in _IGNORED_CONFIG_KEYS:
            continue
        if key in ("down_block_types", "up_block_types"):
            want = "DownEncoderBlock2D" if key == "down_block_types" else "UpDecoderBlock2D"
            if any(t != want for t in value):
                raise ValueError(f"config {key}={value}: only {want} blocks are implemented")
            continue
        if key == "act_fn":
            if value != "silu":
                raise ValueError(f"config act_fn={value!r}: only 'silu' is implemented")
            continue
        if key == "norm_type" and value == "group":
            continue
        if key not in _ARCH_KEYS:
            raise ValueError(f"config key {key}={value!r} is not supported by "
                             f"dydit_jax.models.vae.AutoencoderKL")
        if value is None:  # e.g. "shift_factor": null -> the default
            continue
        kwargs[key] = tuple(value) if key == "block_out_channels" else value
    n = len(kwargs.get("block_out_channels", AutoencoderKL.block_out_channels))
    for key in ("down_block_types", "up_block_types"):
        if key in config and len(config[key]) != n:
            raise ValueError(f"config {key} has {len(config[key])} entries but "
                             f"block_out_channels has {n}")
    return AutoencoderKL(dtype=dtype, **kwargs)


def diffusers_name(path: Tuple[str, ...]) -> str:
    """('encoder', 'down_blocks_0', 'resnets_1', 'conv1', 'kernel') ->
    'encoder.down_blocks.0.resnets.1.conv1.weight'."""
    *modules, leaf = path
    modules = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join(modules + ["bias" if leaf == "bias" else "weight"])


def _layout(leaf: jax.ShapeDtypeStruct) -> str:
    return {4: "conv", 2: "linear"}.get(len(leaf.shape), "none")


def _to_flax(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":  # OIHW -> HWIO
        return array.transpose(2, 3, 1, 0)
    if layout == "linear":  # (out, in) -> (in, out)
        return array.T
    return array


def _torch_shape(shape: Tuple[int, ...], layout: str) -> Tuple[int, ...]:
    if layout == "conv":
        h, w, i, o = shape
        return (o, i, h, w)
    if layout == "linear":
        return tuple(reversed(shape))
    return tuple(shape)


def abstract_params(model: AutoencoderKL):
    """The model's parameter shapes (no allocation), from a small dummy image."""
    size = 2 * model.downsample_factor
    x = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]


def canonical_name(key: str) -> str:
    """A checkpoint key in the current diffusers spelling (legacy attention names renamed)."""
    return _LEGACY_RE.sub(lambda m: m.group(1) + _LEGACY_ATTENTION[m.group(2)] + ".", key)


def from_diffusers(source: Any, model: AutoencoderKL) -> Dict[str, Any]:
    """Flax variables `{"params": ...}` for `model` from a diffusers AutoencoderKL state dict:
    a weights file (.safetensors, .bin, .npz) or a loaded mapping name -> array."""
    state = load_state_dict(source)
    expected = {diffusers_name(path): (path, leaf)
                for path, leaf in traverse_util.flatten_dict(abstract_params(model)).items()}

    found: Dict[Tuple[str, ...], np.ndarray] = {}
    source_of: Dict[str, str] = {}
    unexpected, mismatched = [], []
    for key, value in state.items():
        name = canonical_name(key)
        if name not in expected:
            unexpected.append(key)
            continue
        if name in source_of:
            unexpected.append(f"{key} (duplicate of {source_of[name]})")
            continue
        source_of[name] = key
        path, leaf = expected[name]
        layout = _layout(leaf)
        if value.ndim != len(leaf.shape) or _to_flax(value, layout).shape != leaf.shape:
            mismatched.append((key, _torch_shape(leaf.shape, layout), tuple(value.shape)))
            continue
        found[path] = _to_flax(value, layout).astype(leaf.dtype)

    missing = sorted(name for name in expected if name not in source_of)
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, sorted(unexpected), mismatched,
                                      _hint(missing, unexpected, mismatched, model))
    return {"params": traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in found.items()})}


def _hint(missing, unexpected, mismatched, model: AutoencoderKL) -> str:
    if any(k.startswith(("encoder.down.", "first_stage_model.")) for k in unexpected):
        return ("this is an original LDM/CompVis checkpoint, not the diffusers layout: convert it "
                "with diffusers' scripts/convert_vae_pt_to_diffusers.py first.")
    if any("(duplicate of" in k for k in unexpected):
        return ("the checkpoint holds the same attention weights under both the legacy "
                "(query/key/value/proj_attn) and the current (to_q/to_k/to_v/to_out.0) names.")
    if mismatched:
        return ("config.json does not describe these weights: check block_out_channels, "
                "latent_channels, in_channels and out_channels.")
    for conv, flag in (("quant_conv.", "use_quant_conv"),
                       ("post_quant_conv.", "use_post_quant_conv")):
        if any(k.startswith(conv) for k in missing):
            return f"the checkpoint has no {conv[:-1]}: set {flag} to false in config.json."
        if any(k.startswith(conv) for k in unexpected):
            return f"the checkpoint has a {conv[:-1]}: set {flag} to true in config.json."
    if any(".attentions." in k for k in missing) and model.mid_block_add_attention:
        return "the checkpoint has no mid-block attention: set mid_block_add_attention to false."
    if any(".resnets." in k for k in missing + unexpected):
        return "the number of resnets differs: check layers_per_block and block_out_channels."
    return ""


def find_weights(folder: str) -> str:
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no VAE weights in {folder!r}: expected one of {WEIGHT_FILES} "
                            f"(found {sorted(os.listdir(folder))})")


def load_vae(folder: Union[str, os.PathLike], dtype: Any = jnp.float32
             ) -> Tuple[AutoencoderKL, Dict[str, Any]]:
    """(model, variables) from a diffusers AutoencoderKL folder (config.json + weights)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a folder: pass the diffusers VAE folder "
                                f"holding config.json and {WEIGHT_FILES[0]}")
    model = vae_from_config(folder, dtype=dtype)
    return model, from_diffusers(find_weights(folder), model)
