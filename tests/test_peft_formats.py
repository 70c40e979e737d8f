"""PEFT / diffusers LoRA files (dydit_jax.peft.formats): round trips, scaling, strictness and,
when peft is installed, interop with peft + diffusers in torch."""
import json
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from conftest import DATA, load_npz
from dydit_jax import convert
from dydit_jax.models import DiT
from dydit_jax.peft import (LoraSpec, PeftModel, combine, export_peft, import_peft,
                            init_adapters, merge_params)
from test_dit import TINY, nhwc

TOL = dict(atol=1e-5, rtol=1e-5)
LORA = LoraSpec(method="lora", rank=4, alpha=8.0)       # scale 2: not the identity
ROOT = DATA / "dit_diffusers"
FOLDER = ROOT / "transformer"
D = TINY["hidden_size"]


def noisy(tree, seed, std=0.1):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [a + std * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def base():
    """Randomised per-block params of the tiny DiT (adaLN and the final layer are zero at init:
    the outputs would be zero and compare equal whatever the adapters)."""
    model = DiT(**TINY)
    x = np.zeros((1, 8, 8, 4), np.float32)
    params = model.init(jax.random.PRNGKey(0), x, np.zeros(1), np.zeros(1, np.int32))["params"]
    return noisy(params, 1)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((2, 8, 8, 4)).astype(np.float32), np.array([10.0, 700.0]),
            np.array([3, 7]))


def lora(params, spec=LORA, seed=2):
    """Adapters with random lora_A and lora_B (lora_B is zero at init)."""
    return noisy(init_adapters(params, spec, jax.random.PRNGKey(seed), D), seed + 1)


def setup(base, scanned):
    model = DiT(**TINY, scan_layers=scanned)
    params = convert.to_layout(base, scan_layers=scanned)
    return model, params, lora(params)


def run(model, spec, params, adapters, inputs):
    return np.asarray(PeftModel(model, spec).apply({"params": combine(params, adapters)},
                                                   *inputs))


def deltas(params, adapters, spec=LORA):
    """Per-block kernel deltas (merged minus base), unstacked: {scope: [Din, Dout]}."""
    merged = merge_params(combine(params, adapters), np.zeros(D, np.float32), spec)
    flat_m = traverse_util.flatten_dict(convert.to_layout(merged, scan_layers=False))
    flat_b = traverse_util.flatten_dict(convert.to_layout(params, scan_layers=False))
    return {p[:-1]: np.asarray(flat_m[p]) - np.asarray(flat_b[p]) for p in flat_m
            if p[-1] == "kernel" and p[-2] in ("qkv", "proj", "fc1", "fc2")}


