"""Parity of dydit_jax.transport with SiT's flow-matching ``transport/`` (tests/data/sit).

Golden arrays (willisma/SiT @ 947f95b, torchdiffeq 0.2.5; see the golden README-extra ``sit/``)
are NCHW; the package is NHWC. Random draws (x0, t, label dropout, SDE noise) are injected
from the saved ones. Tolerances: 1e-5 abs and rel everywhere, except the Linear noise/score ODE
runs whose values reach ~3.5e3 through the 1/sigma factor (rtol 1e-5, atol 2e-3; the
reference's own float32-vs-float64 gap there is 7.4e-4).
"""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DATA, load_npz
from test_dit import TINY
from dydit_jax import convert
from dydit_jax.models.sit import SiT
from dydit_jax.transport import (DIFFUSION_FORMS, ModelType, PathType, Sampler, WeightType,
                                 create_transport, time_grid)
from dydit_jax.transport.integrators import integrate_fixed_grid
from dydit_jax.transport.utils import step_noise

TOL = dict(atol=1e-5, rtol=1e-5)
CONFIG = json.loads((DATA / "sit" / "config.json").read_text())
PATHS = ("Linear", "GVP", "VP")
FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing")


def nhwc(a):
    """NCHW -> NHWC (also [S, B, C, H, W] -> [S, B, H, W, C])."""
    a = np.asarray(a)
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a.transpose(0, 1, 3, 4, 2)


@pytest.fixture(scope="module")
def io():
    return load_npz("sit", "io.npz")


@pytest.fixture(scope="module")
def sit():
    model = SiT(**TINY)
    variables = convert.from_pytorch(DATA / "dit_s" / "model.pt", model)
    # One compiled forward for the many eager calls (all batches here have 4 rows).
    fwd = jax.jit(lambda x, t, y: model.apply(variables, x, t, y))
    cfg = jax.jit(lambda x, t, y, cfg_scale: model.apply(variables, x, t, y, cfg_scale,
                                                         method=model.forward_with_cfg))
    return model, variables, fwd, cfg


# ---------------------------------------------------------------------------------------------
# create_transport, intervals
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tag", sorted(CONFIG["loss_configs"]))
def test_create_transport_eps_and_training_interval(tag, io):
    c = CONFIG["loss_configs"][tag]
    tr = create_transport(c["path_type"], c["prediction"], c["loss_weight"])
    assert tr.train_eps == c["train_eps"] and tr.sample_eps == c["sample_eps"]
    t0, t1 = tr.check_interval(tr.train_eps, tr.sample_eps)
    np.testing.assert_allclose([t0, t1], c["t_interval"], rtol=1e-12, atol=0)
    t = io[f"loss_{tag}_t"]
    assert np.all(t >= t0) and np.all(t <= t1)


def test_check_interval_cases():
    lin_v = create_transport("Linear", "velocity")
    assert lin_v.check_interval(0, 0, eval=True) == (0, 1)
    assert lin_v.check_interval(0, 0, eval=True, reverse=True) == (1, 0)
    assert lin_v.check_interval(0, 0, sde=True, eval=True, diffusion_form="sigma",
                                last_step_size=0.04) == (0, 0.96)
    lin_n = create_transport("Linear", "noise")
    assert lin_n.check_interval(1e-3, 1e-3, eval=True) == (1e-3, 1 - 1e-3)
    assert lin_n.check_interval(1e-3, 1e-3, eval=True, sde=True, last_step_size=0.04) == (
        1e-3, 0.96)
    vp = create_transport("VP", "velocity")
    assert vp.check_interval(vp.train_eps, vp.sample_eps) == (0, 1 - 1e-5)
    assert vp.check_interval(vp.train_eps, vp.sample_eps, eval=True) == (0, 1 - 1e-3)
    # Given eps are kept; velocity on Linear/GVP always uses 0 (as the reference).
    assert create_transport("GVP", "score", train_eps=0.01, sample_eps=0.02).sample_eps == 0.02
    assert create_transport("Linear", "velocity", train_eps=0.5).train_eps == 0
    tr = create_transport("GVP", "score", "likelihood")
    assert (tr.path_type, tr.model_type, tr.loss_type) == (
        PathType.GVP, ModelType.SCORE, WeightType.LIKELIHOOD)
    with pytest.raises(ValueError):
        create_transport("Cosine")


