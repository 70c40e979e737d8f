"""The FLUX engine (`engine.flux`): routed DyFLUX equal to the masked path, one executable per
sampling run, and the FLUX MACs counter.

Tolerance 1e-5 (float32): the engine's matmuls run on gathered rows (other shapes, other
summation blocking), so its outputs differ from the masked path's by float rounding only;
the token masks themselves are decided on the same logits (equal counts are checked).
"""
import jax
import numpy as np
import pytest

from conftest import DATA, load_npz
from dydit_jax import convert, flops, flux_sampling
from dydit_jax.engine.flux import FluxEngine
from dydit_jax.models import FLUX
from dydit_jax.models.flux import image_ids
from test_flux import dyflux_inputs, dyflux_model

TOL = dict(atol=1e-5, rtol=1e-5)
# A coarse bucket grid for the random models: fewer branches to compile, the same choice rule
# (the default sixteenths run on the released model).
QUARTERS = (0.25, 0.5, 0.75)


@pytest.fixture(scope="module")
def released():
    model = dyflux_model()
    return model, convert.from_pytorch(DATA / "dyflux" / "transformer_0.pt", model)


# The default sixteenths (kept counts fall between buckets) and the full capacity alone (no
# gather).
@pytest.mark.parametrize("capacities", [None, (1.0,)])
def test_engine_equals_the_masked_release_model(released, capacities):
    model, variables = released
    io = load_npz("dyflux", "io.npz")
    masked, aux = model.apply(variables, *dyflux_inputs(io))
    out, kept = FluxEngine(model, variables, capacities).forward(*dyflux_inputs(io))
    np.testing.assert_allclose(out, masked, **TOL)
    np.testing.assert_array_equal(kept, np.asarray(aux["token_masks"]).sum(axis=2))
    np.testing.assert_array_equal(kept, io["token_masks"].sum(axis=2))


def calibrated(keep: float, seed: int = 0, depth=2, single=3, hidden=64, heads=4,
               n_img=64, n_txt=16, batch=2, dynamic_width=False):
    """A random DyFLUX whose router biases keep about `keep` of the image tokens per block:
    each block's threshold is the midpoint between two consecutive sorted logits of the given
    inputs near the (1 - keep) quantile (so no logit sits within float error of the
    threshold and both paths route alike). `dynamic_width`: with TDW routers of bias 0 (about
    half the heads and groups on, differently per t)."""
    model = FLUX(in_channels=16, vec_in_dim=24, context_in_dim=20, hidden_size=hidden,
                 num_heads=heads, depth=depth, depth_single_blocks=single,
                 axes_dim=(4, 6, 6), dynamic=True, dynamic_width=dynamic_width,
                 width_bias_init=0.0)
    rng = np.random.default_rng(seed)
    side = int(np.sqrt(n_img)) * 2
    inputs = (rng.standard_normal((batch, n_img, 16)).astype(np.float32),
              image_ids(batch, side, side),
              rng.standard_normal((batch, n_txt, 20)).astype(np.float32),
              np.zeros((batch, n_txt, 3), np.float32),
              np.asarray([0.9, 0.3][:batch], np.float32),
              rng.standard_normal((batch, 24)).astype(np.float32),
              np.full((batch,), 3.5, np.float32))
    # FLUX's init is xavier everywhere (no zero-initialised gates): outputs are not trivial.
    params = model.init(jax.random.PRNGKey(seed), *inputs)["params"]
    for i in range(model.num_blocks):
        logits = model.apply({"params": params}, *inputs)[1]["token_logits"][i]
        name = (f"double_blocks_{i}" if i < depth else f"single_blocks_{i - depth}")
        z = np.sort(np.asarray(logits).reshape(-1))
        cut = int(round((1 - keep) * z.size))
        threshold = float(z[cut - 1] + z[cut]) / 2
        bias = params[name]["token_router"]["router"]["bias"]
        params[name]["token_router"]["router"]["bias"] = bias - threshold
    return model, {"params": params}, inputs


