"""SD-VAE (diffusers AutoencoderKL) parity against the golden vectors in tests/data/vae.

The golden folder is a shrunk sd-vae-ft-ema (block_out_channels (16, 32), 8 groups, random
N(0, 0.02) weights) written by diffusers' `save_pretrained`; io.npz holds the PyTorch outputs
(NCHW). See ../shared/golden/README-extra.md, section vae/. Tolerance: float32,
atol = rtol = 1e-5 (the reference's own float32-vs-float64 gap is below 2.1e-6).
"""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import DATA, load_npz
from dydit_jax import convert_vae
from dydit_jax.convert import CheckpointMismatchError
from dydit_jax.models.vae import AutoencoderKL, DiagonalGaussian

VAE = DATA / "vae"
LEGACY = VAE / "legacy_attention_keys"
TOL = dict(atol=1e-5, rtol=1e-5)


def nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def golden():
    return load_npz("vae", "io.npz")


@pytest.fixture(scope="module", params=["current_keys", "legacy_keys"])
def vae(request):
    return convert_vae.load_vae(VAE if request.param == "current_keys" else LEGACY)


@pytest.fixture(scope="module")
def encode(vae):
    model, variables = vae
    return jax.jit(lambda x: model.apply(variables, x, method="encode"))


@pytest.fixture(scope="module")
def decode(vae):
    model, variables = vae
    return jax.jit(lambda z: model.apply(variables, z, method="decode"))


def test_config_is_read_from_config_json(vae):
    model, _ = vae
    assert model.block_out_channels == (16, 32)
    assert (model.layers_per_block, model.latent_channels, model.norm_num_groups) == (1, 4, 8)
    assert model.scaling_factor == pytest.approx(0.18215)
    assert model.shift_factor == 0.0 and model.downsample_factor == 2


def test_encoder_output_before_quant_conv(vae, golden):
    model, variables = vae
    out = model.apply(variables, jnp.asarray(nhwc(golden["x"])), method=lambda m, x: m.encoder(x))
    np.testing.assert_allclose(out, nhwc(golden["encoder_out"]), **TOL)


def test_posterior_mean_logvar_std(encode, golden):
    posterior = encode(jnp.asarray(nhwc(golden["x"])))
    assert isinstance(posterior, DiagonalGaussian)
    np.testing.assert_allclose(posterior.mean, nhwc(golden["posterior_mean"]), **TOL)
    np.testing.assert_allclose(posterior.logvar, nhwc(golden["posterior_logvar"]), **TOL)
    np.testing.assert_allclose(posterior.std, nhwc(golden["posterior_std"]), **TOL)
    # The float64 reference agrees too (the float32 reference is within 1e-9 of it).
    np.testing.assert_allclose(posterior.mean, nhwc(golden["posterior_mean_float64"]), **TOL)


def test_sample_with_golden_noise_and_dit_latent(vae, encode, golden):
    model, _ = vae
    posterior = encode(jnp.asarray(nhwc(golden["x"])))
    z = posterior.from_noise(jnp.asarray(nhwc(golden["posterior_sample_eps"])))
    np.testing.assert_allclose(z, nhwc(golden["posterior_sample"]), **TOL)
    np.testing.assert_allclose(model.scale_latents(z), nhwc(golden["dit_latent"]), **TOL)


def test_sample_draws_mean_plus_std_times_normal(encode, golden):
    posterior = encode(jnp.asarray(nhwc(golden["x"])))
    rng = jax.random.PRNGKey(3)
    expected = posterior.mean + posterior.std * jax.random.normal(rng, posterior.mean.shape)
    np.testing.assert_array_equal(posterior.sample(rng), expected)
    assert not np.allclose(posterior.sample(jax.random.PRNGKey(4)), expected)


def test_decode(vae, decode, golden):
    model, variables = vae
    z = jnp.asarray(nhwc(golden["z_dec"]))
    post_quant = model.apply(variables, z, method=lambda m, z: m.post_quant_conv(z))
    np.testing.assert_allclose(post_quant, nhwc(golden["post_quant_conv_out"]), **TOL)
    np.testing.assert_allclose(decode(z), nhwc(golden["decoded"]), **TOL)
    np.testing.assert_allclose(decode(z), nhwc(golden["decoded_float64"]), **TOL)


def test_decode_latents_divides_by_the_scaling_factor(vae, golden):
    model, variables = vae
    out = model.apply(variables, jnp.asarray(nhwc(golden["dit_latent"])), method="decode_latents")
    np.testing.assert_allclose(out, nhwc(golden["decoded_from_dit_latent"]), **TOL)