# ---------------------------------------------------------------------------------------------
# Paths and conversions
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", PATHS)
def test_path_quantities(p, io):
    ps = create_transport(p).path_sampler
    t = jnp.asarray(io["path_t"])
    got = {}
    got["alpha_t"], got["d_alpha_t"] = ps.compute_alpha_t(t)
    got["sigma_t"], got["d_sigma_t"] = ps.compute_sigma_t(t)
    got["d_alpha_alpha_ratio_t"] = ps.compute_d_alpha_alpha_ratio_t(t)
    x = jnp.ones_like(t)
    got["drift_mean_coef"], got["drift_var"] = ps.compute_drift(x, t)
    for form in FORMS + ("inccreasing-decreasing",):
        got[f"diffusion_{form}"] = ps.compute_diffusion(x, t, form=form)
    np.testing.assert_array_equal(ps.compute_diffusion(x, t, form="increasing-decreasing"),
                                  got["diffusion_inccreasing-decreasing"])
    for k, v in got.items():
        want = io[f"path_{p}_{k}"]
        v = np.broadcast_to(np.asarray(v, np.float32), want.shape)
        # The endpoints are inf where the reference's are (1/t at 0, VP's d_sigma at 1).
        np.testing.assert_array_equal(np.isinf(v), np.isinf(want), err_msg=k)
        np.testing.assert_allclose(v, want, rtol=1e-5, atol=1e-6, err_msg=k)
    with pytest.raises(NotImplementedError):
        ps.compute_diffusion(x, t, form="cubic")


@pytest.mark.parametrize("p", PATHS)
def test_conversions_and_plan(p, io):
    ps = create_transport(p).path_sampler
    x, v, t = nhwc(io["conv_x"]), nhwc(io["conv_v"]), io["conv_t"]
    want = lambda k: nhwc(io[f"conv_{p}_{k}"])  # noqa: E731
    np.testing.assert_allclose(ps.get_score_from_velocity(v, x, t),
                               want("score_from_velocity"), **TOL)
    np.testing.assert_allclose(ps.get_noise_from_velocity(v, x, t),
                               want("noise_from_velocity"), **TOL)
    np.testing.assert_allclose(ps.get_velocity_from_score(v, x, t),
                               want("velocity_from_score"), **TOL)
    t_out, xt, ut = ps.plan(t, v, x)  # x0 = conv_v (noise), x1 = conv_x (data)
    np.testing.assert_array_equal(t_out, t)
    np.testing.assert_allclose(xt, want("plan_xt"), **TOL)
    np.testing.assert_allclose(ut, want("plan_ut"), **TOL)


# ---------------------------------------------------------------------------------------------
# Training losses
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tag", sorted(CONFIG["loss_configs"]))
def test_training_losses_match_reference(tag, io, sit):
    c = CONFIG["loss_configs"][tag]
    tr = create_transport(c["path_type"], c["prediction"], c["loss_weight"])
    fwd = sit[2]
    terms = tr.training_losses(fwd, nhwc(io["loss_x1"]), dict(y=io["loss_y"]),
                               x0=nhwc(io[f"loss_{tag}_x0"]), t=io[f"loss_{tag}_t"])
    for k in ("xt", "ut", "pred"):
        np.testing.assert_allclose(terms[k], nhwc(io[f"loss_{tag}_{k}"]), **TOL, err_msg=k)
    np.testing.assert_allclose(terms["loss"], io[f"loss_{tag}_loss"], **TOL)


