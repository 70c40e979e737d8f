"""Flow-matching models (SiT) through the training system: train, sample, DyDiT, configs.

A tiny digits SiT (D=32, depth 2, 2 heads, 8x8 images, 16 tokens) keeps every compile small.
"""
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from conftest import ROOT

TINY = dict(hidden_size=32, depth=2, num_heads=2, input_size=8)


def load_config(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, mod.get_config(arg)


def tiny_config(arg=""):
    _, c = load_config("digits_sit", ",".join(filter(None, ["steps=3,size=8,batch=16", arg])))
    c.model.update(**TINY)
    c.train.update(log_every=1, checkpoint_every=3, async_checkpointing=False)
    c.transport.num_steps = 5
    c.sample.per_class = 1
    return c


@pytest.fixture(scope="module")
def trained_sit(tmp_path_factory):
    from dydit_jax import train
    config = tiny_config()
    workdir = str(tmp_path_factory.mktemp("sit"))
    state = train.train_and_evaluate(config, workdir)
    return config, workdir, state


def test_sit_trains_through_the_loop(trained_sit):
    from dydit_jax import train
    from dydit_jax.models.sit import SiT
    config, workdir, state = trained_sit
    model = train.build_model(config)
    assert type(model) is SiT and not model.dynamic and not model.learn_sigma
    records = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert "vb" not in records[0] and "mse" not in records[0]
    assert int(state["step"]) == 3
    assert (jax.tree_util.tree_leaves(state["params"])[0].shape
            == jax.tree_util.tree_leaves(state["ema"])[0].shape)
    assert "3" in os.listdir(f"{workdir}/checkpoints")


@pytest.mark.parametrize("sampler,method", [("ode", "heun2"), ("sde", "euler")])
def test_sit_samples_from_the_workdir(trained_sit, sampler, method):
    from dydit_jax import generate
    config, workdir, _ = trained_sit
    config = config.copy_and_resolve_references()
    config.transport.update(sampler=sampler, method=method)
    samples = generate.sample_from_workdir(config, workdir)
    assert samples.shape == (10, 8, 8, 1) and np.all(np.isfinite(samples))
    grid = f"{workdir}/samples/step000003-{sampler}-{method}{config.transport.num_steps}-cfg" \
        f"{config.sample.cfg_scale:g}/grid.png"
    assert os.path.getsize(grid) > 100


@pytest.fixture(scope="module")
def dynamic_sit(trained_sit, tmp_path_factory):
    """DyDiT fine-tuning of the tiny SiT for 3 steps (stage 1, target ramp to 0.5)."""
    from dydit_jax import train
    _, sit_dir, _ = trained_sit
    config = tiny_config(f"lam=0.5,init={sit_dir},warmup=2")
    config.dynamic.hold_steps = 1
    workdir = tmp_path_factory.mktemp("dynamic_sit")
    train.train_and_evaluate(config, str(workdir))
    return config, workdir


def test_dynamic_sit_runs_the_dydit_objective(dynamic_sit):
    from dydit_jax import train
    config, workdir = dynamic_sit
    assert config.dynamic.enabled and config.train.num_steps == 3
    assert train.build_model(config).dynamic
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["flops_target"] for r in records] == pytest.approx([1.0, 1.0, 0.75])
    for r in records:
        assert 0 < r["flops_ratio"] <= 1.0 and len(r["head_width"]) == 2
        assert np.isfinite(r["loss"]) and np.isfinite(r["loss_complete"])
        np.testing.assert_allclose(
            r["loss"], r["loss_dynamic"] + r["loss_complete"] + r["loss_flops"], rtol=1e-5)


def test_dynamic_sit_samples_with_the_gathered_engine(dynamic_sit, monkeypatch):
    """Sample-mode wiring of the gathered engine for flow models (FlowEngine; its exactness
    with routers that switch is tested in test_engine_flow.py): same samples as the masked
    path, for a fixed-grid and an adaptive solver."""
    from dydit_jax import generate
    config, workdir = dynamic_sit
    config = config.copy_and_resolve_references()
    config.transport.update(sampler="ode", method="heun2")
    masked = generate.sample_from_workdir(config, str(workdir))
    config.sample.engine = "gathered"
    gathered = generate.sample_from_workdir(config, str(workdir))
    np.testing.assert_allclose(gathered, masked, atol=1e-5, rtol=1e-5)
    # Adaptive: widths decided on device. Two adaptive solves are not equal to float32
    # rounding (their step sizes follow the rounding, see test_engine_flow.py); after 3 steps
    # of fine-tuning every router is still on (bias 15), so the field is smooth and both are
    # solutions of one problem within the solver's tolerance: each within a few accepted
    # steps' local error (atol + rtol * |x|) of the truth, so within 10x that of each other.
    from dydit_jax.engine import FlowEngine
    used = []
    monkeypatch.setattr(FlowEngine, "sample", lambda self, *a, _orig=FlowEngine.sample, **k:
                        used.append(self.method) or _orig(self, *a, **k))
    config.transport.method = "dopri5"
    gathered = generate.sample_from_workdir(config, str(workdir))
    config.sample.engine = "masked"
    masked = generate.sample_from_workdir(config, str(workdir))
    assert used == ["dopri5"]
    tol = config.transport.atol + config.transport.rtol * np.abs(masked)
    assert (np.abs(gathered - masked) <= 10 * tol).all()


