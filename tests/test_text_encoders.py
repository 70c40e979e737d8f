"""The Flax T5 encoder and CLIP text model against transformers' PyTorch classes on tiny random
configs (default init, and a "sharp" variant whose query/key weights and T5 position biases
are scaled up so attention is far from uniform and the buckets matter).

Tolerance: 1e-5 (float32), or twice the reference's own float32-vs-float64 error where that is
larger (measured in the test by running the PyTorch model in float64: the sharp variants'
peaked softmax amplifies rounding).
"""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from dydit_jax import convert
from dydit_jax.models.text_encoders import (CLIPTextConfig, CLIPTextModel, T5Config, T5Encoder,
                                            load_hf_state, relative_position_buckets)


def tolerance(ref, run):
    """max(1e-5, 2 x |reference float32 - reference float64|) for run(model) -> array."""
    import copy
    with torch.no_grad():
        err = np.abs(run(ref) - run(copy.deepcopy(ref).double())).max()
    return dict(atol=max(1e-5, 2 * float(err)), rtol=1e-5)


def sharpen(module, names, factor):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(n in name for n in names):
                p.mul_(factor)


def t5_reference(sharp: bool, ff="gated-gelu"):
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=3,
                                num_heads=4, relative_attention_num_buckets=32,
                                relative_attention_max_distance=128, feed_forward_proj=ff,
                                dropout_rate=0.0)
    ref = transformers.T5EncoderModel(cfg).eval()
    if sharp:
        sharpen(ref, ("SelfAttention.q", "SelfAttention.k"), 2.0)
        sharpen(ref, ("relative_attention_bias",), 4.0)
    return cfg, ref


@pytest.mark.parametrize("sharp", [False, True])
@pytest.mark.parametrize("ff", ["gated-gelu", "relu"])
def test_t5_encoder_matches_transformers(sharp, ff):
    cfg, ref = t5_reference(sharp, ff)
    ids = torch.randint(0, 99, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    model = T5Encoder(T5Config.from_hf(cfg))
    variables = load_hf_state(model, ref.state_dict())
    with torch.no_grad():
        want = ref(input_ids=ids).last_hidden_state.numpy()
        want_masked = ref(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    tol = tolerance(ref, lambda r: r(input_ids=ids, attention_mask=mask).last_hidden_state
                    .numpy())
    assert tol["atol"] < 1e-4, tol
    got = model.apply(variables, jnp.asarray(ids.numpy()))
    np.testing.assert_allclose(got, want, **tol)
    got_masked = model.apply(variables, jnp.asarray(ids.numpy()), mask=mask.numpy())
    np.testing.assert_allclose(got_masked, want_masked, **tol)
    if sharp:   # the bias and the mask move the output: the test sees them
        assert np.abs(want_masked - want).max() > 1e-2


def test_t5_relative_buckets_cover_long_distances():
    """Bidirectional buckets: 0..15 for keys at or before the query, 16..31 after; exact for
    |d| < 8, log-spaced to 128, clamped beyond (the reference formula)."""
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    want = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=32,
                                                 max_distance=128).numpy()
    np.testing.assert_array_equal(relative_position_buckets(300, 300, 32, 128), want)


@pytest.mark.parametrize("sharp", [False, True])
@pytest.mark.parametrize("eos", [2, 98])
def test_clip_text_model_matches_transformers(sharp, eos):
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=16, hidden_act="quick_gelu",
                                      eos_token_id=eos, attention_dropout=0.0)
    ref = transformers.CLIPTextModel(cfg).eval()
    if sharp:
        sharpen(ref, ("q_proj", "k_proj"), 4.0)
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(2))
    ids[0, 9], ids[1, 15] = 98, 98            # the end token (the highest id too)
    model = CLIPTextModel(CLIPTextConfig.from_hf(cfg))
    variables = load_hf_state(model, ref.state_dict())
    with torch.no_grad():
        out = ref(input_ids=ids)
    hidden, pooled = model.apply(variables, jnp.asarray(ids.numpy()))
    tol = tolerance(ref, lambda r: r(input_ids=ids).last_hidden_state.numpy())
    np.testing.assert_allclose(hidden, out.last_hidden_state.numpy(), **tol)
    np.testing.assert_allclose(pooled, out.pooler_output.numpy(), **tol)
    # The pooled vector is the end token's state, not the last position's.
    assert not np.allclose(pooled[0], hidden[0, -1])


def test_text_encoder_state_mismatch_names_every_bad_key():
    cfg, ref = t5_reference(False)
    state = dict(ref.state_dict())
    del state["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    state["encoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(5, 5)
    state["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(convert.CheckpointMismatchError) as e:
        load_hf_state(T5Encoder(T5Config.from_hf(cfg)), state)
    msg = str(e.value)
    for key in ("block_1/layer_1_DenseReluDense_wo/kernel", "encoder.extra.weight",
                "encoder.block.0.layer.0.SelfAttention.q.weight"):
        assert key in msg, (key, msg)
