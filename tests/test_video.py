"""The video family through the training system: the moving-digits source (deterministic,
exactly resumable, host-sharded), the family registry, the Latte digits config training and
sampling clips (grid, GIF, npz)."""

import jax
import ml_collections
import numpy as np
import pytest

from conftest import load_config
from dydit_jax import config_lib, families
from dydit_jax.data import create_source


def moving(**kw):
    return ml_collections.ConfigDict(dict(dict(name="moving_digits", image_size=16,
                                               num_frames=6, seed=3, shuffle=True,
                                               num_examples=200), **kw))


def test_moving_digits_are_a_pure_function_of_the_index_and_move():
    a = create_source(moving(), local_batch_size=8)
    b = create_source(moving(), local_batch_size=8)
    idx = np.array([0, 5, 1796, 1797, 3000])
    ca, cb = a.clips(idx), b.clips(idx)
    np.testing.assert_array_equal(ca["image"], cb["image"])
    assert ca["image"].shape == (5, 6, 16, 16, 1) and ca["image"].dtype == np.float32
    # Clip 1797 shows digit image 0 again, on another path.
    np.testing.assert_array_equal(ca["label"][[0, 3]], [0, 0])
    assert not np.array_equal(ca["image"][0], ca["image"][3])
    # The digit moves (the ink's centre changes over the clip) and stays on the canvas: all of
    # its ink is drawn in every frame.
    ink = ca["image"][..., 0] > -1
    counts = ink.sum(axis=(2, 3))
    assert (counts == counts[:, :1]).all()
    centres = np.array([[np.argwhere(f).mean(0) for f in clip] for clip in ink])
    assert (np.abs(np.diff(centres, axis=1)).sum(axis=(1, 2)) > 1).sum() >= 4
    assert create_source(moving(seed=4), local_batch_size=8).clips(idx)["image"].tolist() != \
        ca["image"].tolist()


def test_moving_digits_motion_step_keeps_upsampled_pixels_on_the_patch_grid():
    # digit_scale=2 with motion_step=2: every corner is even, so each 2x2 patch of the canvas
    # holds one source pixel (the layout the image digits DiT learns cleanly), and the clip
    # still moves.
    src = create_source(moving(image_size=22, digit_scale=2, motion_step=2, max_speed=2.0),
                        local_batch_size=8)
    clips = src.clips(np.arange(64))["image"][..., 0]
    assert clips.shape == (64, 6, 22, 22)
    patches = clips.reshape(64, 6, 11, 2, 11, 2)
    assert (patches == patches[:, :, :, :1, :, :1]).all()
    ink = clips > -1
    centres = np.array([[np.argwhere(f).mean(0) for f in clip] for clip in ink])
    assert (np.abs(np.diff(centres, axis=1)).sum(axis=(1, 2)) > 1).sum() >= 16
    with pytest.raises(ValueError, match="motion_step=4 must be >= 1 and divide the room"):
        create_source(moving(image_size=22, digit_scale=2, motion_step=4), local_batch_size=8)


def test_moving_digits_resume_exactly_and_split_across_hosts():
    src = create_source(moving(), local_batch_size=8)
    for _ in range(3):
        src.next()
    state = src.get_state()
    expected = [src.next() for _ in range(30)]     # crosses the 25-batch epoch boundary
    again = create_source(moving(), local_batch_size=8)
    again.set_state(state)
    for want in expected:
        got = again.next()
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    hosts = [create_source(moving(), process_index=i, process_count=2, local_batch_size=4)
             for i in range(2)]
    firsts = [h.batch_indices(0, 0) for h in hosts]
    assert not set(firsts[0]) & set(firsts[1])


def test_family_registry_names_the_model_of_a_config():
    c = config_lib.base_config()
    assert families.family_of(c).name == "dit"
    c.model.name = "Latte-XL/2"
    fam = families.family_of(c)
    assert fam.name == "latte" and fam.video and fam.sizes("Latte-XL/2")["depth"] == 28
    c.model.update(name="custom", family="")
    c.transport.enabled = True
    assert families.family_of(c).name == "sit"
    c.model.name = "Vid-S/2"
    with pytest.raises(ValueError, match="names no model family"):
        families.family_of(c)


def test_latte_config_checks_name_the_key():
    c = load_config("latte_digits")
    config_lib.validate(c)
    c.data.num_frames = 4
    with pytest.raises(config_lib.ConfigError, match="config.data.num_frames=4"):
        config_lib.validate(c)
    c = load_config("latte_digits")
    c.model.token_blocks = "frames"
    with pytest.raises(config_lib.ConfigError, match="config.model.token_blocks='frames'"):
        config_lib.validate(c)