def assert_same_tree(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


# ----------------------------------------------------------------------------------------------
# Round trips and the file layout
# ----------------------------------------------------------------------------------------------

# diffusers + scanned is slow-marked: each of its two sides runs in another case.
@pytest.mark.parametrize("scanned,naming", [
    (False, "official"), (True, "official"), (False, "diffusers"),
    pytest.param(True, "diffusers", marks=pytest.mark.slow)],
    ids=["official-unscanned", "official-scanned", "diffusers-unscanned", "diffusers-scanned"])
def test_round_trip_gives_the_same_adapters_and_outputs(tmp_path, base, inputs, naming,
                                                        scanned):
    model, params, adapters = setup(base, scanned)
    out = export_peft(adapters, model, tmp_path / "lora", LORA, naming=naming)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]    # no temporary folders
    back = import_peft(out, model, LORA)
    assert_same_tree(back, adapters)
    want = run(model, LORA, params, adapters, inputs)
    np.testing.assert_array_equal(run(model, LORA, params, back, inputs), want)
    plain = np.asarray(model.apply({"params": params}, *inputs))
    assert np.abs(want - plain).max() > 1e-2                         # the adapters do something

    # The file: PEFT's key names and torch layout.
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    flat = traverse_util.flatten_dict(convert.to_layout(adapters, scan_layers=False))
    a = np.asarray(flat[("blocks_1", "attn", "qkv", "lora_A")][0])       # [Din, r]
    b = np.asarray(flat[("blocks_1", "attn", "qkv", "lora_B")][0])       # [r, 3D]
    fc2_b = np.asarray(flat[("blocks_1", "mlp", "fc2", "lora_B")][0])
    if naming == "official":
        assert len(tensors) == 2 * 4 * TINY["depth"]
        key = "base_model.model.blocks.1.attn.qkv.lora_{}.weight"
        np.testing.assert_array_equal(tensors[key.format("A")], a.T)
        np.testing.assert_array_equal(tensors[key.format("B")], b.T)
        np.testing.assert_array_equal(
            tensors["base_model.model.blocks.1.mlp.fc2.lora_B.weight"], fc2_b.T)
        assert "blocks.0.attn.proj" in config["target_modules"]
    else:
        assert len(tensors) == 2 * 6 * TINY["depth"]
        for i, c in enumerate("qkv"):
            key = f"transformer.transformer_blocks.1.attn1.to_{c}.lora_{{}}.weight"
            np.testing.assert_array_equal(tensors[key.format("A")], a.T)
            np.testing.assert_array_equal(tensors[key.format("B")], b.T[i * D:(i + 1) * D])
        np.testing.assert_array_equal(
            tensors["transformer.transformer_blocks.1.ff.net.2.lora_B.weight"], fc2_b.T)
        assert sorted(config["target_modules"])[:3] == [
            "transformer_blocks.0.attn1.to_k", "transformer_blocks.0.attn1.to_out.0",
            "transformer_blocks.0.attn1.to_q"]


@pytest.mark.parametrize("naming", ["official", "diffusers"])
def test_bare_and_adapter_named_keys_and_the_file_alone_are_read(tmp_path, base, naming):
    model, params, adapters = setup(base, False)
    export_peft(adapters, model, tmp_path / "lora", LORA, naming=naming)
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    bare = {k.split(".", 2)[2] if k.startswith("base_model.") else k.split(".", 1)[1]: v
            for k, v in tensors.items()}
    assert not any(k.startswith(("base_model", "transformer.")) for k in bare)
    named = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    for i, variant in enumerate((bare, named)):
        folder = tmp_path / f"v{i}"
        shutil.copytree(tmp_path / "lora", folder)
        save_file(variant, folder / "adapter_model.safetensors")
        assert_same_tree(import_peft(folder / "adapter_model.safetensors", model, LORA),
                         adapters)
    # Two adapters in one file are refused, not mixed.
    two = {**named, **{k.replace(".default.", ".other."): v for k, v in named.items()}}
    save_file(two, tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match=r"several adapters \(\['default', 'other'\]\)"):
        import_peft(tmp_path / "two.safetensors", model, LORA)


# ----------------------------------------------------------------------------------------------
# Scale
# ----------------------------------------------------------------------------------------------