def test_engine_equals_masked_on_a_half_kept_model():
    model, variables, inputs = calibrated(0.5)
    masked, aux = model.apply(variables, *inputs)
    ratio = float(np.asarray(aux["token_masks"]).mean())
    assert 0.35 < ratio < 0.65, ratio
    eng = FluxEngine(model, variables, QUARTERS)
    out, kept = eng.forward(*inputs)
    np.testing.assert_allclose(out, masked, **TOL)
    np.testing.assert_array_equal(kept, np.asarray(aux["token_masks"]).sum(axis=2))
    # 6 rows (> engine.flux.PER_SAMPLE_MAX_ROWS): single blocks share one capacity bucket.
    big = tuple(np.concatenate([a] * 3) for a in inputs)
    big_masked, big_aux = model.apply(variables, *big)
    np.testing.assert_allclose(eng.forward(*big)[0], big_masked, **TOL)
    # The counter: fewer MACs than the static model, the routers counted.
    per_sample = np.asarray(kept).mean(axis=1)
    r = flops.flux_macs_ratio(model, 64, 16, per_sample)
    assert 0.5 < r < 0.9, r
    full = flops.flux_macs(model, 64, 16, [64] * model.num_blocks)
    static = flops.flux_macs(model, 64, 16)
    assert full["total"] - static["total"] == full["routers"] > 0


def test_denoise_equals_the_masked_sampler_and_compiles_once():
    model, variables, inputs = calibrated(0.5, seed=1)
    img, ids, txt, txt_ids, _, vec, _ = inputs
    schedule = flux_sampling.get_schedule(3, img.shape[1])
    masked = jax.jit(lambda v, x, ts: flux_sampling.denoise(model, v, x, ids, txt, txt_ids, vec,
                                                            ts, guidance=3.5))(
        variables, img, schedule)
    eng = FluxEngine(model, variables, QUARTERS)
    out, kept = eng.denoise(img, ids, txt, txt_ids, vec, schedule, guidance=3.5)
    np.testing.assert_allclose(out, masked, atol=2e-5, rtol=2e-5)   # 3 steps of 1e-5 each
    assert kept.shape == (3, model.num_blocks, img.shape[0])
    assert (np.asarray(kept) < img.shape[1]).any()
    # Another schedule of the same length and another guidance: the same executable.
    eng.denoise(img, ids, txt, txt_ids, vec, flux_sampling.get_schedule(3, 4096), guidance=1.0)
    assert eng.compile_count == 1
    # True CFG: the negative prompt rides in the same batch, as the masked sampler's second pass.
    neg_txt, neg_vec = txt[::-1], vec[::-1]
    masked = jax.jit(lambda v, x, ts: flux_sampling.denoise(
        model, v, x, ids, txt, txt_ids, vec, ts, guidance=3.5, true_cfg=3.0, neg_txt=neg_txt,
        neg_txt_ids=txt_ids, neg_vec=neg_vec))(variables, img, schedule)
    out, kept = eng.denoise(img, ids, txt, txt_ids, vec, schedule, guidance=3.5, true_cfg=3.0,
                            neg_txt=neg_txt, neg_txt_ids=txt_ids, neg_vec=neg_vec)
    # 3 steps, each amplifying the two passes' 1e-5 differences by the guidance scale 3.
    np.testing.assert_allclose(out, masked, atol=1e-4, rtol=1e-4)
    assert kept.shape == (3, model.num_blocks, 2 * img.shape[0]) and eng.compile_count == 2


def test_engine_refuses_a_static_model():
    model = FLUX(in_channels=16, vec_in_dim=8, context_in_dim=8, hidden_size=32, num_heads=2,
                 depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6))
    v = model.init(jax.random.PRNGKey(0), *model.dummy_inputs())
    with pytest.raises(ValueError, match="dynamic FLUX"):
        FluxEngine(model, v)
    with pytest.raises(ValueError, match="token capacity"):
        FluxEngine(dyflux_model(), None, token_capacities=(0.0,))


def test_static_counter_equals_the_jaxpr_count():
    model = dyflux_model(dynamic=False)
    z = model.dummy_inputs(1, image_tokens=48, text_tokens=7)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *z))
    counted = flops.jaxpr_macs(lambda v, *a: model.apply(v, *a), shapes, *z)
    assert flops.flux_macs(model, 48, 7)["total"] == counted
    with pytest.raises(ValueError, match="one count per block"):
        flops.flux_macs(model, 48, 7, kept=[1, 2])
