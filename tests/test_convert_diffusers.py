"""The diffusers layout of DiT (the hub's facebook/DiT-XL-2-256): loading, numerics, export.

Golden data: tests/data/dit_diffusers (diffusers 0.42.1 `DiTTransformer2DModel`, sized like
dit_s; see its config.json). The same weights give `out` in diffusers and `official_out` in the
official DiT (up to 1.1e-3 apart): numerics="diffusers" must reproduce the first, the default
"official" the second.
"""
import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import DATA, load_npz
from dydit_jax import convert
from dydit_jax.checkpointing import load_params
from dydit_jax.models import DiT
from dydit_jax.models.dit import timestep_embedding
from dydit_jax.models.sit import SiT
from test_dit import TINY, nhwc

TOL = dict(atol=1e-5, rtol=1e-5)
ROOT = DATA / "dit_diffusers"                      # a pipeline folder: transformer/ inside
FOLDER = ROOT / "transformer"
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def io():
    return load_npz("dit_diffusers", "io.npz")


@pytest.fixture(scope="module")
def loaded():
    """(model with official numerics, its variables) from the pipeline folder."""
    model = convert.dit_from_diffusers_config(ROOT)
    return model, convert.from_pytorch(ROOT, model)


def nchw_out(model, variables, io):
    return np.asarray(model.apply(variables, nhwc(io["x"]), io["t"], io["y"])).transpose(0, 3, 1, 2)


def assert_same_tree(a, b):
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def copy_folder(tmp_path):
    dst = tmp_path / "transformer"
    shutil.copytree(FOLDER, dst)
    return dst


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def perturbed(variables, seed=0):
    """The golden params plus N(0, 0.02) noise: untied values everywhere (qkv rows, blocks)."""
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [a + 0.02 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


# ----------------------------------------------------------------------------------------------
# Loading and the two numerics
# ----------------------------------------------------------------------------------------------

def test_config_gives_the_model_and_both_folder_forms_load(loaded):
    model, variables = loaded
    assert isinstance(model, DiT) and model.numerics == "official"
    assert {k: getattr(model, k) for k in TINY} == TINY
    assert convert.dit_from_diffusers_config(FOLDER, numerics="diffusers").numerics == "diffusers"
    assert_same_tree(convert.from_pytorch(FOLDER, model), variables)
    # The same weights as the official-layout file of the golden data, loaded strictly.
    assert_same_tree(convert.from_pytorch(ROOT / "official_model.pt", DiT(**TINY)), variables)
    assert convert.is_diffusers_dir(ROOT) and convert.is_diffusers_dir(str(FOLDER))
    assert not convert.is_diffusers_dir(ROOT / "official_model.pt")
    assert not convert.is_diffusers_dir(ROOT / "nowhere")


def test_official_numerics_give_official_out_and_diffusers_numerics_give_out(loaded, io):
    model, variables = loaded
    official = nchw_out(model, variables, io)
    diffusers = nchw_out(model.clone(numerics="diffusers"), variables, io)
    np.testing.assert_allclose(official, io["official_out"], **TOL)
    np.testing.assert_allclose(diffusers, io["out"], **TOL)
    assert np.abs(official - diffusers).max() > 5e-4  # 1.1e-3 on this data: >> the tolerance


@pytest.mark.parametrize("numerics, freq, emb", [("official", "official_t_freq", "official_t_emb"),
                                                 ("diffusers", "t_freq", "t_emb")])
def test_timestep_features_per_numerics(loaded, io, numerics, freq, emb):
    model, variables = loaded
    shift = {"official": 0, "diffusers": 1}[numerics]
    # cos/sin of t * freq in float32: an ulp of exp's result (XLA's vs torch's) moves the
    # argument by up to t * 1.2e-7, 1.2e-4 at t = 999 (measured: 2.9e-5).
    features = timestep_embedding(io["t"], 256, freq_shift=shift)
    np.testing.assert_allclose(features, io[freq], atol=2e-4, rtol=0)
    assert np.abs(timestep_embedding(io["t"], 256, freq_shift=1 - shift) - io[freq]).max() > 1
    t_emb = model.clone(numerics=numerics).apply(variables, io["t"],
                                                 method=lambda m, t: m.t_embedder(t))
    np.testing.assert_allclose(t_emb, io[emb], **TOL)


def test_numerics_is_checked_and_reaches_sit_routers_and_the_masked_path(loaded, io):
    model, variables = loaded
    with pytest.raises(ValueError, match=r"unknown numerics 'hub'; valid: \('official', "
                                         r"'diffusers'\)"):
        DiT(**TINY, numerics="hub").init(jax.random.PRNGKey(0), nhwc(io["x"]), io["t"], io["y"])
    sit = SiT(**TINY, numerics="diffusers")
    np.testing.assert_allclose(nchw_out(sit, variables, io), io["out"][:, :4], **TOL)
    # A DyDiT with fresh routers (all on at init): its masked path is the static model.
    dyn = DiT(**TINY, dynamic=True, numerics="diffusers")
    dyn_vars = convert.from_pytorch(ROOT, dyn)
    out, aux = dyn.apply(dyn_vars, nhwc(io["x"]), io["t"], io["y"])
    assert float(np.min(aux["head_masks"])) == 1.0 and float(np.min(aux["token_masks"])) == 1.0
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), io["out"], **TOL)
    head, _ = dyn.apply(dyn_vars, io["t"], method="width_logits")
    router = dyn_vars["params"]["blocks_1"]["head_router"]
    np.testing.assert_allclose(head[:, 1], io["t_emb"] @ router["kernel"] + router["bias"],
                               **TOL)


