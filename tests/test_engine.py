"""The dynamic inference engine (dydit_jax.engine): width plans, gathered blocks, executables.

Exactness: the gathered engine equals the masked path (`model.apply(..., complete=False)`, eval)
at float32 atol = rtol = 1e-5, single forward passes and whole sampling runs, for exact and
coarse bucket grids, SDT on and off, with CFG, on 1 and 8 devices. The tiny DyDiT of
tests/data/dydit_s switches about half of its heads, groups and tokens off, differently at
almost every timestep (102 distinct per-step width signatures in 250 DDPM steps).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DATA, CompileCounter, run_python
from dydit_jax import convert, flops
from dydit_jax.diffusion import create_diffusion
from dydit_jax.engine import Engine, WidthPlan, bucket_sizes, get_plan
from dydit_jax.engine import gathered
from dydit_jax.models import DiT
from dydit_jax.sampling import make_sample_fn
from test_dit import TINY

TOL = dict(atol=1e-5, rtol=1e-5)
PT = DATA / "dydit_s" / "model.pt"
LABELS = np.array([1, 7, 3, 9, 0, 2, 5, 8])  # divisible by 8 devices
COARSE = (0.5,)  # widths {2, 4} of the 4 heads / groups


def without_token_router(variables):
    """The DyDiT checkpoint's parameters for `DiT(dynamic_tokens=False)`."""
    return {"params": {k: ({n: p for n, p in v.items() if n != "token_router"}
                           if k.startswith("blocks") else v)
                       for k, v in variables["params"].items()}}


@pytest.fixture(scope="module")
def dydit():
    model = DiT(**TINY, dynamic=True)
    return model, convert.from_pytorch(PT, model)


@pytest.fixture(scope="module")
def dydit_no_tokens(dydit):
    return DiT(**TINY, dynamic=True, dynamic_tokens=False), without_token_router(dydit[1])


@pytest.fixture(scope="module")
def ddim10():
    return create_diffusion("ddim10")


@pytest.fixture(scope="module")
def ddpm25():
    return create_diffusion("25")


# ----------------------------------------------------------------------------------------------
# Width plans and buckets
# ----------------------------------------------------------------------------------------------

def test_bucket_grids_orders_and_padding(dydit, ddim10):
    model, variables = dydit
    assert bucket_sizes("exact", 16) == tuple(range(1, 17))
    assert bucket_sizes((0.25, 0.5, 0.75, 1.0), 16) == (4, 8, 12, 16)
    assert bucket_sizes((0.3,), 10) == (3, 10) and bucket_sizes((0.01,), 6) == (1, 6)
    with pytest.raises(ValueError, match="exact"):
        bucket_sizes("coarse", 4)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        bucket_sizes((1.5,), 4)
    plan = WidthPlan.build(model, variables, ddim10)
    for grid in ("exact", COARSE):
        b = plan.bucketize(grid)
        np.testing.assert_array_equal(b.head_count, plan.head_counts)
        assert (b.head_width >= b.head_count).all() and (b.group_width >= b.group_count).all()
        for s in range(plan.num_steps):
            for l in range(plan.depth):
                for order, masks, count in ((b.head_order, plan.head_masks, b.head_count),
                                            (b.group_order, plan.group_masks, b.group_count)):
                    o, n = order[s, l], count[s, l]
                    assert sorted(o) == list(range(4))  # a permutation: padded slots are real
                    np.testing.assert_array_equal(o[:n], np.flatnonzero(masks[s, l]))
    assert set(np.asarray(plan.bucketize(COARSE).head_width).ravel()) <= {2, 4}


def test_plan_save_load_cache_and_checks(dydit, ddim10, tmp_path):
    model, variables = dydit
    plan = WidthPlan.build(model, variables, ddim10)
    loaded = WidthPlan.load(plan.save(tmp_path / "width_plan"))
    for name in ("timesteps", "head_masks", "group_masks"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(plan, name))
    assert loaded.fingerprint == plan.fingerprint and loaded.schedule == plan.schedule
    loaded.check(model, variables, ddim10)
    with pytest.raises(ValueError, match="schedule"):
        loaded.check(model, variables, create_diffusion("ddim5"))
    changed = jax.tree_util.tree_map(lambda a: a, variables)
    changed["params"]["blocks_1"]["head_router"]["bias"] = \
        changed["params"]["blocks_1"]["head_router"]["bias"] + 1.0
    with pytest.raises(ValueError, match="fingerprint"):
        loaded.check(model, changed, ddim10)
    # Cached per (parameters, schedule), in memory and beside a checkpoint. Built in memory
    # first (as another test or workdir of this process may have): the file is still written.
    cached = get_plan(model, variables, ddim10)
    assert get_plan(model, variables, ddim10, cache_dir=tmp_path / "ckpt") is cached
    assert get_plan(model, variables, ddim10, cache_dir=tmp_path / "ckpt") is cached
    files = list((tmp_path / "ckpt").glob("width_plan-*.npz"))
    assert len(files) == 1
    np.testing.assert_array_equal(WidthPlan.load(files[0]).group_masks, plan.group_masks)
    assert get_plan(model, changed, ddim10) is not cached


