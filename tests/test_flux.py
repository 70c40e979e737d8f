"""FLUX and DyFLUX in Flax against the releases.

tests/data/flux: black-forest-labs/flux `Flux` (BFL names, float32) on base, sharp (QK-norm
scales ~1) and strong (modulation biases and MLP-in weights * 0.3) weights, with unit RoPE /
attention probes and a 4-step `sampling.denoise` run. tests/data/dyflux: the DyFLUX release's
`DynFluxTransformer2DModel` (diffusers names + token routers), routing on, off and in training.

Tolerance float32 atol = rtol = 1e-5 (the golden READMEs: the references' own float32 vs
float64 differences are 2.1e-7 to 3.8e-7 at magnitudes 0.5-3.8); masks exactly (the smallest
router margin is 9.2e-5, the float32 logit error <= 3e-9); float64 1e-7 against the float64
runs, which keep the release's float32 steps (t features, RoPE, RMSNorm variance in DyFLUX).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from conftest import DATA, load_npz, run_python
from dydit_jax import convert, convert_flux, flux_sampling
from dydit_jax.models import FLUX, FLUX_models
from dydit_jax.models.flux import attention, image_ids, pack_latents, rope_table, unpack_latents

TOL = dict(atol=1e-5, rtol=1e-5)
FLUX_TINY = dict(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=32,
                 hidden_size=64, mlp_ratio=4.0, num_heads=4, depth=1, depth_single_blocks=2,
                 axes_dim=(4, 6, 6), theta=10000, qkv_bias=True, guidance_embed=True)
BLOCKS = ("double0", "single0", "single1")


@pytest.fixture(scope="module")
def io():
    return load_npz("flux", "io.npz")


@pytest.fixture(scope="module")
def dyio():
    return load_npz("dyflux", "io.npz")


def flux_state(variant: str) -> dict:
    """model.safetensors, then the sharp QK scales, then the strong overrides (README-extra)."""
    state = load_file(DATA / "flux" / "model.safetensors")
    if variant in ("sharp", "strong"):
        state.update(load_file(DATA / "flux" / "qknorm_scales_sharp.safetensors"))
    if variant == "strong":
        state.update(load_file(DATA / "flux" / "strong_overrides.safetensors"))
    return state


def flux_inputs(io, txt_ids=None):
    return (io["img"], io["img_ids"], io["txt"], io["txt_ids"] if txt_ids is None else txt_ids,
            io["timesteps"], io["y"], io["guidance"])


def dyflux_inputs(io, **over):
    names = ("hidden_states", "img_ids", "encoder_hidden_states", "txt_ids", "timestep",
             "pooled_projections", "guidance")
    return tuple(over.get(n, io[n]) for n in names)


def dyflux_model(**kw):
    with open(DATA / "dyflux" / "transformer" / "config.json") as f:
        return FLUX(**{**convert_flux.model_args_from_diffusers_config(json.load(f)), **kw})


@pytest.mark.parametrize("variant,key", [("base", "out"), ("sharp", "out_sharp"),
                                         ("strong", "out_strong")])
def test_forward_matches_the_release(io, variant, key):
    model = FLUX(**FLUX_TINY)
    out = model.apply(convert.from_pytorch(flux_state(variant), model), *flux_inputs(io))
    assert out.dtype == jnp.float32 and out.shape == io[key].shape
    np.testing.assert_allclose(out, io[key], **TOL)


def test_blocks_and_embeddings_of_the_strong_variant(io):
    """Every stage, on the weights where a frozen text stream, swapped shift/scale, exact GELU
    or half-split RoPE would show (README-extra: 7e-2, 0.43, 8e-5, 7.5e-2 on out_strong)."""
    model = FLUX(**FLUX_TINY)
    variables = convert.from_pytorch(flux_state("strong"), model)
    _, state = model.apply(variables, *flux_inputs(io), capture_intermediates=True)
    inter = state["intermediates"]
    img, txt = inter["double_blocks_0"]["__call__"][0][:2]
    np.testing.assert_allclose(img, io["double0_img_strong"], **TOL)
    np.testing.assert_allclose(txt, io["double0_txt_strong"], **TOL)
    for j in range(2):
        np.testing.assert_allclose(inter[f"single_blocks_{j}"]["__call__"][0][0],
                                   io[f"single{j}_out_strong"], **TOL)
    # The embedders (base weights: the stored intermediates are of the base model).
    base = convert.from_pytorch(flux_state("base"), model)
    _, state = model.apply(base, *flux_inputs(io), capture_intermediates=True)
    inter = state["intermediates"]
    for ours, theirs in (("img_in", "img_in_out"), ("txt_in", "txt_in_out"),
                         ("time_in", "time_in_out"), ("guidance_in", "guidance_in_out"),
                         ("vector_in", "vector_in_out")):
        got = np.asarray(inter[ours]["__call__"][0])     # Dense layers run on 2-D rows
        np.testing.assert_allclose(got.reshape(io[theirs].shape), io[theirs], **TOL,
                                   err_msg=ours)
    vec = model.apply(base, io["timesteps"], io["y"], io["guidance"],
                      method=FLUX.conditioning)
    np.testing.assert_allclose(vec, io["vec"], **TOL)


def test_rope_moves_the_output_with_the_text_ids(io):
    model = FLUX(**FLUX_TINY)
    variables = convert.from_pytorch(flux_state("strong"), model)
    out = model.apply(variables, *flux_inputs(io, txt_ids=io["txt_ids_nonzero"]))
    np.testing.assert_allclose(out, io["out_strong_txt_ids"], **TOL)
    assert np.abs(np.asarray(out) - io["out_strong"]).max() > 1e-2   # README: 3.7e-2


def test_rope_table_and_attention_units(io):
    ids = np.concatenate([io["txt_ids"], io["img_ids"]], axis=1)
    np.testing.assert_allclose(rope_table(ids, FLUX_TINY["axes_dim"]), io["pe"][:, 0], **TOL)
    pe = rope_table(io["unit_ids"], FLUX_TINY["axes_dim"])
    np.testing.assert_allclose(pe, io["unit_pe"][:, 0], **TOL)
    # The release's [B, H, L, hd] -> ours [B, L, H, hd].
    q, k, v = (io[f"unit_{n}"].transpose(0, 2, 1, 3) for n in "qkv")
    np.testing.assert_allclose(attention(q, k, v, pe), io["unit_attention"], **TOL)
    with pytest.raises(ValueError, match="position axes"):
        rope_table(ids[..., :2], FLUX_TINY["axes_dim"])


def test_schnell_variant_has_no_guidance_embedding(io):
    model = FLUX(**{**FLUX_TINY, "guidance_embed": False})
    state = {k: v for k, v in flux_state("base").items() if not k.startswith("guidance_in.")}
    variables = convert.from_pytorch(state, model)
    out = model.apply(variables, *flux_inputs(io)[:6])
    np.testing.assert_allclose(out, io["out_no_guidance_embed"], **TOL)
    # The dev checkpoint into schnell: its guidance_in keys are named, with the fix.
    with pytest.raises(convert.CheckpointMismatchError, match="(?s)guidance_in.in_layer.weight"
                       ".*guidance_embed=True"):
        convert.from_pytorch(flux_state("base"), model)
    dev = FLUX(**FLUX_TINY)
    with pytest.raises(ValueError, match="pass guidance"):
        dev.apply(convert.from_pytorch(flux_state("base"), dev), *flux_inputs(io)[:6])


def test_jit_with_traced_variables_and_inputs_equals_eager(io):
    model = FLUX(**FLUX_TINY)
    variables = convert.from_pytorch(flux_state("strong"), model)
    eager = model.apply(variables, *flux_inputs(io))
    jitted = jax.jit(model.apply)(variables, *flux_inputs(io))
    np.testing.assert_allclose(jitted, eager, atol=1e-6, rtol=1e-6)


def test_packing_ids_and_denoise_loop_match_the_release(io):
    """`sampling.prepare`'s packing and ids, `get_schedule(4, 24)`, and the 4-step Euler run
    of the sharp model (README-extra), compiled once for two schedules of one length."""
    np.testing.assert_array_equal(pack_latents(io["denoise_noise_latent"]), io["denoise_img"])
    np.testing.assert_array_equal(unpack_latents(io["denoise_img"], 8, 12),
                                  io["denoise_noise_latent"])
    np.testing.assert_array_equal(image_ids(2, 8, 12), io["img_ids"])
    schedule = flux_sampling.get_schedule(4, 24, shift=True)
    np.testing.assert_allclose(schedule, io["denoise_timesteps"], atol=1e-7, rtol=0)
    assert not np.allclose(flux_sampling.get_schedule(4, 24, shift=False), schedule)
    model = FLUX(**FLUX_TINY)
    variables = convert.from_pytorch(flux_state("sharp"), model)
    traces = []

    @jax.jit
    def run(variables, noise, timesteps):
        traces.append(1)
        return flux_sampling.denoise(model, variables, noise, io["img_ids"], io["txt"],
                                     io["txt_ids"], io["y"], timesteps,
                                     guidance=float(io["denoise_guidance"]))

    out = run(variables, io["denoise_img"], schedule)
    np.testing.assert_allclose(out, io["denoise_out"], **TOL)
    np.testing.assert_allclose(unpack_latents(out, 8, 12), io["denoise_out_unpacked"], **TOL)
    run(variables, io["denoise_img"], flux_sampling.get_schedule(4, 24, shift=False))
    assert len(traces) == 1


def test_float64_matches_the_release():
    code = """
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
from conftest import DATA, load_npz
from dydit_jax import convert
from dydit_jax.models import FLUX
from test_flux import FLUX_TINY, dyflux_inputs, dyflux_model, flux_inputs, flux_state
io = load_npz("flux", "io.npz")
model = FLUX(**FLUX_TINY, dtype=jnp.float64, param_dtype=jnp.float64)
f64 = lambda a: tuple(np.asarray(x, np.float64) for x in a)
for variant, key in (("base", "out_float64"), ("strong", "out_strong_float64")):
    out = model.apply(convert.from_pytorch(flux_state(variant), model), *f64(flux_inputs(io)))
    assert out.dtype == jnp.float64
    err = float(np.abs(np.asarray(out) - io[key]).max())
    print(key, err)
    assert err < 1e-7, (key, err)
