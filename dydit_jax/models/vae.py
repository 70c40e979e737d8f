"""SD-VAE (diffusers `AutoencoderKL`) in Flax Linen, as DiT uses it.

DiT trains on latents of stabilityai/sd-vae-ft-ema (or -mse) and decodes its samples with it:

    vae, variables = dydit_jax.convert_vae.load_vae("/path/to/sd-vae-ft-ema")
    posterior = vae.apply(variables, images, method="encode")    # images: [B, H, W, 3] in [-1, 1]
    latents = vae.scale_latents(posterior.sample(rng))           # * 0.18215: what DiT trains on
    images = vae.apply(variables, latents, method="decode_latents")   # [B, H, W, 3], ~[-1, 1]

As in diffusers, `encode` and `decode` work in VAE units; the scaling factor (0.18215 for the
SD VAEs, `scaling_factor` in config.json) is applied only by `scale_latents` /
`unscale_latents` / `decode_latents`.

Read top to bottom: the building blocks (ResnetBlock2D, Attention, Downsample2D, Upsample2D),
the down/mid/up blocks, Encoder, Decoder, the posterior, the model. Module and parameter names
mirror the diffusers state dict (`encoder.down_blocks.0.resnets.1.conv1.weight` is
`encoder/down_blocks_0/resnets_1/conv1/kernel`), so `dydit_jax.convert_vae` maps them one to one.

Numerics follow diffusers (checked against it in tests/test_vae.py, float32 atol=rtol=1e-5):
- GroupNorm eps 1e-6 everywhere (two-pass variance), SiLU activations;
- Downsample2D pads right and bottom by one, then a stride-2 3x3 conv without padding;
- Upsample2D is nearest-neighbour x2 followed by a 3x3 conv;
- the mid-block attention is one head of width C (scale C^-1/2) over the H*W positions, with
  a GroupNorm before q, k, v and a residual connection; its softmax runs in float32;
- the encoder outputs 2 * latent_channels moments: [mean | logvar], logvar clamped to
  [-30, 20], std = exp(logvar / 2).

Arrays are NHWC. `dtype` is the compute dtype of convolutions and projections; GroupNorm
statistics and the attention softmax stay in float32.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

Dtype = Any

GROUP_NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)


def _conv(features: int, kernel: int, name: str, dtype: Dtype, stride: int = 1,
          padding: Any = "SAME_SYMMETRIC") -> nn.Conv:
    """A conv with PyTorch's symmetric padding k // 2 (or `padding` as given)."""
    if padding == "SAME_SYMMETRIC":
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   dtype=dtype, name=name)


def _group_norm(groups: int, name: str, dtype: Dtype) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, epsilon=GROUP_NORM_EPS, use_fast_variance=False,
                        dtype=dtype, name=name)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

