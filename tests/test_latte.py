"""Latte in Flax against the release (tests/data/latte, made by Vchitect/Latte models/latte.py):
the class-conditional and unconditional models, CFG, every block and embedding, base and sharp
weights, float64; the converter's wrappers and its strict report.

Tolerance float32 atol = rtol = 1e-5: the golden README measures the reference's own float32 vs
float64 difference at 2.4e-7 (out, magnitude 0.44) and 8e-7 (cfg); float64 1e-7 (the 256
t-frequency features are float32 in both codes, as in test_dit).
"""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import DATA, load_npz, run_python
from dydit_jax import convert
from dydit_jax.models import Latte, Latte_models

TOL = dict(atol=1e-5, rtol=1e-5)
LATTE = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4,
             mlp_ratio=4.0, num_frames=4, class_dropout_prob=0.1, num_classes=10,
             learn_sigma=True)
PT = DATA / "latte" / "model.pt"


def video(a):
    """The release's [B, F, C, H, W] -> ours [B, F, H, W, C]."""
    return np.asarray(a).transpose(0, 1, 3, 4, 2)


@pytest.fixture(scope="module")
def io():
    return load_npz("latte", "io.npz")


@pytest.fixture(scope="module")
def state_dicts():
    base = torch.load(PT, map_location="cpu", weights_only=True)
    sharp = dict(base)
    sharp.update(torch.load(DATA / "latte" / "sharp_overrides.pt", map_location="cpu",
                            weights_only=True))
    return {"": base, "_sharp": sharp}


@pytest.mark.parametrize("variant", ["", "_sharp"])
def test_forward_blocks_and_embeddings_match_the_release(io, state_dicts, variant):
    model = Latte(**LATTE, extras=2)
    variables = convert.from_pytorch(state_dicts[variant], model)
    out, state = model.apply(variables, video(io["x"]), io["t"], io["y"],
                             capture_intermediates=True)
    np.testing.assert_allclose(out, video(io[f"out{variant}"]), **TOL)
    inter = state["intermediates"]
    # Layouts as the release's: spatial blocks [(b f), N, D], temporal ones [(b n), F, D].
    for i in range(4):
        np.testing.assert_allclose(inter[f"blocks_{i}"]["__call__"][0][0],
                                   io[f"block{i}_out{variant}"], **TOL, err_msg=f"block {i}")
    np.testing.assert_allclose(inter["final_layer"]["__call__"][0],
                               io[f"final_tokens{variant}"], **TOL)
    if not variant:
        np.testing.assert_allclose(inter["x_embedder"]["__call__"][0], io["x_patch"], **TOL)
        np.testing.assert_allclose(inter["t_embedder"]["__call__"][0], io["t_emb"], **TOL)
        np.testing.assert_allclose(inter["y_embedder"]["__call__"][0], io["y_emb"], **TOL)
        np.testing.assert_allclose(model.pos_embed(), io["pos_embed"], atol=1e-7)
        np.testing.assert_allclose(model.temp_embed(), io["temp_embed"], atol=1e-7)


@pytest.mark.parametrize("variant", ["", "_sharp"])
def test_unconditional_model_and_cfg_match_the_release(io, state_dicts, variant):
    sd = state_dicts[variant]
    uncond = Latte(**LATTE, extras=1)
    no_labels = {k: v for k, v in sd.items() if not k.startswith("y_embedder")}
    out = uncond.apply(convert.from_pytorch(no_labels, uncond), video(io["x"]), io["t"])
    np.testing.assert_allclose(out, video(io[f"out_uncond{variant}"]), **TOL)
    with pytest.raises(ValueError, match="takes no labels"):
        uncond.apply(convert.from_pytorch(no_labels, uncond), video(io["x"]), io["t"], io["y"])
    # The label table is unexpected for extras=1, named.
    with pytest.raises(convert.CheckpointMismatchError, match="y_embedder.embedding_table"):
        convert.from_pytorch(sd, uncond)

    model = Latte(**LATTE, extras=2)
    variables = convert.from_pytorch(sd, model)
    scale = float(io["cfg_scale"])
    cfg = model.apply(variables, video(io["x_cfg"]), io["t_cfg"], io["y_cfg"], scale,
                      method="forward_with_cfg")
    np.testing.assert_allclose(cfg, video(io[f"cfg_out{variant}"]), **TOL)
    half = io["x_cfg"][:2]
    raw = model.apply(variables, video(np.concatenate([half, half])), io["t_cfg"], io["y_cfg"])
    np.testing.assert_allclose(raw, video(io[f"cfg_model_out{variant}"]), **TOL)
    # All 4 eps channels are guided (DiT guides 3): channel 3 differs from the raw output.
    assert np.abs(np.asarray(cfg)[..., 3] - np.asarray(raw)[..., 3]).max() > 1e-3


def test_float64_matches_the_release():
    code = """
import jax, numpy as np, torch
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
from conftest import DATA, load_npz
from dydit_jax import convert
from dydit_jax.models import Latte
from test_latte import LATTE, video
io = load_npz("latte", "io.npz")
model = Latte(**LATTE, extras=2, dtype=jnp.float64, param_dtype=jnp.float64)
sd = torch.load(DATA / "latte" / "model.pt", weights_only=True)
for variant in ("", "_sharp"):
    if variant:
        sd.update(torch.load(DATA / "latte" / "sharp_overrides.pt", weights_only=True))
    v = convert.from_pytorch(sd, model)
    out = model.apply(v, video(io["x"]).astype(np.float64), io["t"], io["y"])
    assert out.dtype == jnp.float64
    err = float(np.abs(np.asarray(out) - video(io[f"out{variant}_float64"])).max())
    print(variant, "max abs err float64", err)
    assert err < 1e-7, err
print("OK")
"""
    assert "OK" in run_python(code).stdout


