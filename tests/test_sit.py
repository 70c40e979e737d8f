"""Parity of the Flax SiT with the official PyTorch SiT (tests/data/sit, willisma/SiT @ 947f95b).

The golden SiT weights are byte-identical to tests/data/dit_s/model.pt (same init scheme and
seed; the golden config records the check), so they are loaded from there. Golden arrays are
NCHW; the package is NHWC.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DATA, load_npz, run_python
from test_dit import TINY
from dydit_jax import convert
from dydit_jax.models.dit import DiT
from dydit_jax.models.sit import SiT, SiT_models, sit_config

TOL = dict(atol=1e-5, rtol=1e-5)
WEIGHTS = DATA / "dit_s" / "model.pt"


def nhwc(a):
    """NCHW -> NHWC (also [S, B, C, H, W] -> [S, B, H, W, C])."""
    a = np.asarray(a)
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a.transpose(0, 1, 3, 4, 2)


@pytest.fixture(scope="module")
def io():
    return load_npz("sit", "io.npz")


@pytest.fixture(scope="module")
def config():
    return json.loads((DATA / "sit" / "config.json").read_text())


@pytest.fixture(scope="module")
def model_and_vars():
    model = SiT(**TINY)
    return model, convert.from_pytorch(WEIGHTS, model)


def test_golden_weights_are_the_dit_s_weights(config):
    assert config["checks"]["weights_identical_to_dit_s_model_pt"] is True
    assert config["constructor_args"] == TINY
    assert config["init"]["param_seed"] == 1234
    dit_cfg = json.loads((DATA / "dit_s" / "config.json").read_text())
    assert dit_cfg["init"]["param_seed"] == config["init"]["param_seed"]
    assert [k.split(" ")[0] for k in config["state_dict_keys"]] == list(
        convert.load_state_dict(WEIGHTS))


def test_output_matches_reference(model_and_vars, io):
    model, v = model_and_vars
    x, t, y = nhwc(io["x"]), io["t"], io["y"]
    assert t.dtype == np.float32 and t.max() == 1.0  # continuous t in [0, 1], no x1000
    out = model.apply(v, x, t, y)
    assert out.shape == x.shape
    np.testing.assert_allclose(out, nhwc(io["out"]), **TOL)
    full = model.apply(v, x, t, y, method=model.forward_full)
    np.testing.assert_allclose(full, nhwc(io["out_full_8ch"]), **TOL)
    np.testing.assert_array_equal(full[..., :4], out)
    # SiT is DiT fed a float t: the same parameters give DiT's output.
    dit = DiT(**TINY)
    np.testing.assert_array_equal(dit.apply(v, x, t, y), full)


def test_cfg_matches_reference(model_and_vars, io):
    model, v = model_and_vars
    args = (nhwc(io["x_cfg"]), io["t_cfg"], io["y_cfg"], io["cfg_scale"])
    out = model.apply(v, *args, method=model.forward_with_cfg)
    assert out.shape == args[0].shape  # 4 channels: guided 0..2, channel 3 unguided
    np.testing.assert_allclose(out, nhwc(io["cfg_out"]), **TOL)
    raw = model.apply(v, *args[:3])
    np.testing.assert_allclose(raw, nhwc(io["cfg_model_out"]), **TOL)
    # Channel 3 passes through from each row's own (conditional / unconditional) output.
    half = np.concatenate([io["x_cfg"][:3]] * 2)
    raw_half = np.asarray(model.apply(v, nhwc(half), *args[1:3]))
    np.testing.assert_array_equal(np.asarray(out)[..., 3], raw_half[..., 3])


def test_intermediates_match_reference(model_and_vars, io):
    model, v = model_and_vars
    x, t, y = nhwc(io["x"]), io["t"], io["y"]
    np.testing.assert_allclose(model.apply(v, x, method=lambda m, x: m.x_embedder(x)),
                               io["x_patch"], **TOL)
    np.testing.assert_allclose(model.pos_embed(), io["pos_embed"], atol=1e-7, rtol=0)
    np.testing.assert_allclose(model.apply(v, t, method=lambda m, t: m.t_embedder(t)),
                               io["t_emb"], **TOL)
    np.testing.assert_allclose(model.apply(v, y, method=lambda m, y: m.y_embedder(y)),
                               io["y_emb"], **TOL)
    _, state = model.apply(v, x, t, y, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    for i in range(TINY["depth"]):
        np.testing.assert_allclose(inter[f"blocks_{i}"]["__call__"][0][0], io["block_out"][i],
                                   **TOL, err_msg=f"block {i}")
    np.testing.assert_allclose(inter["final_layer"]["__call__"][0], io["final_tokens"], **TOL)


# slow: the float32 parity tests stay; DiT's float64 test covers the shared blocks.
@pytest.mark.slow
def test_float64_matches_reference():
    # x64 is process-global, so this runs in its own interpreter. Model outputs are compared
    # with the reference's float64 outputs. For losses and ODE runs the reference recorded only
    # its own float32-vs-float64 gaps (config "checks"): a float64 run here must land within
    # them of the float32 golden arrays (2x margin + 1e-7), and must stay float64 throughout.
    run_python("""