def test_train_mode_loss_with_label_dropout(io, sit):
    model, variables = sit[:2]
    dropped = io["train_label_dropped"].astype(np.int32)
    np.testing.assert_array_equal(np.where(dropped == 1, 10, io["loss_y"]),
                                  io["train_y_effective"])

    @jax.jit
    def model_fn(x, t, y):
        return model.apply(variables, x, t, y, train=True, force_drop_ids=dropped)

    tr = create_transport("Linear", "velocity")
    terms = tr.training_losses(model_fn, nhwc(io["loss_x1"]), dict(y=io["loss_y"]),
                               x0=nhwc(io["train_x0"]), t=io["train_t"])
    for k in ("xt", "ut", "pred"):
        np.testing.assert_allclose(terms[k], nhwc(io[f"train_{k}"]), **TOL, err_msg=k)
    np.testing.assert_allclose(terms["loss"], io["train_loss"], **TOL)


def test_training_losses_random_draws_jit_and_grad():
    x1 = jax.random.normal(jax.random.PRNGKey(0), (4, 4, 4, 2))
    y = jnp.arange(4)
    tr = create_transport("VP", "noise", "likelihood")

    @jax.jit
    def loss(params, rng):
        def model_fn(x, t, y):
            out = params["w"] * x + params["b"] * (t + y)[:, None, None, None]
            return out, {"aux": jnp.ones(())}  # a (out, extra) model, as dynamic ones return

        terms = tr.training_losses(model_fn, x1, dict(y=y), rng=rng)
        return terms["loss"].mean(), terms

    params = {"w": jnp.ones(()), "b": jnp.full((), 0.1)}
    (value, terms), grads = jax.value_and_grad(loss, has_aux=True)(params, jax.random.PRNGKey(3))
    assert np.isfinite(value) and "extra" in terms
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    t0, t1 = tr.check_interval(tr.train_eps, tr.sample_eps)
    assert np.all(terms["t"] >= t0) and np.all(terms["t"] < t1)
    # x0 and t come from rng split in two: noise first, then time.
    k0, kt = jax.random.split(jax.random.PRNGKey(3))
    np.testing.assert_array_equal(terms["x0"], jax.random.normal(k0, x1.shape))
    np.testing.assert_array_equal(terms["t"], tr.sample_t(kt, 4))
    with pytest.raises(ValueError, match="rng"):
        tr.training_losses(lambda x, t, y: x, x1, dict(y=y))
    with pytest.raises(ValueError, match="must match"):
        tr.training_losses(lambda x, t, y: jnp.concatenate([x, x], -1), x1, dict(y=y),
                           rng=jax.random.PRNGKey(0))


# ---------------------------------------------------------------------------------------------
# ODE sampling
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tag", list(CONFIG["ode_runs"]))
def test_ode_runs_match_reference(tag, io, sit):
    r = CONFIG["ode_runs"][tag]
    fwd, cfg = sit[2], sit[3]
    tr = create_transport(r["path_type"], r["prediction"])
    sample = Sampler(tr).sample_ode(sampling_method=r["sampling_method"],
                                    num_steps=r["num_steps"], reverse=r["reverse"])
    grid = sample.time_grid()
    np.testing.assert_array_equal(grid, io[f"ode_{tag}_t"])  # torch.linspace bit for bit
    assert (float(grid[0]), float(grid[-1])) == (np.float32(r["t0"]), np.float32(r["t1"]))
    if r["model_fn"] == "forward_with_cfg":
        xs = sample(nhwc(io["ode_cfg_z"]), cfg, y=io["ode_cfg_y"], cfg_scale=CONFIG["cfg_scale"])
    elif r["reverse"]:
        xs = sample(nhwc(io["loss_x1"]), fwd, y=io["ode_y"])
    else:
        xs = sample(nhwc(io["ode_z"]), fwd, y=io["ode_y"])
    want = nhwc(io[f"ode_{tag}_xs"])
    assert xs.shape == want.shape == (r["num_steps"], 4, 8, 8, 4)
    tol = TOL if r["prediction"] == "velocity" else dict(rtol=1e-5, atol=2e-3)
    np.testing.assert_allclose(xs, want, **tol)


