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


def diffusers_recipe(keys) -> Dict[str, Tuple[str, Tuple[str, ...]]]:
    """How each BFL tensor is made from diffusers FLUX tensors (and DyFLUX's routers), from
    the key names alone: bfl key -> (op, source keys), op "copy" (one source), "concat" (rows
    in the sources' order) or "swap_halves" ([scale; shift] -> [shift; scale]). Keys that map
    to nothing are "copy"-ed under their own name, so the strict check lists them."""
    rest = set(keys)
    recipe: Dict[str, Tuple[str, Tuple[str, ...]]] = {}
    blocks = {"transformer_blocks": _block_count(rest, "transformer_blocks"),
              "single_transformer_blocks": _block_count(rest, "single_transformer_blocks")}

    def indices(template):
        kind = template.split(".")[0]
        return range(blocks[kind]) if "{i}" in template else (None,)

    for parts, target in _CONCATENATED:
        for i in indices(parts[0]):
            for leaf in ("weight", "bias"):
                names = tuple(p.format(i=i) + "." + leaf for p in parts)
                if all(n in rest for n in names):
                    recipe[f"{target.format(i=i)}.{leaf}"] = ("concat", names)
                    rest.difference_update(names)
    for theirs, ours in _DIFFUSERS_MODULES:
        for i in indices(theirs):
            for leaf in ("weight", "bias"):
                name = f"{theirs.format(i=i)}.{leaf}"
                if name in rest:
                    bfl_leaf = "scale" if ours.endswith("_norm") else leaf
                    recipe[f"{ours.format(i=i)}.{bfl_leaf}"] = ("copy", (name,))
                    rest.discard(name)
    for leaf in ("weight", "bias"):
        name = f"norm_out.linear.{leaf}"
        if name in rest:
            recipe[f"final_layer.adaLN_modulation.1.{leaf}"] = ("swap_halves", (name,))
            rest.discard(name)
    for key in sorted(rest):
        m = _DIFFUSERS_ROUTER.match(key)
        if m:
            kind = "double_blocks" if m.group(1) == "transformer_blocks" else "single_blocks"
            recipe[f"{kind}.{m.group(2)}.token_router.{m.group(3)}.{m.group(4)}"] = (
                "copy", (key,))
        else:
            recipe[key] = ("copy", (key,))
    return recipe


def apply_recipe(op: str, arrays) -> np.ndarray:
    if op == "copy":
        return arrays[0]
    if op == "concat":
        return np.concatenate(arrays)
    if op == "swap_halves":
        scale, shift = np.split(arrays[0], 2, axis=0)
        return np.concatenate([shift, scale])
    raise ValueError(f"unknown recipe op {op!r}")


def diffusers_to_bfl(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """diffusers FLUX names (and DyFLUX's routers) -> BFL names (`diffusers_recipe`)."""
    return {target: apply_recipe(op, [state[k] for k in sources])
            for target, (op, sources) in diffusers_recipe(state).items()}


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


def per_block(model):
    """`model` in the per-block layout (`double_blocks_{i}`, `single_blocks_{i}`): what the
    checkpoint names are matched against. A `scan_layers` FLUX's parameters are stacked
    afterwards (`convert.to_layout`)."""
    return model.clone(scan_layers=False) if model.scan_layers else model


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


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
                       "U8": "uint8", "BOOL": "bool"}


class SafetensorsReader:
    """Reads single tensors of a .safetensors file with plain reads (no mmap).

    safetensors' own `safe_open` maps the file, and every tensor read leaves its pages in the
    process's resident set (file-backed, reclaimable, but counted by RSS: converting a 4.4 GB
    file showed 4.3 GB of mapped file pages against 1.3 GB of allocations). Streaming reads
    keep the resident set at the tensors actually held. The format is an 8-byte little-endian
    header length, a JSON header {name: {dtype, shape, data_offsets}} and the data.
    """

    def __init__(self, path):
        import json
        import struct
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.data_start = 8 + n
        header.pop("__metadata__", None)
        self.header = header

    def keys(self):
        return list(self.header)

    def shape(self, key):
        return tuple(self.header[key]["shape"])

    def _dtype(self, key):
        import ml_dtypes
        info = self.header[key]
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{self.path}: tensor {key} has unsupported dtype {info['dtype']}")
        return np.dtype(ml_dtypes.bfloat16 if info["dtype"] == "BF16"
                        else _SAFETENSORS_DTYPES[info["dtype"]])

    def get_transposed(self, key, dtype=np.float32, chunk_bytes: int = 16 << 20):
        """A 2-D tensor transposed ([out, in] -> [in, out], a Linear weight in Flax layout)
        and cast to `dtype`, read in row chunks: one full-size buffer, not three."""
        rows, cols = self.shape(key)
        src = self._dtype(key)
        out = np.empty((cols, rows), dtype)
        step = max(1, chunk_bytes // max(1, cols * src.itemsize))
        start = self.data_start + self.header[key]["data_offsets"][0]
        with open(self.path, "rb", buffering=0) as f:
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                chunk = np.empty((r1 - r0, cols), src)
                f.seek(start + r0 * cols * src.itemsize)
                if f.readinto(memoryview(chunk.reshape(-1).view(np.uint8))) != chunk.nbytes:
                    raise ValueError(f"{self.path} is truncated: tensor {key}")
                out[:, r0:r1] = chunk.T
        return out

    def get(self, key) -> np.ndarray:
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
        info = self.header[key]
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{self.path}: tensor {key} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]] if info["dtype"] != "BF16"
                         else ml_dtypes.bfloat16)
        start, end = info["data_offsets"]
        out = np.empty(tuple(info["shape"]), dtype)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + start)
            view = memoryview(out.reshape(-1).view(np.uint8))
            got = 0
            while got < end - start:
                n = f.readinto(view[got:])
                if not n:
                    raise ValueError(f"{self.path} is truncated: tensor {key} needs "
                                     f"{end - start} bytes at offset {start}")
                got += n
        return out