dy = load_npz("dyflux", "io.npz")
model = dyflux_model(dtype=jnp.float64, param_dtype=jnp.float64)
v = convert.from_pytorch(DATA / "dyflux" / "transformer_0.pt", model)
out, aux = model.apply(v, *f64(dyflux_inputs(dy)))
assert float(np.abs(np.asarray(out) - dy["out_float64"]).max()) < 1e-7
for i, b in enumerate(("double0", "single0", "single1")):
    err = float(np.abs(np.asarray(aux["token_logits"][i]) - dy[b + "_logits_float64"]).max())
    assert err < 1e-7, (b, err)   # as out: the reference's float32 RMSNorm variance
np.testing.assert_array_equal(aux["token_masks"], dy["token_masks"])
out, _ = model.apply(v, *f64(dyflux_inputs(dy)), route=False)
assert float(np.abs(np.asarray(out) - dy["out_all_tokens_float64"]).max()) < 1e-7
print("OK")
"""
    assert "OK" in run_python(code).stdout


# ----------------------------------------------------------------------------------------------
# DyFLUX
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["transformer_0.pt", "transformer", "."])
def test_dyflux_release_forward_and_token_masks(dyio, source):
    """Both stored formats (the release's {"module": ...} .pt, the diffusers folder, and the
    pipeline folder holding it) give the release's output and per-block masks."""
    model = dyflux_model()
    variables = convert.from_pytorch(DATA / "dyflux" / source, model)
    out, aux = model.apply(variables, *dyflux_inputs(dyio))
    np.testing.assert_allclose(out, dyio["out"], **TOL)
    assert aux["token_masks"].shape == (3, 2, 48)
    np.testing.assert_array_equal(aux["token_masks"], dyio["token_masks"])
    np.testing.assert_allclose(aux["token_logits"], dyio["token_logits"], atol=1e-7, rtol=0)
    # Skipped tokens: a third to a half of each block's, so the masks matter.
    kept = np.asarray(aux["token_masks"]).mean(axis=(1, 2))
    assert (kept > 0.3).all() and (kept < 0.7).all(), kept


