"""The checkpoint converter: formats, strict key/shape checks, errors, orbax export."""
import collections

import jax
import numpy as np
import pytest
import torch

from conftest import DATA, load_npz
from dydit_jax import convert
from dydit_jax.checkpointing import load_params
from dydit_jax.models import DiT
from test_dit import TINY, nhwc

PT = DATA / "dit_s" / "model.pt"


@pytest.fixture(scope="module")
def state_dict():
    return torch.load(PT, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference():
    model = DiT(**TINY)
    return model, convert.from_pytorch(PT, model)


def assert_same_tree(a, b):
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_formats_give_identical_params(tmp_path, state_dict, reference):
    model, ref = reference
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp_path / "m.safetensors")
    np.savez(tmp_path / "m.npz", **{k: v.numpy() for k, v in state_dict.items()})
    assert_same_tree(convert.from_pytorch(tmp_path / "m.safetensors", model), ref)
    assert_same_tree(convert.from_pytorch(str(tmp_path / "m.npz"), model), ref)
    assert_same_tree(convert.from_pytorch(state_dict, model), ref)
    # bfloat16 tensors are widened to float32.
    bf16 = {k: v.to(torch.bfloat16) for k, v in state_dict.items()}
    out = convert.from_pytorch(bf16, model)
    np.testing.assert_allclose(out["params"]["blocks_0"]["attn"]["qkv"]["kernel"],
                               ref["params"]["blocks_0"]["attn"]["qkv"]["kernel"], rtol=1e-2)


def test_training_checkpoint_takes_ema_by_default(tmp_path, state_dict, reference):
    model, ref = reference
    noisy = collections.OrderedDict((k, v if k == "pos_embed" else v + 1.0)
                                    for k, v in state_dict.items())
    path = tmp_path / "0100000.pt"
    torch.save({"model": noisy, "ema": state_dict, "opt": {"state": {}, "param_groups": []},
                "args": {"model": "DiT-S/2"}}, path)
    assert_same_tree(convert.from_pytorch(path, model), ref)
    trained = convert.from_pytorch(path, model, which="model")
    np.testing.assert_allclose(trained["params"]["final_layer"]["linear"]["bias"],
                               ref["params"]["final_layer"]["linear"]["bias"] + 1.0, rtol=1e-6)


def test_wrong_key_and_shape_give_one_clear_error(state_dict):
    model = DiT(**TINY)
    bad = collections.OrderedDict(state_dict)
    bad["blocks.1.attn.qkvv.weight"] = bad.pop("blocks.1.attn.qkv.weight")
    bad["blocks.0.mlp.fc1.weight"] = torch.zeros(128, 64)
    bad["extra.thing"] = torch.zeros(3)
    with pytest.raises(convert.CheckpointMismatchError) as err:
        convert.from_pytorch(bad, model)
    msg = str(err.value)
    assert "missing keys (1): blocks.1.attn.qkv.weight" in msg
    assert "blocks.1.attn.qkvv.weight" in msg and "extra.thing" in msg
    assert ("shape mismatch for blocks.0.mlp.fc1.weight: model expects (256, 64)"
            in msg and "checkpoint has (128, 64)" in msg)
    assert err.value.missing == ["blocks.1.attn.qkv.weight"]


def test_checkpoint_for_another_model_is_refused(state_dict):
    bigger = DiT(**{**TINY, "hidden_size": 128})
    with pytest.raises(convert.CheckpointMismatchError, match="pos_embed"):
        convert.from_pytorch(state_dict, bigger)
    deeper = DiT(**{**TINY, "depth": 3})
    with pytest.raises(convert.CheckpointMismatchError, match="missing keys .*blocks.2.attn"):
        convert.from_pytorch(state_dict, deeper)


