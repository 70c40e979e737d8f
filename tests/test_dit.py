"""Parity of the Flax DiT with the official PyTorch DiT (tests/data/dit_s, see its README).

Golden arrays are NCHW; the package is NHWC, so inputs and outputs are transposed here.
Each submodule is compared separately so that a failing test names the layer.
"""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DATA, load_npz
from dydit_jax import convert
from dydit_jax.models import DiT, DiT_models, dit_config

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
            mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True)
TOL = dict(atol=1e-5, rtol=1e-5)


def nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def io():
    return load_npz("dit_s", "io.npz")


@pytest.fixture(scope="module", params=[False, True], ids=["unscanned", "scanned"])
def model_and_vars(request):
    model = DiT(**TINY, scan_layers=request.param)
    return model, convert.from_pytorch(DATA / "dit_s" / "model.pt", model)


def test_output_matches_reference(model_and_vars, io):
    model, variables = model_and_vars
    out = model.apply(variables, nhwc(io["x"]), io["t"], io["y"])
    np.testing.assert_allclose(out, nhwc(io["out"]), **TOL)


def test_cfg_matches_reference(model_and_vars, io):
    model, variables = model_and_vars
    out = model.apply(variables, nhwc(io["x_cfg"]), io["t_cfg"], io["y_cfg"], io["cfg_scale"],
                      method=model.forward_with_cfg)
    np.testing.assert_allclose(out, nhwc(io["cfg_out"]), **TOL)
    raw = model.apply(variables, nhwc(io["x_cfg"]), io["t_cfg"], io["y_cfg"])
    np.testing.assert_allclose(raw, nhwc(io["cfg_model_out"]), **TOL)
    # Only x[:n] is used: garbage in the unconditional half's x must not change the output.
    x_bad = np.concatenate([io["x_cfg"][:3], 100 + io["x_cfg"][3:]])
    out_bad = model.apply(variables, nhwc(x_bad), io["t_cfg"], io["y_cfg"], io["cfg_scale"],
                          method=model.forward_with_cfg)
    np.testing.assert_array_equal(out_bad, out)


def test_cfg_guide_all_channels_option(model_and_vars, io):
    model, variables = model_and_vars
    args = (nhwc(io["x_cfg"]), io["t_cfg"], io["y_cfg"], 4.0)
    out3 = model.apply(variables, *args, method=model.forward_with_cfg)
    out_all = model.apply(variables, *args, guide_channels=None, method=model.forward_with_cfg)
    np.testing.assert_array_equal(out3[..., :3], out_all[..., :3])
    np.testing.assert_array_equal(out3[..., 4:], out_all[..., 4:])
    raw = np.asarray(model.apply(variables, nhwc(np.concatenate([io["x_cfg"][:3]] * 2)),
                                 io["t_cfg"], io["y_cfg"]))
    cond, uncond = raw[:3, ..., 3], raw[3:, ..., 3]
    np.testing.assert_allclose(out_all[:3, ..., 3], uncond + 4.0 * (cond - uncond), **TOL)


def test_intermediates_match_reference(io):
    model = DiT(**TINY)
    variables = convert.from_pytorch(DATA / "dit_s" / "model.pt", model)
    x, t, y = nhwc(io["x"]), io["t"], io["y"]
    x_patch = model.apply(variables, x, method=lambda m, x: m.x_embedder(x))
    np.testing.assert_allclose(x_patch, io["x_patch"], **TOL)
    np.testing.assert_allclose(model.pos_embed(), io["pos_embed"], atol=1e-7, rtol=0)
    np.testing.assert_allclose(model.apply(variables, t, method=lambda m, t: m.t_embedder(t)),
                               io["t_emb"], **TOL)
    np.testing.assert_allclose(model.apply(variables, y, method=lambda m, y: m.y_embedder(y)),
                               io["y_emb"], **TOL)
    _, state = model.apply(variables, x, t, y, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    for i in range(TINY["depth"]):
        np.testing.assert_allclose(inter[f"blocks_{i}"]["__call__"][0][0], io["block_out"][i],
                                   **TOL, err_msg=f"block {i}")
    np.testing.assert_allclose(inter["final_layer"]["__call__"][0], io["final_tokens"], **TOL)


def test_float64_matches_reference(io):
    code = """
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import sys; sys.path.insert(0, "tests")
from conftest import DATA, load_npz
from dydit_jax import convert
from dydit_jax.models import DiT
from test_dit import TINY, nhwc
io = load_npz("dit_s", "io.npz")
model = DiT(**TINY, dtype=jnp.float64, param_dtype=jnp.float64)
v = convert.from_pytorch(DATA / "dit_s" / "model.pt", model)
out = model.apply(v, nhwc(io["x"]).astype(np.float64), io["t"], io["y"])
assert out.dtype == jnp.float64, out.dtype
np.testing.assert_allclose(out, nhwc(io["out_float64"]), atol=1e-6, rtol=1e-6)
cfg = model.apply(v, nhwc(io["x_cfg"]).astype(np.float64), io["t_cfg"], io["y_cfg"], 4.0,
                  method=model.forward_with_cfg)
np.testing.assert_allclose(cfg, nhwc(io["cfg_out_float64"]), atol=1e-6, rtol=1e-6)
err = float(np.abs(np.asarray(out) - nhwc(io["out_float64"])).max())
print("max abs err float64", err)
# ~5e-9 remains: the 256 t-frequency features are float32 in both codes (as the release
# does) and XLA's float32 cos/sin differ from torch's by an ulp.
assert err < 1e-7, err
"""
    # x64 is process-global, so this runs in its own interpreter.
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(DATA.parent.parent))
    assert res.returncode == 0, res.stdout + res.stderr