def test_macs_per_bucket_and_ratio(dydit, ddim10):
    model, variables = dydit
    eng = Engine(model, variables, ddim10, sampler="ddim", grid=COARSE)
    plan = eng.plan
    per_bucket = eng.bucket_macs()
    assert set(per_bucket) == set(eng.buckets.block_signatures())
    # jaxpr-counted MACs of what the engine compiles = our counter on the bucketed widths,
    # minus the width routers the engine never runs (all tokens through the MLP).
    routers = flops.dynamic_macs(model, 4, 4)["width_routers"]
    np.testing.assert_allclose(eng.step_macs(), plan.step_macs(model, COARSE) - routers)
    full = flops.dynamic_macs(model, 4, 4, include_routers=False)["total"]
    assert eng.step_macs().max() <= full
    exact = plan.macs_ratio(model)
    coarse = plan.macs_ratio(model, grid=COARSE)
    assert 0.4 < exact < coarse < 1.0
    # Token counts enter as measured: half the tokens through the MLP lowers the ratio.
    assert plan.macs_ratio(model, token_counts=8) < exact


# ----------------------------------------------------------------------------------------------
# Exactness: single forward passes
# ----------------------------------------------------------------------------------------------

def masked_forward(model, variables, x, t, labels, cfg_scale=None):
    """The masked path at several steps in one batch. x [S, n, ...], t [S] (one timestep per
    step), labels [n]. Without cfg_scale: `model.apply` on the S*n rows; with it: the guided
    conditional half of `forward_with_cfg` on rows [x; x], labels [y; null]. Returns
    (out [S, n, ...], aux with masks per row)."""
    s, n = x.shape[:2]
    x = x.reshape((s * n,) + x.shape[2:])
    t = jnp.repeat(jnp.asarray(t, jnp.int32), n)
    y = jnp.tile(jnp.asarray(labels, jnp.int32), s)
    if cfg_scale is None:
        out, aux = model.apply(variables, x, t, y)
    else:
        out, aux = model.apply(variables, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                               jnp.concatenate([y, jnp.full_like(y, model.num_classes)]),
                               cfg_scale, method=model.forward_with_cfg)
        out = out[: s * n]
    return out.reshape((s, n) + out.shape[1:]), aux


@pytest.fixture(scope="module")
def forward_refs(dydit, dydit_no_tokens, ddim10):
    """x [10, 8, 8, 8, 4] (one batch per DDIM-10 step) and the masked path's outputs for the
    variants "tokens+cfg", "tokens", "no_tokens+cfg" (computed on first use)."""
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(42), (10, 8, 8, 8, 4))
    t = ddim10.timestep_map
    refs = {}

    def get(variant):
        if variant not in refs:
            model, variables = dydit_no_tokens if variant.startswith("no_tokens") else dydit
            cfg = 4.0 if variant.endswith("+cfg") else None
            fn = jax.jit(lambda x, s: masked_forward(model, variables, x, t, LABELS, s))
            refs[variant] = jax.device_get(fn(x, cfg))
        return refs[variant]
    return np.asarray(x), get


def test_plan_masks_are_the_masked_paths_masks(dydit, ddim10, forward_refs):
    model, variables = dydit
    plan = WidthPlan.build(model, variables, ddim10)
    assert plan.head_masks.shape == (10, 2, 4) and plan.head_masks[..., 0].all()
    np.testing.assert_array_equal(plan.timesteps, ddim10.timestep_map)
    _, aux = forward_refs[1]("tokens")  # one row batch per step, rows [step, sample]
    for name, masks in (("head_masks", plan.head_masks), ("group_masks", plan.group_masks)):
        per_row = np.asarray(aux[name]).reshape(10, len(LABELS), 2, 4) > 0.5
        np.testing.assert_array_equal(per_row, np.broadcast_to(masks[:, None], per_row.shape))
    assert 0.3 < plan.head_masks.mean() < 0.9 and 0.3 < plan.group_masks.mean() < 0.9


