"""DyDiT fine-tuning: the objective, the FLOPs target schedule, training through the loop, plots."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DATA, load_config, load_npz
from dydit_jax import convert, flops
from dydit_jax.diffusion import create_diffusion
from dydit_jax.dydit_loss import dydit_loss_fn, flops_target
from dydit_jax.models import DiT
from test_dit import TINY, nhwc


def test_flops_target_schedule():
    steps = np.array([0, 99, 100, 600, 1100, 5000])
    got = np.asarray(flops_target(steps, 0.5, warmup_steps=1000, hold_steps=100))
    np.testing.assert_allclose(got, [1.0, 1.0, 1.0, 0.75, 0.5, 0.5], atol=1e-7)


def test_training_losses_of_dynamic_and_complete_model_match_reference():
    io = load_npz("dydit_s", "io.npz")
    model = DiT(**TINY, dynamic=True)
    variables = convert.from_pytorch(DATA / "dydit_s" / "model.pt", model)
    diffusion = create_diffusion("")
    x0, noise = nhwc(io["tl_x0"]), nhwc(io["tl_noise"])
    t, y = io["tl_t"], io["tl_y"]

    def dynamic_fn(x_t, t, y):
        return model.apply(variables, x_t, t, y)

    def complete_fn(x_t, t, y):
        return model.apply(variables, x_t, t, y, complete=True)[0]

    dyn = diffusion.training_losses(dynamic_fn, x0, t, model_kwargs={"y": y}, noise=noise)
    full = diffusion.training_losses(complete_fn, x0, t, model_kwargs={"y": y}, noise=noise)
    tol = dict(atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dyn["loss"], io["tl_loss"], **tol)
    np.testing.assert_allclose(dyn["mse"], io["tl_mse"], **tol)
    np.testing.assert_allclose(dyn["vb"], io["tl_vb"], **tol)
    np.testing.assert_allclose(full["mse"], io["tl_complete_mse"], **tol)
    np.testing.assert_allclose(full["vb"], io["tl_complete_vb"], **tol)
    aux = dyn["extra"]
    for ours, theirs in (("head_masks", "tl_attn_masks"), ("group_masks", "tl_mlp_masks")):
        np.testing.assert_array_equal(aux[ours], io[theirs])
    # The smallest token decision margin here is 9.5e-6 (golden README), above float noise.
    np.testing.assert_array_equal(aux["token_masks"], io["tl_token_masks"][..., 0])


@pytest.mark.parametrize("stage", [1, 2])
def test_dydit_objective_terms_and_gradients(stage):
    import ml_collections
    model = DiT(**TINY, dynamic=True)
    variables = convert.from_pytorch(DATA / "dydit_s" / "model.pt", model)
    dc = ml_collections.ConfigDict(dict(target=0.5, warmup_steps=10, hold_steps=0, stage=stage))
    loss_fn = dydit_loss_fn(model, create_diffusion(""), dc)
    io = load_npz("dydit_s", "io.npz")
    batch = {"image": nhwc(io["x"]), "label": io["y"]}
    (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables["params"], batch, jax.random.PRNGKey(0), 20)
    expected = m["loss_dynamic"] + m["loss_flops"] + (m["loss_complete"] if stage == 1 else 0)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert ("loss_complete" in m) == (stage == 1)
    np.testing.assert_allclose(m["flops_target"], 0.5)
    np.testing.assert_allclose(m["loss_flops"], 2 * (m["flops_ratio"] - 0.5) ** 2, rtol=1e-6)
    assert m["head_width"].shape == (2,) and m["token_fraction"].shape == (2,)
    # The FLOPs loss reaches every router through the straight-through masks.
    for name in ("head_router", "group_router"):
        assert np.abs(grads["blocks_1"][name]["kernel"]).sum() > 0, name
    assert np.abs(grads["blocks_1"]["token_router"]["fc1"]["kernel"]).sum() > 0


def test_dydit_run_through_the_training_loop_and_plots(tmp_path):
    from dydit_jax import plots, train
    tiny = dict(hidden_size=32, depth=2, num_heads=2, input_size=8)
    dit = load_config("digits", "steps=3,size=8,batch=16")
    dit.model.update(**tiny)
    dit.train.update(log_every=1, checkpoint_every=3, async_checkpointing=False)
    train.train_and_evaluate(dit, str(tmp_path / "dit"))

    cfg = load_config("digits_dydit", f"steps=6,init={tmp_path / 'dit'},warmup=2")
    cfg.model.update(**tiny)
    cfg.data.image_size = 8
    cfg.dynamic.hold_steps = 1
    cfg.train.update(batch_size=16, log_every=1, checkpoint_every=6, async_checkpointing=False)
    train.train_and_evaluate(cfg, str(tmp_path / "dydit"))
    records = [json.loads(line) for line in open(tmp_path / "dydit" / "metrics.jsonl")]
    assert [r["flops_target"] for r in records][:4] == pytest.approx([1.0, 1.0, 0.75, 0.5])
    assert all(len(r["head_width"]) == 2 and 0 < r["flops_ratio"] <= 1.0 for r in records)
    assert "loss_complete" in records[-1]

    cfg.sample.update(per_class=1, num_steps=5)
    plots.plot_from_workdir(cfg, str(tmp_path / "dydit"))
    # Sample-mode wiring of the gathered engine (routers here are still mostly on after 6 steps;
    # tests/test_engine.py checks exactness with half the heads, groups and tokens off).
    from dydit_jax import generate
    masked = generate.sample_from_workdir(cfg, str(tmp_path / "dydit"))
    cfg.sample.engine = "gathered"
    gathered = generate.sample_from_workdir(cfg, str(tmp_path / "dydit"))
    np.testing.assert_allclose(gathered, masked, atol=1e-5, rtol=1e-5)
    for name in ("width_heatmap.png", "token_masks.png"):
        assert (tmp_path / "dydit" / "plots" / "step000006" / name).stat().st_size > 1000
