"""FLUX with `scan_layers` (one `nn.scan` per block kind): the same function as the unrolled
model on the same parameters restacked, its converters and its sharding.

Tolerance: |got - ref| <= 1e-6 max |ref| per output (and logit) array, a few float32 ulps of
its scale: a scanned block is one XLA while-loop body, compiled and fused apart from its
neighbours, so its float32 rounding differs from the unrolled graph's (measured: 2 ulps,
7.6e-6 on outputs of magnitude 36); masks must be equal exactly.
Training draws the width gates' Gumbel noise from the "gumbel" rng inside each block, which
the scan splits per block and the loop folds by module name: different draws. The train-mode
comparison therefore saturates the width routers (zero kernels, bias 30: every gate on
whatever the draw), and takes the token noise as `gumbel_noise`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from conftest import load_config, run_python
from dydit_jax import convert, convert_flux, families
from dydit_jax.models.flux import FLUX, block_params

TOL = 1e-6
TINY = dict(in_channels=8, vec_in_dim=6, context_in_dim=5, hidden_size=32, num_heads=4,
            depth=2, depth_single_blocks=3, axes_dim=(2, 2, 4), guidance_embed=True)
B, N, T = 2, 6, 3


def model(**kw):
    return FLUX(**{**TINY, "dynamic": True, "dynamic_width": True, **kw})


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    ids = jnp.asarray(rng.integers(0, 4, size=(B, N, 3)), jnp.float32)
    return (f(B, N, 8), ids, f(B, T, 5), jnp.zeros((B, T, 3)), jnp.asarray([0.3, 0.8]),
            f(B, 6), jnp.asarray([3.5, 2.0]))


def strong(m, seed=1):
    """0.3 N(0, 1) per-block weights of `m`'s shapes: mixed token and width masks (the default
    init keeps everything)."""
    shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0), *inputs())["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape), jnp.float32), shapes)


def saturate_width(params):
    """Width routers with zero kernels and bias 30: every gate on for any Gumbel draw."""
    flat = flatten_dict(params)
    for path, v in flat.items():
        if path[1].endswith("_router") and path[1] != "token_router":
            flat[path] = jnp.zeros_like(v) if path[-1] == "kernel" else jnp.full_like(v, 30.0)
    return unflatten_dict(flat)


def stacked(params):
    return convert.to_layout(params, scan_layers=True)


def assert_close(a, b, exact_masks=True):
    """Every leaf of a within TOL of b's scale; "masks" leaves exactly (`exact_masks`)."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        name = jax.tree_util.keystr(path)
        if exact_masks and "masks" in name:
            np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            np.testing.assert_allclose(x, y, rtol=0, atol=TOL * float(np.abs(y).max()),
                                       err_msg=name)


@pytest.fixture(scope="module")
def params():
    """Strong per-block parameters of the dynamic tiny model."""
    return strong(model())


def run_all(m):
    """Every mode of `m` in one executable: routed inference, route=False, training (token
    noise given, width noise from the rng) and the width plans' logits."""
    def run(p, noise):
        v, x = {"params": p}, inputs()
        return dict(
            infer=m.apply(v, *x),
            plain=m.apply(v, *x, route=False)[0],
            train=m.apply(v, *x, train=True, gumbel_noise=noise,
                          rngs={"gumbel": jax.random.PRNGKey(3)}),
            width_logits=m.apply(v, jnp.asarray([0.1, 0.5, 0.9]), method=FLUX.width_logits))
    return jax.jit(run)


