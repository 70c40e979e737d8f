"""Parity of the dynamic DiT (DyDiT) with the released PyTorch DyDiT (tests/data/dydit_s).

Masks must be exactly equal wherever the deciding |logit| > 1e-6 (see the golden README);
outputs, logits and intermediates at float32 atol = rtol = 1e-5.
"""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import DATA, load_npz
from dydit_jax import convert, flops
from dydit_jax.models import DiT
from test_dit import TINY, nhwc

TOL = dict(atol=1e-5, rtol=1e-5)
PT = DATA / "dydit_s" / "model.pt"


@pytest.fixture(scope="module")
def io():
    return load_npz("dydit_s", "io.npz")


@pytest.fixture(scope="module", params=[False, True], ids=["unscanned", "scanned"])
def dydit(request):
    model = DiT(**TINY, dynamic=True, scan_layers=request.param)
    return model, convert.from_pytorch(PT, model)


def assert_masks_equal(mask, ref, logits, name):
    """Exact equality where the decision is not within float32 noise of the threshold."""
    mask, ref, logits = np.asarray(mask), np.asarray(ref), np.asarray(logits)
    assert set(np.unique(mask)) <= {0.0, 1.0}, f"{name}: mask values not 0/1"
    decided = np.abs(logits) > 1e-6
    np.testing.assert_array_equal(mask[decided], ref[decided], err_msg=name)


def check_width_masks(aux, io, prefix=""):
    for ours, theirs in (("head", "attn"), ("group", "mlp")):
        logits = aux[f"{ours}_logits"]
        if f"{prefix}{theirs}_logits" in io:  # the CFG batch stores only its masks
            np.testing.assert_allclose(logits, io[f"{prefix}{theirs}_logits"], **TOL)
        full_logits = np.concatenate([np.full(logits.shape[:-1] + (1,), 99.0), logits], -1)
        assert_masks_equal(aux[f"{ours}_masks"], io[f"{prefix}{theirs}_masks"], full_logits, ours)


def test_inference_outputs_masks_and_logits(dydit, io):
    model, variables = dydit
    out, aux = model.apply(variables, nhwc(io["x"]), io["t"], io["y"])
    np.testing.assert_allclose(out, nhwc(io["out"]), **TOL)
    check_width_masks(aux, io)
    np.testing.assert_allclose(aux["token_logits"], io["token_logits"][..., 0], **TOL)
    assert_masks_equal(aux["token_masks"], io["token_masks"][..., 0], aux["token_logits"], "token")
    assert aux["head_masks"].shape == (4, 2, 4) and aux["token_masks"].shape == (4, 2, 16)
    # The masks really bite: the dynamic output differs from the complete one.
    assert 0 < aux["head_masks"].mean() < 1 and 0 < aux["token_masks"].mean() < 1


def test_complete_model_and_intermediates(dydit, io):
    model, variables = dydit
    out, aux = model.apply(variables, nhwc(io["x"]), io["t"], io["y"], complete=True)
    assert aux is None
    np.testing.assert_allclose(out, nhwc(io["complete_model_out"]), **TOL)
    x = nhwc(io["x"])
    np.testing.assert_allclose(model.apply(variables, x, method=lambda m, x: m.x_embedder(x)),
                               io["x_patch"], **TOL)
    np.testing.assert_allclose(model.apply(variables, io["t"],
                                           method=lambda m, t: m.t_embedder(t)), io["t_emb"], **TOL)
    if not model.scan_layers:
        _, state = model.apply(variables, x, io["t"], io["y"], capture_intermediates=True,
                               mutable=["intermediates"])
        inter = state["intermediates"]
        for i in range(2):
            np.testing.assert_allclose(inter[f"blocks_{i}"]["__call__"][0][0], io["block_out"][i],
                                       **TOL, err_msg=f"block {i}")
        np.testing.assert_allclose(inter["final_layer"]["__call__"][0], io["final_tokens"], **TOL)


def test_cfg_batch(dydit, io):
    model, variables = dydit
    out, aux = model.apply(variables, nhwc(io["x_cfg"]), io["t_cfg"], io["y_cfg"],
                           io["cfg_scale"], method=model.forward_with_cfg)
    np.testing.assert_allclose(out, nhwc(io["cfg_out"]), **TOL)
    check_width_masks(aux, io, prefix="cfg_")
    np.testing.assert_allclose(aux["token_logits"], io["cfg_token_logits"][..., 0], **TOL)
    assert_masks_equal(aux["token_masks"], io["cfg_token_masks"][..., 0], aux["token_logits"],
                       "cfg token")
    raw, _ = model.apply(variables, nhwc(io["x_cfg"]), io["t_cfg"], io["y_cfg"])
    np.testing.assert_allclose(raw, nhwc(io["cfg_model_out"]), **TOL)
    full, _ = model.apply(variables, nhwc(io["x_cfg"]), io["t_cfg"], io["y_cfg"], complete=True)
    np.testing.assert_allclose(full, nhwc(io["complete_model_cfg_model_out"]), **TOL)


def test_timestep_sweep_of_width_masks(dydit, io):
    model, variables = dydit
    head, group = model.apply(variables, io["sweep_t"], method=model.width_logits)
    np.testing.assert_allclose(head, io["sweep_attn_logits"], **TOL)
    np.testing.assert_allclose(group, io["sweep_mlp_logits"], **TOL)
    from dydit_jax.models.dit import gumbel_sigmoid_gate
    assert_masks_equal(gumbel_sigmoid_gate(head, 5.0), io["sweep_attn_masks"], head, "sweep head")
    assert_masks_equal(gumbel_sigmoid_gate(group, 5.0), io["sweep_mlp_masks"], group, "sweep grp")
    t_emb = model.apply(variables, io["sweep_t"], method=lambda m, t: m.t_embedder(t))
    np.testing.assert_allclose(t_emb, io["sweep_t_emb"], **TOL)