def test_engine_honours_numerics():
    """The gathered engine on a numerics="diffusers" DyDiT equals its masked path; its width
    plan (from the diffusers timestep features) is not the official model's."""
    from dydit_jax.diffusion import create_diffusion
    from dydit_jax.engine import Engine, WidthPlan, gathered
    model = DiT(**TINY, dynamic=True, numerics="diffusers")
    variables = convert.from_pytorch(DATA / "dydit_s" / "model.pt", model)
    ddim10 = create_diffusion("ddim10")
    official = WidthPlan.build(model.clone(numerics="official"), variables, ddim10)
    eng = Engine(model, variables, ddim10, sampler="ddim", grid="exact", use_cfg=False,
                 token_capacities=(0.5, 1.0))
    assert (eng.plan.head_masks != official.head_masks).any()
    assert eng.plan.fingerprint != official.fingerprint
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 4))
    labels = np.array([1, 7, 3, 9])
    for step in (0, 5, 9):
        t = jnp.full((4,), eng.plan.timesteps[step], jnp.int32)
        want, _ = model.apply(variables, x, t, labels)
        np.testing.assert_allclose(eng.forward(x, step, labels), want, **TOL,
                                   err_msg=f"step {step}")
    # The pre-MLP LayerNorm: on residual tokens of variance ~1e-6, eps 1e-5 vs 1e-6 is visible.
    # The token router's bias is moved to keep about half of the 16 tokens (it reads the stream
    # after attention): the gathered capacity path of 12 slots runs.
    rest, blocks = gathered.split_params(model, variables)
    blk = gathered.block_module(model)
    xs = 1e-3 * jax.random.normal(jax.random.PRNGKey(2), (1, 16, 64))
    bp = blocks[0]
    logits = blk.apply({"params": bp}, xs, method=lambda m, x: m.token_router(x))
    fc2 = {**bp["token_router"]["fc2"], "bias": bp["token_router"]["fc2"]["bias"]
           - jnp.median(logits)}
    bp = {**bp, "token_router": {**bp["token_router"], "fc2": fc2}}
    _, c, t_emb = model.apply(variables, x[:1], t[:1], labels[:1], method="embed")
    sizes = (1, 2, 3, 4)
    width = jax.tree_util.tree_map(lambda a: a[0], gathered.routed_widths(
        model, rest, gathered.stacked_blocks(model, variables), t[0], sizes))
    got, kept = gathered.block_forward(model, bp, xs, c, width, sizes, sizes, (0.75, 1.0))
    want, _ = blk.apply({"params": bp}, xs, c, t_emb, complete=False)
    other, _ = blk.clone(numerics="official").apply({"params": bp}, xs, c, t_emb,
                                                    complete=False)
    assert 0 < int(kept) <= 12
    np.testing.assert_allclose(got, want, **TOL)
    assert np.abs(np.asarray(other) - np.asarray(want)).max() > 1e-4