import json
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
from conftest import DATA, load_npz, run_python
from dydit_jax import convert
from dydit_jax.models.sit import SiT
from dydit_jax.transport import Sampler, create_transport
from test_sit import TINY, nhwc
io = load_npz("sit", "io.npz")
config = json.loads((DATA / "sit" / "config.json").read_text())
checks = config["checks"]
model = SiT(**TINY, dtype=jnp.float64, param_dtype=jnp.float64)
v = convert.from_pytorch(DATA / "dit_s" / "model.pt", model)
f64 = lambda a: nhwc(a).astype(np.float64)
out = model.apply(v, f64(io["x"]), io["t"], io["y"])
assert out.dtype == jnp.float64, out.dtype
np.testing.assert_allclose(out, nhwc(io["out_float64"]), atol=1e-7, rtol=1e-6)
cfg = model.apply(v, f64(io["x_cfg"]), io["t_cfg"], io["y_cfg"], 4.0,
                  method=model.forward_with_cfg)
np.testing.assert_allclose(cfg, nhwc(io["cfg_out_float64"]), atol=1e-7, rtol=1e-6)

fwd = jax.jit(lambda x, t, y: model.apply(v, x, t, y))
for tag, c in config["loss_configs"].items():
    tr = create_transport(c["path_type"], c["prediction"], c["loss_weight"])
    terms = tr.training_losses(fwd, f64(io["loss_x1"]), dict(y=io["loss_y"]),
                               x0=f64(io[f"loss_{tag}_x0"]),
                               t=io[f"loss_{tag}_t"].astype(np.float64))
    assert terms["loss"].dtype == jnp.float64, tag
    gap = checks[f"loss_{tag}_float32_vs_float64"]["max_abs"]
    np.testing.assert_allclose(terms["loss"], io[f"loss_{tag}_loss"], rtol=0,
                               atol=2 * gap + 1e-7, err_msg=tag)
for tag in ("Linear_noise_euler", "Linear_velocity_heun2"):
    path, pred, method = tag.split("_")
    sample = Sampler(create_transport(path, pred)).sample_ode(sampling_method=method,
                                                              num_steps=5)
    xs = sample(f64(io["ode_z"]), fwd, y=io["ode_y"])
    assert xs.dtype == jnp.float64 and sample.time_grid(np.float64).dtype == np.float64
    gap = checks[f"ode_{tag}_float32_vs_float64"]["max_abs"]
    np.testing.assert_allclose(xs, nhwc(io[f"ode_{tag}_xs"]), rtol=0, atol=2 * gap + 1e-7,
                               err_msg=tag)
""")


def test_train_mode_label_dropout(model_and_vars, io):
    model, v = model_and_vars
    x, t = nhwc(io["train_xt"]), io["train_t"]
    dropped = io["train_label_dropped"].astype(np.int32)
    out = model.apply(v, x, t, io["loss_y"], train=True, force_drop_ids=dropped)
    np.testing.assert_allclose(out, nhwc(io["train_pred"]), **TOL)
    # The same as the effective (null-substituted) labels in eval mode.
    np.testing.assert_array_equal(out, model.apply(v, x, t, io["train_y_effective"]))
    # Random dropout draws from the "label_dropout" stream.
    out_rng = model.apply(v, x, t, io["loss_y"], train=True,
                          rngs={"label_dropout": jax.random.PRNGKey(0)})
    assert out_rng.shape == x.shape


def test_no_learn_sigma_and_dynamic_outputs():
    x = jnp.zeros((2, 8, 8, 4))
    t = jnp.array([0.1, 0.9])
    y = jnp.array([1, 2])
    m = SiT(**{**TINY, "learn_sigma": False})
    v = m.init(jax.random.PRNGKey(0), x, t, y)
    assert m.apply(v, x, t, y).shape == x.shape
    assert m.apply(v, x, t, y, method=m.forward_full).shape == x.shape
    dyn = SiT(**TINY, dynamic=True)
    v = dyn.init(jax.random.PRNGKey(0), x, t, y)
    out, aux = dyn.apply(v, x, t, y)
    assert out.shape == x.shape and aux["head_masks"].shape == (2, 2, 4)
    full, _ = dyn.apply(v, x, t, y, method=dyn.forward_full)
    assert full.shape == (2, 8, 8, 8)
    np.testing.assert_array_equal(full[..., :4], out)


def test_presets():
    assert sit_config("SiT-XL/2") == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
    assert sit_config("SiT_S_4")["patch_size"] == 4
    assert isinstance(SiT_models["SiT-B/8"](), SiT)
    assert len(SiT_models) == 12
    with pytest.raises(ValueError, match="unknown SiT config"):
        sit_config("SiT-XXL/2")