def test_label_dropout_uses_null_class():
    model = DiT(**{**TINY, "depth": 1})
    x = jnp.zeros((64, 8, 8, 4))
    t = jnp.zeros((64,))
    y = jnp.arange(64) % 10
    variables = model.init(jax.random.PRNGKey(0), x, t, y)

    def emb(labels, train, rng=None, force=None):
        return model.apply(variables, labels, train, force,
                           method=lambda m, l, tr, f: m.y_embedder(l, train=tr, force_drop_ids=f),
                           rngs={"label_dropout": rng} if rng is not None else None)

    table = variables["params"]["y_embedder"]["embedding_table"]["embedding"]
    np.testing.assert_array_equal(emb(y, False), table[y])
    dropped = np.asarray(emb(y, True, jax.random.PRNGKey(1)))
    is_null = np.all(dropped == np.asarray(table[10]), axis=-1)
    assert 0 < is_null.sum() < 20  # about 10 % of 64
    force = (jnp.arange(64) < 5).astype(jnp.int32)
    np.testing.assert_array_equal(np.all(np.asarray(emb(y, False, force=force)) == table[10], -1),
                                  np.asarray(force, bool))


def test_scan_remat_bf16_variants_agree():
    base = DiT(**TINY)
    variables = convert.from_pytorch(DATA / "dit_s" / "model.pt", base)
    io = load_npz("dit_s", "io.npz")
    args = (nhwc(io["x"]), io["t"], io["y"])
    ref = base.apply(variables, *args)
    remat = DiT(**TINY, remat=True)
    np.testing.assert_allclose(remat.apply(variables, *args), ref, atol=1e-6)
    scanned = DiT(**TINY, scan_layers=True, remat=True)
    sv = convert.from_pytorch(DATA / "dit_s" / "model.pt", scanned)
    np.testing.assert_allclose(scanned.apply(sv, *args), ref, atol=1e-6)
    bf16 = DiT(**TINY, dtype=jnp.bfloat16)
    out = bf16.apply(variables, *args)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=2e-2)


def test_any_size_and_no_learn_sigma():
    model = DiT(input_size=(16, 8), patch_size=4, in_channels=3, hidden_size=32, depth=1,
                num_heads=2, num_classes=5, learn_sigma=False, class_dropout_prob=0.0)
    x = jnp.ones((2, 16, 8, 3))
    variables = model.init(jax.random.PRNGKey(0), x, jnp.array([1, 500]), jnp.array([0, 4]))
    assert variables["params"]["y_embedder"]["embedding_table"]["embedding"].shape == (5, 32)
    out = model.apply(variables, x, jnp.array([1, 500]), jnp.array([0, 4]))
    assert out.shape == (2, 16, 8, 3)


def test_zero_init_output_is_zero():
    model = DiT(**TINY)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
    variables = model.init(jax.random.PRNGKey(1), x, jnp.array([3, 900]), jnp.array([1, 2]))
    out = model.apply(variables, x, jnp.array([3, 900]), jnp.array([1, 2]))
    np.testing.assert_array_equal(out, 0.0)  # adaLN-Zero and the zero final layer


def test_bad_input_shapes_raise_clear_errors():
    model = DiT(**TINY)
    variables = convert.from_pytorch(DATA / "dit_s" / "model.pt", model)
    with pytest.raises(ValueError, match=r"NHWC"):
        model.apply(variables, jnp.zeros((2, 4, 8, 8)), jnp.zeros(2), jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match=r"t of shape"):
        model.apply(variables, jnp.zeros((2, 8, 8, 4)), jnp.zeros(3), jnp.zeros(2, jnp.int32))


@pytest.mark.parametrize("name,expected", [
    ("DiT-XL/2", dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)),
    ("DiT_S_8", dict(depth=12, hidden_size=384, num_heads=6, patch_size=8)),
])
def test_named_configs(name, expected):
    assert dit_config(name) == expected
    assert len(DiT_models) == 12
    with pytest.raises(ValueError, match="valid"):
        dit_config("DiT-M/2")


def test_presets_parameter_counts():
    # The release's train.py prints "DiT Parameters: 675,129,632" for DiT-XL/2 at 256 px; that
    # count includes the fixed pos_embed (256 x 1152), which is not a parameter here.
    from flax import traverse_util

    from dydit_jax.models import DiT_XL_2
    model = DiT_XL_2(input_size=32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 4)),
                            jnp.zeros(1), jnp.zeros(1, jnp.int32))
    count = sum(np.prod(s.shape) for s in traverse_util.flatten_dict(shapes).values())
    assert count + 256 * 1152 == 675_129_632


@pytest.mark.parametrize("policy", ["dots_with_no_batch_dims_saveable", "dots_saveable"])
def test_remat_policies_keep_outputs_and_gradients(policy):
    """`remat_policy` changes what the backward recomputes, never the values; unknown names
    are refused with the valid ones."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
    t, y = jnp.array([3.0, 700.0]), jnp.array([1, 2])
    base = DiT(**TINY)
    variables = base.init(jax.random.PRNGKey(1), x, t, y)
    loss = lambda m: jax.grad(lambda v: jnp.mean(m.apply(v, x, t, y) ** 2))(variables)  # noqa
    got = loss(DiT(**TINY, remat=True, remat_policy=policy))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got,
                           loss(base))
    with pytest.raises(ValueError, match="unknown remat policy 'dots'.*nothing_saveable"):
        DiT(**TINY, remat=True, remat_policy="dots").apply(variables, x, t, y)