def stream_to_orbax(source, model, out_dir, overwrite: bool = False,
                    max_item_bytes: int = 32 << 20) -> dict:
    """Converts a FLUX checkpoint (BFL .safetensors, diffusers folder) into an orbax checkpoint
    at `out_dir` tensor by tensor: each parameter is read (with the parts it is made of, e.g.
    to_q/to_k/to_v for a qkv), laid out, and written in orbax items of at most
    `max_item_bytes` (a larger tensor gets an item of its own), so host memory peaks near a
    few times the largest tensor (FLUX.1-dev: linear1, 0.26 GB in float32), not the model
    (48 GB). Names and shapes are checked strictly before anything is written (the
    `CheckpointMismatchError` of `convert.from_pytorch`, from the files' headers, no tensor
    read); the directory appears atomically (written beside it, renamed at the end). Read it
    with `load_streamed` (or `checkpointing.load_params`, `convert.from_pytorch`). Returns the
    manifest. The directory holds the per-block layout whatever `model.scan_layers` (stacking
    would need every block at once): `convert.to_layout` or `convert.from_pytorch` stack it.
    """
    import gc
    import json
    import os
    import shutil
    import uuid

    import jax
    from flax import traverse_util

    from dydit_jax import convert
    from dydit_jax.checkpointing import save_params

    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir!r} exists and is not empty; pass overwrite=True "
                              f"(--overwrite) to replace it")
    model = per_block(model)
    files = safetensors_files(source)
    readers = {path: SafetensorsReader(path) for path in files}
    where: Dict[str, str] = {}
    shapes: Dict[str, tuple] = {}
    for path, reader in readers.items():
        for key in reader.keys():
            where[key] = path
            shapes[key] = reader.shape(key)
    recipe = (diffusers_recipe(shapes) if is_diffusers_named(shapes)
              else {k: ("copy", (k,)) for k in shapes})

    # Strict check on shapes only: zero-stride int8 stand-ins (no data) through the recipe.
    fake = {k: np.broadcast_to(np.zeros((), np.int8), s) for k, s in shapes.items()}
    abstract = traverse_util.flatten_dict(convert._abstract_params(model))
    convert._match_shapes({t: apply_recipe(op, [fake[k] for k in ks])
                           for t, (op, ks) in recipe.items()}, model, abstract)
    del fake

    def read(key):
        return readers[where[key]].get(key).astype(np.float32, copy=False)

    tmp = f"{out_dir}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    items, item, size = [], {}, 0

    def flush():
        nonlocal item, size
        if item:
            name = f"item_{len(items):05d}"
            save_params(os.path.join(tmp, name), traverse_util.unflatten_dict(item))
            items.append(dict(name=name, leaves=["/".join(p) for p in item]))
            item, size = {}, 0
            gc.collect()

    try:
        for target in sorted(recipe, key=lambda t: bfl_key_to_flax(t)[0]):
            op, sources = recipe[target]
            path, layout = bfl_key_to_flax(target)
            leaf = abstract[path]
            nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
            if item and size + nbytes > max_item_bytes:
                flush()
            if op == "copy" and layout == "linear" and len(shapes[sources[0]]) == 2:
                value = readers[where[sources[0]]].get_transposed(sources[0], leaf.dtype)
            else:
                value = apply_recipe(op, [read(k) for k in sources])
                value = np.ascontiguousarray(convert.to_flax_layout(value, layout),
                                             dtype=leaf.dtype)
            item[path] = value
            size += nbytes
            del value
        flush()
        manifest = dict(format="dydit_jax streamed FLUX params", items=items,
                        source=[os.path.basename(f) for f in files], leaves=len(abstract),
                        jax=jax.__version__)
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

    from flax import traverse_util

    from dydit_jax.checkpointing import load_params
    with open(os.path.join(os.fspath(path), STREAMED_MANIFEST)) as f:
        manifest = json.load(f)
    flat_target = None if target is None else traverse_util.flatten_dict(target)
    flat = {}
    for item in manifest["items"]:
        sub = None
        if flat_target is not None:
            sub = traverse_util.unflatten_dict(
                {tuple(n.split("/")): flat_target[tuple(n.split("/"))] for n in item["leaves"]})
        restored = load_params(os.path.join(os.fspath(path), item["name"]), sub)
        flat.update(traverse_util.flatten_dict(restored))
    return traverse_util.unflatten_dict(flat)


def streamed_state(path) -> Dict[str, np.ndarray]:
    """A streamed directory as a BFL-named state dict (so `convert.from_pytorch` reads it)."""
    from flax import traverse_util
    flat = traverse_util.flatten_dict(load_streamed(path))
    return {flax_to_bfl_key(p): (np.asarray(v).T if p[-1] == "kernel" else np.asarray(v))
            for p, v in flat.items()}