def test_corrupt_and_pickled_files_are_refused(tmp_path):
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(PT.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        convert.load_state_dict(truncated)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, evil)
    with pytest.raises(ValueError, match="weights_only|tensors"):
        convert.load_state_dict(evil)
    with pytest.raises(FileNotFoundError):
        convert.load_state_dict(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        (tmp_path / "w.h5").write_bytes(b"x")
        convert.load_state_dict(tmp_path / "w.h5")


def test_orbax_export_reproduces_outputs(tmp_path, reference):
    model, ref = reference
    out = tmp_path / "converted"
    # The tiny golden model is not a named config, so this drives the CLI's save path directly.
    from dydit_jax.checkpointing import save_params
    save_params(str(out), ref["params"])
    params = load_params(str(out), target=ref["params"])
    assert_same_tree(params, ref["params"])
    io = load_npz("dit_s", "io.npz")
    np.testing.assert_allclose(model.apply({"params": params}, nhwc(io["x"]), io["t"], io["y"]),
                               nhwc(io["out"]), atol=1e-5, rtol=1e-5)


def test_cli_end_to_end(tmp_path, state_dict):
    # A DiT-S/8 at 64 px (input 8x8x4) with random weights, saved as the release would.
    model = DiT(input_size=8, in_channels=4, num_classes=10, patch_size=8, depth=12,
                hidden_size=384, num_heads=6)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 4), np.float32),
                                 np.zeros(1, np.float32), np.zeros(1, np.int32))["params"]
    sd = to_torch_state_dict(params, model)
    torch.save(sd, tmp_path / "s8.pt")
    convert.main(["--checkpoint", str(tmp_path / "s8.pt"), "--model", "DiT-S/8",
                  "--image-size", "64", "--num-classes", "10", "--out", str(tmp_path / "ck")])
    assert_same_tree(load_params(str(tmp_path / "ck"), target=params), params)


# The static case is slow-marked: the dynamic one runs the same CLI path with the routers too.
@pytest.mark.parametrize("dynamic", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["static", "dynamic"])
def test_cli_converts_sit_checkpoints(tmp_path, capsys, dynamic):
    """`--model SiT-S/8` (with `--dynamic`: a DyDiT checkpoint, routers included) builds a SiT;
    the written params give it the outputs of `from_pytorch` into that SiT."""
    from dydit_jax.models.sit import SiT, sit_config
    model = SiT(input_size=8, in_channels=4, num_classes=10, dynamic=dynamic,
                **sit_config("SiT-S/8"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t, y = np.array([0.1, 0.8], np.float32), np.array([3, 7], np.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x, t, y)["params"]
    torch.save(to_torch_state_dict(params, model), tmp_path / "sit.pt")
    convert.main(["--checkpoint", str(tmp_path / "sit.pt"), "--model", "SiT-S/8",
                  "--image-size", "64", "--num-classes", "10", "--out", str(tmp_path / "ck")]
                 + (["--dynamic"] if dynamic else []))
    assert "(SiT" in capsys.readouterr().out
    reference = convert.from_pytorch(tmp_path / "sit.pt", model)
    loaded = load_params(str(tmp_path / "ck"), target=reference["params"])
    assert_same_tree(loaded, params)  # routers too: read from the checkpoint, not fresh
    out = model.apply({"params": loaded}, x, t, y)
    want = model.apply(reference, x, t, y)
    if dynamic:
        (out, _), (want, _) = out, want
    assert out.shape == x.shape  # SiT's C prediction channels of the 2C (learn_sigma)
    np.testing.assert_array_equal(out, want)


def to_torch_state_dict(params, model):
    """Inverse mapping (ours -> release names and layouts), used to test round trips."""
    from flax import traverse_util
    sd = collections.OrderedDict()
    sd["pos_embed"] = torch.from_numpy(np.array(model.pos_embed()))
    for path, value in traverse_util.flatten_dict(params).items():
        name = convert._flax_to_torch_name(path)
        v = np.asarray(value)
        if path[-1] == "kernel":
            v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
        sd[name] = torch.from_numpy(np.array(v))
    return sd


def test_layout_conversion_between_scanned_and_per_block(reference):
    model, ref = reference
    stacked = convert.to_layout(ref["params"], scan_layers=True)
    assert "blocks" in stacked and "blocks_0" not in stacked
    assert stacked["blocks"]["attn"]["qkv"]["kernel"].shape == (2, 64, 192)
    scanned_model = DiT(**TINY, scan_layers=True)
    direct = convert.from_pytorch(PT, scanned_model)["params"]
    assert_same_tree(stacked, direct)
    assert_same_tree(convert.to_layout(stacked, scan_layers=False), ref["params"])