def test_dyflux_without_routing_is_the_plain_model(dyio):
    model = dyflux_model()
    variables = convert.from_pytorch(DATA / "dyflux" / "transformer_0.pt", model)
    out, aux = model.apply(variables, *dyflux_inputs(dyio), route=False)
    assert aux is None
    np.testing.assert_allclose(out, dyio["out_all_tokens"], **TOL)
    routed = model.apply(variables, *dyflux_inputs(dyio))[0]
    assert np.abs(np.asarray(routed) - np.asarray(out)).max() > 1e-3   # README: 5.5e-3


def test_dyflux_skip_semantics_per_block(dyio):
    """Double block: unselected image tokens keep the after-attention state; single block:
    they keep the block input (README-extra, checks.skip_semantics)."""
    model = dyflux_model()
    variables = convert.from_pytorch(DATA / "dyflux" / "transformer_0.pt", model)
    _, state = model.apply(variables, *dyflux_inputs(dyio), capture_intermediates=True)
    inter = state["intermediates"]
    img, txt = inter["double_blocks_0"]["__call__"][0][:2]
    np.testing.assert_allclose(img, dyio["double0_img"], **TOL)
    np.testing.assert_allclose(txt, dyio["double0_txt"], **TOL)
    outs = [inter[f"single_blocks_{j}"]["__call__"][0][0] for j in range(2)]
    for j, out in enumerate(outs):
        np.testing.assert_allclose(out, dyio[f"single{j}_out"], **TOL)
    skipped = dyio["single1_mask"] == 0
    block_in = np.asarray(outs[0])[:, 7:]
    np.testing.assert_array_equal(np.asarray(outs[1])[:, 7:][skipped], block_in[skipped])
    assert not np.allclose(np.asarray(outs[1])[:, 7:][~skipped], block_in[~skipped])