@pytest.mark.parametrize("case", [
    dict(grid="exact", ref="tokens+cfg", executor="fused"),
    dict(grid=COARSE, ref="tokens", executor="fused", scan_layers=True),
    dict(grid=(0.25, 0.5, 0.75, 1.0), ref="no_tokens+cfg", executor="fused"),
    dict(grid=COARSE, ref="no_tokens+cfg", executor="blocks"),
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_forward_equals_masked_path(dydit, dydit_no_tokens, ddim10, forward_refs, case):
    model, variables = dydit_no_tokens if case["ref"].startswith("no_tokens") else dydit
    if case.get("scan_layers"):
        model = model.clone(scan_layers=True)
        variables = convert.from_pytorch(PT, model)
    use_cfg = case["ref"].endswith("+cfg")
    eng = Engine(model, variables, ddim10, sampler="ddim", grid=case["grid"], use_cfg=use_cfg,
                 executor=case["executor"], token_capacities=(0.5, 1.0))
    x, get_ref = forward_refs
    ref, _ = get_ref(case["ref"])
    for step in range(10):
        out = eng.forward(x[step], step, LABELS, cfg_scale=4.0)
        np.testing.assert_allclose(out, ref[step], **TOL, err_msg=f"step {step}")
    signatures = {eng.buckets.block_signature(s, l) for s in range(10) for l in range(2)}
    assert eng.compile_count == (1 if case["executor"] == "fused" else 2 + len(signatures))


def test_padded_slots_contribute_exactly_zero(dydit):
    """A bucket wider than the active count gathers real heads/groups for its padded slots and
    zeroes their proj / fc2 rows: the same output as the narrower exact bucket."""
    model, variables = dydit
    bp = variables["params"]["blocks_0"]
    order = jnp.array([0, 2, 1, 3], jnp.int32)
    h = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 64))
    for fn, params in ((gathered.gathered_attention, bp["attn"]),
                       (gathered.gathered_mlp, bp["mlp"])):
        narrow, wide = jax.jit(lambda p, h: [fn(model, p, h, order, 2, k) for k in (2, 4)])(
            params, h)
        # The padded slots add exact zeros, but the wider contraction may be summed in another
        # order (XLA blocks a dot by its length): a few float32 ulps of the output's scale.
        ulps = 4 * np.finfo(np.float32).eps * float(np.abs(narrow).max())
        np.testing.assert_allclose(wide, narrow, atol=ulps, rtol=0)


# ----------------------------------------------------------------------------------------------
# Exactness: whole sampling runs against the masked sampler
# ----------------------------------------------------------------------------------------------
# The tiny model has random weights: it predicts eps ~ 0, so unclipped pred_xstart, and with it
# the samples, grow to |x| ~ 600 (x_t / sqrt(alpha_bar)); float32 rounding differences of any two
# programs then reach ~2e-4 (the masked sampler itself differs that much between 1 and 8
# devices). Sampling tests therefore clip the predicted x0 to [-1, 1] (`clip_denoised=True`),
# which keeps every trajectory O(1) and makes atol = rtol = 1e-5 a meaningful check.

@pytest.fixture(scope="module")
def masked_ddpm25(dydit, ddpm25):
    """The masked sampler's DDPM-25 CFG samples (sampling.make_sample_fn), seed 0, scale 4."""
    model, variables = dydit
    sample = make_sample_fn(model, ddpm25, sampler="ddpm", clip_denoised=True)
    return np.asarray(sample(variables, jax.random.PRNGKey(0), LABELS, 4.0))


def test_ddpm_sampling_equals_masked_sampler(dydit, ddpm25, masked_ddpm25):
    model, variables = dydit
    eng = Engine(model, variables, ddpm25, sampler="ddpm", grid=COARSE, clip_denoised=True)
    x0, stats = eng.sample(jax.random.PRNGKey(0), LABELS, 4.0, return_stats=True)
    np.testing.assert_allclose(x0, masked_ddpm25, **TOL)
    assert (np.abs(masked_ddpm25) < 0.999).mean() > 0.5  # mostly not clipped
    assert stats["kept_tokens"].shape == (25, 2) and 0.2 < stats["token_fraction"].mean() < 0.8


def test_ddim_sampling_without_tokens_equals_masked_sampler(dydit_no_tokens, ddim10):
    model, variables = dydit_no_tokens
    ref = make_sample_fn(model, ddim10, sampler="ddim", eta=0.5, clip_denoised=True)(
        variables, jax.random.PRNGKey(3), LABELS, 2.5)
    eng = Engine(model, variables, ddim10, sampler="ddim", eta=0.5, grid=COARSE,
                 clip_denoised=True)
    np.testing.assert_allclose(eng.sample(jax.random.PRNGKey(3), LABELS, 2.5), ref, **TOL)