def test_scanned_dynamic_model_equals_the_unrolled_one(params):
    noise = jax.random.gumbel(jax.random.PRNGKey(2), (5, 2, B, N))
    unrolled, scanned = run_all(model()), run_all(model(scan_layers=True))
    ref, got = unrolled(params, noise), scanned(stacked(params), noise)
    masks = ref["infer"][1]["token_masks"]
    assert 0 < float(masks.mean()) < 1, "the test needs mixed token masks"
    assert 0 < float(ref["infer"][1]["head_masks"].mean()) < 1, "and mixed width masks"
    assert ref["width_logits"]["head"].shape == (3, 5, 3)
    assert ref["width_logits"]["txt_group"].shape == (3, 2, 3)
    for key in ("infer", "plain", "width_logits"):
        assert_close(got[key], ref[key])
    # Training with the token noise given: shapes and finiteness only (width draws differ) ...
    shapes = lambda tree: jax.tree_util.tree_map(jnp.shape, tree)  # noqa: E731
    assert shapes(got["train"]) == shapes(ref["train"])
    assert all(bool(jnp.isfinite(a).all()) for a in jax.tree_util.tree_leaves(got["train"]))
    # ... and equal outputs once the width gates are saturated (the STE gates' values are
    # 1 - s + s, within an ulp of 1 for any draw s, hence not exact masks).
    sat = saturate_width(params)
    ref, got = unrolled(sat, noise)["train"], scanned(stacked(sat), noise)["train"]
    assert 0 < float(ref[1]["token_masks"].mean()) < 1
    np.testing.assert_array_equal(got[1]["token_masks"] > 0.5, ref[1]["token_masks"] > 0.5)
    assert_close(got, ref, exact_masks=False)


def test_scanned_static_model_with_remat_has_the_unrolled_outputs_and_gradients():
    m, ms = FLUX(**TINY), FLUX(**TINY, scan_layers=True, remat=True)
    x, p = inputs(), strong(m)

    def loss(model, p):
        return jnp.mean(model.apply({"params": p}, *x) ** 2)

    (ref, ref_g), (got, got_g) = (jax.jit(jax.value_and_grad(lambda p, mm=mm: loss(mm, p)))(pp)
                                  for mm, pp in ((m, p), (ms, stacked(p))))
    assert_close((got, got_g), (ref, stacked(ref_g)))
    assert "double_blocks" in got_g and got_g["single_blocks"]["linear1"]["kernel"].shape == \
        (3, 32, 3 * 32 + 128)


def test_block_params_stacks_either_layout(params):
    rest, doubles, singles = block_params(model(), params)
    # Block i of the stack is double_blocks_{i} (single_blocks_{i}), leaf for leaf.
    for stack, name, n in ((doubles, "double_blocks", 2), (singles, "single_blocks", 3)):
        for i in range(n):
            jax.tree_util.tree_map(lambda s, a, i=i: np.testing.assert_array_equal(s[i], a),
                                   stack, params[f"{name}_{i}"])
    got = block_params(model(scan_layers=True), {"params": stacked(params)})
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, (rest, doubles, singles))
    assert doubles["img_attn"]["qkv"]["kernel"].shape == (2, 32, 96)
    assert set(rest) == {"img_in", "time_in", "vector_in", "guidance_in", "txt_in",
                         "final_layer"}
    with pytest.raises(ValueError, match=r"'double_blocks_0' is there.*to_layout"):
        block_params(model(scan_layers=True), params)
    no_singles = FLUX(**{**TINY, "depth_single_blocks": 0}, scan_layers=True)
    assert block_params(no_singles, {"double_blocks": doubles, **rest})[2] == {}


def test_to_layout_converts_flux_trees_both_ways_and_keeps_dit_ones():
    tree = {"img_in": {"kernel": np.ones((2, 3))},
            **{f"double_blocks_{i}": {"k": np.full((2,), i)} for i in range(2)},
            **{f"single_blocks_{i}": {"k": np.full((3,), 10 + i)} for i in range(12)}}
    s = convert.to_layout(tree, scan_layers=True)
    assert sorted(s) == ["double_blocks", "img_in", "single_blocks"]
    np.testing.assert_array_equal(s["single_blocks"]["k"][:, 0], 10 + np.arange(12))
    assert convert.to_layout(s, scan_layers=True) is not s      # idempotent, a new dict
    back = convert.to_layout(s, scan_layers=False)
    assert sorted(back) == sorted(tree)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, tree)
    dit = {"blocks_0": {"k": np.zeros(2)}, "blocks_1": {"k": np.ones(2)}, "x": np.zeros(1)}
    assert sorted(convert.to_layout(dit, True)) == ["blocks", "x"]
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           convert.to_layout(convert.to_layout(dit, True), False), dit)