def test_dyflux_training_gates_replay_the_release(dyio):
    """Train mode with the release's Gumbel draws: the same masks and output; without stored
    noise the gates are drawn from the "gumbel" stream (different keys, different masks)."""
    model = dyflux_model()
    variables = convert.from_pytorch(DATA / "dyflux" / "transformer_0.pt", model)

    def draws(b):
        return [np.asarray(dyio[f"train_{b}_gumbel{k}"]).reshape(2, 48) for k in (1, 2)]

    noise = np.stack([np.stack(draws(b)) for b in BLOCKS])
    out, aux = model.apply(variables, *dyflux_inputs(dyio), train=True, gumbel_noise=noise)
    np.testing.assert_allclose(out, dyio["out_train"], **TOL)
    for i, b in enumerate(BLOCKS):
        np.testing.assert_array_equal(aux["token_masks"][i], dyio[f"train_{b}_mask"])
    # The straight-through gate carries the router's gradient (the release's gather does not).
    grad = jax.grad(lambda v: model.apply(v, *dyflux_inputs(dyio), train=True,
                                          gumbel_noise=noise)[0].sum())(variables)
    router = grad["params"]["single_blocks_1"]["token_router"]["router"]["kernel"]
    assert np.abs(np.asarray(router)).max() > 0
    masks = [model.apply(variables, *dyflux_inputs(dyio), train=True,
                         rngs={"gumbel": jax.random.PRNGKey(s)})[1]["token_masks"]
             for s in (0, 1)]
    assert not np.array_equal(masks[0], masks[1])
    with pytest.raises(ValueError, match="gumbel_noise must be"):
        model.apply(variables, *dyflux_inputs(dyio), train=True, gumbel_noise=noise[:2])