def test_file_scale_is_absorbed_into_lora_b(tmp_path, base):
    model, params, adapters = setup(base, False)
    export_peft(adapters, model, tmp_path / "lora", LORA)
    want = deltas(params, adapters)
    config_path = tmp_path / "lora" / "adapter_config.json"
    config = json.loads(config_path.read_text())

    config["lora_alpha"] = 16                                # 2r in the file -> twice the delta
    config_path.write_text(json.dumps(config))
    got = deltas(params, import_peft(tmp_path / "lora", model, LORA))
    for scope, delta in want.items():
        np.testing.assert_allclose(got[scope], 2 * delta, **TOL, err_msg=str(scope))

    # Another spec scale computes the same delta (the file's scale goes into lora_B).
    other = LoraSpec(method="lora", rank=4, alpha=1.0)
    got = deltas(params, import_peft(tmp_path / "lora", model, other), other)
    np.testing.assert_allclose(got[("blocks_0", "mlp", "fc1")],
                               2 * want[("blocks_0", "mlp", "fc1")], **TOL)

    # alpha_pattern for one module; rslora; no config at all (alpha = r: half our scale 2).
    config["lora_alpha"] = 8
    config["alpha_pattern"] = {"blocks.1.mlp.fc2": 4}
    config_path.write_text(json.dumps(config))
    got = deltas(params, import_peft(tmp_path / "lora", model, LORA))
    np.testing.assert_allclose(got[("blocks_1", "mlp", "fc2")],
                               0.5 * want[("blocks_1", "mlp", "fc2")], **TOL)
    np.testing.assert_allclose(got[("blocks_0", "mlp", "fc2")],
                               want[("blocks_0", "mlp", "fc2")], **TOL)
    config_path.write_text(json.dumps({**config, "alpha_pattern": {}, "use_rslora": True}))
    got = deltas(params, import_peft(tmp_path / "lora", model, LORA))
    np.testing.assert_allclose(got[("blocks_0", "attn", "qkv")],
                               2 * want[("blocks_0", "attn", "qkv")], **TOL)  # 8/sqrt(4) = 4
    shutil.copy(tmp_path / "lora" / "adapter_model.safetensors", tmp_path / "alone.safetensors")
    got = deltas(params, import_peft(tmp_path / "alone.safetensors", model, LORA))
    np.testing.assert_allclose(got[("blocks_1", "attn", "proj")],
                               0.5 * want[("blocks_1", "attn", "proj")], **TOL)


@pytest.mark.parametrize("scanned", [False, True], ids=["unscanned", "scanned"])
def test_separate_qkv_loras_become_an_exact_rank_3r_qkv(tmp_path, base, scanned):
    model, params, adapters = setup(base, scanned)
    export_peft(adapters, model, tmp_path / "lora", LORA, naming="diffusers")
    path = tmp_path / "lora" / "adapter_model.safetensors"
    tensors = load_file(path)
    rng = np.random.default_rng(5)
    key = "transformer.transformer_blocks.0.attn1.to_k.lora_A.weight"   # one block differs
    tensors[key] = rng.standard_normal(tensors[key].shape).astype(np.float32) * 0.1
    save_file(tensors, path)
    back = import_peft(tmp_path / "lora", model, LORA)
    flat = traverse_util.flatten_dict(convert.to_layout(back, scan_layers=False))
    for i in range(TINY["depth"]):
        assert flat[(f"blocks_{i}", "attn", "qkv", "lora_A")].shape == (1, D, 12)
        assert flat[(f"blocks_{i}", "attn", "qkv", "lora_B")].shape == (1, 12, 3 * D)
        assert flat[(f"blocks_{i}", "mlp", "fc1", "lora_A")].shape == (1, D, 4)
    # The delta is each of to_q/to_k/to_v's own, in its columns.
    got = deltas(params, back)[("blocks_0", "attn", "qkv")]
    for j, c in enumerate("qkv"):
        a = tensors[f"transformer.transformer_blocks.0.attn1.to_{c}.lora_A.weight"]
        b = tensors[f"transformer.transformer_blocks.0.attn1.to_{c}.lora_B.weight"]
        np.testing.assert_allclose(got[:, j * D:(j + 1) * D], LORA.scale * (b @ a).T, **TOL)
    want = deltas(params, adapters)
    np.testing.assert_allclose(deltas(params, back)[("blocks_1", "attn", "qkv")],
                               want[("blocks_1", "attn", "qkv")], **TOL)
    # The rank-3r tree exports with a rank_pattern (and the same scale) and reads back as is.
    export_peft(back, model, tmp_path / "again", LORA)
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {f"blocks.{i}.attn.qkv": 12 for i in range(2)}
    assert config["alpha_pattern"] == {f"blocks.{i}.attn.qkv": 24 for i in range(2)}
    assert_same_tree(import_peft(tmp_path / "again", model, LORA), back)
    # Equal lora_A again: fused back to rank r, the exported adapters exactly.
    tensors[key] = tensors["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"]
    save_file(tensors, path)
    assert_same_tree(import_peft(tmp_path / "lora", model, LORA), adapters)


