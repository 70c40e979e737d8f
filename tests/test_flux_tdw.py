"""TDW for FLUX (`FLUX(..., dynamic=True, dynamic_width=True)`): head and MLP-group routers on
time_in(t). The masked path is checked against the same model with the switched-off heads' and
groups' weights zeroed by hand (what "switched off" must mean), the masks against the routers'
logits (a function of t alone), and the FLOPs counter and the DyFLUX objective with widths."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from conftest import load_config
from dydit_jax import flops, flux_loss
from dydit_jax.models import FLUX

H = 4


def tdw_model(**kw):
    return FLUX(**{**dict(in_channels=8, vec_in_dim=6, context_in_dim=5, hidden_size=32,
                          num_heads=H, depth=1, depth_single_blocks=1, axes_dim=(2, 2, 4),
                          guidance_embed=False, dynamic=True, dynamic_width=True), **kw})


def inputs(b=2, n=6, t=3, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    ids = jnp.asarray(rng.integers(0, 4, size=(b, n, 3)), jnp.float32)
    return (f(b, n, 8), ids, f(b, t, 5), jnp.zeros((b, t, 3)), jnp.asarray([0.3, 0.8]),
            f(b, 6), None)


def strong(params, seed=1):
    """N(0, 1) weights (the default init's zero biases and tiny outputs would hide a head)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [0.3 * jax.random.normal(k, a.shape)
                                               for k, a in zip(keys, leaves)])


def force_width(params, on):
    """Routers with zero kernels and biases +-30: mask entry j (j >= 1) of router `name` in
    block `blk` is on(blk, name)[j]; token routers keep every token."""
    flat = flatten_dict(params)
    for path in list(flat):
        blk, mod = path[0], path[1]
        if mod.endswith("_router") and mod != "token_router":
            name = mod[:-len("_router")]
            flat[path] = jnp.zeros_like(flat[path]) if path[-1] == "kernel" else \
                jnp.where(jnp.asarray(on(blk, name)[1:]), 30.0, -30.0)
        if mod == "token_router" and path[-2:] == ("router", "bias"):
            flat[path] = jnp.full_like(flat[path], 30.0)
        if mod == "token_router" and path[-2:] == ("router", "kernel"):
            flat[path] = jnp.zeros_like(flat[path])
    return unflatten_dict(flat)


def zero_switched_off(params, on):
    """The static-width weights equivalent to the masks: an off head's rows of proj /
    linear2, an off group's fc1 columns and bias (GELU(0) = 0) / linear2 rows are zero."""
    flat = {k: np.array(v) for k, v in flatten_dict(params).items()}
    d, f = 32, 128
    hd, fg = d // H, f // H
    for j in range(H):
        for g in ("double_blocks_0",):
            if not on(g, "head")[j]:
                for s in ("img_attn", "txt_attn"):
                    flat[(g, s, "proj", "kernel")][j * hd:(j + 1) * hd] = 0
            for mlp, name in (("img_mlp_0", "group"), ("txt_mlp_0", "txt_group")):
                if not on(g, name)[j]:
                    flat[(g, mlp, "kernel")][:, j * fg:(j + 1) * fg] = 0
                    flat[(g, mlp, "bias")][j * fg:(j + 1) * fg] = 0
        s = "single_blocks_0"
        if not on(s, "head")[j]:
            flat[(s, "linear2", "kernel")][j * hd:(j + 1) * hd] = 0
        if not on(s, "group")[j]:
            flat[(s, "linear2", "kernel")][d + j * fg:d + (j + 1) * fg] = 0
    return unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})


PATTERN = {("double_blocks_0", "head"): [1, 0, 1, 0], ("double_blocks_0", "group"): [1, 1, 0, 0],
           ("double_blocks_0", "txt_group"): [1, 0, 0, 1],
           ("single_blocks_0", "head"): [1, 1, 0, 1], ("single_blocks_0", "group"): [1, 0, 1, 0]}