# ----------------------------------------------------------------------------------------------
# Checkpoint layouts
# ----------------------------------------------------------------------------------------------

def _diffusers_state():
    return load_file(DATA / "dyflux" / "transformer" / "diffusion_pytorch_model.safetensors")


def sharded_folder(pipeline, state):
    """A diffusers pipeline folder whose transformer/ holds `state` in 2 shards + index."""
    folder = pipeline / "transformer"
    folder.mkdir(parents=True)
    with open(DATA / "dyflux" / "transformer" / "config.json") as f:
        (folder / "config.json").write_text(f.read())
    names = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / shard)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}))
    return folder


def test_bfl_diffusers_sharded_and_release_files_load_the_same(tmp_path):
    """One set of weights written as a BFL .safetensors, a sharded diffusers folder (index
    json + 2 shards), the release's {"module": ...} .pt and an in-memory torch state dict."""
    model = dyflux_model()
    diffusers = _diffusers_state()
    save_file(convert_flux.diffusers_to_bfl(diffusers), tmp_path / "flux1-tiny.safetensors")
    folder = sharded_folder(tmp_path / "pipeline", diffusers)
    torch_state = {k: torch.from_numpy(v) for k, v in diffusers.items()}
    torch.save({"module": torch_state}, tmp_path / "transformer_230000.pt")

    ref = convert.from_pytorch(DATA / "dyflux" / "transformer_0.pt", model)
    for source in (tmp_path / "flux1-tiny.safetensors", tmp_path / "pipeline", folder,
                   tmp_path / "transformer_230000.pt", torch_state, diffusers):
        got = convert.from_pytorch(source, model)
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, ref)
    # A shard missing from the folder is named.
    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="00002-of-00002"):
        convert.from_pytorch(folder, model)


def test_mismatched_checkpoint_names_every_bad_key():
    model = FLUX(**FLUX_TINY)
    state = flux_state("base")
    del state["single_blocks.1.linear2.bias"]
    state["double_blocks.0.img_attn.extra.weight"] = np.zeros((2, 2), np.float32)
    state["img_in.weight"] = np.zeros((64, 63), np.float32)
    with pytest.raises(convert.CheckpointMismatchError) as e:
        convert.from_pytorch(state, model)
    msg = str(e.value)
    assert "single_blocks.1.linear2.bias" in msg
    assert "double_blocks.0.img_attn.extra.weight" in msg
    assert "img_in.weight: model expects (64, 64)" in msg and "has (64, 63)" in msg


def test_routers_are_demanded_only_by_what_the_model_is(dyio):
    """A DyFLUX checkpoint into a static FLUX names its routers with the fix; a plain
    checkpoint into a dynamic FLUX gets fresh routers (the release's init: xavier weights,
    bias 5.0, so nearly every token starts kept)."""
    with pytest.raises(convert.CheckpointMismatchError,
                       match="(?s)token_router.*dynamic=True"):
        convert.from_pytorch(DATA / "dyflux" / "transformer_0.pt", dyflux_model(dynamic=False))
    plain = {k: v for k, v in _diffusers_state().items() if ".token_selection." not in k}
    model = dyflux_model()
    variables, fresh = convert.load_report(plain, model)
    assert len(fresh) == 3 * 6 and all("/token_router/" in f for f in fresh)
    router = variables["params"]["single_blocks_0"]["token_router"]["router"]
    np.testing.assert_array_equal(router["bias"], [5.0])
    assert np.asarray(model.apply(variables, *dyflux_inputs(dyio))[1]["token_masks"]).mean() > 0.9
    out, _ = model.apply(variables, *dyflux_inputs(dyio), route=False)
    np.testing.assert_allclose(out, dyio["out_all_tokens"], **TOL)


