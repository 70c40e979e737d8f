"""Dynamic Latte (DyDiT++ on video): the masked path, its FLOPs constants, and the engine.

There is no released dynamic Latte, so the oracle is our masked path, built from the DiT block
whose dynamic path matches the released DyDiT (tests/test_dydit.py). Its complete path is the
static Latte (parity with Vchitect/Latte in tests/test_latte.py). The engine must equal the
masked path at float32 tolerance (1e-5: the gathered matmuls sum the same products in another
order), on 1 and 8 simulated devices.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CompileCounter, run_python
from dydit_jax import flops
from dydit_jax.diffusion import create_diffusion
from dydit_jax.dydit_loss import dydit_loss_fn
from dydit_jax.engine import Engine
from dydit_jax.models import Latte
from dydit_jax.sampling import make_sample_fn

TOL = dict(atol=1e-5, rtol=1e-5)
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4,
            num_frames=4, num_classes=10, learn_sigma=True)
LABELS = np.array([1, 7, 3, 9, 0, 2, 5, 8])   # divisible by 8 devices
COARSE = dict(grid=(0.5,), token_capacities=(0.5, 1.0))   # few buckets: quick compiles


def routed_variables(model, seed=0):
    """Initial parameters with random routers (heads, groups and tokens switch on and off
    with t and x) and a non-zero adaLN / final layer (the adaLN-Zero init would make every
    block the identity, hiding a wrong layout)."""
    dummy = model.dummy_inputs(1)
    params = model.init({"params": jax.random.PRNGKey(seed)}, *dummy)["params"]
    rng = np.random.default_rng(seed)

    def perturb(path, a):
        name = jax.tree_util.keystr(path)
        if "router" in name:
            scale = {"bias": 2.0, "kernel": 0.5}["bias" if "bias" in name else "kernel"]
            return jnp.asarray(rng.normal(0, scale, a.shape), a.dtype)
        if "adaLN" in name or "final_layer" in name:
            return jnp.asarray(rng.normal(0, 0.05, a.shape), a.dtype)
        return a
    return {"params": jax.tree_util.tree_map_with_path(perturb, params)}


@pytest.fixture(scope="module")
def latte():
    model = Latte(**TINY, extras=2, dynamic=True)
    return model, routed_variables(model)


def clip_inputs(batch=2, seed=1):
    x = jax.random.normal(jax.random.PRNGKey(seed), (batch, 4, 8, 8, 4))
    return x, jnp.linspace(20.0, 980.0, batch), jnp.arange(batch, dtype=jnp.int32) % 10


# ----------------------------------------------------------------------------------------------
# The masked path
# ----------------------------------------------------------------------------------------------

def test_complete_path_is_the_static_latte_and_all_on_routers_change_nothing(latte):
    model, variables = latte
    x, t, y = clip_inputs()
    static = Latte(**TINY, extras=2)
    no_routers = {"params": {k: ({n: p for n, p in v.items() if "router" not in n}
                                 if k.startswith("blocks") else v)
                             for k, v in variables["params"].items()}}
    complete, aux = model.apply(variables, x, t, y, complete=True)
    assert aux is None
    np.testing.assert_array_equal(complete, static.apply(no_routers, x, t, y))
    # The init routers (biases 15 and 35) keep every head, group and token on.
    init = {"params": model.init({"params": jax.random.PRNGKey(3)}, x, t, y)["params"]}
    out, aux = model.apply(init, x, t, y)
    np.testing.assert_allclose(out, model.apply(init, x, t, y, complete=True)[0], atol=1e-6)
    assert all(float(jnp.min(aux[k])) == 1 for k in ("head_masks", "group_masks",
                                                     "token_masks"))


def test_masks_are_per_clip_and_tokens_in_frame_position_order(latte):
    model, variables = latte
    x, t, y = clip_inputs()
    out, aux = model.apply(variables, x, t, y)
    b, depth, heads, f, n = 2, 4, 4, 4, 16
    assert aux["head_masks"].shape == (b, depth, heads)
    assert aux["token_masks"].shape == (b, depth, f * n)
    # Width masks are the routers' decision on t alone (what the engine's plan uses).
    head_logits, group_logits = model.apply(variables, t, method="width_logits")
    np.testing.assert_array_equal(aux["head_logits"], head_logits)
    np.testing.assert_array_equal(aux["group_logits"], group_logits)
    assert 0.1 < float(jnp.mean(aux["token_masks"])) < 0.9
    # Train mode replays given per-clip noise: a huge draw on token (frame 1, position 3) of
    # clip 0 keeps exactly that token, in the spatial and in the temporal blocks.
    big = np.full((b, depth, f * n), -1e4, np.float32)
    big[0, :, 1 * n + 3] = 1e4
    noise = {"token": (jnp.asarray(big), jnp.zeros_like(big))}
    _, train_aux = model.apply(variables, x, t, y, train=True, gumbel_noise=noise,
                               rngs={"gumbel": jax.random.PRNGKey(0),
                                     "label_dropout": jax.random.PRNGKey(1)})
    kept = np.argwhere(np.asarray(train_aux["token_masks"][0]) > 0.5)
    np.testing.assert_array_equal(kept, [[layer, n + 3] for layer in range(depth)])
    # Per-clip width noise: every frame / position of a clip runs the same heads.
    assert train_aux["head_masks"].shape == (b, depth, heads)


def test_token_blocks_switch_places_the_token_routers(latte):
    _, variables = latte
    model = Latte(**TINY, extras=2, dynamic=True, token_blocks="spatial")
    params = model.init({"params": jax.random.PRNGKey(0)}, *model.dummy_inputs(1))["params"]
    assert "token_router" in params["blocks_0"] and "token_router" not in params["blocks_1"]
    x, t, y = clip_inputs()
    _, aux = model.apply(routed_variables(model), x, t, y)
    np.testing.assert_array_equal(aux["token_masks"][:, 1::2], 1.0)
    # The FLOPs counter knows where the routers are.
    both = flops.dynamic_macs(Latte(**TINY, dynamic=True), 4, 4)["token_router"]
    spatial_only = flops.dynamic_macs(model, 4, 4)["token_router"]
    assert spatial_only == both / 2 > 0
    with pytest.raises(ValueError, match="token_blocks"):
        Latte(**TINY, dynamic=True, token_blocks="frames").init(
            jax.random.PRNGKey(0), *model.dummy_inputs(1))


def test_static_macs_count_what_the_static_latte_computes():
    # The counter's parts are the model's own matmuls, adaLN included (once per clip in every
    # block and the final layer, `dit.per_row`): counted from the jaxpr of one clip.
    model = Latte(**TINY, extras=2)
    x, t, y = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in model.dummy_inputs(1))
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, y)
    assert flops.jaxpr_macs(model.apply, variables, x, t, y) == \
        flops.static_macs(model)["total"]


def test_flops_loss_uses_spatial_and_temporal_block_constants(latte):
    model, variables = latte
    f, n, d, depth = 4, 16, 64, 4
    a, m = flops.model_block_costs(model)
    t_tokens = f * n
    assert a == tuple(4 * t_tokens * d * d + 2 * t_tokens * (n if l % 2 == 0 else f) * d
                      for l in range(depth))
    assert m == (8 * t_tokens * d * d,) * depth
    rng = np.random.default_rng(0)
    heads = (rng.random((3, depth, 4)) < 0.6).astype(np.float32)
    groups = (rng.random((3, depth, 4)) < 0.6).astype(np.float32)
    tokens = (rng.random((3, depth, f * n)) < 0.5).astype(np.float32)
    got = flops.flops_ratio(heads, groups, tokens, t_tokens, d, costs=(a, m))
    a64, m64 = np.asarray(a, np.float64), np.asarray(m, np.float64)
    want = ((heads.mean(-1) * a64 + groups.mean(-1) * tokens.mean(-1) * m64).sum(-1)
            / (a64 + m64).sum())
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Full counts without routers: the dynamic count is the static one.
    assert flops.dynamic_macs(model, 4, 4, include_routers=False)["total"] == \
        flops.static_macs(model)["total"]
    # The DyDiT objective runs on a dynamic Latte and reports the ratio of its masks.
    from ml_collections import ConfigDict
    x, t, y = clip_inputs()
    loss_fn = dydit_loss_fn(model, create_diffusion("1000"),
                            ConfigDict(dict(target=0.5, warmup_steps=10, hold_steps=0,
                                            stage=1)))
    loss, metrics = loss_fn(variables["params"], {"image": x, "label": y},
                            jax.random.PRNGKey(0), 100)
    assert np.isfinite(float(loss)) and 0 < float(metrics["flops_ratio"]) < 1
    assert metrics["token_fraction"].shape == (depth,)


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def masked_ddpm10(latte):
    model, variables = latte
    sample = make_sample_fn(model, create_diffusion("10"), sampler="ddpm", clip_denoised=True)
    return np.asarray(sample(variables, jax.random.PRNGKey(0), LABELS, 4.0))


def test_engine_samples_equal_the_masked_sampler_and_compile_once(latte, masked_ddpm10):
    model, variables = latte
    eng = Engine(model, variables, create_diffusion("10"), sampler="ddpm", clip_denoised=True,
                 **COARSE)
    assert eng.warmup(batch_size=len(LABELS)) == 1
    with CompileCounter() as counter:
        x0, stats = eng.sample(jax.random.PRNGKey(0), LABELS, 4.0, return_stats=True)
        jax.block_until_ready(eng.sample(jax.random.PRNGKey(1), LABELS[::-1], 1.5))
    assert counter.count == 0 and eng.compile_count == 1
    np.testing.assert_allclose(x0, masked_ddpm10, **TOL)
    assert (np.abs(masked_ddpm10) < 0.999).mean() > 0.5   # mostly not clipped
    assert stats["kept_tokens"].shape == (10, 4) and 0.1 < stats["token_fraction"].mean() < 0.9
    assert eng.plan.head_counts.min() < 4   # some heads are off
    # The engine's jaxpr count is the plan's (minus the width routers it never runs).
    routers = flops.dynamic_macs(model, 4, 4)["width_routers"]
    token_routers = flops.dynamic_macs(model, 4, 4)["token_router"]
    np.testing.assert_allclose(eng.step_macs(),
                               eng.plan.step_macs(model, eng.grid) - routers, rtol=0)
    assert token_routers > 0
    with pytest.raises(ValueError, match="fused"):
        Engine(model, variables, create_diffusion("10"), executor="blocks", **COARSE)


def test_engine_unconditional_spatial_only_tokens_ddim(latte):
    model = Latte(**TINY, extras=1, dynamic=True, token_blocks="spatial")
    variables = routed_variables(model, seed=4)
    diffusion = create_diffusion("ddim10")
    labels = np.zeros(4, np.int32)
    ref = make_sample_fn(model, diffusion, sampler="ddim", use_cfg=False, clip_denoised=True)(
        variables, jax.random.PRNGKey(3), labels)
    eng = Engine(model, variables, diffusion, sampler="ddim", use_cfg=False,
                 clip_denoised=True, **COARSE)
    np.testing.assert_allclose(eng.sample(jax.random.PRNGKey(3), labels), ref, **TOL)


# slow: the DiT engine's 8-device test covers the shard_map path Latte shares.
@pytest.mark.slow
def test_engine_latte_on_a_mesh_of_8_devices(masked_ddpm10, tmp_path):
    np.save(tmp_path / "ref.npy", masked_ddpm10)
    code = f"""
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from dydit_jax.diffusion import create_diffusion
from dydit_jax.engine import Engine
from dydit_jax.models import Latte
from test_latte_dynamic import COARSE, LABELS, TINY, TOL, routed_variables
assert jax.device_count() == 8
mesh = Mesh(np.array(jax.devices()), ("data",))
model = Latte(**TINY, extras=2, dynamic=True)
eng = Engine(model, routed_variables(model), create_diffusion("10"), sampler="ddpm",
             clip_denoised=True, mesh=mesh, **COARSE)