def test_switched_off_heads_and_groups_are_the_zeroed_weights():
    model = tdw_model()
    x = inputs()
    params = strong(model.init(jax.random.PRNGKey(0), *x)["params"])
    on = lambda blk, name: PATTERN[(blk, name)]  # noqa: E731
    params = force_width(params, on)
    out, aux = model.apply({"params": params}, *x)
    for (blk, name), want in PATTERN.items():
        i = 0 if blk.startswith("double") else 1
        got = aux[f"{name}_masks"][i]
        np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))
    assert float(aux["token_masks"].min()) == 1.0
    # The same weights with the off parts zeroed, every head and group on.
    ref_params = force_width(zero_switched_off(params, on), lambda *_: [1] * H)
    ref, ref_aux = model.apply({"params": ref_params}, *x)
    assert float(ref_aux["head_masks"].min()) == 1.0
    # float32 rounding of differently ordered sums of ~1e1-sized terms (the zeroed weights
    # add exact zeros, the masks multiply by exact zeros): a few ulp of the output scale.
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    full, _ = model.apply({"params": force_width(params, lambda *_: [1] * H)}, *x)
    assert float(jnp.abs(full - out).max()) > 1e-2 * float(jnp.abs(full).max())


def test_every_width_on_is_the_model_without_tdw():
    model = tdw_model()
    x = inputs()
    params = strong(model.init(jax.random.PRNGKey(0), *x)["params"])
    params = force_width(params, lambda *_: [1] * H)
    plain = tdw_model(dynamic_width=False)
    flat = {k: v for k, v in flatten_dict(params).items()
            if not (k[1].endswith("_router") and k[1] != "token_router")}
    out, _ = model.apply({"params": params}, *x)
    want, aux = plain.apply({"params": unflatten_dict(flat)}, *x)
    np.testing.assert_array_equal(out, want)
    assert "head_masks" not in aux
    with pytest.raises(ValueError, match="dynamic=True"):
        tdw_model(dynamic=False).init(jax.random.PRNGKey(0), *x)


def test_width_masks_depend_on_t_only_and_match_width_logits():
    model = tdw_model(width_bias_init=0.0)
    x = inputs()
    v = model.init(jax.random.PRNGKey(0), *x)
    v = {"params": strong(v["params"], seed=3)}
    _, aux = model.apply(v, *x)
    other = inputs(seed=7)                         # other latents, prompts and pooled vector
    _, aux2 = model.apply(v, *other[:4], x[4], other[5], None)
    for name in ("head", "group", "txt_group"):
        np.testing.assert_array_equal(aux[f"{name}_masks"], aux2[f"{name}_masks"])
        logits = model.apply(v, x[4], method="width_logits")[name]      # [T, blocks, H-1]
        np.testing.assert_array_equal(np.moveaxis(np.asarray(logits), 0, 1),
                                      aux[f"{name}_logits"])
        on = 1 / (1 + np.exp(-np.asarray(aux[f"{name}_logits"]) / model.router_tau)) > 0.5
        np.testing.assert_array_equal(aux[f"{name}_masks"][..., 1:], on)
        assert np.all(aux[f"{name}_masks"][..., 0] == 1)
    # Both times differ in some mask (N(0, 0.3) routers on different t embeddings).
    assert any(not np.array_equal(aux[f"{n}_masks"][:, 0], aux[f"{n}_masks"][:, 1])
               for n in ("head", "group", "txt_group"))


