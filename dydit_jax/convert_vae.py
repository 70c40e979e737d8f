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
The LDM / BFL layout (`encoder.down.0.block.0...`; FLUX's `ae.safetensors`, the original
CompVis `.ckpt` files with their `first_stage_model.` prefix) is mapped to the diffusers names
(`ldm_to_diffusers`); `flux_autoencoder()` builds FLUX's autoencoder (16 latent channels, no
quant convs, scale 0.3611 and shift 0.1159) and `load_flux_ae` loads `ae.safetensors` or a
diffusers `vae/` folder into it.
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


_LDM_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "nin_shortcut": "conv_shortcut"}
_LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                  "proj_out": "to_out.0"}


def is_ldm_named(state: Mapping[str, Any]) -> bool:
    return any(re.match(r"^(first_stage_model\.)?(encoder\.down|decoder\.up|encoder\.mid"
                        r"\.block_1)\.", k) for k in state)


def ldm_to_diffusers(state: Mapping[str, Any], num_levels: int) -> Dict[str, Any]:
    """LDM / BFL autoencoder names -> diffusers AutoencoderKL names. The decoder's `up` list
    is indexed by resolution level (up[0] is the last to run), diffusers' up_blocks by
    execution order: up.{i} -> up_blocks.{num_levels - 1 - i}. The mid attention's 1x1 convs
    become Linear weights. Unmapped names pass through (the strict check lists them)."""
    out = {}
    for key, value in state.items():
        k = key[len("first_stage_model."):] if key.startswith("first_stage_model.") else key
        m = re.match(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(block|downsample|upsample)"
                     r"(?:\.(\d+))?\.(\w+)\.(weight|bias)$", k)
        if m:
            side, _, level, kind, j, module, leaf = m.groups()
            level = int(level)
            if side == "decoder":
                level = num_levels - 1 - level
            blocks = "down_blocks" if side == "encoder" else "up_blocks"
            if kind == "block":
                name = f"{side}.{blocks}.{level}.resnets.{j}.{_LDM_RESNET.get(module, module)}"
            else:
                sampler = "downsamplers" if kind == "downsample" else "upsamplers"
                name = f"{side}.{blocks}.{level}.{sampler}.0.{module}"
            out[f"{name}.{leaf}"] = value
            continue
        m = re.match(r"^(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(\w+)\.(weight|bias)$",
                     k)
        if m:
            side, part, module, leaf = m.groups()
            if part == "attn_1":
                name = f"{side}.mid_block.attentions.0.{_LDM_ATTENTION.get(module, module)}"
                if leaf == "weight" and module != "norm":
                    value = np.asarray(value).reshape(value.shape[0], -1)   # 1x1 conv -> Linear
            else:
                name = (f"{side}.mid_block.resnets.{0 if part == 'block_1' else 1}."
                        f"{_LDM_RESNET.get(module, module)}")
            out[f"{name}.{leaf}"] = value
            continue
        m = re.match(r"^(encoder|decoder)\.norm_out\.(weight|bias)$", k)
        out[f"{m.group(1)}.conv_norm_out.{m.group(2)}" if m else k] = value
    return out


def from_diffusers(source: Any, model: AutoencoderKL) -> Dict[str, Any]:
    """Flax variables `{"params": ...}` for `model` from a diffusers AutoencoderKL state dict:
    a weights file (.safetensors, .bin, .npz) or a loaded mapping name -> array; an LDM / BFL
    named one (FLUX's ae.safetensors) is mapped first (`ldm_to_diffusers`)."""
    state = load_state_dict(source)
    if is_ldm_named(state):
        state = ldm_to_diffusers(state, len(model.block_out_channels))
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


# FLUX.1's autoencoder (`flux/util.py` ae_params: ch 128, ch_mult [1, 2, 4, 4], 2 res blocks,
# z_channels 16, scale 0.3611, shift 0.1159; no quant convs), the diffusers FLUX vae/ config.
FLUX_AE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, latent_channels=16, norm_num_groups=32,
               scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
               use_post_quant_conv=False)


def flux_autoencoder(dtype: Any = jnp.float32, **overrides) -> AutoencoderKL:
    """FLUX's autoencoder: `encode` -> posterior in AE units, `scale_latents` -> what the
    FLUX transformer sees, (z - 0.1159) * 0.3611, as BFL's `AutoEncoder.encode` returns."""
    return AutoencoderKL(**{**FLUX_AE, **overrides}, dtype=dtype)


def load_flux_ae(source: Union[str, os.PathLike], dtype: Any = jnp.float32, **overrides):
    """(model, variables) from BFL's `ae.safetensors` (LDM names) or a diffusers `vae/`
    folder of a FLUX pipeline (its config.json is used, then `overrides`)."""
    source = os.fspath(source)
    if os.path.isdir(source):
        return load_vae(source, dtype=dtype)
    model = flux_autoencoder(dtype, **overrides)
    return model, from_diffusers(source, model)