def test_presets_have_the_released_sizes():
    """FLUX.1-dev 11.9 B parameters (schnell: no guidance_in), lite-8B 8 double blocks; shapes
    only (`jax.eval_shape`), nothing allocated."""
    def count(model):
        shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                   *model.dummy_inputs()))
        return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    dev, schnell = count(FLUX_models["flux-dev"]()), count(FLUX_models["flux-schnell"]())
    assert dev == 11_901_408_320
    assert dev - schnell == 256 * 3072 + 3072 + 3072 * 3072 + 3072
    lite = FLUX_models["flux-lite-8b"]()
    assert (lite.depth, lite.depth_single_blocks) == (8, 38)
    assert 8.0e9 < count(lite) < 8.3e9


# ----------------------------------------------------------------------------------------------
# Sharding
# ----------------------------------------------------------------------------------------------

def test_sharded_forward_and_sampler_equal_one_device():
    """8 simulated devices, mesh data 2 x fsdp 4, the default rules (kernels FSDP-sharded):
    the DyFLUX forward (output and masks) and the FLUX sampler equal the 1-device results; the
    parameters are sharded as the rules say, also for a 12 B FLUX.1-dev laid out from shapes
    only, and `sharding.init_sharded` makes them born sharded."""
    code = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from conftest import DATA, load_npz
from dydit_jax import convert, flux_sampling, sharding
from dydit_jax.models import FLUX, FLUX_models
from test_flux import FLUX_TINY, dyflux_inputs, dyflux_model, flux_state
assert jax.device_count() == 8
rules = (("kernel$|embedding$", "fsdp"), (".*", "replicate"))
mesh = sharding.create_mesh(data=2, fsdp=4)
dy = load_npz("dyflux", "io.npz")
model = dyflux_model()
v = convert.from_pytorch(DATA / "dyflux" / "transformer_0.pt", model)
inputs = tuple(np.concatenate([a] * 4) for a in dyflux_inputs(dy))        # batch 8
ref_out, ref_aux = model.apply(v, *inputs)
shard = sharding.tree_shardings(v, mesh, rules)
vs = jax.device_put(v, shard)
qkv = vs["params"]["double_blocks_0"]["img_attn"]["qkv"]
assert qkv["kernel"].sharding.spec == P(None, "fsdp"), qkv["kernel"].sharding.spec
assert qkv["bias"].sharding.spec == P()
batch = sharding.batch_sharding(mesh)
xs = tuple(jax.device_put(a, batch) for a in inputs)
out, aux = jax.jit(model.apply)(vs, *xs)
assert out.sharding.spec[0] == ("data", "fsdp"), out.sharding
np.testing.assert_allclose(out, ref_out, atol=1e-6, rtol=1e-6)
np.testing.assert_array_equal(aux["token_masks"], ref_aux["token_masks"])
# The sampler (static FLUX, golden weights), sharded vs 1 device.
io = load_npz("flux", "io.npz")
flux = FLUX(**FLUX_TINY)
fv = convert.from_pytorch(flux_state("sharp"), flux)
rep = lambda a: np.concatenate([a] * 4)
args = [rep(io[k]) for k in ("denoise_img", "img_ids", "txt", "txt_ids", "y")]
run = lambda v, x, ids, txt, tids, y: flux_sampling.denoise(
    flux, v, x, ids, txt, tids, y, io["denoise_timesteps"], guidance=4.0)
ref = jax.jit(run)(fv, *args)
np.testing.assert_allclose(ref[:2], io["denoise_out"], atol=1e-5, rtol=1e-5)
got = jax.jit(run)(jax.device_put(fv, sharding.tree_shardings(fv, mesh, rules)),
                   *(jax.device_put(a, batch) for a in args))