def test_checkpoint_wrappers_and_formats_load_the_same(tmp_path, state_dicts):
    from safetensors.torch import save_file
    model = Latte(**LATTE, extras=2)
    ref = convert.from_pytorch(state_dicts[""], model)
    noisy = collections.OrderedDict(
        (k, v if k.endswith("_embed") else v + 1.0) for k, v in state_dicts[""].items())
    torch.save({"model": noisy, "ema": state_dicts[""], "opt": {}}, tmp_path / "ema.pt")
    torch.save({"model": state_dicts[""]}, tmp_path / "model.pt")
    save_file({k: v.contiguous() for k, v in state_dicts[""].items()}, tmp_path / "m.safetensors")
    same = lambda a, b: jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)  # noqa: E731
    for path in ("ema.pt", "model.pt", "m.safetensors"):
        same(convert.from_pytorch(tmp_path / path, model), ref)
    trained = convert.from_pytorch(tmp_path / "ema.pt", model, which="model")
    np.testing.assert_allclose(trained["params"]["final_layer"]["linear"]["bias"],
                               ref["params"]["final_layer"]["linear"]["bias"] + 1.0, rtol=1e-6)


def test_a_mismatched_checkpoint_names_every_bad_key(state_dicts):
    sd = dict(state_dicts[""])
    del sd["blocks.3.mlp.fc2.bias"]
    sd["blocks.9.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"]
    sd["blocks.1.mlp.fc1.weight"] = sd["blocks.1.mlp.fc1.weight"][:, :8]
    with pytest.raises(convert.CheckpointMismatchError) as e:
        convert.from_pytorch(sd, Latte(**LATTE, extras=2))
    msg = str(e.value)
    for key in ("blocks.3.mlp.fc2.bias", "blocks.9.attn.qkv.weight", "blocks.1.mlp.fc1.weight"):
        assert key in msg, msg
    # Another frame count: the fixed frame table does not match, named.
    with pytest.raises(convert.CheckpointMismatchError, match="temp_embed"):
        convert.from_pytorch(state_dicts[""], Latte(**{**LATTE, "num_frames": 8}, extras=2))
    # A Latte checkpoint is not a DiT's: its frame table is an unexpected key.
    from dydit_jax.models import DiT
    dit = {k: v for k, v in LATTE.items() if k != "num_frames"}
    with pytest.raises(convert.CheckpointMismatchError, match="temp_embed"):
        convert.from_pytorch(state_dicts[""], DiT(**dit))


def test_presets_and_input_checks():
    assert set(Latte_models) == {f"Latte-{s}/{p}" for s in ("S", "B", "L", "XL")
                                 for p in (2, 4, 8)}
    xl = Latte_models["Latte-XL/2"](num_frames=16, extras=2)
    assert (xl.depth, xl.hidden_size, xl.num_heads, xl.patch_size) == (28, 1152, 16, 2)
    model = Latte(**LATTE, extras=2)
    variables = model.init(jax.random.PRNGKey(0), *model.dummy_inputs())
    with pytest.raises(ValueError, match=r"transpose\(0, 1, 3, 4, 2\)"):
        model.apply(variables, jnp.zeros((1, 4, 4, 8, 8)), jnp.zeros(1), jnp.zeros(1, int))
    with pytest.raises(ValueError, match="expects y"):
        model.apply(variables, jnp.zeros((1, 4, 8, 8, 4)), jnp.zeros(1))
    with pytest.raises(ValueError, match="even"):
        Latte(**{**LATTE, "depth": 3}).init(jax.random.PRNGKey(0), *model.dummy_inputs())


def test_static_macs_of_a_clip_equal_the_forward_pass_count():
    """The Latte FLOPs counter (spatial attention F N^2 D, temporal N F^2 D per product)
    against the MACs of the forward's own jaxpr, for one clip."""
    from dydit_jax import flops
    for extras, frames in ((2, 4), (1, 6)):
        model = Latte(**{**LATTE, "num_frames": frames}, extras=extras)
        variables = model.init(jax.random.PRNGKey(0), *model.dummy_inputs())
        x, t, y = model.dummy_inputs()
        counted = flops.jaxpr_macs(lambda v: model.apply(v, x, t, y), variables)
        macs = flops.static_macs(model)
        assert macs["total"] == counted, (macs, counted)
        assert macs["attn_qk"] == 2 * (frames * 16 * 16 + 16 * frames * frames) * 64


@pytest.mark.parametrize("scan, remat", [(True, False), (True, True), (False, True)])
def test_scan_layers_and_remat_match_the_release(io, state_dicts, scan, remat):
    """scan_layers stacks the blocks as a scanned DiT's (the converter's stacking); one scan
    step runs a spatial or temporal block by an nn.cond on its index."""
    model = Latte(**LATTE, extras=2, scan_layers=scan, remat=remat)
    variables = convert.from_pytorch(state_dicts["_sharp"], model)
    if scan:
        assert variables["params"]["blocks"]["attn"]["qkv"]["kernel"].shape[0] == 4
    out = model.apply(variables, video(io["x"]), io["t"], io["y"])
    np.testing.assert_allclose(out, video(io["out_sharp"]), **TOL)
