"""The Kinetics-400 Inception-I3D of the FVD protocol in Flax Linen.

This is the PyTorch `InceptionI3d` that TATS and content-debiased FVD (`cd-fvd`,
`cdfvd/third_party/i3d/pytorch_i3d.py`, itself piergiaj/pytorch-i3d) evaluate FVD with, loaded
from `i3d_pretrained_400.pt` (TATS's conversion of DeepMind's TF-Hub `i3d-kinetics-400`, the
network of the original FVD). It returns, for videos [B, T, H, W, 3] in [-1, 1],

    features: [B, 1024]  the pre-logits layer: Mixed_5c, average-pooled 2x7x7 (stride 1,
                         VALID), then averaged over the remaining time steps
    logits:   [B, 400]   the 1x1x1 logits convolution of each pooled time step, averaged over
                         time (the reference's `forward`); since that convolution is linear,
                         logits = features @ W + b

Published FVDs embed clips with the 400-d logits: the TF-Hub module's output in the original
FVD, StyleGAN-V's detector, TATS's `get_fvd_logits` and cd-fvd's `get_i3d_logits` all call the
network's forward. `dydit_jax.evaluation.fvd` therefore computes FVD on the logits by default
and on `features` on request (not comparable to published numbers).

As the reference does (its layers, not the TF graph's, where they differ):
- every convolution and max pool pads TensorFlow-"SAME": total = max(k - (s if n % s == 0 else
  n % s), 0), front = total // 2, back = the rest; the max pools pad with zeros (their inputs
  are ReLU outputs, so this equals -inf padding);
- BatchNorm with running statistics and eps 1e-5 (the PyTorch port's; the TF graph used 1e-3);
  the weight file's BatchNorm scales are ones (the TF graph has none);
- dropout before the logits is the identity at evaluation.

Input limits: the network strides time by 8 and space by 32, and the final 2x7x7 pool needs
at least 2 x 7 x 7 steps, so T >= 9 (MIN_FRAMES) and 193 <= H, W <= 224 (the protocol resizes
to 224, see `preprocess`); larger frames would leave a spatial grid the reference cannot
squeeze, shorter clips have no time window to pool.

Weights: nothing is downloaded at run time. Get `i3d_pretrained_400.pt` once (TATS,
`tats/fvd/i3d_pretrained_400.pt`; cd-fvd downloads the same file) and convert it once to a
torch-free `.npz` (same names and PyTorch layout) on any machine with torch:

    python -m dydit_jax.evaluation.i3d --convert i3d_pretrained_400.pt --out i3d_400.npz

`load_i3d(path)` reads the `.npz` (or the `.pt` with torch, or a `.safetensors`) strictly: every
parameter and BatchNorm statistic must be present with the right shape, otherwise one
`CheckpointMismatchError` lists them all. StyleGAN-V's `i3d_torchscript.pt` is a TorchScript
trace with other names and is not supported.
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

from dydit_jax.convert import CheckpointMismatchError, load_state_dict
from dydit_jax.evaluation.inception import match_torch_state

INPUT_SIZE = 224
NUM_FRAMES = 16
NUM_CLASSES = 400
FEATURE_DIM = 1024
MIN_FRAMES = 9
MIN_SIZE = 193
BN_EPS = 1e-5

# Weight-file keys that hold nothing the model uses.
_UNUSED_KEYS = re.compile(r"\.num_batches_tracked$")

# (name, channels of b0, b1a, b1b, b2a, b2b, b3b) of the Inception modules, in order.
_MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}

Triple = Tuple[int, int, int]


def same_pads(sizes: Sequence[int], kernel: Triple, stride: Triple):
    """TensorFlow "SAME" padding per dimension, the reference's `compute_pad`: a tuple of
    (front, back) pairs for `sizes` (T, H, W)."""
    pads = []
    for n, k, s in zip(sizes, kernel, stride):
        total = max(k - (s if n % s == 0 else n % s), 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


def max_pool_same(x, kernel: Triple, stride: Triple):
    """The reference's `MaxPool3dSamePadding`: zero "SAME" padding, then a VALID max pool.
    x: [B, T, H, W, C]."""
    x = jnp.pad(x, ((0, 0),) + same_pads(x.shape[1:4], kernel, stride) + ((0, 0),))
    return nn.max_pool(x, kernel, strides=stride, padding="VALID")


class Unit3D(nn.Module):
    """"SAME"-padded conv3d -> BatchNorm (running statistics, eps 1e-5) -> ReLU; the logits
    unit has a bias and neither BatchNorm nor ReLU."""
    features: int
    kernel: Triple = (1, 1, 1)
    stride: Triple = (1, 1, 1)
    use_batch_norm: bool = True
    use_bias: bool = False
    activation: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, self.kernel, strides=self.stride,
                    padding=same_pads(x.shape[1:4], self.kernel, self.stride),
                    use_bias=self.use_bias, dtype=self.dtype, name="conv3d")(x)
        if self.use_batch_norm:
            x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, dtype=self.dtype,
                             name="bn")(x)
        return nn.relu(x) if self.activation else x


class InceptionModule(nn.Module):
    """Four branches concatenated in the order b0, b1, b2, b3 (channels last):
    1x1 | 1x1 -> 3x3x3 | 1x1 -> 3x3x3 | 3x3x3 max pool -> 1x1."""
    channels: Tuple[int, int, int, int, int, int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c0, c1a, c1b, c2a, c2b, c3b = self.channels
        unit = functools.partial(Unit3D, dtype=self.dtype)
        b0 = unit(c0, name="b0")(x)
        b1 = unit(c1b, (3, 3, 3), name="b1b")(unit(c1a, name="b1a")(x))
        b2 = unit(c2b, (3, 3, 3), name="b2b")(unit(c2a, name="b2a")(x))
        b3 = unit(c3b, name="b3b")(max_pool_same(x, (3, 3, 3), (1, 1, 1)))
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


def check_video_shape(shape: Sequence[int]) -> None:
    """Raises a ValueError naming the fix if I3D cannot take clips of `shape` [B, T, H, W, 3]."""
    if len(shape) != 5 or shape[-1] != 3:
        raise ValueError(f"expected NDHWC RGB videos [B, T, H, W, 3], got shape {tuple(shape)} "
                         f"(NCDHW input? transpose it to [B, T, H, W, C])")
    t, h, w = shape[1:4]
    if t < MIN_FRAMES:
        raise ValueError(
            f"I3D needs clips of at least {MIN_FRAMES} frames, got {t}: its temporal strides "
            f"(x8) leave fewer than the 2 time steps its final 2x7x7 average pool needs. The "
            f"FVD protocol uses {NUM_FRAMES}-frame clips; sample longer clips (repeating "
            f"frames gives numbers not comparable to published FVDs)")
    if not (MIN_SIZE <= h <= INPUT_SIZE and MIN_SIZE <= w <= INPUT_SIZE):
        raise ValueError(f"I3D needs frames of {MIN_SIZE}..{INPUT_SIZE} pixels (a final 7x7 grid),"
                         f" got {h}x{w}: resize them with `preprocess` (to {INPUT_SIZE}x"
                         f"{INPUT_SIZE}, the FVD protocol)")


class InceptionI3d(nn.Module):
    """Kinetics-400 I3D. videos: [B, T, H, W, 3] in [-1, 1] -> {"features": [B, 1024],
    "logits": [B, 400]}; see the module docstring for the input limits."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, videos) -> Dict[str, jax.Array]:
        check_video_shape(videos.shape)
        x = videos.astype(self.dtype)
        unit = functools.partial(Unit3D, dtype=self.dtype)
        x = unit(64, (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7")(x)     # T/2, 112x112
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))                      # MaxPool3d_2a: 56x56
        x = unit(64, name="Conv3d_2b_1x1")(x)
        x = unit(192, (3, 3, 3), name="Conv3d_2c_3x3")(x)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))                      # MaxPool3d_3a: 28x28
        for name in ("Mixed_3b", "Mixed_3c"):
            x = InceptionModule(_MIXED[name], self.dtype, name=name)(x)  # 480
        x = max_pool_same(x, (3, 3, 3), (2, 2, 2))                      # MaxPool3d_4a: T/4, 14x14
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = InceptionModule(_MIXED[name], self.dtype, name=name)(x)  # 832
        x = max_pool_same(x, (2, 2, 2), (2, 2, 2))                      # MaxPool3d_5a: T/8, 7x7
        for name in ("Mixed_5b", "Mixed_5c"):
            x = InceptionModule(_MIXED[name], self.dtype, name=name)(x)  # 1024
        pooled = nn.avg_pool(x.astype(jnp.float32), (2, 7, 7), strides=(1, 1, 1),
                             padding="VALID")                           # [B, T/8 - 1, 1, 1, 1024]
        logits = Unit3D(NUM_CLASSES, use_batch_norm=False, use_bias=True, activation=False,
                        name="logits")(pooled)
        return {"features": pooled.mean(axis=(1, 2, 3)), "logits": logits.mean(axis=(1, 2, 3))}