# ----------------------------------------------------------------------------------------------
# Folder variants and clear errors
# ----------------------------------------------------------------------------------------------

def test_legacy_class_sharded_and_bin_folders_load(tmp_path, loaded):
    model, variables = loaded
    folder = copy_folder(tmp_path)
    edit_config(folder, _class_name="Transformer2DModel", cross_attention_dim=None,
                num_vector_embeds=None, use_linear_projection=False)
    assert_same_tree(convert.from_pytorch(folder, model), variables)
    # Sharded safetensors with an index, then a torch .bin.
    state = load_file(FOLDER / WEIGHTS)
    (folder / WEIGHTS).unlink()
    names = sorted(state)
    shards = {"a.safetensors": names[:20], "b.safetensors": names[20:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / shard)
    index = {"weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (folder / f"{WEIGHTS}.index.json").write_text(json.dumps(index))
    assert_same_tree(convert.from_pytorch(folder, model), variables)
    torch = pytest.importorskip("torch")
    for name in list(shards) + [f"{WEIGHTS}.index.json"]:
        (folder / name).unlink()
    torch.save({k: torch.from_numpy(v) for k, v in state.items()},
               folder / "diffusion_pytorch_model.bin")
    assert_same_tree(convert.from_pytorch(folder, model), variables)


@pytest.mark.parametrize("changes, message", [
    (dict(_class_name="UNet2DConditionModel"), "holds a UNet2DConditionModel, not a DiT"),
    (dict(_class_name="Transformer2DModel", norm_type="layer_norm"),
     "holds a Transformer2DModel with norm_type 'layer_norm', not a DiT"),
    (dict(activation_fn="geglu"), "has activation_fn='geglu': only 'gelu-approximate'"),
    (dict(out_channels=5), "out_channels=5 for in_channels=4"),
])
def test_configs_that_are_not_dit_are_refused(tmp_path, changes, message):
    folder = copy_folder(tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=message):
        convert.from_pytorch(folder, DiT(**TINY))
    with pytest.raises(ValueError, match=message):
        convert.dit_from_diffusers_config(folder)


def test_untied_embedder_copy_missing_key_and_truncated_file_are_refused(tmp_path):
    folder = copy_folder(tmp_path)
    state = load_file(FOLDER / WEIGHTS)
    copy = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"
    save_file({**state, copy: state[copy] + 0.5}, folder / WEIGHTS)
    with pytest.raises(ValueError, match=rf"{copy} differs from block 0's copy .*max \|diff\| "
                                         r"0\.5.*one timestep/label embedder per block"):
        convert.from_pytorch(folder, DiT(**TINY))

    gone = "transformer_blocks.1.ff.net.2.weight"
    save_file({k: v for k, v in state.items() if k != gone}, folder / WEIGHTS)
    with pytest.raises(convert.CheckpointMismatchError) as err:
        convert.from_pytorch(folder, DiT(**TINY))
    assert f"missing keys (1): {gone}" in str(err.value)
    assert "names as in the diffusers folder" in str(err.value)

    save_file({k: v for k, v in state.items() if k != "transformer_blocks.0.attn1.to_k.bias"},
              folder / WEIGHTS)
    with pytest.raises(convert.CheckpointMismatchError) as err:
        convert.from_pytorch(folder, DiT(**TINY))
    assert err.value.missing == ["transformer_blocks.0.attn1.to_{q,k,v}.bias"]
    assert err.value.unexpected == ["transformer_blocks.0.attn1.to_q.bias",
                                    "transformer_blocks.0.attn1.to_v.bias"]

    (folder / WEIGHTS).write_bytes((FOLDER / WEIGHTS).read_bytes()[:100_000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        convert.from_pytorch(folder, DiT(**TINY))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a diffusers model folder .* nor an orbax"):
        convert.from_pytorch(tmp_path / "empty", DiT(**TINY))


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------

def test_export_reproduces_the_golden_files_and_round_trips(tmp_path, loaded):
    model, variables = loaded
    out = convert.to_diffusers(variables, model, tmp_path / "export")
    assert (tmp_path / "export" / "config.json").read_text() == \
        (FOLDER / "config.json").read_text()
    ours, golden = load_file(tmp_path / "export" / WEIGHTS), load_file(FOLDER / WEIGHTS)
    assert sorted(ours) == sorted(golden) and len(ours) == 44
    for k in golden:
        assert ours[k].dtype == np.float32
        np.testing.assert_array_equal(ours[k], golden[k], err_msg=k)
    # Scanned params, and untied values (qkv rows, every block) round-trip exactly.
    noisy = perturbed(variables)
    scanned = model.clone(scan_layers=True)
    stacked = {"params": convert.to_layout(noisy["params"], scan_layers=True)}
    convert.to_diffusers(stacked, scanned, out, overwrite=True)
    assert_same_tree(convert.from_pytorch(out, model), noisy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folders


def test_export_refuses_to_overwrite_and_what_diffusers_cannot_express(tmp_path, loaded):
    model, variables = loaded
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        convert.to_diffusers(variables, model, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").exists()
    convert.to_diffusers(variables, model, tmp_path / "full", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["config.json", WEIGHTS]
    with pytest.raises(ValueError, match="input_size .* is not square"):
        convert.to_diffusers(variables, model.clone(input_size=(8, 16)), tmp_path / "x")
    with pytest.raises(convert.CheckpointMismatchError, match="not those of the model"):
        convert.to_diffusers(variables, model.clone(depth=3), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_dynamic_export_writes_the_static_weights_with_a_warning(tmp_path, loaded, caplog, io):
    model, variables = loaded
    dyn = DiT(**TINY, dynamic=True)
    with caplog.at_level(logging.WARNING):
        convert.to_diffusers(convert.from_pytorch(ROOT, dyn), dyn, tmp_path / "d")
    assert "static weights only" in caplog.text and "16 router tensors" in caplog.text
    assert_same_tree(convert.from_pytorch(tmp_path / "d", model), variables)


def test_diffusers_runs_our_export_like_diffusers_numerics(tmp_path, loaded, io):
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    model, variables = loaded
    noisy = perturbed(variables, seed=1)
    convert.to_diffusers(noisy, model, tmp_path / "export")
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        out = theirs(torch.from_numpy(io["x"]), timestep=torch.from_numpy(io["t"]),
                     class_labels=torch.from_numpy(io["y"])).sample.numpy()
    ours = nchw_out(model.clone(numerics="diffusers"), noisy, io)
    np.testing.assert_allclose(ours, out, **TOL)
    assert np.abs(nchw_out(model, noisy, io) - out).max() > 1e-4  # official numerics differ


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def test_cli_converts_a_diffusers_folder_without_model_and_exports_back(tmp_path, loaded,
                                                                       capsys):
    model, variables = loaded
    convert.main(["--checkpoint", str(ROOT), "--out", str(tmp_path / "ck")])
    assert "(DiT, 0.18M parameters)" in capsys.readouterr().out
    assert_same_tree(load_params(str(tmp_path / "ck"), target=variables["params"]),
                     variables["params"])
    # orbax params -> diffusers; the tiny model is no named config: --model takes the folder.
    convert.main(["--checkpoint", str(tmp_path / "ck"), "--model", str(ROOT),
                  "--to-diffusers", str(tmp_path / "back")])
    assert_same_tree(load_file(tmp_path / "back" / WEIGHTS), load_file(FOLDER / WEIGHTS))
    with pytest.raises(FileExistsError):
        convert.main(["--checkpoint", str(ROOT), "--to-diffusers", str(tmp_path / "back")])
    convert.main(["--checkpoint", str(ROOT), "--to-diffusers", str(tmp_path / "back"),
                  "--overwrite"])
    with pytest.raises(SystemExit):
        convert.main(["--checkpoint", str(ROOT)])
    assert "nothing to write" in capsys.readouterr().err


def test_diffusers_folder_as_init_from(loaded):
    from dydit_jax import config_lib, train
    model, variables = loaded
    config = config_lib.base_config()
    config.train.init_from = str(ROOT)
    fresh = jax.tree_util.tree_map(np.zeros_like, variables["params"])
    assert_same_tree(train.initial_params(config, model, fresh), variables["params"])