class ResnetBlock2D(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus the input (through a 1x1
    `conv_shortcut` when the channel count changes). x: [B, H, W, Cin] -> [B, H, W, out]."""
    out_channels: int
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(_group_norm(self.groups, "norm1", self.dtype)(x))
        h = _conv(self.out_channels, 3, "conv1", self.dtype)(h)
        h = nn.silu(_group_norm(self.groups, "norm2", self.dtype)(h))
        h = _conv(self.out_channels, 3, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection.
    x: [B, H, W, C] -> [B, H, W, C]."""
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = _group_norm(self.groups, "group_norm", self.dtype)(x).reshape(b, h * w, c)
        q = nn.Dense(c, dtype=self.dtype, name="to_q")(y)
        k = nn.Dense(c, dtype=self.dtype, name="to_k")(y)
        v = nn.Dense(c, dtype=self.dtype, name="to_v")(y)
        logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * (c ** -0.5)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bqk,bkc->bqc", probs, v)
        out = nn.Dense(c, dtype=self.dtype, name="to_out_0")(out)
        return x + out.reshape(b, h, w, c)


class Downsample2D(nn.Module):
    """Pad right and bottom by one, then a 3x3 stride-2 conv: [B, H, W, C] -> [B, H/2, W/2, C]."""
    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, 3, "conv", self.dtype, stride=2, padding="VALID")(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv: [B, H, W, C] -> [B, 2H, 2W, C]."""
    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, "conv", self.dtype)(x)


# ----------------------------------------------------------------------------------------------
# Down, mid and up blocks
# ----------------------------------------------------------------------------------------------

class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets at `out_channels`, then (unless last) a Downsample2D."""
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.dtype, name="downsamplers_0")(x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet, attention (optional), resnet, all at the input width."""
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = Attention(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(c, self.groups, self.dtype, name="resnets_1")(x)


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets at `out_channels`, then (unless last) an Upsample2D."""
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


# ----------------------------------------------------------------------------------------------
# Encoder and decoder
# ----------------------------------------------------------------------------------------------

class Encoder(nn.Module):
    """[B, H, W, in] -> [B, H / f, W / f, out_channels], f = 2^(len(block_out_channels) - 1)."""
    out_channels: int
    block_out_channels: Tuple[int, ...]
    layers_per_block: int
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = _conv(self.block_out_channels[0], 3, "conv_in", self.dtype)(x)
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(self.block_out_channels):
            x = DownEncoderBlock2D(channels, self.layers_per_block, self.groups,
                                   add_downsample=i != last, dtype=self.dtype,
                                   name=f"down_blocks_{i}")(x)
        x = UNetMidBlock2D(self.groups, self.add_attention, self.dtype, name="mid_block")(x)
        x = nn.silu(_group_norm(self.groups, "conv_norm_out", self.dtype)(x))
        return _conv(self.out_channels, 3, "conv_out", self.dtype)(x)


class Decoder(nn.Module):
    """[B, h, w, latent] -> [B, h * 2^(n-1), w * 2^(n-1), out_channels]; the up blocks run over
    `block_out_channels` reversed, each with layers_per_block + 1 resnets."""
    out_channels: int
    block_out_channels: Tuple[int, ...]
    layers_per_block: int
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        channels = tuple(reversed(self.block_out_channels))
        x = _conv(channels[0], 3, "conv_in", self.dtype)(z)
        x = UNetMidBlock2D(self.groups, self.add_attention, self.dtype, name="mid_block")(x)
        last = len(channels) - 1
        for i, ch in enumerate(channels):
            x = UpDecoderBlock2D(ch, self.layers_per_block + 1, self.groups,
                                 add_upsample=i != last, dtype=self.dtype,
                                 name=f"up_blocks_{i}")(x)
        x = nn.silu(_group_norm(self.groups, "conv_norm_out", self.dtype)(x))
        return _conv(self.out_channels, 3, "conv_out", self.dtype)(x)


# ----------------------------------------------------------------------------------------------
# Posterior and model
# ----------------------------------------------------------------------------------------------

@struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)); mean, logvar: [B, h, w, latent]."""
    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments) -> "DiagonalGaussian":
        """moments: [B, h, w, 2 * latent] = [mean | logvar] on the channel axis."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, *LOGVAR_RANGE))

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    def from_noise(self, noise):
        """mean + std * noise, for a given standard-normal `noise` of the latent shape."""
        return self.mean + self.std * noise.astype(self.mean.dtype)

    def sample(self, rng):
        return self.from_noise(jax.random.normal(rng, self.mean.shape, self.mean.dtype))

    def mode(self):
        return self.mean


class AutoencoderKL(nn.Module):
    """The KL autoencoder. Defaults are stabilityai/sd-vae-ft-ema's config.json; build others
    with `dydit_jax.convert_vae.vae_from_config`. `scaling_factor` and `shift_factor` only
    enter `scale_latents` / `unscale_latents` / `decode_latents`."""
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        common = dict(block_out_channels=tuple(self.block_out_channels),
                      layers_per_block=self.layers_per_block, groups=self.norm_num_groups,
                      add_attention=self.mid_block_add_attention, dtype=self.dtype)
        self.encoder = Encoder(out_channels=2 * self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=self.dtype)
        if self.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype)

    def encode(self, x) -> DiagonalGaussian:
        """x: [B, H, W, in_channels] in [-1, 1] -> posterior over [B, H/f, W/f, latent]."""
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"expected NHWC images with {self.in_channels} channels, got shape "
                             f"{x.shape} (NCHW input? transpose it to NHWC)")
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z):
        """z: [B, h, w, latent] in VAE units -> images [B, h*f, w*f, out_channels]."""
        if z.shape[-1] != self.latent_channels:
            raise ValueError(f"expected NHWC latents with {self.latent_channels} channels, got "
                             f"shape {z.shape} (NCHW input? transpose it to NHWC)")
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def scale_latents(self, z):
        """VAE units -> diffusion-model latents: (z - shift_factor) * scaling_factor."""
        return (z - self.shift_factor) * self.scaling_factor

    def unscale_latents(self, latents):
        """Diffusion-model latents -> VAE units: latents / scaling_factor + shift_factor."""
        return latents / self.scaling_factor + self.shift_factor

    def decode_latents(self, latents):
        """What DiT's sample.py does: decode(latents / 0.18215)."""
        return self.decode(self.unscale_latents(latents))

    def __call__(self, x, rng: Optional[jax.Array] = None):
        """Reconstruction: decode(posterior.sample(rng)), or decode(posterior.mode()) without
        `rng` (diffusers' `sample_posterior=False`)."""
        posterior = self.encode(x)
        z = posterior.mode() if rng is None else posterior.sample(rng)
        return self.decode(z)
