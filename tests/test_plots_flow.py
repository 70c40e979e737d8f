"""mode=plot for a dynamic flow model (SiT): widths over its continuous time t in [0, 1], token
masks of points on the transport's path (the DiT plots are run in test_dydit_train.py)."""
import jax
import numpy as np

from test_flow_train import tiny_config


def test_plots_of_a_dynamic_sit_are_over_flow_time(tmp_path):
    from dydit_jax import plots, train
    from dydit_jax.checkpointing import TrainCheckpointer
    config = tiny_config()
    config.dynamic.enabled = True
    model = train.build_model(config)
    state = train.init_state(model, train.build_optimizer(config.train), jax.random.PRNGKey(0))
    # Fresh routers keep everything on (bias 15). Centring each width router's logits at
    # t = 0.5 makes the masks switch inside [0, 1], so masks of any other times (the ADM's
    # 0..999) would differ. The workdir gets the checkpoint a training run would write.
    heads, groups = model.apply({"params": state["ema"]}, np.array([0.5], np.float32),
                                method=model.width_logits)
    ema = jax.tree_util.tree_map(np.array, state["ema"])
    for i in range(model.depth):
        ema[f"blocks_{i}"]["head_router"]["bias"] -= np.asarray(heads[0, i])
        ema[f"blocks_{i}"]["group_router"]["bias"] -= np.asarray(groups[0, i])
    checkpointer = TrainCheckpointer(str(tmp_path / "checkpoints"), async_save=False)
    checkpointer.save(1, dict(state, ema=ema), {}, config.to_dict())
    checkpointer.close()

    plotted = plots.plot_from_workdir(config, str(tmp_path))
    for name in ("width_heatmap.png", "token_masks.png"):
        assert (tmp_path / "plots" / "step000001" / name).stat().st_size > 1000
    t = plotted["width_t"]
    assert t.dtype == np.float32 and len(t) == 1000 and (t[0], t[-1]) == (0.0, 1.0)
    np.testing.assert_allclose(np.diff(t), 1 / 999, rtol=1e-3)
    head_logits, group_logits = model.apply({"params": ema}, np.linspace(0, 1, 1000),
                                            method=model.width_logits)
    for masks, logits in ((plotted["head_masks"], head_logits),
                          (plotted["group_masks"], group_logits)):
        assert masks.shape == (1000, model.depth, model.num_heads) and np.all(masks[..., 0] == 1)
        np.testing.assert_array_equal(masks[..., 1:], np.asarray(logits) > 0)
        assert 0 < masks[..., 1:].mean() < 1  # the masks do switch within [0, 1]
    assert plotted["token_t"] == plots.FLOW_TIMES

    # The token masks' x_t run from the noise (t = 0) to the data (t = 1).
    transport = train.build_transport(config)
    x1 = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
    rng = jax.random.PRNGKey(3)
    x0 = jax.random.normal(rng, x1.shape)
    for t_end, want in ((0.0, x0), (1.0, x1)):
        np.testing.assert_allclose(
            plots.noisy_images(transport, x1, np.full(2, t_end, np.float32), rng), want,
            atol=1e-6)
