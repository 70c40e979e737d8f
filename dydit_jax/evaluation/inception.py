"""The FID Inception-v3 (TensorFlow's `inception-2015-12-05` graph) in Flax Linen.

This is the network of the ADM evaluator (openai/guided-diffusion `evaluations/evaluator.py`),
whose FID, sFID, Inception Score and precision/recall DiT and DyDiT report. It returns

    pool:    [B, 2048]        `pool_3`: the global average pool (FID, precision/recall)
    spatial: [B, 17, 17, 7]   the first 7 channels of `mixed_6/conv` (sFID)
    logits:  [B, 1008]        pool @ softmax weights, without the bias (Inception Score)

for images [B, H, W, 3] with values in [0, 255] (uint8 or float), as the graph does:
- resize to 299x299 with TensorFlow 1's legacy bilinear resize (align_corners=False, no
  half-pixel centres), then (x - 128) / 128;
- the torchvision Inception-v3 layout with the graph's differences: average pools that exclude
  the padding from the count, and a max pool in the last block's pool branch;
- `mixed_6` is Mixed_6d; its `conv` is the 1x1 branch, the first 192 channels of the block's
  output, so `spatial` is Mixed_6d's output[..., :7];
- ADM's softmax multiplies pool_3 by the graph's `softmax/logits/MatMul` weights only, and
  torch-fidelity's Inception Score uses the same unbiased logits, so the `fc.bias` of the
  weight file is not used.

Weights: nothing is downloaded at run time. Get the PyTorch port of the graph's weights once,
`pt_inception-2015-12-05-6726825d.pth` (mseitzer/pytorch-fid, GitHub release `fid_weights`;
torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` is the same file), then convert it
once to a torch-free `.npz` (same names and PyTorch layout) on any machine with torch:

    python -m dydit_jax.evaluation.inception --convert pt_inception-2015-12-05-6726825d.pth \
        --out inception_fid.npz

`load_inception(path)` reads the `.npz` (or the `.pth` with torch, or a `.safetensors`) with
the same strict checks as the checkpoint converters: every parameter and BatchNorm statistic
must be present with the right shape, otherwise a `CheckpointMismatchError` lists them all.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dydit_jax.convert import CheckpointMismatchError, load_state_dict

INPUT_SIZE = 299
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7
BN_EPS = 1e-3

# Weight-file keys that hold nothing the model uses (see the module docstring).
_UNUSED_KEYS = re.compile(r"^fc\.bias$|\.num_batches_tracked$")


def resize_bilinear_tf1(images, size: Tuple[int, int]):
    """TensorFlow 1 `ResizeBilinear(align_corners=False)` (the legacy, non-half-pixel one).

    Output pixel i samples the input at i * in / out: rows y0 = floor, y1 = min(y0 + 1, in - 1)
    mixed by the fraction, first along W then along H. images: [B, H, W, C] float.
    """
    def axis_weights(n_in, n_out):
        src = np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)
        lo = np.floor(src).astype(np.int32)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (src - lo).astype(np.float32)

    (y0, y1, dy), (x0, x1, dx) = axis_weights(images.shape[1], size[0]), \
        axis_weights(images.shape[2], size[1])
    dx = jnp.asarray(dx)[None, None, :, None]
    dy = jnp.asarray(dy)[None, :, None, None]
    left, right = images[:, :, x0], images[:, :, x1]
    rows = left + (right - left) * dx
    top, bottom = rows[:, y0], rows[:, y1]
    return top + (bottom - top) * dy


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU."""
    features: int
    kernel: Tuple[int, int]
    stride: int = 1
    padding: Tuple[int, int] = (0, 0)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, strides=(self.stride, self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, dtype=self.dtype,
                    name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, dtype=self.dtype,
                         name="bn")(x)
        return nn.relu(x)