x0 = eng.sample(jax.random.PRNGKey(0), LABELS, 4.0)
assert x0.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 5), x0.sharding
np.testing.assert_allclose(x0, np.load({str(tmp_path / "ref.npy")!r}), **TOL)
print("OK")
"""
    assert "OK" in run_python(code, devices=8).stdout


def test_scan_layers_equals_the_unrolled_stack(latte):
    """A scanned Latte (blocks stacked as a scanned DiT's, an nn.cond on each block's kind)
    computes what the unrolled one does: eval masks, train-mode draws, gradients, and the
    engine reads its stacked parameters."""
    from dydit_jax import convert
    model, variables = latte
    scanned = Latte(**TINY, extras=2, dynamic=True, scan_layers=True, remat=True)
    stacked = {"params": convert.to_layout(variables["params"], scan_layers=True)}
    x, t, y = clip_inputs()
    rngs = {"gumbel": jax.random.PRNGKey(0), "label_dropout": jax.random.PRNGKey(1)}
    for kw in (dict(), dict(train=True, rngs=rngs)):
        (out, aux), (ref, ref_aux) = (jax.jit(functools.partial(m.apply, **kw))(v, x, t, y)
                                      for m, v in ((scanned, stacked), (model, variables)))
        np.testing.assert_allclose(out, ref, **TOL)
        for k in ("head_masks", "group_masks", "token_masks"):
            np.testing.assert_array_equal(aux[k], ref_aux[k])

    def loss(m, p):
        return jnp.mean(m.apply({"params": p}, x, t, y, train=True, rngs=rngs)[0] ** 2)
    grads = jax.jit(jax.grad(lambda p: loss(scanned, p)))(stacked["params"])
    ref = convert.to_layout(jax.jit(jax.grad(lambda p: loss(model, p)))(variables["params"]),
                            True)
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-4)
    a = Engine(scanned, stacked, create_diffusion("ddim10"), sampler="ddim", **COARSE)
    b = Engine(model, variables, create_diffusion("ddim10"), sampler="ddim", **COARSE)
    np.testing.assert_allclose(a.forward(x, 3, y, 2.0), b.forward(x, 3, y, 2.0), **TOL)
    with pytest.raises(NotImplementedError, match="token_blocks"):
        Latte(**TINY, dynamic=True, scan_layers=True, token_blocks="spatial").init(
            jax.random.PRNGKey(0), *model.dummy_inputs(1))


def test_engine_with_tdlora_latte_equals_the_masked_path(latte):
    """DyDiT++ PEFT on video: TD-LoRA adapters on a dynamic Latte, merged per step by the
    engine (`Engine._merged` on its per-kind block stacks), equal the masked sampler on the
    PEFT model's merged weights, and the adapters change the samples."""
    from dydit_jax import peft
    from test_peft import sharp_adapters
    model, base = latte
    spec = peft.LoraSpec(method="tdlora", rank=2, experts=3)
    adapters = sharp_adapters(peft.init_adapters(base["params"], spec, jax.random.PRNGKey(2),
                                                 model.hidden_size))
    variables = {"params": peft.combine(base["params"], adapters)}
    ddim = create_diffusion("ddim5")
    labels = LABELS[:4]
    merged = peft.PeftModel(model, spec, mode="merged")
    kw = dict(sampler="ddim", clip_denoised=True)
    ref = np.asarray(make_sample_fn(merged, ddim, **kw)(variables, jax.random.PRNGKey(0),
                                                         labels, 3.0))
    plain = np.asarray(make_sample_fn(model, ddim, **kw)(base, jax.random.PRNGKey(0), labels,
                                                          3.0))
    assert np.abs(ref - plain).max() > 0.05, "the adapters matter"
    eng = Engine(model, variables, ddim, peft=spec, **kw, **COARSE)
    np.testing.assert_allclose(eng.sample(jax.random.PRNGKey(0), labels, 3.0), ref, **TOL)