# ----------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------

def test_a_file_for_another_model_names_every_bad_key(tmp_path, base):
    model, params, adapters = setup(base, False)
    export_peft(adapters, model, tmp_path / "lora", LORA)
    path = tmp_path / "lora" / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.blocks.1.mlp.fc1.lora_B.weight"]
    tensors["base_model.model.blocks.0.mlp.fc2.lora_A.weight"] = np.zeros((4, 99), np.float32)
    tensors["base_model.model.blocks.7.attn.qkv.lora_A.weight"] = np.zeros((4, D), np.float32)
    tensors["base_model.model.blocks.0.attn.qkv.lora_magnitude_vector"] = np.zeros(3 * D)
    save_file(tensors, path)
    with pytest.raises(convert.CheckpointMismatchError) as err:
        import_peft(tmp_path / "lora", model, LORA)
    e = err.value
    assert e.missing == ["blocks.1.mlp.fc1.lora_B.weight"]
    assert e.unexpected == ["base_model.model.blocks.0.attn.qkv.lora_magnitude_vector",
                            "base_model.model.blocks.7.attn.qkv.lora_A.weight"]
    assert e.mismatched == [("base_model.model.blocks.0.mlp.fc2.lora_A.weight", ("r", 4 * D),
                             (4, 99))]
    assert "shape mismatch for base_model.model.blocks.0.mlp.fc2.lora_A.weight" in str(e)
    # A whole file for a deeper, wider model: every extra block and every width named.
    wide = DiT(**{**TINY, "depth": 3, "hidden_size": 96, "num_heads": 4})
    wide_params = convert._abstract_params(wide)                     # shapes only: no init
    export_peft(lora(wide_params), wide, tmp_path / "wide", LORA, naming="diffusers")
    with pytest.raises(ValueError) as err:
        import_peft(tmp_path / "wide", model, LORA)
    e = err.value
    assert len(e.unexpected) == 12 and all(".transformer_blocks.2." in k for k in e.unexpected)
    assert not e.missing and len(e.mismatched) == 2 * 6 * TINY["depth"]
    assert ("transformer.transformer_blocks.0.attn1.to_q.lora_A.weight", ("r", D),
            (4, 96)) in e.mismatched
    assert "transformer_blocks.2.ff.net.2.lora_B.weight" in str(e)


def test_tdlora_export_and_bad_folders_are_refused(tmp_path, base):
    model, params, _ = setup(base, False)
    td = LoraSpec(method="tdlora", rank=4, experts=3)
    with pytest.raises(ValueError, match=r"TD-LoRA adapters \(8 timestep routers, experts per "
                                         r"target \[3\]\).*cannot be written as one"):
        export_peft(init_adapters(params, td, jax.random.PRNGKey(0), D), model,
                    tmp_path / "td", td)
    assert not (tmp_path / "td").exists()
    with pytest.raises(ValueError, match="naming='hub'"):
        export_peft(lora(params), model, tmp_path / "x", LORA, naming="hub")
    # A combined base + adapter tree exports its adapters; a full out_dir needs overwrite.
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        export_peft(lora(params), model, tmp_path / "full", LORA)
    assert (tmp_path / "full" / "keep.txt").exists()
    export_peft({"params": combine(params, lora(params))}, model, tmp_path / "full", LORA,
                overwrite=True)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    # Adapters of another model do not export under this one's names.
    with pytest.raises(ValueError, match="do not match the model"):
        export_peft(lora(params), DiT(**{**TINY, "hidden_size": 96}), tmp_path / "y", LORA)
    with pytest.raises(ValueError, match="holds none of adapter_model.safetensors"):
        import_peft(tmp_path, model, LORA)


