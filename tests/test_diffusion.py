"""Parity of dydit_jax.diffusion with facebookresearch/DiT's diffusion (commit ed81ce2).

Golden arrays: tests/data/diffusion/diffusion.npz (NCHW; our package is NHWC, so images are
transposed with `nhwc`). The fake model functions below return the stored raw model outputs,
so these tests check the diffusion math only (the DiT forward is tested in the model tests).
The `s250_cfg_*` arrays are p_mean_variance applied to DiT.forward_with_cfg's output, which is
not stored here; they are deliberately not used in this file (CFG parity belongs to the model
tests, which can compute the CFG model output).

Tolerances. The README asks for atol = rtol = 1e-5 (float32 vs float64 reference differences
are <= 1.2e-6 on everything except pred_xstart). pred_xstart = a*x - b*eps with a, b up to ~157
reaches ~450, where one float32 ulp is 3e-5, so an absolute 1e-5 would be below float32
resolution there: for pred_xstart we use rtol=1e-5 and atol = 1e-5 * max|ref| (4.5e-3 here),
i.e. an error budget relative to the largest term of the cancellation, not of each element.
In practice the CPU results match the reference bit for bit on most arrays.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_npz
from dydit_jax.diffusion import (
    LossType,
    ModelMeanType,
    ModelVarType,
    create_diffusion,
    get_named_beta_schedule,
    loop_step_noise,
    space_timesteps,
    split_loop_key,
)

TOL = dict(atol=1e-5, rtol=1e-5)
SCHED_KEYS = [
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
]


def nhwc(a):
    return np.transpose(np.asarray(a), (0, 2, 3, 1))


@pytest.fixture(scope="module")
def g():
    return load_npz("diffusion", "diffusion.npz")


@pytest.fixture(scope="module")
def d1000():
    return create_diffusion("")


@pytest.fixture(scope="module")
def d250():
    return create_diffusion("250")


def fake_model(out_nchw, expected_t, seen):
    """A model_fn returning a stored raw output; records the timesteps it was called with."""
    out = jnp.asarray(nhwc(out_nchw))

    def model_fn(x, t, **kwargs):
        assert x.shape == out.shape[:-1] + (out.shape[-1] // 2,)
        assert t.dtype == jnp.int32
        if not isinstance(t, jax.core.Tracer):
            np.testing.assert_array_equal(np.asarray(t), np.asarray(expected_t))
        seen.append(dict(kwargs))
        return out

    return model_fn


def assert_pred_xstart_close(ours, ref):
    ref = np.asarray(ref)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# ------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("steps,respacing", [(1000, ""), (250, "250")])
def test_schedule_tables(g, steps, respacing):
    diff = create_diffusion(respacing)
    assert diff.num_timesteps == steps
    for key in SCHED_KEYS:
        ours = getattr(diff, key)
        assert ours.dtype == np.float64, key
        np.testing.assert_allclose(ours, g[f"sched{steps}_{key}"], rtol=1e-12, atol=1e-15, err_msg=key)
    np.testing.assert_array_equal(diff.timestep_map, g[f"sched{steps}_timestep_map"])


def test_space_timesteps_and_config():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, [1000]) == set(range(1000))
    steps = sorted(space_timesteps(300, "10,15,20"))
    assert len(steps) == 45 and steps[0] == 0 and steps[-1] == 299
    assert sorted(space_timesteps(300, "10,15,20"))[:10] == [round(i * 99 / 9) for i in range(10)]
    with pytest.raises(ValueError):
        space_timesteps(10, "20")
    d = create_diffusion("ddim25")
    assert d.num_timesteps == 25 and list(d.timestep_map) == list(range(0, 1000, 40))
    # The kept steps keep the base process's alphas_cumprod.
    base = create_diffusion("")
    np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[d.timestep_map], rtol=1e-12)
    assert base.model_var_type == ModelVarType.LEARNED_RANGE
    assert base.model_mean_type == ModelMeanType.EPSILON and base.loss_type == LossType.MSE
    assert create_diffusion("", use_kl=True).loss_type == LossType.RESCALED_KL
    assert create_diffusion("", rescale_learned_sigmas=True).loss_type == LossType.RESCALED_MSE
    assert create_diffusion("", learn_sigma=False).model_var_type == ModelVarType.FIXED_LARGE
    assert (
        create_diffusion("", learn_sigma=False, sigma_small=True).model_var_type
        == ModelVarType.FIXED_SMALL
    )
    assert create_diffusion("", predict_xstart=True).model_mean_type == ModelMeanType.START_X
    cos = get_named_beta_schedule("squaredcos_cap_v2", 1000)
    assert cos.shape == (1000,) and cos.dtype == np.float64
    assert (cos > 0).all() and cos.max() == 0.999
    abar = np.cumprod(1 - cos)
    t = 0.5
    np.testing.assert_allclose(
        abar[499], np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2,
        rtol=1e-10,
    )


# ------------------------------------------------------------------------- q / training


def test_q_sample(g, d1000):
    out = d1000.q_sample(jnp.asarray(nhwc(g["x0"])), g["t"], noise=jnp.asarray(nhwc(g["noise"])))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), nhwc(g["q_sample"]), **TOL)


def test_training_losses(g, d1000):
    seen = []
    model_fn = fake_model(g["model_out_at_q_sample"], g["t"], seen)
    terms = d1000.training_losses(
        model_fn, jnp.asarray(nhwc(g["x0"])), g["t"], model_kwargs=dict(y=jnp.asarray(g["y"])),
        noise=jnp.asarray(nhwc(g["noise"])),
    )
    assert len(seen) == 1 and np.array_equal(np.asarray(seen[0]["y"]), g["y"])
    assert set(terms) == {"loss", "mse", "vb"}
    for k in ("loss", "mse", "vb"):
        assert terms[k].shape == (4,) and terms[k].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(terms[k]), g[f"training_losses_{k}"], **TOL, err_msg=k)


def test_training_losses_variants(g):
    """vb only trains the variance; RESCALED_MSE / RESCALED_KL scale as in the reference."""
    x0, noise = jnp.asarray(nhwc(g["x0"])), jnp.asarray(nhwc(g["noise"]))
    out = jnp.asarray(nhwc(g["model_out_at_q_sample"]))
    t = jnp.asarray(g["t"])
    d = create_diffusion("")

    def losses(diff, m, tt=t):
        return diff.training_losses(lambda x, ts, **kw: m, x0, tt, noise=noise)

    grad_vb = jax.grad(lambda m: losses(d, m)["vb"].sum())(out)
    assert np.all(np.asarray(grad_vb[..., :4]) == 0)  # stop_gradient on the mean part
    assert np.abs(np.asarray(grad_vb[..., 4:])).max() > 0
    grad_mse = jax.grad(lambda m: losses(d, m)["mse"].sum())(out)
    np.testing.assert_allclose(
        np.asarray(grad_mse[..., :4]), np.asarray(2 * (out[..., :4] - noise) / (8 * 8 * 4)), rtol=1e-5, atol=1e-7
    )
    ref = losses(d, out)
    kl = losses(create_diffusion("", use_kl=True), out)
    assert set(kl) == {"loss"}
    np.testing.assert_allclose(np.asarray(kl["loss"]), 1000 * np.asarray(ref["vb"]), rtol=1e-6)
    # RESCALED_MSE multiplies vb by num_timesteps / 1000 (0.25 for a 250-step process).
    t250 = jnp.asarray([0, 1, 125, 249])
    plain = losses(create_diffusion("250"), out, t250)
    resc = losses(create_diffusion("250", rescale_learned_sigmas=True), out, t250)
    np.testing.assert_allclose(np.asarray(resc["vb"]), 0.25 * np.asarray(plain["vb"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(resc["mse"]), np.asarray(plain["mse"]), rtol=0)
    # Fixed variance: no vb term; START_X: the target is x0.
    fixed = create_diffusion("", learn_sigma=False).training_losses(
        lambda x, ts, **kw: out[..., :4], x0, t, noise=noise
    )
    assert set(fixed) == {"loss", "mse"}
    np.testing.assert_allclose(np.asarray(fixed["mse"]), np.asarray(ref["mse"]), rtol=1e-6)
    xs = create_diffusion("", predict_xstart=True).training_losses(
        lambda x, ts, **kw: out, x0, t, noise=noise
    )
    np.testing.assert_allclose(
        np.asarray(xs["mse"]), np.mean((np.asarray(x0) - np.asarray(out[..., :4])) ** 2, axis=(1, 2, 3)),
        rtol=1e-5,
    )


# --------------------------------------------------------------------- respaced sampling


def s250_model(g, seen=None):
    return fake_model(g["s250_model_out"], g["sched250_timestep_map"][g["s250_t"]], [] if seen is None else seen)


@pytest.mark.parametrize("clip", [False, True])
def test_p_mean_variance(g, d250, clip):
    seen = []
    x = jnp.asarray(nhwc(g["s250_x"]))
    out = d250.p_mean_variance(
        s250_model(g, seen), x, jnp.asarray(g["s250_t"]), clip_denoised=clip,
        model_kwargs=dict(y=jnp.asarray(g["s250_y"])),
    )
    assert len(seen) == 1 and np.array_equal(np.asarray(seen[0]["y"]), g["s250_y"])
    pre = "s250_pmv_clip_" if clip else "s250_pmv_"
    np.testing.assert_allclose(np.asarray(out["mean"]), nhwc(g[pre + "mean"]), **TOL)
    if clip:
        np.testing.assert_allclose(np.asarray(out["pred_xstart"]), nhwc(g[pre + "pred_xstart"]), **TOL)
    else:
        assert_pred_xstart_close(out["pred_xstart"], nhwc(g[pre + "pred_xstart"]))
    # The variance does not depend on clipping.
    np.testing.assert_allclose(np.asarray(out["variance"]), nhwc(g["s250_pmv_variance"]), **TOL)
    np.testing.assert_allclose(np.asarray(out["log_variance"]), nhwc(g["s250_pmv_log_variance"]), **TOL)
    for v in out.values():
        if v is not None:
            assert v.shape == x.shape and v.dtype == jnp.float32


def test_p_sample(g, d250):
    out = d250.p_sample(
        s250_model(g), jnp.asarray(nhwc(g["s250_x"])), jnp.asarray(g["s250_t"]),
        noise=jnp.asarray(nhwc(g["s250_p_sample_noise"])), clip_denoised=False,
        model_kwargs=dict(y=jnp.asarray(g["s250_y"])),
    )
    np.testing.assert_allclose(np.asarray(out["sample"]), nhwc(g["s250_p_sample_sample"]), **TOL)
    assert_pred_xstart_close(out["pred_xstart"], nhwc(g["s250_pmv_pred_xstart"]))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sample(g, d250, eta):
    kw = {}
    if eta == 1.0:
        kw["noise"] = jnp.asarray(nhwc(g["s250_ddim_eta1_noise"]))
    out = d250.ddim_sample(
        s250_model(g), jnp.asarray(nhwc(g["s250_x"])), jnp.asarray(g["s250_t"]),
        clip_denoised=False, model_kwargs=dict(y=jnp.asarray(g["s250_y"])), eta=eta, **kw,
    )
    name = "eta0" if eta == 0.0 else "eta1"
    np.testing.assert_allclose(np.asarray(out["sample"]), nhwc(g[f"s250_ddim_{name}_sample"]), **TOL)
    assert_pred_xstart_close(out["pred_xstart"], nhwc(g["s250_ddim_eta0_pred_xstart"]))
    if eta == 1.0:  # a traced eta gives the same result
        out2 = jax.jit(
            lambda e, n: d250.ddim_sample(
                s250_model(g), jnp.asarray(nhwc(g["s250_x"])), jnp.asarray(g["s250_t"]),
                clip_denoised=False, eta=e, noise=n,
            )["sample"]
        )(jnp.float32(1.0), kw["noise"])
        np.testing.assert_allclose(np.asarray(out2), nhwc(g["s250_ddim_eta1_sample"]), **TOL)


def test_ddim_reverse_sample_inverts_eta0_step(d250):
    """With an eps model independent of x and t, a DDIM step and its reverse are inverses."""
    eps = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 2))
    model_fn = lambda x, t: jnp.concatenate([eps, jnp.zeros_like(eps)], -1)  # noqa: E731
    x = jax.random.normal(jax.random.PRNGKey(1), eps.shape)
    t = jnp.array([100, 100])
    fwd = d250.ddim_sample(model_fn, x, t, clip_denoised=False)["sample"]
    back = d250.ddim_reverse_sample(model_fn, fwd, t - 1, clip_denoised=False)["sample"]
    np.testing.assert_allclose(np.asarray(back), np.asarray(x), atol=1e-4, rtol=1e-4)


def test_float64_under_x64(g):
    """Under jax_enable_x64, float64 inputs compute in float64 (close to the float32 golden
    within the README's float32-vs-float64 differences); float32 inputs still match tightly."""
    with jax.enable_x64(True):
        d = create_diffusion("250")
        x = jnp.asarray(nhwc(g["s250_x"]).astype(np.float64))
        model_out = jnp.asarray(nhwc(g["s250_model_out"]).astype(np.float64))
        out = d.p_mean_variance(lambda xx, t, **kw: model_out, x, jnp.asarray(g["s250_t"]), clip_denoised=False)
        assert out["mean"].dtype == jnp.float64 and out["pred_xstart"].dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(out["mean"]), nhwc(g["s250_pmv_mean"]), **TOL)
        np.testing.assert_allclose(np.asarray(out["log_variance"]), nhwc(g["s250_pmv_log_variance"]), **TOL)
        assert_pred_xstart_close(out["pred_xstart"], nhwc(g["s250_pmv_pred_xstart"]))
        d1 = create_diffusion("")
        tl = d1.training_losses(
            lambda xx, t, **kw: jnp.asarray(nhwc(g["model_out_at_q_sample"]).astype(np.float64)),
            jnp.asarray(nhwc(g["x0"]).astype(np.float64)), jnp.asarray(g["t"]),
            noise=jnp.asarray(nhwc(g["noise"]).astype(np.float64)),
        )
        assert tl["loss"].dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(tl["loss"]), g["training_losses_loss"], **TOL)
        # float32 inputs with x64 on: still float32, same numbers as without x64.
        out32 = d.p_sample(
            s250_model(g), jnp.asarray(nhwc(g["s250_x"])), jnp.asarray(g["s250_t"]),
            noise=jnp.asarray(nhwc(g["s250_p_sample_noise"])), clip_denoised=False,
        )
        assert out32["sample"].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out32["sample"]), nhwc(g["s250_p_sample_sample"]), **TOL)


