"""Importance reordering: function-preserving, non-trivial, sorted, idempotent, both layouts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dydit_jax.models.dit import DiT
from dydit_jax.reorder import apply_permutation, importance, reorder_by_importance

CFG = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
           num_classes=10)
H = CFG["num_heads"]


def _inputs(b=3):
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(k1, (b, 8, 8, 4))
    t = jnp.array([3.0, 500.0, 999.0][:b])
    y = jax.random.randint(k2, (b,), 0, CFG["num_classes"])
    return x, t, y


def _random_variables(scan_layers=False, seed=0):
    """DiT init zeroes adaLN and the final layer, so redraw every parameter ~ N(0, 0.02^2)."""
    model = DiT(**CFG, scan_layers=scan_layers)
    x, t, y = _inputs()
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, y)
    rng = np.random.default_rng(seed)  # numpy: no per-leaf compiles
    return model, jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype), shapes)


def _stack(variables):
    """Unstacked blocks_i params -> the scan_layers layout (leading depth axis)."""
    p = dict(variables["params"])
    blocks = [p.pop(f"blocks_{i}") for i in range(CFG["depth"])]
    p["blocks"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *blocks)
    return {"params": p}


@pytest.fixture(scope="module")
def unstacked():
    model, variables = _random_variables()
    apply = jax.jit(model.apply)
    return model, variables, apply, apply(variables, *_inputs())


def test_reordered_model_computes_the_same(unstacked):
    model, variables, apply, ref = unstacked
    new, perms = reorder_by_importance(variables, H)
    assert perms["heads"].shape == perms["groups"].shape == (CFG["depth"], H)
    out = apply(new, *_inputs())
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
    # The permutation is non-trivial, so the check above has teeth ...
    ident = np.broadcast_to(np.arange(H), perms["heads"].shape)
    assert not np.array_equal(perms["heads"], ident)
    assert not np.array_equal(perms["groups"], ident)
    assert not np.allclose(np.asarray(new["params"]["blocks_0"]["attn"]["qkv"]["kernel"]),
                           np.asarray(variables["params"]["blocks_0"]["attn"]["qkv"]["kernel"]))
    # ... and a half-applied permutation (qkv moved, proj not) does change the output.
    broken = jax.tree_util.tree_map(lambda a: a, new)
    for i in range(CFG["depth"]):
        broken["params"][f"blocks_{i}"] = dict(broken["params"][f"blocks_{i}"])
        attn = dict(broken["params"][f"blocks_{i}"]["attn"])
        attn["proj"] = variables["params"][f"blocks_{i}"]["attn"]["proj"]
        broken["params"][f"blocks_{i}"]["attn"] = attn
    assert np.max(np.abs(np.asarray(apply(broken, *_inputs()) - ref))) > 1e-4
    # Untouched parameters are passed through as they are.
    assert new["params"]["final_layer"] is variables["params"]["final_layer"]
    assert new["params"]["blocks_0"]["adaLN_modulation"] is \
        variables["params"]["blocks_0"]["adaLN_modulation"]


def test_importance_sorted_and_idempotent(unstacked):
    _, variables, _, _ = unstacked
    before = importance(variables, H)
    new, perms = reorder_by_importance(variables, H)
    after = importance(new, H)
    for k in ("heads", "groups"):
        assert np.all(np.diff(after[k], axis=-1) <= 0), (k, after[k])
        # Importance moves with its head/group: after[l, s] == before[l, perm[l, s]].
        np.testing.assert_array_equal(after[k], np.take_along_axis(before[k], perms[k], -1))
    again, perms2 = reorder_by_importance(new, H)
    ident = np.broadcast_to(np.arange(H), perms2["heads"].shape)
    np.testing.assert_array_equal(perms2["heads"], ident)
    np.testing.assert_array_equal(perms2["groups"], ident)
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(new)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_importance_definition(unstacked):
    """Head 1 of block 0 by hand: q, k, v columns + biases and proj rows."""
    _, variables, _, _ = unstacked
    blk = jax.tree_util.tree_map(np.asarray, variables["params"]["blocks_0"])
    d, hd = CFG["hidden_size"], CFG["hidden_size"] // H
    cols = np.concatenate([np.arange(j * d + hd, j * d + 2 * hd) for j in range(3)])
    head1 = np.sqrt(np.sum(blk["attn"]["qkv"]["kernel"][:, cols] ** 2)
                    + np.sum(blk["attn"]["qkv"]["bias"][cols] ** 2)
                    + np.sum(blk["attn"]["proj"]["kernel"][hd:2 * hd] ** 2))
    gw = 4 * d // H
    ch = slice(2 * gw, 3 * gw)
    group2 = np.sqrt(np.sum(blk["mlp"]["fc1"]["kernel"][:, ch] ** 2)
                     + np.sum(blk["mlp"]["fc1"]["bias"][ch] ** 2)
                     + np.sum(blk["mlp"]["fc2"]["kernel"][ch] ** 2))
    imp = importance(variables["params"], H)  # a bare params dict works too
    np.testing.assert_allclose(imp["heads"][0, 1], head1, rtol=1e-5)
    np.testing.assert_allclose(imp["groups"][0, 2], group2, rtol=1e-5)


def test_scan_layers_layout(unstacked):
    _, variables, _, ref = unstacked
    model = DiT(**CFG, scan_layers=True)
    stacked = _stack(variables)
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(np.asarray(apply(stacked, *_inputs())), np.asarray(ref),
                               atol=1e-5)
    new, perms = reorder_by_importance(stacked, H, scan_layers=True)
    _, perms_unstacked = reorder_by_importance(variables, H)
    for k in ("heads", "groups"):
        np.testing.assert_array_equal(perms[k], perms_unstacked[k])
    np.testing.assert_allclose(np.asarray(apply(new, *_inputs())), np.asarray(ref), atol=1e-5)
    _, perms2 = reorder_by_importance(new, H, scan_layers=True)
    np.testing.assert_array_equal(perms2["heads"], np.broadcast_to(np.arange(H), (2, H)))
    with pytest.raises(ValueError, match="scan_layers"):
        reorder_by_importance(stacked, H)
    with pytest.raises(ValueError, match="scan_layers"):
        reorder_by_importance(variables, H, scan_layers=True)


def test_apply_permutation_reuses_perms(unstacked):
    """The same permutation brings a second copy (e.g. EMA) into the same order."""
    _, variables, _, _ = unstacked
    new, perms = reorder_by_importance(variables, H)
    ema = jax.tree_util.tree_map(lambda a: a * 2.0, variables)
    ema_new = apply_permutation(ema, perms, H)
    for a, b in zip(jax.tree_util.tree_leaves(ema_new), jax.tree_util.tree_leaves(new)):
        np.testing.assert_allclose(np.asarray(a), 2.0 * np.asarray(b), rtol=1e-6)
    bad = {"heads": np.zeros((2, H), np.int32), "groups": perms["groups"]}
    with pytest.raises(ValueError, match="permutation"):
        apply_permutation(variables, bad, H)


def test_routers_refused_unless_fresh(unstacked):
    _, variables, _, _ = unstacked
    d = CFG["hidden_size"]
    params = dict(variables["params"])
    for i in range(CFG["depth"]):
        blk = dict(params[f"blocks_{i}"])
        blk["head_router"] = {"kernel": jnp.zeros((d, H - 1)), "bias": jnp.full((H - 1,), 15.)}
        blk["group_router"] = {"kernel": jnp.zeros((d, H - 1)), "bias": jnp.full((H - 1,), 15.)}
        params[f"blocks_{i}"] = blk
    with pytest.raises(ValueError, match="router"):
        reorder_by_importance({"params": params}, H)
    new, perms = reorder_by_importance({"params": params}, H, allow_fresh_routers=True)
    assert new["params"]["blocks_1"]["head_router"] is params["blocks_1"]["head_router"]
    _, perms_plain = reorder_by_importance(variables, H)
    np.testing.assert_array_equal(perms["heads"], perms_plain["heads"])


def test_bfloat16_params_keep_dtype(unstacked):
    _, variables, _, _ = unstacked
    bf16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), variables)
    new, _ = reorder_by_importance(bf16, H)
    for leaf in jax.tree_util.tree_leaves(new):
        assert leaf.dtype == jnp.bfloat16