def _avg_pool_same(x):
    """3x3, stride 1, SAME padding; padded positions do not count (TensorFlow's average pool)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_valid(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """Mixed_5b/c/d: 35x35, 64 + 64 + 96 + pool_features channels."""
    pool_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda *a, **k: BasicConv2d(*a, dtype=self.dtype, **k)  # noqa: E731
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: 35x35 -> 17x17, 384 + 96 + input channels."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda *a, **k: BasicConv2d(*a, dtype=self.dtype, **k)  # noqa: E731
        b3 = conv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b/c/d/e: 17x17, 4 x 192 channels, factorised 7x7 convolutions."""
    channels_7x7: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda *a, **k: BasicConv2d(*a, dtype=self.dtype, **k)  # noqa: E731
        c7 = self.channels_7x7
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: 17x17 -> 8x8, 320 + 192 + input channels."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda *a, **k: BasicConv2d(*a, dtype=self.dtype, **k)  # noqa: E731
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b/c: 8x8, 320 + 768 + 768 + 192 = 2048 channels. `pool`: "avg" (Mixed_7b) or
    "max" (Mixed_7c, a quirk of the FID graph)."""
    pool: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda *a, **k: BasicConv2d(*a, dtype=self.dtype, **k)  # noqa: E731
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
        if self.pool == "avg":
            pooled = _avg_pool_same(x)
        else:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception-v3. images: [B, H, W, 3] in [0, 255] -> {"pool", "spatial", "logits"}.

    `image_size`: the graph resizes every input to 299; None feeds the input as it is (any
    size >= 75, for tests and for inputs already at 299, where the resize is the identity).
    """
    image_size: Optional[int] = INPUT_SIZE
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images) -> Dict[str, jax.Array]:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected NHWC RGB images [B, H, W, 3] in [0, 255], got shape "
                             f"{images.shape} (NCHW input? transpose it to NHWC)")
        x = images.astype(jnp.float32)
        size = self.image_size
        if size is not None and x.shape[1:3] != (size, size):
            x = resize_bilinear_tf1(x, (size, size))
        x = ((x - 128.0) / 128.0).astype(self.dtype)
        conv = lambda *a, **k: BasicConv2d(*a, dtype=self.dtype, **k)  # noqa: E731
        x = conv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)         # 149x149
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)                   # 147x147
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_valid(x)                                          # 73x73
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)                  # 71x71
        x = _max_pool_valid(x)                                          # 35x35
        x = InceptionA(32, self.dtype, name="Mixed_5b")(x)              # 256
        x = InceptionA(64, self.dtype, name="Mixed_5c")(x)              # 288
        x = InceptionA(64, self.dtype, name="Mixed_5d")(x)              # 288
        x = InceptionB(self.dtype, name="Mixed_6a")(x)                  # 17x17x768
        x = InceptionC(128, self.dtype, name="Mixed_6b")(x)
        x = InceptionC(160, self.dtype, name="Mixed_6c")(x)
        x = InceptionC(160, self.dtype, name="Mixed_6d")(x)
        spatial = x[..., :SPATIAL_CHANNELS]                             # mixed_6/conv[..., :7]
        x = InceptionC(192, self.dtype, name="Mixed_6e")(x)
        x = InceptionD(self.dtype, name="Mixed_7a")(x)                  # 8x8x1280
        x = InceptionE("avg", self.dtype, name="Mixed_7b")(x)           # 8x8x2048
        x = InceptionE("max", self.dtype, name="Mixed_7c")(x)
        pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))             # pool_3: [B, 2048]
        logits = nn.Dense(NUM_CLASSES, use_bias=False, name="fc")(pool)
        return {"pool": pool, "spatial": spatial.astype(jnp.float32), "logits": logits}


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def abstract_variables():
    """Shapes of {"params", "batch_stats"} without allocating them (the same for every
    `image_size` and `dtype`: parameters are stored in float32)."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0), x)


_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "scale"): "weight",
               ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
               ("batch_stats", "var"): "running_var"}


def torch_name(collection: str, path: Tuple[str, ...]) -> str:
    """('params', ('Mixed_5b', 'branch1x1', 'bn', 'scale')) -> 'Mixed_5b.branch1x1.bn.weight'."""
    return ".".join(path[:-1] + (_LEAF_NAMES[(collection, path[-1])],))


def _torch_shape(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """A Flax leaf shape in PyTorch's layout: HWIO -> OIHW, (in, out) -> (out, in)."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape[::-1])