# ----------------------------------------------------------------------------- scan loops

SHAPE = (2, 4, 4, 3)


def make_tiny_model(trace_counter):
    """A tiny learned-sigma model_fn with a `cfg_scale`-like kwarg; counts its traces."""
    w = jax.random.normal(jax.random.PRNGKey(3), (3, 6)) * 0.3

    def model_fn(x, t, y, cfg_scale):
        trace_counter.append(1)
        h = jnp.tanh(x @ w + (t.astype(x.dtype) / 1000.0)[:, None, None, None] + y[:, None, None, None])
        eps = h[..., :3] * cfg_scale
        return jnp.concatenate([eps, h[..., 3:]], axis=-1)

    return model_fn


@pytest.mark.parametrize("sampler", ["p", "ddim0", "ddim1"])
def test_scan_loop_matches_python_loop_and_compiles_once(sampler):
    d = create_diffusion("10")
    traces = []
    model_fn = make_tiny_model(traces)
    y = jnp.array([0.1, -0.2])
    clip = sampler == "p"  # cover both clip settings
    eta = {"p": None, "ddim0": 0.0, "ddim1": 1.0}[sampler]

    def loop(rng, cfg_scale):
        kw = dict(model_kwargs=dict(y=y, cfg_scale=cfg_scale), clip_denoised=clip)
        if sampler == "p":
            return d.p_sample_loop(model_fn, SHAPE, rng, **kw)
        return d.ddim_sample_loop(model_fn, SHAPE, rng, eta=eta, **kw)

    jitted = jax.jit(loop)
    rng = jax.random.PRNGKey(42)
    out = jitted(rng, jnp.float32(1.5))
    assert out.shape == SHAPE and out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
    assert len(traces) == 1  # the model is traced once for all 10 steps (a scan)
    out2 = jitted(rng, jnp.float32(4.0))  # a new cfg_scale value: no retrace, no recompile
    assert len(traces) == 1 and jitted._cache_size() == 1
    assert not np.allclose(np.asarray(out), np.asarray(out2))

    # A Python loop over the single-step functions with the same noise.
    init_key, step_key = split_loop_key(rng)
    x = jax.random.normal(init_key, SHAPE, jnp.float32)
    for i in reversed(range(d.num_timesteps)):
        t = jnp.full((SHAPE[0],), i, jnp.int32)
        kw = dict(model_kwargs=dict(y=y, cfg_scale=jnp.float32(1.5)), clip_denoised=clip)
        if sampler == "p":
            x = d.p_sample(model_fn, x, t, noise=loop_step_noise(step_key, i, SHAPE), **kw)["sample"]
        elif eta == 0.0:
            x = d.ddim_sample(model_fn, x, t, **kw)["sample"]
        else:
            x = d.ddim_sample(model_fn, x, t, noise=loop_step_noise(step_key, i, SHAPE), eta=eta, **kw)["sample"]
    np.testing.assert_allclose(np.asarray(out), np.asarray(x), atol=1e-5, rtol=1e-5)


