"""FLUX in the training system: captioned digits, text conditioning, the rectified-flow and
DyFLUX objectives, and main's train -> sample -> DyFLUX fine-tune -> engine sampling path."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from dydit_jax import families, flops, flux_loss, flux_sampling, main, text_conditioning
from dydit_jax.data import create_source
from dydit_jax.data.captioned_digits import WORDS, attributes, digit_captions
from dydit_jax.models.flux import FLUX


def test_captions_follow_the_images_and_batches_resume():
    from sklearn.datasets import load_digits
    d = load_digits()
    captions = digit_captions()
    assert captions == digit_captions() and len(captions) == len(d.target)
    weight, slanted = attributes(d.images, d.target)
    ink = d.images.reshape(len(d.images), -1).sum(1)
    for c in range(10):
        cls = d.target == c
        # "bold" digits of a class have more ink than its "thin" ones, and say so.
        assert ink[cls & (weight == "bold")].min() > ink[cls & (weight == "thin")].max()
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    for text, y, w, s in zip(captions, d.target, weight, slanted):
        tokens = text.replace(",", " ,").split()
        assert set(tokens) <= set(WORDS) and words[y] in tokens
        assert (w in tokens) == bool(w) and ("slanted" in tokens) == bool(s)
    cfg = load_config("flux_digits").data
    src = create_source(cfg, local_batch_size=8)
    first = [src.next() for _ in range(3)]
    state = src.get_state()
    after = src.next()
    again = create_source(cfg, local_batch_size=8)
    again.set_state(state)
    np.testing.assert_array_equal(again.next()["caption"], after["caption"])
    b = first[0]
    assert b["image"].shape == (8, 16, 16, 1)
    assert [src.captions[i] for i in b["caption"]] == [captions[i] for i in
                                                      src.batch_indices(0, 0)]


def test_word_tokenizer_and_batch_conditioner():
    tok = text_conditioning.word_tokenizer(WORDS)
    ids = tok.encode("a bold zebra").ids
    vocab = tok.get_vocab()
    assert ids == [vocab["a"], vocab["bold"], vocab["[UNK]"], vocab["[EOS]"]]
    assert vocab["[EOS]"] == max(vocab.values())        # CLIP pools at the highest id
    cfg = load_config("flux_digits")
    cfg.text.update(width=16, layers=1)
    enc = text_conditioning.from_config(cfg.text)
    assert enc.widths == (16, 16)
    captions = ["a bold one", "a thin two"]
    cond = text_conditioning.BatchConditioner(enc, captions, dropout=0.5, seed=3)
    batch = {"image": np.zeros((64, 2, 2, 1)), "caption": np.asarray([0, 1] * 32)}
    out = cond(batch, step=7)
    assert "caption" not in out and out["txt"].shape == (64, 12, 16)
    txt, vec = enc.encode(captions + [""])
    dropped = np.all(out["vec"] == vec[2], axis=1)
    assert 10 < dropped.sum() < 54                        # p = 0.5 of 64
    kept = ~dropped
    np.testing.assert_array_equal(out["txt"][kept], txt[batch["caption"][kept]])
    np.testing.assert_array_equal(cond(batch, step=7)["vec"], out["vec"])   # same step, same
    assert not np.array_equal(cond(batch, step=8)["vec"], out["vec"])
    assert len(enc.cache) == 3                            # each caption encoded once
    with pytest.raises(ValueError, match="captioned"):
        cond({"image": batch["image"]}, 0)


def _tiny_flux(dynamic=False):
    return FLUX(in_channels=4, vec_in_dim=8, context_in_dim=8, hidden_size=32, num_heads=2,
                depth=1, depth_single_blocks=2, axes_dim=(2, 6, 8), guidance_embed=False,
                dynamic=dynamic)


def test_flux_macs_ratio_fn_is_flux_macs():
    model = _tiny_flux(True)
    kept = np.random.default_rng(0).uniform(0, 64, size=(3, 5))
    got = flops.flux_macs_ratio_fn(model, 64, 12)(jnp.asarray(kept, jnp.float32))
    want = [flops.flux_macs_ratio(model, 64, 12, kept[:, b]) for b in range(5)]
    np.testing.assert_allclose(got, want, rtol=1e-6)     # float32 of an exact affine map


def test_time_sampling_and_the_sampler_convention():
    fc = load_config("flux_digits").flux
    t = np.asarray(flux_loss.sample_t(jax.random.PRNGKey(0), 20000, 64, fc))
    mu = flux_sampling.lin_function()(64)
    # The median of sigmoid(N(0, 1)) is 1/2; shifted: e^mu / (e^mu + 1). 20k draws: the
    # sample median's standard error in t is ~0.002.
    assert abs(np.median(t) - np.exp(mu) / (np.exp(mu) + 1)) < 0.01
    assert t.min() > 0 and t.max() < 1
    fc.update(shift=False, time_sampling="uniform")
    t = np.asarray(flux_loss.sample_t(jax.random.PRNGKey(0), 20000, 64, fc))
    assert abs(t.mean() - 0.5) < 0.01
    # The regression target is the velocity the Euler sampler integrates: with the exact
    # velocity of a straight path, denoising from the noise lands on the data.
    x0 = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 4))
    noise = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 4))

    class Oracle:
        guidance_embed = False

        def apply(self, variables, x, *args):
            return flux_loss.velocity_target(x0, noise)

    t = jnp.full((2,), 0.3)
    _, dx_dt = jax.jvp(lambda t: flux_loss.interpolate(x0, noise, t), (t,), (jnp.ones(2),))
    np.testing.assert_allclose(dx_dt, flux_loss.velocity_target(x0, noise), atol=1e-6)
    np.testing.assert_allclose(flux_loss.interpolate(x0, noise, jnp.ones(2)), noise)
    sched = flux_sampling.get_schedule(5, 16)
    out = flux_sampling.denoise(Oracle(), {}, noise, None, None, None, None, sched)
    np.testing.assert_allclose(out, x0, atol=1e-5)


def _batch(b=4):
    r = np.random.default_rng(0)
    return {"image": jnp.asarray(r.uniform(-1, 1, (b, 8, 8, 1)), jnp.float32),
            "txt": jnp.asarray(r.normal(size=(b, 3, 8)), jnp.float32),
            "vec": jnp.asarray(r.normal(size=(b, 8)), jnp.float32)}


def test_static_loss_is_the_velocity_mse():
    model = _tiny_flux()
    fc = load_config("flux_digits").flux
    batch = _batch()
    params = model.init(jax.random.PRNGKey(0), *model.dummy_inputs(1))["params"]
    # A model that outputs 0: the loss is the MSE of the target noise - x0 itself.
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    rng = jax.random.PRNGKey(5)
    loss, _ = jax.jit(flux_loss.flux_loss_fn(model, fc))(zero, batch, rng, 0)
    _, k_noise, _ = jax.random.split(rng, 3)
    img = flux_loss.flux_inputs(model, batch)[0]
    noise = jax.random.normal(k_noise, img.shape)
    np.testing.assert_allclose(loss, jnp.mean(jnp.square(noise - img)), rtol=1e-5)
    with pytest.raises(ValueError, match="in_channels"):
        flux_loss.flux_loss_fn(model, fc)(params, dict(batch, image=batch["image"][..., [0, 0]]),
                                          rng, 0)


def test_dyflux_loss_targets_kept_tokens_and_trains_the_routers():
    model = _tiny_flux(True)
    cfg = load_config("flux_digits")
    cfg.dynamic.update(enabled=True, target=0.5, warmup_steps=10, hold_steps=0, stage=1)
    cfg.flux.distill = 0.5
    params = model.init(jax.random.PRNGKey(0), *model.dummy_inputs(1))["params"]
    loss_fn = flux_loss.flux_loss_fn(model, cfg.flux, cfg.dynamic)
    (loss, m), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, _batch(), jax.random.PRNGKey(1), 20)
    assert float(m["token_target"]) == pytest.approx(0.5)
    # Router bias 5.0: nearly every token kept at first (the Gumbel noise drops a few).
    frac = float(m["token_fraction"])
    assert 0.95 < frac <= 1.0
    assert float(m["loss_tokens"]) == pytest.approx(2 * (frac - 0.5) ** 2, rel=1e-5)
    assert float(m["flops_ratio"]) > 1.0                  # the routers cost a little
    np.testing.assert_allclose(loss, m["loss_dynamic"] + m["loss_tokens"] + m["loss_complete"]
                               + 0.5 * m["loss_distill"], rtol=1e-6)
    router = [g for path, g in jax.tree_util.tree_leaves_with_path(grads)
              if "router" in jax.tree_util.keystr(path)]
    assert router and max(float(jnp.abs(g).max()) for g in router) > 0


def _tiny_config(workdir_arg=""):
    c = load_config("flux_digits", workdir_arg or None)
    c.model.update(hidden_size=32, num_heads=2, depth=1, depth_single_blocks=1)
    c.text.update(width=16, layers=1, t5_max_length=6, clip_max_length=6)
    c.train.update(batch_size=8, num_steps=3, log_every=1, checkpoint_every=3,
                   async_checkpointing=False)
    c.sample.update(num_steps=2, per_class=2, batch_size=4,
                    prompts=("a bold handwritten one", "a thin seven"))
    c.compilation_cache_dir = ""
    return c


def test_main_trains_samples_prompts_and_fine_tunes_dyflux(tmp_path, capsys):
    config = _tiny_config()
    assert isinstance(families.family_of(config).build(config), FLUX)
    base = tmp_path / "flux"
    main.run(config, str(base))
    rows = [json.loads(line) for line in open(base / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    folder = next((base / "samples").iterdir())
    assert (folder / "grid.png").exists() and len(list(folder.glob("0*.png"))) == 4
    assert (folder / "prompts.txt").read_text().split("\n")[0] == "a bold handwritten one"
    from PIL import Image
    assert Image.open(folder / "grid.png").size == (2 * 16, 2 * 16)

    tuned = _tiny_config(f"lam=0.5,init={base}")
    tuned.train.update(num_steps=3)
    tuned.dynamic.update(hold_steps=0, warmup_steps=2)
    tuned.flux.tdw = True           # TDW as well: the static checkpoint has no width routers
    tuned.sample.engine = "gathered"
    tuned.flux.update(capacities=(0.5,), width_grid=(0.5,))     # fewer branches to compile
    main.run(tuned, str(tmp_path / "dyflux"))
    rows = [json.loads(line) for line in open(tmp_path / "dyflux" / "metrics.jsonl")]
    assert {"token_fraction", "loss_flops", "loss_complete", "flops_ratio",
            "head_fraction", "group_fraction"} <= set(rows[-1])
    assert rows[-1]["token_target"] == pytest.approx(0.5)
    out = capsys.readouterr().out
    assert "engine: kept" in out and "MLP groups" in out     # the engine's TDW report
    folder = next((tmp_path / "dyflux" / "samples").iterdir())
    assert folder.name.endswith("gathered") and (folder / "grid.png").exists()