def test_fixed_grid_solvers_compile_once_and_use_the_grid():
    traces = []

    def model(x, t, y):
        traces.append(1)
        return -x * t[:, None, None, None]  # dx/dt = -t x  ->  x(t) = x0 exp(-t^2 / 2)

    tr = create_transport("Linear", "velocity")
    z = jnp.ones((2, 4, 4, 1))
    exact = np.exp(-np.linspace(0, 1, 101) ** 2 / 2)
    errs = {}
    for method, evals in (("euler", 1), ("midpoint", 2), ("heun2", 2), ("heun3", 3), ("rk4", 4)):
        traces.clear()
        xs = Sampler(tr).sample_ode(sampling_method=method, num_steps=101)(z, model, y=None)
        assert len(traces) == evals, (method, len(traces))  # one trace of the body: lax.scan
        errs[method] = float(np.abs(np.asarray(xs)[:, 0, 0, 0, 0] - exact).max())
    assert errs["euler"] < 3e-3
    assert max(errs["rk4"], errs["heun3"]) < 1e-6 < errs["heun2"] < 1e-4 < errs["euler"]
    assert errs["midpoint"] < 1e-4
    with pytest.raises(NotImplementedError):
        Sampler(tr).sample_ode(sampling_method="leapfrog")


def _gaussian_velocity(x, t, **_):
    """Exact Linear-path velocity when the data is N(0, I) too: ((2t - 1) / s(t)) x with
    s(t) = t^2 + (1 - t)^2; the flow is x(t) = x(0) sqrt(s(t))."""
    t = t[:, None, None, None]
    return (2 * t - 1) / (t ** 2 + (1 - t) ** 2) * x


def test_adaptive_ode_through_diffrax_forward_and_reverse():
    tr = create_transport("Linear", "velocity")
    z = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2))
    samples = [Sampler(tr).sample_ode(sampling_method="dopri5", num_steps=7, atol=1e-7,
                                      rtol=1e-6, reverse=reverse) for reverse in (False, True)]
    xs_all = jax.jit(lambda z: [f(z, _gaussian_velocity) for f in samples])(z)
    s = lambda t: np.sqrt(t ** 2 + (1 - t) ** 2)  # noqa: E731
    for reverse, sample, xs in zip((False, True), samples, xs_all):
        grid = sample.time_grid()
        np.testing.assert_array_equal(grid, time_grid(1, 0, 7) if reverse else time_grid(0, 1, 7))
        exact = np.asarray(z)[None] * (s(grid) / s(grid[0]))[:, None, None, None, None]
        np.testing.assert_allclose(xs, exact, atol=2e-5, rtol=1e-5, err_msg=f"reverse={reverse}")
        np.testing.assert_array_equal(xs[0], z)


def test_likelihood_of_gaussian_data_is_exact():
    # With N(0, I) data the flow maps N(0, I) to itself, so log p(x) = log N(x; 0, I); the
    # divergence is linear in x, so Hutchinson's estimate is exact for any Rademacher probe.
    tr = create_transport("Linear", "velocity")
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 2))
    fn = Sampler(tr).sample_ode_likelihood(sampling_method="dopri5", num_steps=2, atol=1e-7,
                                           rtol=1e-6)
    logp, z = jax.jit(lambda x: fn(x, _gaussian_velocity, rng=jax.random.PRNGKey(2)))(x)
    want = -0.5 * np.sum(np.asarray(x).reshape(3, -1) ** 2, -1) - 16 * math.log(2 * math.pi)
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(z, x, atol=1e-5)  # s(0) = s(1)