# ----------------------------------------------------------------------------------------------
# Compile counts
# ----------------------------------------------------------------------------------------------

def test_ddpm_250_steps_compiles_once_per_bucket_signature(dydit):
    """Counted, not timed: the fused executor compiles one executable for the whole run; the
    blocks executor one per block bucket signature in use plus init, embed, final+guidance
    and the diffusion update, all in `warmup`. Sampling runs after it, with new seeds, labels
    and CFG scales, compile nothing (no XLA compile at all, counted with jax.monitoring).
    Both executors give the same 250-step samples (the fused one equals the masked sampler
    on shorter runs, tested above)."""
    model, variables = dydit
    diffusion = create_diffusion("250")
    samples = {}
    for executor, grid in (("fused", "exact"), ("blocks", COARSE)):
        eng = Engine(model, variables, diffusion, sampler="ddpm", grid=grid, executor=executor,
                     token_capacities=(0.5, 1.0), clip_denoised=True)
        signatures = eng.buckets.block_signatures()
        compiled = eng.warmup(batch_size=len(LABELS))
        assert compiled == (1 if executor == "fused" else len(signatures) + 4)
        if executor == "blocks":
            assert sorted(k[2] for k in eng.cache.keys() if k[0] == "block") == list(signatures)
        with CompileCounter() as counter:
            samples[executor] = np.asarray(eng.sample(jax.random.PRNGKey(0), LABELS, 4.0))
            # a second run with a new seed, new labels and a new CFG scale
            jax.block_until_ready(eng.sample(jax.random.PRNGKey(1), LABELS[::-1], 1.5))
        assert counter.count == 0 and eng.compile_count == compiled, executor
    assert len(signatures) > 1 and np.isfinite(samples["fused"]).all()
    np.testing.assert_allclose(samples["blocks"], samples["fused"], **TOL)


# ----------------------------------------------------------------------------------------------
# 8 simulated devices
# ----------------------------------------------------------------------------------------------

def test_engine_on_a_mesh_of_8_devices(forward_refs, masked_ddpm25, tmp_path):
    """Batch split over 8 devices, parameters replicated: DDPM-25 samples and forward passes
    equal the masked path's (references computed here on one device). Also: the persistent
    compilation cache option (process-global, hence tested in this subprocess)."""
    x, get_ref = forward_refs
    np.savez(tmp_path / "refs.npz", x=x, ddpm25=masked_ddpm25,
             tokens_cfg=get_ref("tokens+cfg")[0], no_tokens_cfg=get_ref("no_tokens+cfg")[0])
    code = f"""
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from conftest import DATA
from dydit_jax import convert
from dydit_jax.diffusion import create_diffusion
from dydit_jax.engine import Engine
from dydit_jax.models import DiT
from test_dit import TINY
from test_engine import LABELS, TOL, without_token_router
assert jax.device_count() == 8
refs = np.load({str(tmp_path / "refs.npz")!r})
mesh = Mesh(np.array(jax.devices()), ("data",))
model = DiT(**TINY, dynamic=True)
variables = convert.from_pytorch(DATA / "dydit_s" / "model.pt", model)
cache_dir = {str(tmp_path / "xla_cache")!r}
eng = Engine(model, variables, create_diffusion("25"), sampler="ddpm", grid="exact", mesh=mesh,
             clip_denoised=True, token_capacities=(0.5, 1.0), compilation_cache_dir=cache_dir)
x0 = eng.sample(jax.random.PRNGKey(0), LABELS, 4.0)
assert x0.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 4), x0.sharding
np.testing.assert_allclose(x0, refs["ddpm25"], **TOL)
import os
assert os.listdir(cache_dir), "the persistent compilation cache stored nothing"
d = create_diffusion("ddim10")
no_tok = DiT(**TINY, dynamic=True, dynamic_tokens=False)
for m, v, ref, executor in ((model, variables, refs["tokens_cfg"], "fused"),
                            (no_tok, without_token_router(variables), refs["no_tokens_cfg"],
                             "blocks")):
    eng = Engine(m, v, d, sampler="ddim", grid=(0.5,), mesh=mesh, executor=executor,
                 token_capacities=(0.5, 1.0))
    for step in (0, 9)[: 2 if executor == "fused" else 1]:
        out = eng.forward(refs["x"][step], step, LABELS, 4.0)
        assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 4)
        np.testing.assert_allclose(out, ref[step], **TOL)
print("OK")
"""
    assert "OK" in run_python(code, devices=8).stdout