def match_torch_state(state, abstract, shape_fn, layout_fn, unused):
    """A PyTorch state dict onto Flax variables, strictly, for the feature networks (Inception,
    I3D). `abstract`: {collection: tree of abstract leaves}; `shape_fn(flax shape)` -> the
    PyTorch shape; `layout_fn(array)` -> the Flax layout; `unused`: a regex of keys to drop
    (BatchNorm counters). Returns (variables, missing, unexpected, mismatched); the caller
    raises `CheckpointMismatchError` with its own hint when any list is non-empty."""
    expected = {}
    for collection, tree in abstract.items():
        for path, leaf in traverse_util.flatten_dict(tree).items():
            expected[torch_name(collection, path)] = (collection, path, leaf)
    variables: Dict[str, Dict[Tuple[str, ...], Any]] = {c: {} for c in abstract}
    unexpected, mismatched, seen = [], [], set()
    for key, value in state.items():
        if key not in expected:
            if not unused.search(key):
                unexpected.append(key)
            continue
        seen.add(key)
        collection, path, leaf = expected[key]
        if tuple(value.shape) != shape_fn(leaf.shape):
            mismatched.append((key, shape_fn(leaf.shape), tuple(value.shape)))
            continue
        variables[collection][path] = jnp.asarray(layout_fn(value), leaf.dtype)
    missing = sorted(k for k in expected if k not in seen)
    variables = {c: traverse_util.unflatten_dict(v) for c, v in variables.items()}
    return variables, missing, sorted(unexpected), mismatched


def _to_flax_layout(value):
    if value.ndim == 4:    # OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:    # (out, in) -> (in, out)
        return value.T
    return value


def from_pytorch(source: Any) -> Dict[str, Any]:
    """Flax variables {"params", "batch_stats"} of `InceptionV3` from the pytorch-fid weight
    file (.pth needs torch; .npz / .safetensors do not) or a loaded mapping name -> array;
    strict."""
    variables, missing, unexpected, mismatched = match_torch_state(
        load_state_dict(source), abstract_variables(), _torch_shape, _to_flax_layout,
        _UNUSED_KEYS)
    if missing or unexpected or mismatched:
        hint = ""
        if any(k.startswith("AuxLogits.") for k in unexpected):
            hint = ("this is torchvision's ImageNet Inception-v3, not the FID network: use "
                    "pt_inception-2015-12-05-6726825d.pth (see dydit_jax.evaluation.inception).")
        raise CheckpointMismatchError(missing, unexpected, mismatched, hint)
    return variables


def load_inception(path: str, image_size: Optional[int] = INPUT_SIZE, dtype: Any = jnp.float32
                   ) -> Tuple[InceptionV3, Dict[str, Any]]:
    """(model, variables) from a local weight file; see the module docstring for the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Inception weights {path!r} not found. Download "
            f"pt_inception-2015-12-05-6726825d.pth once (pytorch-fid's GitHub release "
            f"'fid_weights') and convert it with `python -m dydit_jax.evaluation.inception "
            f"--convert <pth> --out {path}`")
    return InceptionV3(image_size=image_size, dtype=dtype), from_pytorch(path)


def convert_inception_weights(src: str, dst: str) -> None:
    """The .pth weight file -> a torch-free .npz with the same names and layout. The file is
    checked against the model first, so a wrong file fails here and not at evaluation time."""
    state = {k: v for k, v in load_state_dict(src).items() if not _UNUSED_KEYS.search(k)}
    from_pytorch(state)
    if not dst.endswith(".npz"):
        raise ValueError(f"--out {dst!r}: write a .npz file")
    np.savez(dst, **{k: np.asarray(v, np.float32) for k, v in state.items()})


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description="Convert the FID Inception weights once.")
    parser.add_argument("--convert", required=True, help="pt_inception-2015-12-05-*.pth")
    parser.add_argument("--out", required=True, help="output .npz")
    args = parser.parse_args(argv)
    convert_inception_weights(args.convert, args.out)
    print(f"converted {args.convert} -> {args.out}")


if __name__ == "__main__":
    main()