def preprocess(videos, size: int = INPUT_SIZE):
    """The protocol's preprocessing: uint8 videos [B, T, H, W, 3] -> float32 [B, T, size, size,
    3] in [-1, 1]. Frames are resized like torch's `F.interpolate(mode="bilinear",
    align_corners=False)` (half-pixel centres, no antialiasing when downsampling)."""
    x = jnp.asarray(videos).astype(jnp.float32)
    if x.shape[2:4] != (size, size):
        x = jax.image.resize(x, x.shape[:2] + (size, size) + x.shape[4:], "bilinear",
                             antialias=False)
    return 2.0 * x / 255.0 - 1.0


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def abstract_variables():
    """Shapes of {"params", "batch_stats"} without allocating them (parameters in float32)."""
    x = jax.ShapeDtypeStruct((1, NUM_FRAMES, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(InceptionI3d().init, jax.random.PRNGKey(0), x)


def torch_shape(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """A Flax leaf shape in PyTorch's layout: DHWIO -> OIDHW; vectors unchanged."""
    if len(shape) == 5:
        return (shape[4], shape[3], shape[0], shape[1], shape[2])
    return tuple(shape)


def from_pytorch(source: Any) -> Dict[str, Any]:
    """Flax variables {"params", "batch_stats"} of `InceptionI3d` from `i3d_pretrained_400.pt`
    (needs torch; .npz / .safetensors do not) or a loaded mapping name -> array; strict."""
    def to_flax(value):
        return value.transpose(2, 3, 4, 1, 0) if value.ndim == 5 else value   # OIDHW -> DHWIO
    variables, missing, unexpected, mismatched = match_torch_state(
        load_state_dict(source), abstract_variables(), torch_shape, to_flax, _UNUSED_KEYS)
    if missing or unexpected or mismatched:
        hint = ""
        if any(k.startswith(("module.", "_orig_mod.")) for k in unexpected):
            hint = "strip the 'module.' / '_orig_mod.' prefix of a wrapped model first."
        elif mismatched and all(k.startswith("logits.") for k, _, _ in mismatched):
            hint = (f"the logits are not {NUM_CLASSES}-way: FVD uses the Kinetics-400 I3D "
                    f"(i3d_pretrained_400.pt).")
        raise CheckpointMismatchError(missing, unexpected, mismatched, hint)
    return variables


def load_i3d(path: str, dtype: Any = jnp.float32) -> Tuple[InceptionI3d, Dict[str, Any]]:
    """(model, variables) from a local weight file; see the module docstring for the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"I3D weights {path!r} not found. Get i3d_pretrained_400.pt once (TATS, "
            f"tats/fvd/i3d_pretrained_400.pt) and convert it with `python -m "
            f"dydit_jax.evaluation.i3d --convert i3d_pretrained_400.pt --out {path}`")
    return InceptionI3d(dtype=dtype), from_pytorch(path)


def convert_i3d_weights(src: str, dst: str) -> None:
    """The .pt weight file -> a torch-free .npz with the same names and layout. The file is
    checked against the model first, so a wrong file fails here and not at evaluation time."""
    if not dst.endswith(".npz"):
        raise ValueError(f"--out {dst!r}: write a .npz file")
    state = {k: v for k, v in load_state_dict(src).items() if not _UNUSED_KEYS.search(k)}
    from_pytorch(state)
    np.savez(dst, **{k: np.asarray(v, np.float32) for k, v in state.items()})


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description="Convert the FVD I3D weights once.")
    parser.add_argument("--convert", required=True, help="i3d_pretrained_400.pt")
    parser.add_argument("--out", required=True, help="output .npz")
    args = parser.parse_args(argv)
    convert_i3d_weights(args.convert, args.out)
    print(f"converted {args.convert} -> {args.out}")


if __name__ == "__main__":
    main()
