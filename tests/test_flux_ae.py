"""FLUX's autoencoder: BFL's `ae.safetensors` layout (LDM names) and the diffusers `vae/`
layout load into `models.vae.AutoencoderKL` with 16 latent channels, no quant convs and the
scale + shift latent transform, matching diffusers' AutoencoderKL on a tiny FLUX-like config.

The LDM-named file is written by the test from the diffusers weights with the BFL module
names (`flux/modules/autoencoder.py`: down.{i}.block.{j}, mid.block_1/attn_1/block_2,
up.{i} in resolution order, nin_shortcut, 1x1-conv attention); diffusers' own single-file
converter (`convert_ldm_vae_checkpoint`) is run on it to confirm those names.
Tolerance 1e-5 (float32, as tests/test_vae.py).
"""
import re

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from dydit_jax import convert_vae
from dydit_jax.convert_vae import flux_autoencoder, from_diffusers, load_flux_ae

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
TOL = dict(atol=1e-5, rtol=1e-5)


def diffusers_flux_vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    cfg = dict(convert_vae.FLUX_AE, **TINY)
    cfg["down_block_types"] = ["DownEncoderBlock2D"] * 2
    cfg["up_block_types"] = ["UpDecoderBlock2D"] * 2
    cfg["block_out_channels"] = list(cfg["block_out_channels"])
    return AutoencoderKL(**cfg).eval()


def to_ldm(state, levels):
    """diffusers names -> the BFL autoencoder's (test-side, independent of the converter)."""
    out = {}
    for k, v in state.items():
        v = v.numpy()
        k = re.sub(r"\.resnets\.(\d+)\.conv_shortcut\.", r".resnets.\1.nin_shortcut.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.block.{m.group(2)}.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.", k)
        k = re.sub(r"\.mid_block\.resnets\.0\.", ".mid.block_1.", k)
        k = re.sub(r"\.mid_block\.resnets\.1\.", ".mid.block_2.", k)
        m = re.match(r"^(\w+)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)$", k)
        if m:
            name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                    "to_out.0": "proj_out"}[m.group(2)]
            k = f"{m.group(1)}.mid.attn_1.{name}.{m.group(3)}"
            if name != "norm" and m.group(3) == "weight":
                v = v.reshape(v.shape + (1, 1))
        k = re.sub(r"\.conv_norm_out\.", ".norm_out.", k)
        out[k] = np.ascontiguousarray(v)
    return out


def test_bfl_and_diffusers_layouts_match_diffusers(tmp_path):
    ref = diffusers_flux_vae()
    state = ref.state_dict()
    ldm = to_ldm(state, 2)
    # diffusers reads the same file names as these modules (BFL / LDM layout).
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    back = convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in ldm.items()},
                                      dict(ref.config))
    assert set(back) == set(state)
    for k in state:
        np.testing.assert_array_equal(back[k].reshape(state[k].shape).numpy(), state[k].numpy())

    save_file(ldm, tmp_path / "ae.safetensors")
    model, variables = load_flux_ae(tmp_path / "ae.safetensors", **TINY)
    assert (model.latent_channels, model.use_quant_conv) == (16, False)
    same = from_diffusers({k: v.numpy() for k, v in state.items()}, model)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, same)

    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean = ref.encode(x).latent_dist.mean
        image = ref.decode(mean).sample
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)  # noqa: E731
    posterior = model.apply(variables, nhwc(x), method="encode")
    np.testing.assert_allclose(posterior.mean, nhwc(mean), **TOL)
    np.testing.assert_allclose(model.apply(variables, posterior.mean, method="decode"),
                               nhwc(image), **TOL)
    # BFL's AutoEncoder.encode / decode latents: scale * (z - shift), z / scale + shift.
    latents = model.scale_latents(posterior.mean)
    np.testing.assert_allclose(latents, 0.3611 * (nhwc(mean) - 0.1159), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.apply(variables, latents, method="decode_latents"),
                               nhwc(image), **TOL)

    # The diffusers vae/ folder.
    ref.save_pretrained(tmp_path / "vae")
    model2, variables2 = load_flux_ae(tmp_path / "vae")
    assert model2.shift_factor == pytest.approx(0.1159)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables2, same)


def test_flux_autoencoder_preset():
    model = flux_autoencoder()
    assert model.block_out_channels == (128, 256, 512, 512)
    assert (model.latent_channels, model.scaling_factor, model.shift_factor) == (16, 0.3611,
                                                                                 0.1159)
    assert model.downsample_factor == 8