# ---------------------------------------------------------------------------------------------
# SDE pieces and sampling
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", ["Linear", "GVP"])
@pytest.mark.parametrize("pred", ["velocity", "noise", "score"])
def test_sde_functions_match_reference(p, pred, io, sit):
    fwd = sit[2]
    sampler = Sampler(create_transport(p, pred))
    x, t, kw = nhwc(io["sdefn_x"]), io["sdefn_t"], dict(y=io["sdefn_y"])
    key = f"sdefn_{p}_{pred}"
    np.testing.assert_allclose(sampler.drift(x, t, fwd, **kw), nhwc(io[f"{key}_ode_drift"]),
                               **TOL)
    np.testing.assert_allclose(sampler.score(x, t, fwd, **kw), nhwc(io[f"{key}_score"]), **TOL)
    for form in FORMS:
        sde_drift, diffusion = sampler.get_sde_diffusion_and_drift(diffusion_form=form)
        np.testing.assert_allclose(sde_drift(x, t, fwd, **kw), nhwc(io[f"{key}_{form}_drift"]),
                                   **TOL, err_msg=form)
        d = diffusion(x, t)
        assert d.shape == (4, 1, 1, 1)
        np.testing.assert_allclose(d.reshape(-1), io[f"{key}_{form}_diffusion"], **TOL,
                                   err_msg=form)


@pytest.mark.parametrize("tag", [k for k, r in CONFIG["sde_runs"].items() if r["all_finite"]])
def test_sde_runs_match_reference(tag, io, sit):
    r = CONFIG["sde_runs"][tag]
    fwd = sit[2]
    sample = Sampler(create_transport(tag.split("_")[0], "velocity")).sample_sde(
        sampling_method=r["sampling_method"], diffusion_form=r["diffusion_form"],
        diffusion_norm=r["diffusion_norm"], last_step=r["last_step"],
        last_step_size=r["last_step_size"], num_steps=r["num_steps"])
    np.testing.assert_array_equal(sample.time_grid(), io[f"sde_{tag}_t"])
    xs = sample(nhwc(io["ode_z"]), fwd, noise=nhwc(io[f"sde_{tag}_w"]), y=io["ode_y"])
    want = nhwc(io[f"sde_{tag}_xs"])
    assert xs.shape == want.shape == (5, 4, 8, 8, 4)  # 4 stochastic steps + the mean step
    np.testing.assert_allclose(xs, want, **TOL)


def test_sde_sbdm_with_velocity_model_is_nonfinite_as_the_reference(io):
    # The reference's default diffusion_form "SBDM" divides by t = 0 for velocity models (its
    # golden runs were not saved: NaN/inf); any velocity model shows it.
    assert not CONFIG["sde_runs"]["Linear_velocity_Euler_SBDM"]["all_finite"]
    sample = Sampler(create_transport("Linear", "velocity")).sample_sde(num_steps=5)
    xs = sample(nhwc(io["ode_z"]), _toy_velocity,
                noise=nhwc(io["sde_Linear_velocity_Euler_sigma_w"]))
    assert not np.all(np.isfinite(xs))


def _toy_velocity(x, t, y=None):
    return -x * (1 + t[:, None, None, None]) + 0.5