# ----------------------------------------------------------------------------------------------
# Interop with peft and diffusers in torch
# ----------------------------------------------------------------------------------------------

TORCH_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


@pytest.fixture(scope="module")
def torch_side():
    pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    io = load_npz("dit_diffusers", "io.npz")
    model = convert.dit_from_diffusers_config(ROOT, numerics="diffusers")
    variables = convert.from_pytorch(ROOT, model)

    def torch_out(transformer):
        with torch.no_grad():
            return transformer.eval()(torch.from_numpy(io["x"]),
                                      timestep=torch.from_numpy(io["t"]),
                                      class_labels=torch.from_numpy(io["y"])).sample.numpy()

    def ours(spec, adapters):
        out = PeftModel(model, spec).apply(
            {"params": combine(variables["params"], adapters)}, nhwc(io["x"]), io["t"],
            io["y"])
        return np.asarray(out).transpose(0, 3, 1, 2)

    def fresh():
        return diffusers.DiTTransformer2DModel.from_pretrained(FOLDER)
    return model, variables["params"], torch_out, ours, fresh


def test_a_peft_lora_trained_in_torch_runs_the_same_here(tmp_path, torch_side):
    import peft
    import torch
    model, params, torch_out, ours, fresh = torch_side
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=TORCH_TARGETS,
                             init_lora_weights=False)       # random lora_B: a visible delta
    wrapped = peft.get_peft_model(fresh(), config)
    want = torch_out(wrapped)
    assert np.abs(want - torch_out(fresh())).max() > 1e-2
    wrapped.save_pretrained(tmp_path / "torch_lora")          # base_model.model.* keys
    spec = LoraSpec(method="lora", rank=2)
    back = import_peft(tmp_path / "torch_lora", model, spec)
    assert back["blocks_0"]["attn"]["qkv"]["lora_A"].shape == (1, D, 6)  # q/k/v A differ: 3r
    np.testing.assert_allclose(ours(spec, back), want, **TOL)
    # The bare keys of a LoRA injected into the diffusers model itself read the same.
    state = peft.get_peft_model_state_dict(wrapped)
    save_file({k.removeprefix("base_model.model."): v.numpy() for k, v in state.items()},
              tmp_path / "torch_lora" / "adapter_model.safetensors")
    assert_same_tree(import_peft(tmp_path / "torch_lora", model, spec), back)


def test_our_export_loads_into_peft_and_diffusers(tmp_path, torch_side):
    import peft
    from safetensors.torch import load_file as torch_load
    model, params, torch_out, ours, fresh = torch_side
    spec = LoraSpec(method="lora", rank=3, alpha=5.0)
    adapters = noisy(init_adapters(params, spec, jax.random.PRNGKey(3), D), 4)
    want = ours(spec, adapters)
    # The default diffusers file ("transformer." keys) into a model with injected LoRA layers.
    export_peft(adapters, model, tmp_path / "ours", spec, naming="diffusers")
    config = peft.LoraConfig.from_pretrained(str(tmp_path / "ours"))
    assert (config.r, config.lora_alpha) == (3, 5)
    transformer = peft.inject_adapter_in_model(config, fresh())
    state = torch_load(tmp_path / "ours" / "adapter_model.safetensors")
    result = peft.set_peft_model_state_dict(
        transformer, {k.removeprefix("transformer."): v for k, v in state.items()})
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora" in k]
    np.testing.assert_allclose(torch_out(transformer), want, **TOL)
    # PEFT's own loader reads the folder written with its prefix.
    export_peft(adapters, model, tmp_path / "peft", spec, naming="diffusers",
                prefix="base_model.model.")
    loaded = peft.PeftModel.from_pretrained(fresh(), str(tmp_path / "peft"))
    np.testing.assert_allclose(torch_out(loaded), want, **TOL)
