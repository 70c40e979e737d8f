"""mode=plot and importance reordering for a dynamic Latte: blocks labelled spatial/temporal in
the width heat map, per-frame token maps in (frame, position) order, clips through
`noisy_images`, no labels for the unconditional model; reordering keeps the complete path's
function and, with router columns moved along, the masked path's (the DiT versions are in
tests/test_dydit_train.py, test_plots_flow.py and test_reorder.py)."""
import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.image
import numpy as np
import pytest

from dydit_jax import plots
from dydit_jax.diffusion import create_diffusion
from dydit_jax.models import Latte
from dydit_jax.models.dit import DiT, DiTBlock, eval_width_masks
from dydit_jax.reorder import apply_permutation, reorder_by_importance

TINY = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=4,
            num_frames=4, num_classes=10, dynamic=True)
H, DEPTH, FRAMES = TINY["num_heads"], TINY["depth"], TINY["num_frames"]
TIMES = (100, 900)   # the token figure's t (two, to keep it quick)


def _inputs(model, batch=3):
    x = jnp.asarray(clips(batch, seed=2))
    t = jnp.array([30.0, 500.0, 970.0][:batch])
    y = jnp.array([1, 5, 9][:batch]) if model.conditional else None
    return x, t, y


def random_variables(model, apply, seed=0):
    """Every parameter redrawn (numpy: no per-leaf compiles): kernels ~ N(0, 1/fan_in) so
    t_emb and the residual stream are O(1), router kernels twice that and router biases
    N(0, 0.5^2), so heads, groups and tokens switch on and off with t and x (the init's
    router biases keep them all on). `apply`: the jitted `model.apply`."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *model.dummy_inputs(1))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            std = (2 if "router" in name else 1) / np.sqrt(np.prod(s.shape[:-1]))
        else:
            std = 0.5 if "router" in name else 0.1
        return jnp.asarray(std * rng.standard_normal(s.shape), s.dtype)
    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    # A token router's logits share the sign of its ReLU MLP's output weights for most x:
    # centring them, block by block, at their median over some clips makes every block keep
    # some tokens and skip others.
    params = dict(variables["params"])
    for l in range(model.depth):
        if model.block_has_token_router(l):
            _, aux = apply({"params": params}, *_inputs(model))
            blk = params[f"blocks_{l}"] = dict(params[f"blocks_{l}"])
            router = blk["token_router"] = dict(blk["token_router"])
            median = float(np.median(np.asarray(aux["token_logits"])[:, l]))
            router["fc2"] = {**router["fc2"], "bias": router["fc2"]["bias"] - median}
    return {"params": params}


def clips(batch=2, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, FRAMES, 8, 8, 1)).astype(
        np.float32)


@pytest.fixture(scope="module")
def conditional():
    """Class-conditional, token routers in every block."""
    model = Latte(**TINY, extras=2)
    apply = jax.jit(model.apply)
    return model, random_variables(model, apply), apply


@pytest.fixture(scope="module")
def unconditional():
    """extras=1 (called without labels), token routers in the spatial blocks only."""
    model = Latte(**TINY, extras=1, token_blocks="spatial")
    apply = jax.jit(model.apply)
    return model, random_variables(model, apply, seed=1), apply


def test_block_labels_name_spatial_and_temporal_blocks(conditional):
    model, _, _ = conditional
    assert plots.block_labels(model) == ["S0", "T1", "S2", "T3"]
    assert plots.block_labels(DiT(input_size=8, depth=3, hidden_size=32, num_heads=2)) is None


def test_width_heatmap_of_a_latte(conditional, tmp_path):
    model, variables, _ = conditional
    path = tmp_path / "width_heatmap.png"
    t, heads, groups = plots.plot_width_heatmap(model, variables["params"], str(path),
                                                num_timesteps=50)
    assert path.stat().st_size > 1000
    logits = model.apply(variables, jnp.asarray(t), method=model.width_logits)
    for masks, want in zip((heads, groups), eval_width_masks(*logits, tau=DiTBlock.tau)):
        assert masks.shape == (50, DEPTH, H)
        np.testing.assert_array_equal(masks, np.asarray(want))
    assert 0 < heads.mean() < 1 and 0 < groups.mean() < 1


def test_noisy_images_of_clips_are_q_sample_per_clip():
    diffusion = create_diffusion("")
    x = clips()
    t = np.array([10, 900])
    rng = jax.random.PRNGKey(4)
    noise = np.asarray(jax.random.normal(rng, x.shape))
    a = diffusion.sqrt_alphas_cumprod[t][:, None, None, None, None]
    b = diffusion.sqrt_one_minus_alphas_cumprod[t][:, None, None, None, None]
    np.testing.assert_allclose(plots.noisy_images(diffusion, x, t, rng), a * x + b * noise,
                               atol=1e-6)


def test_clip_panel_puts_each_frame_under_its_input_frame():
    rng = np.random.default_rng(0)
    f, h, w, depth, p = 3, 4, 6, 2, 2
    clip = rng.normal(size=(f, h, w)).astype(np.float32)
    token = (rng.random((depth, f, h // p, w // p)) > 0.5).astype(np.float32)
    cmap = matplotlib.colormaps["magma"]
    panel = plots.clip_panel(clip, token, cmap)
    gap = 1
    assert panel.shape == ((depth + 1) * (h + gap) + gap, f * (w + gap) - gap, 3)
    gray = (clip - clip.min()) / (clip.max() - clip.min())
    for i in range(f):
        cols = slice(i * (w + gap), i * (w + gap) + w)
        np.testing.assert_allclose(panel[:h, cols], np.repeat(gray[i][..., None], 3, -1),
                                   atol=1e-6)
        for l in range(depth):
            top = (l + 1) * (h + gap) + 2 * gap
            want = np.asarray(cmap(np.kron(token[l, i], np.ones((p, p)))))[..., :3]
            np.testing.assert_allclose(panel[top:top + h, cols], want, atol=1e-6)
    assert np.all(panel[h:h + 2 * gap] == 1) and np.all(panel[:, w] == 1)   # white gaps


@pytest.mark.parametrize("which", ["conditional", "unconditional"])
def test_token_masks_of_clips_one_panel_per_clip_and_t(which, request, tmp_path, monkeypatch):
    """Panels get the model's token masks [L, F*N] as per-frame maps [L, F, gh, gw]; the
    unconditional model is called without the labels it is given."""
    model, variables, apply = request.getfixturevalue(which)
    panels, draw = [], plots.clip_panel

    def recorded(clip, token, cmap):
        panels.append((clip, token))
        return draw(clip, token, cmap)
    monkeypatch.setattr(plots, "clip_panel", recorded)
    x, labels = clips(), np.array([3, 7])
    path = tmp_path / "token_masks.png"
    assert plots.plot_token_masks(model, variables["params"], create_diffusion(""), x, labels,
                                  str(path), timesteps=TIMES) == TIMES
    assert len(panels) == len(x) * len(TIMES)
    gh, gw = model.grid_size
    diffusion, key = create_diffusion(""), jax.random.PRNGKey(0)
    for j, t_orig in enumerate(TIMES):
        t = jnp.full((len(x),), t_orig, jnp.int32)
        x_t = plots.noisy_images(diffusion, jnp.asarray(x), t, jax.random.fold_in(key, j))
        y = jnp.asarray(labels) if model.conditional else None
        _, aux = apply(variables, x_t, t, y)
        want = np.asarray(aux["token_masks"]).reshape(len(x), DEPTH, FRAMES, gh, gw)
        for i in range(len(x)):   # panels are drawn clip by clip, t by t
            clip, token = panels[i * len(TIMES) + j]
            np.testing.assert_allclose(clip, np.asarray(x_t[i]).mean(-1), atol=1e-6)
            np.testing.assert_array_equal(token, want[i])
    tokens = np.stack([tok for _, tok in panels])    # [panels, L, F, gh, gw]
    assert 0 < tokens.mean() < 1
    if not model.conditional:   # token routers only in the spatial blocks
        assert np.all(tokens[:, 1::2] == 1) and tokens[:, ::2].mean() < 1
    png = matplotlib.image.imread(path)
    # One column of panels per t, each at least its F frames wide.
    assert png.shape[1] >= len(TIMES) * FRAMES * plots.TILE_INCHES * 120


@pytest.mark.parametrize("which", ["conditional", "unconditional"])
def test_reordered_latte_computes_the_same(which, request):
    """Complete path: the same function (as the DiT's); refused with trained-looking width
    routers unless told they are fresh."""
    model, variables, _ = request.getfixturevalue(which)
    with pytest.raises(ValueError, match="router"):
        reorder_by_importance(variables, H)
    new, perms = reorder_by_importance(variables, H, allow_fresh_routers=True)
    ident = np.broadcast_to(np.arange(H), (DEPTH, H))
    assert not np.array_equal(perms["heads"], ident)
    assert not np.array_equal(perms["groups"], ident)
    complete = jax.jit(lambda v, x, t, y: model.apply(v, x, t, y, complete=True)[0])
    np.testing.assert_allclose(complete(new, *_inputs(model)),
                               complete(variables, *_inputs(model)), atol=1e-5, rtol=0)
    # Blocks without a token router (the temporal ones here) pass through as they are.
    for i in range(DEPTH):
        blk = new["params"][f"blocks_{i}"]
        assert ("token_router" in blk) == model.block_has_token_router(i)
        if "token_router" in blk:
            assert blk["token_router"] is variables["params"][f"blocks_{i}"]["token_router"]


def _move_router_columns(params, perms):
    """Width router output j gates slot j+1: for permutations that keep slot 0, new output
    j is old output perms[l, j+1] - 1."""
    out = dict(params)
    for l in range(DEPTH):
        blk = dict(out[f"blocks_{l}"])
        for router, key in (("head_router", "heads"), ("group_router", "groups")):
            cols = perms[key][l, 1:] - 1
            blk[router] = {"kernel": blk[router]["kernel"][:, cols],
                           "bias": blk[router]["bias"][cols]}
        out[f"blocks_{l}"] = blk
    return out


@pytest.mark.parametrize("which", ["conditional", "unconditional"])
def test_masked_path_follows_a_consistent_permutation(which, request):
    """Masked path, both ways a permutation can be consistent with the routers:
    - slot 0 kept and the router columns moved along: the same output, the width masks
      permuted with the heads (groups), the token masks unchanged;
    - fresh (all-on) width routers and `reorder_by_importance`: the same output and token
      masks (the token routers read the residual stream, which reordering leaves as it is)."""
    model, variables, masked = request.getfixturevalue(which)
    inputs = _inputs(model)
    out, aux = masked(variables, *inputs)
    assert 0 < float(aux["head_masks"].mean()) < 1
    kept = np.asarray(aux["token_masks"]).mean((0, 2))   # per block
    for l in range(DEPTH):
        assert 0 < kept[l] < 1 if model.block_has_token_router(l) else kept[l] == 1

    rng = np.random.default_rng(0)
    perms = {k: np.stack([np.concatenate([[0], 1 + rng.permutation(H - 1)])
                          for _ in range(DEPTH)]).astype(np.int32) for k in ("heads", "groups")}
    moved = apply_permutation(variables, perms, H, allow_fresh_routers=True)
    moved = {"params": _move_router_columns(moved["params"], perms)}
    out2, aux2 = masked(moved, *inputs)
    np.testing.assert_allclose(out2, out, atol=1e-5, rtol=0)
    for name, key in (("head_masks", "heads"), ("group_masks", "groups")):
        np.testing.assert_array_equal(
            aux2[name], np.take_along_axis(np.asarray(aux[name]), perms[key][None], -1))
    np.testing.assert_array_equal(aux2["token_masks"], aux["token_masks"])

    fresh = jax.tree_util.tree_map(lambda a: a, variables)
    for l in range(DEPTH):
        blk = fresh["params"][f"blocks_{l}"] = dict(fresh["params"][f"blocks_{l}"])
        for router in ("head_router", "group_router"):
            blk[router] = {"kernel": jnp.zeros_like(blk[router]["kernel"]),
                           "bias": jnp.full_like(blk[router]["bias"], 15.0)}
    out, aux = masked(fresh, *inputs)
    new, _ = reorder_by_importance(fresh, H, allow_fresh_routers=True)
    out2, aux2 = masked(new, *inputs)
    np.testing.assert_allclose(out2, out, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(aux2["token_masks"], aux["token_masks"])
    assert 0 < float(aux["token_masks"].mean()) < 1


def test_reorder_of_a_scanned_latte(conditional):
    """scan_layers stacks a Latte's blocks as a scanned DiT's: the same permutations as the
    unrolled blocks', and the scanned model computes the same after them."""
    from dydit_jax import convert
    model, variables, _ = conditional
    scanned = Latte(**TINY, extras=2, scan_layers=True)
    stacked = {"params": convert.to_layout(variables["params"], scan_layers=True)}
    new, perms = reorder_by_importance(stacked, H, scan_layers=True, allow_fresh_routers=True)
    _, unrolled = reorder_by_importance(variables, H, allow_fresh_routers=True)
    for k in ("heads", "groups"):
        np.testing.assert_array_equal(perms[k], unrolled[k])
    complete = jax.jit(lambda v, x, t, y: scanned.apply(v, x, t, y, complete=True)[0])
    np.testing.assert_allclose(complete(new, *_inputs(scanned)),
                               complete(stacked, *_inputs(scanned)), atol=1e-5, rtol=0)