def test_sde_rng_draws_and_last_steps():
    sampler = Sampler(create_transport("GVP", "velocity"))
    z = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
    rng = jax.random.PRNGKey(7)
    kw = dict(sampling_method="Heun", diffusion_form="linear", num_steps=6)
    samples = {str(k): sampler.sample_sde(last_step=k, **kw)
               for k in ("Mean", "Euler", "Tweedie", None)}
    sde_drift, _ = sampler.get_sde_diffusion_and_drift(diffusion_form="linear")
    t1 = jnp.full((2,), samples["Mean"].time_grid()[-1])
    assert float(t1[0]) == np.float32(0.96)
    a, s = np.sin(np.float32(0.96) * np.pi / 2), np.cos(np.float32(0.96) * np.pi / 2)

    @jax.jit  # one compile for the whole check
    def run(z, rng):
        noise = jnp.stack([step_noise(rng, i, z.shape) for i in range(5)])
        out = {k: f(z, _toy_velocity, noise=noise) for k, f in samples.items()}
        out["rng"] = samples["Mean"](z, _toy_velocity, rng=rng)
        x = out["Mean"][-2]
        want = {"Mean": x + sde_drift(x, t1, _toy_velocity) * 0.04,
                "Euler": x + sampler.drift(x, t1, _toy_velocity) * 0.04,
                "Tweedie": x / a + s ** 2 / a * sampler.score(x, t1, _toy_velocity)}
        return out, want

    out, want = run(z, rng)
    np.testing.assert_allclose(out["rng"], out["Mean"], atol=1e-6, rtol=1e-6)
    for k in ("Mean", "Euler", "Tweedie"):
        np.testing.assert_allclose(out[k][:-1], out["Mean"][:-1], atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(out[k][-1], want[k], atol=1e-5, rtol=1e-5, err_msg=k)
    # No last step: the grid runs to 1 - sample_eps = 1 and the last entry repeats.
    assert samples["None"].time_grid()[-1] == 1.0
    np.testing.assert_array_equal(out["None"][-1], out["None"][-2])
    with pytest.raises(ValueError, match="rng"):
        samples["Mean"](z, _toy_velocity)
    with pytest.raises(NotImplementedError):
        sampler.sample_sde(last_step="Median", **kw)


def test_sde_constant_diffusion_and_euler_maruyama_by_hand():
    tr = create_transport("Linear", "noise")
    sampler = Sampler(tr)
    sample = sampler.sample_sde(sampling_method="Euler", diffusion_form="constant",
                                diffusion_norm=0.5, last_step="Euler", num_steps=4)
    z = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 2, 1))
    w = jax.random.normal(jax.random.PRNGKey(1), (3,) + z.shape)
    xs = sample(z, _toy_velocity, noise=w)
    grid = sample.time_grid()
    np.testing.assert_array_equal(grid, time_grid(1e-3, 0.96, 4))  # noise model: t0 = eps
    sde_drift, diffusion = sampler.get_sde_diffusion_and_drift(diffusion_form="constant",
                                                               diffusion_norm=0.5)
    x, dt = z, grid[1] - grid[0]
    for i in range(3):
        t = jnp.full((2,), grid[i])
        x = x + sde_drift(x, t, _toy_velocity) * dt + jnp.sqrt(2 * diffusion(x, t)) * (
            w[i] * np.sqrt(dt))
        np.testing.assert_allclose(xs[i], x, atol=1e-5, rtol=1e-5)


def test_time_grid_is_torch_linspace():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    cases = [(0, 1, 5), (1e-3, 1 - 1e-3, 250), (1, 0, 50), (0, 0.96, 250), (0.999, 0.001, 7)]
    cases += [(float(a), float(b), int(n)) for a, b, n in
              zip(rng.random(40), rng.random(40), rng.integers(2, 400, 40))]
    for a, b, n in cases:
        np.testing.assert_array_equal(time_grid(a, b, n), torch.linspace(a, b, n).numpy(),
                                      err_msg=str((a, b, n)))


def test_integrate_fixed_grid_pytree_state():
    ts = time_grid(0, 1, 3)
    f = lambda t, y: (y[0] * 0 + 1, y[1] * 0 + 2)  # noqa: E731
    from dydit_jax.transport.integrators import _heun2
    ys = integrate_fixed_grid(_heun2, f, (jnp.zeros(2), jnp.zeros(())), ts)
    np.testing.assert_allclose(ys[0][:, 0], [0, 0.5, 1])
    np.testing.assert_allclose(ys[1], [0, 1, 2])


def test_diffusion_forms_listed():
    assert set(FORMS) < set(DIFFUSION_FORMS)
    assert {"increasing-decreasing", "inccreasing-decreasing"} < set(DIFFUSION_FORMS)