def test_flow_models_evaluate_masked_and_gathered(dynamic_sit, tmp_path, monkeypatch):
    """mode=evaluate on a flow model: SDE samples in chunks, metrics from the (stand-in)
    Inception; the gathered engine writes the same samples as the masked path."""
    import shutil
    from dydit_jax import evaluate, main
    from test_evaluate import TinyFeatures
    features = TinyFeatures()
    stand_in = (features, features.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3), np.uint8)))
    monkeypatch.setattr(evaluate, "load_feature_model", lambda config: stand_in)
    config, workdir = dynamic_sit
    chunks = {}
    for engine in ("masked", "gathered"):
        run = tmp_path / engine
        shutil.copytree(workdir, run)
        config = config.copy_and_resolve_references()
        config.mode = "evaluate"
        config.transport.update(sampler="sde", method="euler")
        config.sample.engine = engine
        config.evaluate.update(num_samples=16, chunk_size=16, batch_size=8, cfg_scale=1.5,
                               inception_path="unused-stand-in.npz")
        result = main.run(config, str(run))
        assert np.isfinite(result["metrics"]["fid"]) and result["sampled_chunks"] == [0]
        with np.load(run / "eval" / "chunk_00000.npz") as f:
            chunks[engine] = f["arr_0"]
    # uint8 images: the float samples agree to 1e-5, so at most a rounding step apart
    assert np.abs(chunks["gathered"].astype(int) - chunks["masked"].astype(int)).max() <= 1


def test_non_finite_samples_are_reported_with_their_cause():
    """An adaptive solve that runs out of steps returns inf (no runtime exception inside the
    sharded solve); sample and evaluate modes then stop with the cause named."""
    import jax.numpy as jnp
    from dydit_jax.sampling import check_finite
    from dydit_jax.transport.integrators import ode
    stiff = ode(lambda x, t, model: -50 * x * jnp.sin(30 * t)[:, None], t0=0.0, t1=1.0,
                sampler_type="dopri5", num_steps=5, max_steps=3)
    ys = np.asarray(stiff.sample(jnp.ones((2, 3)), None))
    assert np.isfinite(ys[0]).all() and np.isinf(ys[-1]).all()
    config = tiny_config()
    config.transport.method = "dopri5"
    with pytest.raises(FloatingPointError, match="adaptive ODE solver 'dopri5'.*atol"):
        check_finite(ys[-1], config)
    config.transport.update(sampler="sde", method="euler", diffusion_form="SBDM")
    with pytest.raises(FloatingPointError, match="SBDM"):
        check_finite(np.array([np.nan]), config)
    first = ys[0]
    assert check_finite(first, config) is first


def test_flow_sampler_cfg_layout_and_one_compile():
    """Guidance at scale 1 over all channels is the unguided sampler; a new scale or new labels
    reuse the compiled program."""
    from dydit_jax import train
    from dydit_jax.sampling import make_flow_sample_fn
    config = tiny_config()
    model = train.build_model(config)
    params = train.init_state(model, train.build_optimizer(config.train),
                              jax.random.PRNGKey(1))["params"]
    transport = train.build_transport(config)
    kw = dict(sampler="ode", method="Euler", num_steps=4)
    guided = make_flow_sample_fn(model, transport, guide_channels=None, **kw)
    plain = make_flow_sample_fn(model, transport, use_cfg=False, **kw)
    rng, labels = jax.random.PRNGKey(0), np.array([1, 2, 3])
    np.testing.assert_allclose(guided(params, rng, labels, 1.0), plain(params, rng, labels),
                               atol=1e-5)
    x4 = guided(params, rng, np.array([4, 5, 6]), 4.0)
    assert x4.shape == (3, 8, 8, 1) and guided.trace_count() == 1
    with pytest.raises(ValueError, match="unknown sde method"):
        make_flow_sample_fn(model, transport, sampler="sde", method="dopri5")


def test_new_configs_build_and_validate():
    from dydit_jax import config_lib, train
    from dydit_jax.models.sit import SiT
    for name in ("digits_sit", "sit_xl"):
        mod, config = load_config(name)
        config_lib.validate(config)
        assert mod.__doc__ and "python -m dydit_jax.main" in mod.__doc__
        assert config.transport.enabled and config.transport.path_type == "Linear"
        assert config.transport.prediction == "velocity"
        model = train.build_model(config)
        assert type(model) is SiT and not model.dynamic
        with pytest.raises(ValueError, match="init="):
            mod.get_config("lam=0.5")
    _, xl = load_config("sit_xl")
    assert (xl.model.name, xl.model.input_size, xl.transport.sampler) == ("SiT-XL/2", 32, "sde")
    assert train.build_model(xl).hidden_size == 1152
    _, dy = load_config("sit_xl", "lam=0.5,init=converted")
    assert dy.dynamic.enabled and dy.dynamic.target == 0.5 and dy.transport.enabled
    assert train.build_model(dy).dynamic and dy.train.num_steps == 200_000
    _, dd = load_config("digits_sit", "lam=0.5,init=runs/digits_sit")
    config_lib.validate(dd)
    assert dd.dynamic.enabled and dd.train.num_steps == 800 and train.build_model(dd).dynamic
    _, ode = load_config("digits_sit", "method=heun2")
    assert (ode.transport.sampler, ode.transport.method, ode.transport.num_steps) == (
        "ode", "heun2", 50)
    xl.transport.enabled = False
    with pytest.raises(ValueError, match="transport.enabled"):
        train.build_model(xl)