def test_flux_macs_with_widths():
    model = tdw_model(depth=2, depth_single_blocks=3)
    n, t = 64, 12
    full = flops.flux_macs(model, n, t, [n] * 5, [H] * 5, [H] * 5, [H] * 2)
    no_width = flops.flux_macs(model, n, t, [n] * 5)
    # Every head and group on: the same MACs plus the width routers' D x (H-1) Dense layers.
    assert full["total"] - no_width["total"] == (2 * 3 + 3 * 2) * 32 * (H - 1)
    half = flops.flux_macs(model, n, t, [n] * 5, [H // 2] * 5, [H] * 5, [H] * 2)
    for part in ("double_qkv", "double_attention", "double_proj", "single_kv",
                 "single_attention"):
        assert half[part] == pytest.approx(full[part] / 2)
    assert half["double_img_ffn"] == full["double_img_ffn"]
    rng = np.random.default_rng(0)
    kept, heads = rng.uniform(0, n, (5, 3)), rng.integers(1, H + 1, (5, 3))
    groups, txt = rng.integers(1, H + 1, (5, 3)), rng.integers(1, H + 1, (2, 3))
    got = flops.flux_macs_ratio_fn(model, n, t)(kept, heads, groups, txt)
    want = [flops.flux_macs_ratio(model, n, t, kept[:, b], heads[:, b], groups[:, b],
                                  txt[:, b]) for b in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-6)        # float32 of the float64 count
    with pytest.raises(ValueError, match="txt_groups"):
        flops.flux_macs(model, n, t, [n] * 5, [H] * 5, [H] * 5, [H] * 5)


def test_dyflux_tdw_objective_bounds_the_flops_ratio_and_trains_the_width_routers():
    model = FLUX(in_channels=4, vec_in_dim=8, context_in_dim=8, hidden_size=32, num_heads=2,
                 depth=1, depth_single_blocks=2, axes_dim=(2, 6, 8), guidance_embed=False,
                 dynamic=True, dynamic_width=True)
    cfg = load_config("flux_digits")
    cfg.dynamic.update(enabled=True, target=0.5, warmup_steps=10, hold_steps=0, stage=2)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(4, 8, 8, 1)).astype(np.float32),
             "txt": rng.normal(size=(4, 5, 8)).astype(np.float32),
             "vec": rng.normal(size=(4, 8)).astype(np.float32)}
    params = model.init(jax.random.PRNGKey(0), *model.dummy_inputs(1))["params"]
    loss_fn = flux_loss.flux_loss_fn(model, cfg.flux, cfg.dynamic)
    (loss, m), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, batch, jax.random.PRNGKey(1), 20)
    assert float(m["head_fraction"]) == 1.0 and float(m["group_fraction"]) == 1.0   # bias 15
    ratio = float(m["flops_ratio"])
    assert float(m["loss_flops"]) == pytest.approx(2 * (ratio - 0.5) ** 2, rel=1e-5)
    np.testing.assert_allclose(loss, m["loss_dynamic"] + m["loss_flops"], rtol=1e-6)
    flat = flatten_dict(grads)
    for name in ("head_router", "group_router", "txt_group_router"):
        g = [v for k, v in flat.items() if name in k]
        assert g and max(float(jnp.abs(a).max()) for a in g) > 0, name


# ----------------------------------------------------------------------------------------------
# The engine with TDW: gathered heads and groups equal the masked path
# ----------------------------------------------------------------------------------------------

# Float32 rounding of gathered matmuls (other shapes, other summation order; a single block's
# linear2 is split into its attention and MLP rows): as tests/test_flux_engine.py.
TOL = dict(atol=1e-5, rtol=1e-5)


# Quarters (padding slots when a count falls between widths) and one full-width bucket (every
# head gathered, the inactive ones zeroed by their masks); capacities halves.
# One full-width bucket is slow-marked: the 8-device test below runs that grid.
@pytest.mark.parametrize("width_grid", [None, pytest.param((1.0,), marks=pytest.mark.slow)])
def test_engine_with_tdw_equals_masked(width_grid):
    from test_flux_engine import calibrated
    from dydit_jax.engine.flux import FluxEngine
    model, variables, inputs = calibrated(0.5, seed=2, dynamic_width=True)
    masked, aux = model.apply(variables, *inputs)
    heads = np.asarray(aux["head_masks"])
    # Rows at t = 0.9 and 0.3: different widths per row (the engine gathers their union).
    assert 0.2 < heads.mean() < 0.9 and not np.array_equal(heads[:, 0], heads[:, 1])
    eng = FluxEngine(model, variables, (0.5,), width_grid=width_grid)
    out, kept = eng.forward(*inputs)
    np.testing.assert_allclose(out, masked, **TOL)
    np.testing.assert_array_equal(kept, np.asarray(aux["token_masks"]).sum(axis=2))
    union = lambda m: np.asarray(m).max(axis=1).sum(axis=-1)  # noqa: E731
    np.testing.assert_array_equal(eng.widths["heads"], union(aux["head_masks"]))
    np.testing.assert_array_equal(eng.widths["groups"], union(aux["group_masks"]))
    np.testing.assert_array_equal(eng.widths["txt_groups"], union(aux["txt_group_masks"]))
    if width_grid is None:
        # 6 rows (> engine.flux.PER_SAMPLE_MAX_ROWS): single blocks share one capacity bucket.
        big = tuple(np.concatenate([a] * 3) for a in inputs)
        masked, aux = model.apply(variables, *big)
        out, kept = eng.forward(*big)
        np.testing.assert_allclose(out, masked, **TOL)
        np.testing.assert_array_equal(kept, np.asarray(aux["token_masks"]).sum(axis=2))