def test_loop_model_sees_mapped_timesteps_and_progressive():
    d = create_diffusion("ddim5")  # steps 0, 200, 400, 600, 800
    seen_t = []

    def model_fn(x, t):
        jax.debug.callback(lambda tt: seen_t.append(int(tt[0])), t)
        return jnp.concatenate([0.1 * x, jnp.zeros_like(x)], -1)

    noise = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
    prog = jax.jit(
        lambda n: d.ddim_sample_loop_progressive(model_fn, SHAPE, noise=n, clip_denoised=False)
    )(noise)
    jax.effects_barrier()
    assert seen_t == [800, 600, 400, 200, 0]
    assert prog["sample"].shape == (5,) + SHAPE and prog["pred_xstart"].shape == (5,) + SHAPE
    final = d.ddim_sample_loop(model_fn, SHAPE, noise=noise, clip_denoised=False)
    # jit vs eager: a few float32 ulps on values up to ~30.
    np.testing.assert_allclose(np.asarray(prog["sample"][-1]), np.asarray(final), atol=1e-5, rtol=1e-5)
    pprog = d.p_sample_loop_progressive(model_fn, SHAPE, jax.random.PRNGKey(1), clip_denoised=False)
    pfinal = d.p_sample_loop(model_fn, SHAPE, jax.random.PRNGKey(1), clip_denoised=False)
    np.testing.assert_allclose(np.asarray(pprog["sample"][-1]), np.asarray(pfinal), atol=1e-5, rtol=1e-5)