def bfl_state(params):
    """Our per-block params as a BFL-named state dict (what `flux1-dev.safetensors` holds)."""
    return {convert_flux.flax_to_bfl_key(p): np.ascontiguousarray(np.asarray(v).T)
            if p[-1] == "kernel" else np.asarray(v) for p, v in flatten_dict(params).items()}


def test_from_pytorch_and_streaming_give_a_scanned_flux_the_stacked_layout(params, tmp_path):
    from safetensors.numpy import save_file
    state = bfl_state(params)
    ms = model(scan_layers=True)
    got = convert.from_pytorch(state, ms)["params"]
    assert isinstance(got["double_blocks"]["img_mod"]["lin"]["kernel"], jax.Array)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, stacked(params))
    # Streaming conversion writes the per-block layout; from_pytorch stacks it.
    save_file(state, str(tmp_path / "flux1-tiny.safetensors"))
    convert_flux.stream_to_orbax(tmp_path / "flux1-tiny.safetensors", ms, tmp_path / "out")
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           convert.from_pytorch(tmp_path / "out", ms)["params"], got)


def test_build_flux_passes_scan_layers():
    config = load_config("flux_digits")
    config.model.scan_layers = True
    assert families.build_flux(config).scan_layers


def test_stacked_flux_params_are_fsdp_sharded_as_their_blocks_depth_axis_whole():
    """8 simulated devices, fsdp 8: every stacked leaf [n, ...] is split as its blocks are
    (a depth of 16 = the hidden size would otherwise win the tie for the split), and a
    scanned FLUX is born sharded with `init_sharded`."""
    code = """
import jax, numpy as np
from jax.sharding import PartitionSpec as P
from flax.traverse_util import flatten_dict
from dydit_jax import sharding
from dydit_jax.models.flux import FLUX
assert jax.device_count() == 8
rules = (("kernel$|embedding$", "fsdp"), (".*", "replicate"))
mesh = sharding.create_mesh(data=1, fsdp=8)
kw = dict(in_channels=8, vec_in_dim=8, context_in_dim=8, hidden_size=16, num_heads=2,
          depth=16, depth_single_blocks=16, axes_dim=(2, 2, 4), dynamic=True,
          dynamic_width=True)
def specs(m):
    init = lambda r: m.init(r, *m.dummy_inputs())
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    return init, flatten_dict(shapes["params"]), flatten_dict(
        sharding.tree_shardings(shapes, mesh, rules)["params"])
_, shapes, per_block = specs(FLUX(**kw))
init, stacked_shapes, stacked = specs(FLUX(**kw, scan_layers=True))
full = lambda spec, n: tuple(spec) + (None,) * (n - len(spec))
checked = 0
for path, s in stacked.items():
    n = len(stacked_shapes[path].shape)
    if path[0] in ("double_blocks", "single_blocks"):
        block = per_block[(path[0] + "_3",) + path[1:]].spec
        assert full(s.spec, n) == (None,) + full(block, n - 1), (path, s.spec, block)
        checked += "fsdp" in block
    else:
        assert full(s.spec, n) == full(per_block[path].spec, n), path
assert full(stacked[("single_blocks", "token_router", "router", "kernel")].spec, 3) == \
    (None, "fsdp", None)
assert checked > 10, checked
params = sharding.init_sharded(init, mesh, rules, jax.random.PRNGKey(0))
k = params["params"]["double_blocks"]["img_attn"]["qkv"]["kernel"]
assert k.shape == (16, 16, 48) and k.addressable_shards[0].data.shape == (16, 16, 6)
print("OK")
"""
    assert "OK" in run_python(code, devices=8).stdout