def test_engine_with_tdw_denoises_as_the_masked_sampler_once():
    from test_flux_engine import calibrated
    from dydit_jax import flux_sampling
    from dydit_jax.engine.flux import FluxEngine
    model, variables, inputs = calibrated(0.5, seed=3, dynamic_width=True)
    img, ids, txt, txt_ids, _, vec, _ = inputs
    schedule = flux_sampling.get_schedule(3, img.shape[1])
    masked = jax.jit(lambda v, x, ts: flux_sampling.denoise(model, v, x, ids, txt, txt_ids, vec,
                                                            ts, guidance=3.5))(
        variables, img, schedule)
    eng = FluxEngine(model, variables, (0.5,), width_grid=(0.5, 1.0))
    out, kept = eng.denoise(img, ids, txt, txt_ids, vec, schedule, guidance=3.5)
    np.testing.assert_allclose(out, masked, atol=2e-5, rtol=2e-5)   # 3 steps of 1e-5 each
    assert eng.widths["heads"].shape == (3, model.num_blocks)
    assert eng.widths["txt_groups"].shape == (3, model.depth)
    # The widths are those of the schedule's times (t only), and some are below full.
    want = model.apply(variables, np.asarray(schedule[:-1]), method="width_logits")["head"]
    want = (np.asarray(want) / model.router_tau > 0).sum(-1) + 1
    np.testing.assert_array_equal(eng.widths["heads"], want)
    assert (np.asarray(eng.widths["heads"]) < model.num_heads).any()
    eng.denoise(img, ids, txt, txt_ids, vec, flux_sampling.get_schedule(3, 4096), guidance=1.0)
    assert eng.compile_count == 1
    ratio = flops.flux_macs_ratio(model, img.shape[1], txt.shape[1],
                                  np.asarray(kept).mean(axis=(0, 2)),
                                  np.asarray(eng.widths["heads"]).mean(0),
                                  np.asarray(eng.widths["groups"]).mean(0),
                                  np.asarray(eng.widths["txt_groups"]).mean(0))
    assert 0.2 < ratio < 0.9, ratio


def test_engine_on_eight_devices_equals_the_masked_sampler():
    """The FLUX engine on a (data 2, fsdp 4) mesh of 8 simulated devices, TDW + token routing,
    true CFG (the negative prompt in the same batch): each device routes its own rows; the
    latents equal the masked sampler's on one device."""
    from conftest import run_python
    code = """
import jax, numpy as np
from dydit_jax import flux_sampling, sharding
from dydit_jax.engine.flux import FluxEngine
from test_flux_engine import calibrated
assert jax.device_count() == 8
model, variables, inputs = calibrated(0.5, seed=3, dynamic_width=True, batch=2)
img, ids, txt, txt_ids, _, vec, _ = [np.concatenate([a] * 4) for a in inputs]
rng = np.random.default_rng(0)
img = rng.standard_normal(img.shape).astype(np.float32)              # 8 different rows
schedule = flux_sampling.get_schedule(2, img.shape[1])
neg = dict(neg_txt=txt[::-1], neg_txt_ids=txt_ids, neg_vec=vec[::-1])
masked = jax.jit(lambda v, x: flux_sampling.denoise(model, v, x, ids, txt, txt_ids, vec,
                                                   schedule, guidance=3.5, true_cfg=2.0,
                                                   **neg))(variables, img)
mesh = sharding.create_mesh(data=2, fsdp=4)
eng = FluxEngine(model, variables, (0.5,), width_grid=(1.0,), mesh=mesh)
out, kept = eng.denoise(img, ids, txt, txt_ids, vec, schedule, guidance=3.5, true_cfg=2.0,
                        **neg)
# 2 steps of 1e-5 each, amplified by the guidance scale 2 (as tests/test_flux_engine.py).
np.testing.assert_allclose(out, masked, atol=1e-4, rtol=1e-4)
assert kept.shape == (2, model.num_blocks, 16) and eng.compile_count == 1
assert eng.widths["heads"].shape == (2, model.num_blocks)
try:
    eng.forward(*[a[:3] for a in (img, ids, txt, txt_ids)], np.full(3, 0.5, np.float32),
                vec[:3], None)
    raise SystemExit("3 rows on 8 devices were accepted")
except ValueError as e:
    assert "divisible by 8" in str(e), e
print("OK")
"""
    assert "OK" in run_python(code, devices=8).stdout