def test_reconstruction_uses_the_posterior_mode(vae, golden):
    model, variables = vae
    out = jax.jit(model.apply)(variables, jnp.asarray(nhwc(golden["x"])))
    np.testing.assert_allclose(out, nhwc(golden["reconstruction_mode"]), **TOL)


def test_both_key_sets_give_identical_params():
    _, current = convert_vae.load_vae(VAE)
    _, legacy = convert_vae.load_vae(LEGACY)
    jax.tree_util.tree_map(np.testing.assert_array_equal, current, legacy)
    assert "to_out_0" in current["params"]["decoder"]["mid_block"]["attentions_0"]


def test_nchw_input_is_rejected_with_a_hint(vae, golden):
    model, variables = vae
    with pytest.raises(ValueError, match="NCHW"):
        model.apply(variables, jnp.asarray(golden["x"]), method="encode")


# ----------------------------------------------------------------------------------------------
# Strict loading
# ----------------------------------------------------------------------------------------------

@pytest.fixture()
def weights():
    return load_file(VAE / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def model():
    return convert_vae.vae_from_config(VAE)


def test_missing_unexpected_and_misshaped_keys_are_all_listed(weights, model):
    weights.pop("decoder.conv_out.bias")
    weights["encoder.extra.weight"] = np.zeros(3, np.float32)
    weights["quant_conv.weight"] = weights["quant_conv.weight"][:, :, 0, 0]  # (8, 8) not 4-D
    with pytest.raises(CheckpointMismatchError) as err:
        convert_vae.from_diffusers(weights, model)
    e = err.value
    assert e.missing == ["decoder.conv_out.bias"]
    assert e.unexpected == ["encoder.extra.weight"]
    assert e.mismatched == [("quant_conv.weight", (8, 8, 1, 1), (8, 8))]
    message = str(e)
    for key in ("decoder.conv_out.bias", "encoder.extra.weight", "quant_conv.weight"):
        assert key in message


def test_config_that_does_not_match_the_weights(tmp_path):
    config = json.loads((VAE / "config.json").read_text())
    config["latent_channels"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(VAE / "diffusion_pytorch_model.safetensors", tmp_path)
    with pytest.raises(CheckpointMismatchError, match="latent_channels") as err:
        convert_vae.load_vae(tmp_path)
    assert ("post_quant_conv.weight", (8, 8, 1, 1), (4, 4, 1, 1)) in err.value.mismatched


def test_missing_quant_conv_hint(weights, model):
    del weights["quant_conv.weight"], weights["quant_conv.bias"]
    with pytest.raises(CheckpointMismatchError, match="use_quant_conv to false"):
        convert_vae.from_diffusers(weights, model)


def test_legacy_and_current_names_together_are_duplicates(weights, model):
    name = "encoder.mid_block.attentions.0.to_q.weight"
    weights[name.replace("to_q", "query")] = weights[name]
    with pytest.raises(CheckpointMismatchError, match="both the legacy") as err:
        convert_vae.from_diffusers(weights, model)
    assert err.value.unexpected == [("encoder.mid_block.attentions.0.query.weight "
                                     "(duplicate of encoder.mid_block.attentions.0.to_q.weight)")]


def test_safetensors_npz_and_mapping_sources_agree(tmp_path, weights, model):
    ref = convert_vae.from_diffusers(VAE / "diffusion_pytorch_model.safetensors", model)
    np.savez(tmp_path / "vae.npz", **weights)
    save_file(weights, tmp_path / "copy.safetensors")
    for source in (weights, tmp_path / "vae.npz", str(tmp_path / "copy.safetensors")):
        jax.tree_util.tree_map(np.testing.assert_array_equal,
                               convert_vae.from_diffusers(source, model), ref)


def test_unsupported_config_values_name_the_key():
    config = json.loads((VAE / "config.json").read_text())
    for key, value in (("act_fn", "gelu"), ("up_block_types", ["UpDecoderBlock2D", "X"]),
                       ("norm_type", "spatial")):
        with pytest.raises(ValueError, match=key):
            convert_vae.vae_from_config({**config, key: value})


def test_folder_without_weights(tmp_path):
    shutil.copy(VAE / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        convert_vae.load_vae(tmp_path)


def test_default_config_is_sd_vae_ft_ema():
    model = AutoencoderKL()
    shapes = convert_vae.abstract_params(model)
    assert shapes["encoder"]["conv_in"]["kernel"].shape == (3, 3, 3, 128)
    last_resnet = shapes["decoder"]["up_blocks_3"]["resnets_2"]
    assert last_resnet["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert model.downsample_factor == 8
    n = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
    assert n == 83_653_863  # AutoencoderKL of stabilityai/sd-vae-ft-ema
