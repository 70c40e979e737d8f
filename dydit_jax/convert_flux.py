"""FLUX checkpoint names: the BFL layout, diffusers' FluxTransformer2DModel and DyFLUX.

`dydit_jax.convert` does the reading, the strict key/shape check and the error report for
every family; this module only says how FLUX names map (the `NameScheme` for `FLUX` models):
- BFL (`flux1-dev.safetensors`): the model's own names, `double_blocks.3.img_mlp.0.weight` ->
  `double_blocks_3/img_mlp_0/kernel`;
- diffusers (`transformer/` folders, sharded or not) and the DyFLUX release (`transformer_*.pt`
  = `{"module": <diffusers-named state_dict>}` with `token_selection.*` router keys): mapped
  to BFL names first (`diffusers_to_bfl`): to_q/to_k/to_v (+ proj_mlp in single blocks) are
  concatenated into qkv / linear1, `norm_out.linear`'s [scale; shift] halves are swapped to
  the final layer's [shift; scale], the routers become `*.token_router.*` (our name; BFL has
  no routers).
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Tuple

import numpy as np

# BFL module path -> ours (applied to the dotted module path, then dots become '/').
_BFL_RENAMES = (
    (r"^(double_blocks|single_blocks)\.(\d+)\.", r"\1_\2."),
    (r"\.(img|txt)_mlp\.(\d)$", r".\1_mlp_\2"),
    (r"\.adaLN_modulation\.1$", ".adaLN_modulation"),
)

# diffusers module -> BFL module, one to one ("{i}": the block index).
_DIFFUSERS_MODULES = (
    ("x_embedder", "img_in"),
    ("context_embedder", "txt_in"),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("transformer_blocks.{i}.norm1.linear", "double_blocks.{i}.img_mod.lin"),
    ("transformer_blocks.{i}.norm1_context.linear", "double_blocks.{i}.txt_mod.lin"),
    ("transformer_blocks.{i}.attn.norm_q", "double_blocks.{i}.img_attn.norm.query_norm"),
    ("transformer_blocks.{i}.attn.norm_k", "double_blocks.{i}.img_attn.norm.key_norm"),
    ("transformer_blocks.{i}.attn.norm_added_q", "double_blocks.{i}.txt_attn.norm.query_norm"),
    ("transformer_blocks.{i}.attn.norm_added_k", "double_blocks.{i}.txt_attn.norm.key_norm"),
    ("transformer_blocks.{i}.attn.to_out.0", "double_blocks.{i}.img_attn.proj"),
    ("transformer_blocks.{i}.attn.to_add_out", "double_blocks.{i}.txt_attn.proj"),
    ("transformer_blocks.{i}.ff.net.0.proj", "double_blocks.{i}.img_mlp.0"),
    ("transformer_blocks.{i}.ff.net.2", "double_blocks.{i}.img_mlp.2"),
    ("transformer_blocks.{i}.ff_context.net.0.proj", "double_blocks.{i}.txt_mlp.0"),
    ("transformer_blocks.{i}.ff_context.net.2", "double_blocks.{i}.txt_mlp.2"),
    ("single_transformer_blocks.{i}.norm.linear", "single_blocks.{i}.modulation.lin"),
    ("single_transformer_blocks.{i}.attn.norm_q", "single_blocks.{i}.norm.query_norm"),
    ("single_transformer_blocks.{i}.attn.norm_k", "single_blocks.{i}.norm.key_norm"),
    ("single_transformer_blocks.{i}.proj_out", "single_blocks.{i}.linear2"),
    ("proj_out", "final_layer.linear"),
)
_DIFFUSERS_ROUTER = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)"
                               r"\.token_selection\.(linear_t|norm|router)\.(weight|bias)$")
# Concatenated rows: (diffusers parts, BFL module); the parts' order is the rows' order.
_CONCATENATED = (
    (("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
      "transformer_blocks.{i}.attn.to_v"), "double_blocks.{i}.img_attn.qkv"),
    (("transformer_blocks.{i}.attn.add_q_proj", "transformer_blocks.{i}.attn.add_k_proj",
      "transformer_blocks.{i}.attn.add_v_proj"), "double_blocks.{i}.txt_attn.qkv"),
    (("single_transformer_blocks.{i}.attn.to_q", "single_transformer_blocks.{i}.attn.to_k",
      "single_transformer_blocks.{i}.attn.to_v", "single_transformer_blocks.{i}.proj_mlp"),
     "single_blocks.{i}.linear1"),
)
# The FLUX classes of diffusers folders (config.json `_class_name`).
DIFFUSERS_CLASSES = ("FluxTransformer2DModel", "DynFluxTransformer2DModel")


def is_diffusers_named(state: Mapping[str, np.ndarray]) -> bool:
    return any(k.startswith(("transformer_blocks.", "single_transformer_blocks.",
                             "x_embedder.", "time_text_embed.")) for k in state)


def _block_count(state, prefix: str) -> int:
    found = [int(m.group(1)) for k in state
             for m in [re.match(rf"^{re.escape(prefix)}\.(\d+)\.", k)] if m]
    return max(found) + 1 if found else 0


def diffusers_to_bfl(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """diffusers FLUX names (and DyFLUX's routers) -> BFL names; anything unmapped passes
    through unchanged, so the strict check lists it as unexpected."""
    rest = dict(state)
    out: Dict[str, np.ndarray] = {}
    blocks = {"transformer_blocks": _block_count(state, "transformer_blocks"),
              "single_transformer_blocks": _block_count(state, "single_transformer_blocks")}

    def indices(template):
        kind = template.split(".")[0]
        return range(blocks[kind]) if "{i}" in template else (None,)

    for parts, target in _CONCATENATED:
        for i in indices(parts[0]):
            for leaf in ("weight", "bias"):
                names = [p.format(i=i) + "." + leaf for p in parts]
                if all(n in rest for n in names):
                    out[f"{target.format(i=i)}.{leaf}"] = np.concatenate(
                        [rest.pop(n) for n in names])
    for theirs, ours in _DIFFUSERS_MODULES:
        for i in indices(theirs):
            for leaf in ("weight", "bias"):
                name = f"{theirs.format(i=i)}.{leaf}"
                if name in rest:
                    bfl_leaf = "scale" if ours.endswith("_norm") else leaf
                    out[f"{ours.format(i=i)}.{bfl_leaf}"] = rest.pop(name)
    for leaf in ("weight", "bias"):   # [scale; shift] -> [shift; scale]
        name = f"norm_out.linear.{leaf}"
        if name in rest:
            scale, shift = np.split(rest.pop(name), 2, axis=0)
            out[f"final_layer.adaLN_modulation.1.{leaf}"] = np.concatenate([shift, scale])
    for key in list(rest):
        m = _DIFFUSERS_ROUTER.match(key)
        if m:
            kind = "double_blocks" if m.group(1) == "transformer_blocks" else "single_blocks"
            out[f"{kind}.{m.group(2)}.token_router.{m.group(3)}.{m.group(4)}"] = rest.pop(key)
    out.update(rest)
    return out


def bfl_key_to_flax(key: str) -> Tuple[Tuple[str, ...], str]:
    """'double_blocks.0.img_mlp.0.weight' -> (('double_blocks_0', 'img_mlp_0', 'kernel'),
    'linear'); the second value is the layout ('linear' = transpose, 'none')."""
    module, _, leaf = key.rpartition(".")
    for pattern, repl in _BFL_RENAMES:
        module = re.sub(pattern, repl, module)
    path = tuple(module.split("."))
    if leaf == "weight" and path[-1] == "norm" and "token_router" in path:
        return path + ("scale",), "none"            # the router's affine LayerNorm
    if leaf == "weight":
        return path + ("kernel",), "linear"
    return path + (leaf,), "none"


def flax_to_bfl_key(path: Tuple[str, ...]) -> str:
    """The inverse of `bfl_key_to_flax` (for naming missing keys)."""
    parts = []
    for i, p in enumerate(path):
        m = re.match(r"^(double_blocks|single_blocks)_(\d+)$", p)
        if m:
            parts += [m.group(1), m.group(2)]
            continue
        m = re.match(r"^(img|txt)_mlp_(\d)$", p)
        if m:
            parts += [f"{m.group(1)}_mlp", m.group(2)]
        elif p == "adaLN_modulation":
            parts.append("adaLN_modulation.1")
        elif p == "kernel":
            parts.append("weight")
        elif p == "scale" and i > 0 and path[i - 1] == "norm":
            parts.append("weight")
        else:
            parts.append(p)
    return ".".join(parts)


def mismatch_hint(unexpected, mismatched) -> str:
    """What a FLUX mismatch most likely means, in one line ('' when nothing specific)."""
    if any(".token_router." in k for k in unexpected):
        return ("the checkpoint has DyFLUX token routers: build the model with dynamic=True.")
    if any(k.startswith("guidance_in.") for k in unexpected):
        return ("the checkpoint has a guidance embedding (FLUX.1-dev style): build the model "
                "with guidance_embed=True.")
    if any(k.endswith("img_attn.qkv.bias") for k in unexpected):
        return "the checkpoint has qkv biases: build the model with qkv_bias=True."
    return ""


def model_args_from_diffusers_config(config: Mapping) -> dict:
    """FLUX constructor arguments from a diffusers FluxTransformer2DModel config.json."""
    need = [k for k in ("in_channels", "num_layers", "num_single_layers", "attention_head_dim",
                        "num_attention_heads", "joint_attention_dim", "pooled_projection_dim")
            if k not in config]
    if need:
        raise ValueError(f"the FLUX config.json has no {need}: they fix the model's size")
    if config.get("patch_size", 1) != 1:
        raise ValueError(f"FLUX config.json has patch_size={config['patch_size']}: only 1 "
                         f"(2x2 packing outside the model, as FLUX does) is supported")
    heads, hd = config["num_attention_heads"], config["attention_head_dim"]
    return dict(in_channels=config["in_channels"],
                out_channels=config.get("out_channels") or config["in_channels"],
                vec_in_dim=config["pooled_projection_dim"],
                context_in_dim=config["joint_attention_dim"], hidden_size=heads * hd,
                mlp_ratio=4.0, num_heads=heads, depth=config["num_layers"],
                depth_single_blocks=config["num_single_layers"],
                axes_dim=tuple(config.get("axes_dims_rope", (16, 56, 56))), theta=10_000,
                qkv_bias=True, guidance_embed=bool(config.get("guidance_embeds", False)),
                dynamic=bool(config.get("do_token_select", False)))


# ----------------------------------------------------------------------------------------------
# Streaming conversion: safetensors -> orbax, one block at a time
# ----------------------------------------------------------------------------------------------

# The manifest of a streamed checkpoint: one orbax item per group of top-level modules.
STREAMED_MANIFEST = "streamed_params.json"
_GROUP = re.compile(r"^(transformer_blocks|single_transformer_blocks|double_blocks|"
                    r"single_blocks)\.(\d+)\.")


def safetensors_files(source) -> list:
    """The .safetensors files of a BFL file, a diffusers folder (sharded via its index json,
    or one file) or a pipeline folder with transformer/."""
    import json
    import os
    source = os.fspath(source)
    if os.path.isfile(source):
        if not source.endswith(".safetensors"):
            raise ValueError(f"streaming conversion reads .safetensors files, got {source!r}")
        return [source]
    for folder in (source, os.path.join(source, "transformer")):
        index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
        single = os.path.join(folder, "diffusion_pytorch_model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(folder, s) for s in shards]
            absent = [f for f in files if not os.path.isfile(f)]
            if absent:
                raise FileNotFoundError(f"{index} names shards that are not there: {absent}")
            return files
        if os.path.isfile(single):
            return [single]
    raise FileNotFoundError(f"{source!r} is neither a .safetensors file nor a diffusers folder "
                            f"with diffusion_pytorch_model*.safetensors (or its transformer/)")


def _group_of(key: str) -> str:
    m = _GROUP.match(key)
    if not m:
        return "rest"
    kind = {"transformer_blocks": "double_blocks",
            "single_transformer_blocks": "single_blocks"}.get(m.group(1), m.group(1))
    return f"{kind}_{m.group(2)}"


def stream_to_orbax(source, model, out_dir, overwrite: bool = False) -> dict:
    """Converts a FLUX checkpoint (BFL .safetensors, diffusers folder) into an orbax checkpoint
    at `out_dir` reading one group (a block, or the embedders + final layer) at a time: host
    memory peaks near the largest group (a FLUX.1-dev single block: 0.57 GB in float32), not
    the model (48 GB). Names and shapes are checked strictly before anything is written (the
    `CheckpointMismatchError` of `convert.from_pytorch`, from the files' headers, no tensor
    read); the directory appears atomically (written beside it, renamed at the end).
    Read it back with `load_streamed` (or `checkpointing.load_params`). Returns the manifest.
    """
    import json
    import os
    import shutil
    import uuid

    import jax
    from flax import traverse_util
    from safetensors import safe_open

    from dydit_jax import convert
    from dydit_jax.checkpointing import save_params

    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir!r} exists and is not empty; pass overwrite=True "
                              f"(--overwrite) to replace it")
    files = safetensors_files(source)
    where: Dict[str, str] = {}
    shapes: Dict[str, tuple] = {}
    for path in files:
        with safe_open(path, framework="flax") as h:
            for key in h.keys():
                where[key] = path
                shapes[key] = tuple(h.get_slice(key).get_shape())
    groups: Dict[str, list] = {}
    for key in where:
        groups.setdefault(_group_of(key), []).append(key)

    # Strict check on shapes only: zero-stride stand-ins (int8, no data) go through the same
    # name mapping and the same check as `from_pytorch`.
    fake = {k: np.broadcast_to(np.zeros((), np.int8), s) for k, s in shapes.items()}
    abstract = traverse_util.flatten_dict(convert._abstract_params(model))
    convert._match_shapes(diffusers_to_bfl(fake) if is_diffusers_named(fake) else fake,
                          model, abstract)

    tmp = f"{out_dir}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    written = []
    try:
        for name, keys in sorted(groups.items()):
            state = {}
            for key in keys:
                with safe_open(where[key], framework="flax") as h:
                    state[key] = np.asarray(h.get_tensor(key).astype("float32"))
            if is_diffusers_named(state) or any(k.startswith(("norm_out.", "proj_out."))
                                                for k in state):
                state = diffusers_to_bfl(state)
            tree = {}
            for key in list(state):
                path, layout = bfl_key_to_flax(key)
                leaf = abstract[path]
                tree[path] = np.ascontiguousarray(
                    convert.to_flax_layout(state.pop(key), layout)).astype(leaf.dtype)
            save_params(os.path.join(tmp, name), traverse_util.unflatten_dict(tree))
            written.append(name)
            del tree
        manifest = dict(format="dydit_jax streamed FLUX params", groups=written,
                        source=[os.path.basename(f) for f in files],
                        leaves=len(abstract), jax=jax.__version__)
        with open(os.path.join(tmp, STREAMED_MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def is_streamed(path) -> bool:
    import os
    return os.path.isfile(os.path.join(os.fspath(path), STREAMED_MANIFEST))


def load_streamed(path, target=None):
    """The params tree of a `stream_to_orbax` directory. `target` (the model's params tree of
    arrays or ShapeDtypeStructs with shardings) places every leaf as it is restored, so a
    sharded restore never holds a full copy of a sharded leaf on one device."""
    import json
    import os

    from dydit_jax.checkpointing import load_params
    with open(os.path.join(os.fspath(path), STREAMED_MANIFEST)) as f:
        manifest = json.load(f)
    params = {}
    for name in manifest["groups"]:
        sub = load_params(os.path.join(os.fspath(path), name),
                          None if target is None else {k: target[k] for k in _top_keys(
                              target, name)})
        params.update(sub)
    return params


def _top_keys(target, group: str):
    if group != "rest":
        return [group]
    return [k for k in target if not k.startswith(("double_blocks_", "single_blocks_"))]


def streamed_state(path) -> Dict[str, np.ndarray]:
    """A streamed directory as a BFL-named state dict (so `convert.from_pytorch` reads it)."""
    from flax import traverse_util
    flat = traverse_util.flatten_dict(load_streamed(path))
    return {flax_to_bfl_key(p): (np.asarray(v).T if p[-1] == "kernel" else np.asarray(v))
            for p, v in flat.items()}