def test_flops_ratio_of_our_masks(dydit, io):
    model, variables = dydit
    _, aux = model.apply(variables, nhwc(io["x"]), io["t"], io["y"])
    ratio = flops.flops_ratio(aux["head_masks"], aux["group_masks"], aux["token_masks"],
                              num_tokens=16, hidden_size=64)
    np.testing.assert_allclose(ratio, io["flops_ratio"], atol=1e-6)
    np.testing.assert_allclose(jnp.mean(ratio), io["flops_ratio_batch_mean"], atol=1e-6)


def test_training_mode_with_recorded_gumbel_noise(dydit, io):
    model, variables = dydit
    noise = {ours: (io[f"train_gumbel_{theirs}_g1"], io[f"train_gumbel_{theirs}_g2"])
             for ours, theirs in (("head", "attn"), ("group", "mlp"))}
    noise["token"] = (io["train_gumbel_tok_g1"][..., 0], io["train_gumbel_tok_g2"][..., 0])
    out, aux = model.apply(variables, nhwc(io["x"]), io["t"], io["y"], train=True,
                           force_drop_ids=io["train_label_dropped"].astype(np.int32),
                           gumbel_noise=noise)
    np.testing.assert_allclose(out, nhwc(io["train_out"]), **TOL)
    check_width_masks(aux, io, prefix="train_")
    np.testing.assert_allclose(aux["token_logits"], io["train_token_logits"][..., 0], **TOL)
    noisy_token_logits = aux["token_logits"] + noise["token"][0] - noise["token"][1]
    assert_masks_equal(aux["token_masks"], io["train_token_masks"][..., 0], noisy_token_logits,
                       "train token")


def test_training_mode_draws_fresh_noise_from_the_gumbel_stream(dydit, io):
    model, variables = dydit
    args = (nhwc(io["x"]), io["t"], io["y"])
    outs = [model.apply(variables, *args, train=True,
                        rngs={"gumbel": jax.random.PRNGKey(k), "label_dropout": jax.random.PRNGKey(0)})
            for k in (0, 0, 1)]
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    assert not np.array_equal(outs[0][1]["token_masks"], outs[2][1]["token_masks"])
    # Straight-through: masks are hard 0/1 but the router gets a gradient.
    def loss(params):
        out, aux = model.apply({"params": params}, *args, train=True,
                               rngs={"gumbel": jax.random.PRNGKey(0),
                                     "label_dropout": jax.random.PRNGKey(0)})
        return jnp.sum(out ** 2) + jnp.sum(aux["head_masks"]) + jnp.sum(aux["token_masks"])
    grads = jax.grad(loss)(variables["params"])
    blk = grads["blocks"] if model.scan_layers else grads["blocks_0"]
    assert np.abs(np.asarray(blk["head_router"]["kernel"])).sum() > 0
    assert np.abs(np.asarray(blk["token_router"]["fc2"]["kernel"])).sum() > 0


def test_plain_dit_checkpoint_loads_with_fresh_routers_reported(caplog):
    model = DiT(**TINY, dynamic=True)
    variables, fresh = convert.load_report(DATA / "dit_s" / "model.pt", model)
    assert len(fresh) == 2 * 8 and all("router" in f for f in fresh)
    head_bias = variables["params"]["blocks_0"]["head_router"]["bias"]
    np.testing.assert_array_equal(head_bias, 15.0)  # everything on at the start
    np.testing.assert_array_equal(variables["params"]["blocks_1"]["token_router"]["fc2"]["bias"], 35.0)
    with caplog.at_level("WARNING"):
        convert.from_pytorch(DATA / "dit_s" / "model.pt", model)
    assert "freshly initialised" in caplog.text and "head_router" in caplog.text
    # With every router on, the dynamic path equals the complete path.
    io = load_npz("dit_s", "io.npz")
    out, aux = model.apply(variables, nhwc(io["x"]), io["t"], io["y"])
    assert float(aux["head_masks"].min()) == 1.0 and float(aux["token_masks"].min()) == 1.0
    np.testing.assert_allclose(out, nhwc(io["out"]), **TOL)


def test_dydit_checkpoint_into_static_model_and_old_release_are_refused():
    sd = torch.load(PT, weights_only=True)
    with pytest.raises(convert.CheckpointMismatchError, match="dynamic=True"):
        convert.from_pytorch(sd, DiT(**TINY))
    old = collections.OrderedDict(sd)
    for i in range(2):
        for r in ("attn_rate", "mlp_rate"):
            old[f"blocks.{i}.{r}.router.weight"] = torch.zeros(4, 64)
            old[f"blocks.{i}.{r}.router.bias"] = torch.zeros(4)
    with pytest.raises(convert.CheckpointMismatchError, match="older DyDiT release"):
        convert.from_pytorch(old, DiT(**TINY, dynamic=True))


def test_float64_dynamic_matches_reference():
    from conftest import run_python
    code = """
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
from conftest import DATA, load_npz
from dydit_jax import convert
from dydit_jax.models import DiT
from test_dit import TINY, nhwc
io = load_npz("dydit_s", "io.npz")
model = DiT(**TINY, dynamic=True, dtype=jnp.float64, param_dtype=jnp.float64)
v = convert.from_pytorch(DATA / "dydit_s" / "model.pt", model)
out, aux = model.apply(v, nhwc(io["x"]).astype(np.float64), io["t"], io["y"])
np.testing.assert_allclose(out, nhwc(io["out_float64"]), atol=1e-6, rtol=1e-6)
print("OK")
"""
    assert "OK" in run_python(code).stdout