def test_latte_digits_trains_and_samples_clips(tmp_path):
    from dydit_jax import main, train
    from dydit_jax.models import Latte
    c = load_config("latte_digits",
                    "steps=3,batch=4,frames=4,size=16,scale=1,image_steps=2,image_batch=4")
    c.model.update(hidden_size=32, depth=2, num_heads=2)
    c.train.update(log_every=1, checkpoint_every=3, async_checkpointing=False)
    c.sample.update(num_steps=3, per_class=1, classes=(0, 1, 2))
    config_lib.validate(c)
    assert isinstance(train.build_model(c), Latte)
    # The image stage (config.pretrain: single frames, its own steps and lr) trains first in
    # <workdir>/pretrain; the video stage starts from its EMA. With the video lr at 0 the video
    # run's weights stay exactly that EMA: a fresh init would differ everywhere.
    c.train.lr = 0.0
    samples = main._run_mode(c, str(tmp_path))
    assert samples.shape == (3, 4, 16, 16, 1)
    [image] = list((tmp_path / "pretrain" / "samples").iterdir())
    with np.load(image / "samples.npz") as f:
        assert f["arr_0"].shape == (3, 1, 16, 16, 1)
    flat = [jax.tree_util.tree_leaves(train._latest_ema(str(d))) for d in
            (tmp_path / "pretrain", tmp_path)]
    assert len(flat[0]) == len(flat[1])
    for a, b in zip(*flat):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-9)
    [out] = list((tmp_path / "samples").iterdir())
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (3, 4, 16, 16, 1) and f["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(f["arr_1"], [0, 1, 2])
    from PIL import Image
    gif = Image.open(out / "samples.gif")
    assert gif.n_frames == 4
    strip = Image.open(out / "grid.png")
    assert strip.size == (2 + 4 * 18, 2 + 3 * 18)   # 4 frames per row, one row per clip

    # `:lam=0.5` fine-tunes that run as a dynamic Latte (routers, reordering, the DyDiT
    # objective with the clip's per-block constants) and samples it with the engine: the same
    # clips as the masked path (uint8, same rng and labels).
    fine_tune_and_compare(tmp_path, "", "dydit")
    import json
    logged = [json.loads(line) for line in open(tmp_path / "dydit" / "metrics.jsonl")]
    assert any("flops_ratio" in r for r in logged)
    with pytest.raises(config_lib.ConfigError, match="lam=0.5,peft=tdlora"):
        load_config("latte_digits", "peft=lora")


# slow: tests/test_latte_dynamic.py holds the TD-LoRA Latte engine to the masked path, and
# tests/test_peft.py runs the TD-LoRA recipe through main.
@pytest.mark.slow
def test_latte_digits_tdlora_recipe(tmp_path):
    """`:lam=0.5,peft=tdlora` is the DyDiT++ PEFT recipe on a digits Latte run (base frozen,
    TD-LoRA adapters and routers trained; the engine merges the adapters per step)."""
    from dydit_jax import main
    c = load_config("latte_digits",
                    "steps=2,batch=4,frames=4,size=16,scale=1,image_steps=1,image_batch=4")
    c.model.update(hidden_size=32, depth=2, num_heads=2)
    c.train.update(checkpoint_every=2, async_checkpointing=False)
    c.sample.update(num_steps=2, per_class=1, classes=(0,))
    main._run_mode(c, str(tmp_path))
    fine_tune_and_compare(tmp_path, ",peft=tdlora", "tdlora")


def fine_tune_and_compare(base, extra: str, workdir: str):
    """Fine-tunes the digits Latte of `base` with `:lam=0.5` + extra, samples it masked and
    with the engine, and holds them equal."""
    from dydit_jax import main
    arg = f"steps=2,batch=4,frames=4,size=16,scale=1,lam=0.5,init={base},warmup=1"
    d = load_config("latte_digits", arg + extra)
    assert d.peft.method == ("tdlora" if extra else "none")
    d.model.update(hidden_size=32, depth=2, num_heads=2)
    d.dynamic.update(hold_steps=0)
    d.train.update(log_every=1, checkpoint_every=2, async_checkpointing=False)
    d.sample.update(num_steps=3, per_class=1, classes=(0, 1, 2))
    config_lib.validate(d)
    masked = main._run_mode(d, str(base / workdir))
    d.mode, d.sample.engine = "sample", "gathered"
    gathered = main._run_mode(d, str(base / workdir))
    np.testing.assert_allclose(gathered, masked, atol=1e-5, rtol=1e-5)