np.testing.assert_allclose(got, ref, atol=1e-6, rtol=1e-6)
# Born sharded: a reduced FLUX through init_sharded; FLUX.1-dev's layout from shapes.
small = FLUX(**{**FLUX_TINY, "hidden_size": 128, "num_heads": 4, "axes_dim": (8, 12, 12)})
params = sharding.init_sharded(lambda r: small.init(r, *small.dummy_inputs()), mesh, rules,
                               jax.random.PRNGKey(0))
lin1 = params["params"]["single_blocks_0"]["linear1"]["kernel"]
assert lin1.sharding.spec == P(None, "fsdp") and lin1.addressable_shards[0].data.shape == (128, 224)
dev = FLUX_models["flux-dev"]()
shapes = jax.eval_shape(lambda r: dev.init(r, *dev.dummy_inputs()), jax.random.PRNGKey(0))
specs = sharding.tree_shardings(shapes, mesh, rules)
total = per_device = 0
for (path, leaf), s in zip(jax.tree_util.tree_leaves_with_path(shapes),
                           jax.tree_util.tree_leaves(specs)):
    size = int(np.prod(leaf.shape)) * 4
    total += size
    shard_size = int(np.prod(s.shard_shape(leaf.shape))) * 4
    per_device += shard_size
    if "kernel" in str(path[-1]):
        assert "fsdp" in tuple(s.spec), (path, s.spec)
print("GB", total / 1e9, per_device / 1e9)
assert per_device < total / 4 * 1.001
print("OK")
"""
    assert "OK" in run_python(code, devices=8).stdout


def test_streaming_conversion_writes_what_from_pytorch_loads(tmp_path):
    """`stream_to_orbax` (one group at a time) from the BFL file and from a sharded diffusers
    folder gives the parameters `from_pytorch` gives; a bad file is refused before anything
    is written; the directory is read by load_params, from_pytorch and with shardings."""
    model = FLUX(**FLUX_TINY)
    ref = convert.from_pytorch(flux_state("strong"), model)["params"]
    save_file(flux_state("strong"), tmp_path / "flux1-tiny.safetensors")
    manifest = convert_flux.stream_to_orbax(tmp_path / "flux1-tiny.safetensors", model,
                                            tmp_path / "out", max_item_bytes=64 << 10)
    # Items of at most 64 KiB (a larger tensor alone): several, every leaf in one of them.
    leaves = [n for item in manifest["items"] for n in item["leaves"]]
    assert len(leaves) == len(set(leaves)) == manifest["leaves"] == 60
    assert len(manifest["items"]) > 5
    from dydit_jax.checkpointing import load_params
    same = lambda a, b: jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)  # noqa
    same(load_params(tmp_path / "out"), ref)
    same(convert.from_pytorch(tmp_path / "out", model)["params"], ref)
    target = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), ref)
    same(convert_flux.load_streamed(tmp_path / "out", target), ref)

    dy = dyflux_model()
    sharded_folder(tmp_path / "pipe", _diffusers_state())
    convert_flux.stream_to_orbax(tmp_path / "pipe", dy, tmp_path / "dyout")
    same(load_params(tmp_path / "dyout"),
         convert.from_pytorch(DATA / "dyflux" / "transformer_0.pt", dy)["params"])

    bad = flux_state("base")
    bad["img_in.weight"] = bad["img_in.weight"][:, :10]
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(convert.CheckpointMismatchError, match="img_in.weight"):
        convert_flux.stream_to_orbax(tmp_path / "bad.safetensors", model, tmp_path / "badout")
    assert not (tmp_path / "badout").exists() and not list(tmp_path.glob("badout.tmp-*"))
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_flux.stream_to_orbax(tmp_path / "flux1-tiny.safetensors", model,
                                     tmp_path / "out")
