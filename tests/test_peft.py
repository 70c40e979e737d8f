"""LoRA / TD-LoRA (dydit_jax.peft): zero init, the two forward modes, the frozen-base train step,
the engine, checkpoints of the trainable tree only, and the base check.

Tolerances: "rows" (per-sample low-rank path) and "merged" (W + delta W(t), one matmul) compute
the same function in a different order: float32 rounding of the outputs' scale, 1e-5 relative.
Bases are N(0, 0.1) (or the DyDiT golden weights) and adapters are drawn with lora_B ~ N(0, 0.3)
so that every adapted layer changes the output by O(1) ("sharp": the zero-initialised adapters
of a fresh run would make every comparison trivially pass).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import DATA, CompileCounter, load_config, run_python
from dydit_jax import convert, peft
from dydit_jax.diffusion import create_diffusion
from dydit_jax.models import DiT
from dydit_jax.peft.trainable import fingerprint, num_params, split_trainable
from test_dit import TINY

TOL = dict(atol=1e-5, rtol=1e-5)
SPECS = {
    "lora": peft.LoraSpec(method="lora", rank=2),
    "tdlora": peft.LoraSpec(method="tdlora", rank=2, experts=3),
    "tdlora-block-sigmoid": peft.LoraSpec(method="tdlora", rank=2, experts=2, scope="block",
                                          mixing="sigmoid", tau=0.5),
}


def randomized(tree, scale, seed):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [scale * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)])


def sharp_adapters(adapters, seed=5):
    """Nonzero lora_B and routers (a trained state), lora_A as initialised."""
    flat = peft.adapters.traverse_util.flatten_dict(adapters)
    out = {}
    for i, (path, leaf) in enumerate(sorted(flat.items())):
        if path[-1] == "lora_A":
            out[path] = leaf
        else:
            out[path] = 0.3 * jax.random.normal(jax.random.PRNGKey(seed * 1000 + i), leaf.shape)
    return peft.adapters.traverse_util.unflatten_dict(out)


def inputs(b=3):
    x = jax.random.normal(jax.random.PRNGKey(1), (b, 8, 8, 4))
    return x, jnp.array([10.0, 500.0, 990.0][:b]), jnp.array([1, 2, 3][:b])


def build(scan=False, remat=False, dynamic=True):
    model = DiT(**TINY, dynamic=dynamic, scan_layers=scan, remat=remat)
    base = model.init(jax.random.PRNGKey(0), *inputs())["params"]
    return model, randomized(base, 0.1, 0)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_fresh_adapters_leave_the_model_unchanged(name, scan):
    spec = SPECS[name]
    model, base = build(scan)
    adapters = peft.init_adapters(base, spec, jax.random.PRNGKey(2), model.hidden_size)
    wrapped = peft.PeftModel(model, spec)
    ref, _ = model.apply({"params": base}, *inputs())
    out, _ = wrapped.apply({"params": peft.combine(base, adapters)}, *inputs())
    np.testing.assert_array_equal(out, ref)   # B = 0: base + exactly 0
    # Every target really ran through the adapter (none silently skipped).
    expected = {"attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2"}
    assert {p.split("/", 1)[1] for p in wrapped.last_applied} == expected
    assert len(wrapped.last_applied) == (4 if scan else 8)
    # Experts start different (independent A_k), the routers evenly mixed (W_r = 0).
    a = adapters["blocks" if scan else "blocks_0"]["attn"]["qkv"]["lora_A"]
    if spec.num_experts > 1:
        assert not np.allclose(a[..., 0, :, :], a[..., 1, :, :])
    assert a.shape[-3:] == (spec.num_experts, 64, 2)


@pytest.mark.parametrize("name,scan,remat", [(name, False, False) for name in sorted(SPECS)]
                         + [("tdlora-block-sigmoid", True, True)])
def test_merged_equals_per_sample_low_rank_path(name, scan, remat):
    spec = SPECS[name]
    model, base = build(scan, remat)
    adapters = sharp_adapters(peft.init_adapters(base, spec, jax.random.PRNGKey(2), 64))
    full = peft.combine(base, adapters)
    x, t, y = inputs()
    rows, _ = jax.jit(lambda p: peft.PeftModel(model, spec).apply({"params": p}, x, t, y))(full)
    plain, _ = model.apply({"params": base}, x, t, y)
    assert np.abs(rows - plain).max() > 0.02 * np.abs(plain).max()   # the adapters matter (>> TOL)
    merged_model = peft.PeftModel(model, spec, mode="merged")
    for i in range(3):
        one = (x[i:i + 1], t[i:i + 1], y[i:i + 1])
        merged, _ = merged_model.apply({"params": full}, *one)
        np.testing.assert_allclose(merged[0], rows[i], **TOL)
        t_emb = peft.time_embedding(model, base, t[i:i + 1], spec)[0]
        tree, _ = model.apply({"params": peft.merge_params(full, t_emb, spec)}, *one)
        np.testing.assert_allclose(tree[0], rows[i], **TOL)
    # The complete (static) path of a DyDiT is adapted as well.
    comp, _ = peft.PeftModel(model, spec).apply({"params": full}, x, t, y, complete=True)
    comp_plain, _ = model.apply({"params": base}, x, t, y, complete=True)
    assert np.abs(comp - comp_plain).max() > 0.02 * np.abs(comp_plain).max()


def test_mixing_is_a_function_of_t_only():
    spec = SPECS["tdlora"]
    model, base = build()
    router = 0.5 * jax.random.normal(jax.random.PRNGKey(3), (64, 3))
    t = jnp.array([7.0, 7.0, 7.0, 400.0])
    t_emb = peft.time_embedding(model, base, t, spec)
    a = np.asarray(peft.mixing_weights(router, t_emb, spec))
    np.testing.assert_array_equal(a[0], a[1])
    np.testing.assert_array_equal(a[0], a[2])
    assert not np.allclose(a[0], a[3])
    np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-6)
    # The same t gives the same output for different tokens' positions in the batch: the
    # output of a sample does not depend on which other samples share its batch.
    full = peft.combine(base, sharp_adapters(peft.init_adapters(base, spec,
                                                                jax.random.PRNGKey(2), 64)))
    x, t3, y = inputs()
    wrapped = peft.PeftModel(model, spec)
    both, _ = wrapped.apply({"params": full}, x, t3, y)
    alone, _ = wrapped.apply({"params": full}, x[1:2], t3[1:2], y[1:2])
    np.testing.assert_allclose(alone[0], both[1], **TOL)


def test_bad_targets_are_refused_with_the_reason():
    model, base = build()
    with pytest.raises(ValueError, match="matches no Dense"):
        peft.target_paths(base, dataclasses.replace(SPECS["lora"], targets="nothing_here"))
    with pytest.raises(ValueError, match="width routers"):
        peft.target_paths(base, dataclasses.replace(SPECS["lora"], targets="head_router"))
    with pytest.raises(ValueError, match="only Dense"):
        peft.target_paths(base, dataclasses.replace(SPECS["lora"], targets="x_embedder/proj"))
    with pytest.raises(ValueError, match="peft.mixing"):
        peft.LoraSpec(mixing="tanh")
    spec = dataclasses.replace(SPECS["lora"], targets=peft.ADALN_TARGETS)
    assert peft.target_paths(base, spec) == ("blocks_0/adaLN_modulation",
                                             "blocks_1/adaLN_modulation")


# ----------------------------------------------------------------------------------------------
# Training with a frozen base
# ----------------------------------------------------------------------------------------------

def _peft_train(spec, steps, lr=3e-2):
    """A few DyDiT steps of a PEFT state on the golden DyDiT weights (real routers)."""
    import ml_collections
    from dydit_jax import train
    from dydit_jax.dydit_loss import dydit_loss_fn
    model = DiT(**TINY, dynamic=True)
    base = convert.from_pytorch(DATA / "dydit_s" / "model.pt", model)["params"]
    tx = optax.adam(lr)
    trainable_base, frozen = split_trainable(base, spec)
    state = train.peft_state_fn(model, spec, tx, base)(jax.random.PRNGKey(0), trainable_base)
    dc = ml_collections.ConfigDict(dict(target=0.5, warmup_steps=1, hold_steps=0, stage=1))
    loss_fn = dydit_loss_fn(peft.PeftModel(model, spec), create_diffusion(""), dc)
    step = jax.jit(train.make_train_step(loss_fn, tx, 0.9))
    batch = {"image": jax.random.normal(jax.random.PRNGKey(4), (4, 8, 8, 4)),
             "label": jnp.array([0, 1, 2, 3])}
    start = state
    for _ in range(steps):
        state, metrics = step(state, batch, frozen)
    return model, base, frozen, start, state, metrics


def test_only_the_trainable_tree_trains_and_has_optimizer_state():
    spec = SPECS["tdlora"]
    model, base, frozen, start, state, _ = _peft_train(spec, steps=3)
    frozen_before = jax.tree_util.tree_map(np.array, frozen)
    trainable_paths = set(peft.adapters.traverse_util.flatten_dict(state["params"]))
    # Adam moments exist for the trainable leaves only (mu and nu mirror the trainable tree).
    adam = state["opt_state"][0]
    for moments in (adam.mu, adam.nu):
        assert set(peft.adapters.traverse_util.flatten_dict(moments)) == trainable_paths
    assert not any(p[-1] == "kernel" and "attn" in p and "router" not in "/".join(p)
                   for p in trainable_paths)
    # Trainable: adapters + the DyDiT routers; everything else frozen, bitwise unchanged.
    names = {"/".join(p) for p in trainable_paths}
    assert any("lora_B" in n for n in names) and any("head_router" in n for n in names)
    assert num_params(state["params"]) < 0.5 * num_params(base)
    jax.tree_util.tree_map(np.testing.assert_array_equal, frozen, frozen_before)
    full = peft.combine(frozen, state["params"])
    for path, leaf in peft.adapters.traverse_util.flatten_dict(base).items():
        if path not in trainable_paths:
            np.testing.assert_array_equal(
                peft.adapters.traverse_util.flatten_dict(full)[path], leaf)
    changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                                     state["params"], start["params"])
    flat = peft.adapters.traverse_util.flatten_dict(changed)
    assert all(v for p, v in flat.items() if p[-1] == "lora_B"), "every lora_B trains"
    assert all(v for p, v in flat.items() if p[-1] == "lora_router")


def test_tdlora_mixing_changes_with_t_after_training():
    spec = SPECS["tdlora"]
    model, base, frozen, start, state, _ = _peft_train(spec, steps=8)
    router = state["params"]["blocks_1"]["mlp"]["fc1"]["lora_router"]
    t_emb = peft.time_embedding(model, base, jnp.array([0.0, 999.0]), spec)
    a = np.asarray(peft.mixing_weights(router, t_emb, spec))
    a0 = np.asarray(peft.mixing_weights(start["params"]["blocks_1"]["mlp"]["fc1"]["lora_router"],
                                        t_emb, spec))
    np.testing.assert_allclose(a0, 1.0 / 3, rtol=1e-6)   # evenly mixed at the start
    assert np.abs(a[0] - a[1]).max() > 1e-4, a


def test_fingerprint_sees_one_bit():
    model, base = build()
    fp = fingerprint(base)
    assert fingerprint(jax.tree_util.tree_map(np.asarray, base)) == fp
    flipped = jax.tree_util.tree_map(np.array, base)
    k = flipped["blocks_1"]["mlp"]["fc2"]["kernel"]
    k.view(np.uint32)[3, 5] ^= 1          # one bit of one weight
    assert fingerprint(flipped) != fp
    # On 8 FSDP-sharded devices: test_sharded_peft_step_equals_one_device (one subprocess).


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------

LABELS = np.array([1, 7, 3, 9, 0, 2, 5, 8])


def test_engine_with_tdlora_equals_the_masked_path_and_compiles_once():
    from dydit_jax.engine import Engine
    from dydit_jax.sampling import make_sample_fn
    spec = SPECS["tdlora"]
    model = DiT(**TINY, dynamic=True)
    base = convert.from_pytorch(DATA / "dydit_s" / "model.pt", model)["params"]
    # The golden DyDiT's routers (which switch heads, groups and tokens off), with its adaLN
    # scaled up: at N(0, 0.02) the block gates are ~1e-3 and no block (so no adapter) would
    # reach the output.
    for name in ("blocks_0", "blocks_1"):
        ada = base[name]["adaLN_modulation"]
        base[name]["adaLN_modulation"] = jax.tree_util.tree_map(lambda a: 30.0 * a, ada)
    adapters = sharp_adapters(peft.init_adapters(base, spec, jax.random.PRNGKey(2), 64))
    variables = {"params": peft.combine(base, adapters)}
    ddim = create_diffusion("ddim10")
    with pytest.raises(ValueError, match="peft="):
        Engine(model, variables, ddim, sampler="ddim")
    eng = Engine(model, variables, ddim, sampler="ddim", clip_denoised=True, grid=(0.5,),
                 peft=spec)
    # One forward per step (CFG 4, rows [x; x]) against the masked path on merged weights.
    merged = peft.PeftModel(model, spec, mode="merged")
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(42), (10, 8, 8, 8, 4))
    y = jnp.asarray(LABELS)
    y2 = jnp.concatenate([y, jnp.full_like(y, model.num_classes)])
    for step in (0, 4, 9):
        t = jnp.full((16,), ddim.timestep_map[step], jnp.float32)
        x2 = jnp.concatenate([x[step], x[step]])
        ref, _ = merged.apply(variables, x2, t, y2, 4.0, method=model.forward_with_cfg)
        plain, _ = model.apply({"params": base}, x2, t, y2, 4.0,
                               method=model.forward_with_cfg)
        assert np.abs(ref - plain).max() > 0.02 * np.abs(plain).max(), "adapters matter"
        out = eng.forward(x[step], step, LABELS, cfg_scale=4.0)
        np.testing.assert_allclose(out, ref[:8], **TOL, err_msg=f"step {step}")
    # Whole runs: the masked sampler (merged per step, and the per-sample path) and the engine.
    kw = dict(sampler="ddim", clip_denoised=True)
    ref = np.asarray(make_sample_fn(merged, ddim, **kw)(variables, jax.random.PRNGKey(0),
                                                         LABELS, 3.0))
    rows = make_sample_fn(peft.PeftModel(model, spec), ddim, **kw)
    np.testing.assert_allclose(np.asarray(rows(variables, jax.random.PRNGKey(0), LABELS, 3.0)),
                               ref, **TOL)
    compiles = eng.compile_count
    x0 = eng.sample(jax.random.PRNGKey(0), LABELS, 3.0)
    np.testing.assert_allclose(x0, ref, **TOL)
    assert eng.compile_count == compiles + 1          # one executable for the run
    with CompileCounter() as counter:
        eng.sample(jax.random.PRNGKey(1), LABELS, 2.0)   # new seed and CFG scale: none
    assert counter.count == 0 and eng.compile_count == compiles + 1


# ----------------------------------------------------------------------------------------------
# Through the training system: checkpoints, resume, sample mode, the base check
# ----------------------------------------------------------------------------------------------

def tiny(config, steps):
    config.data.image_size = 8
    config.model.update(input_size=8, hidden_size=32, depth=2, num_heads=2)
    config.train.update(batch_size=8, num_steps=steps, log_every=1, checkpoint_every=2,
                        async_checkpointing=False)
    config.sample.update(per_class=1, num_steps=4)
    return config


@pytest.fixture(scope="module")
def base_workdirs(tmp_path_factory):
    """Two trained tiny digits DiTs (different seeds): a base and a wrong base."""
    from dydit_jax import train
    root = tmp_path_factory.mktemp("peft_bases")
    for seed in (0, 1):
        c = tiny(load_config("digits", "steps=2,size=8,batch=8"), 2)
        c.seed = seed
        train.train_and_evaluate(c, str(root / f"base{seed}"))
    return root


def peft_config(base, method="tdlora", steps=4):
    c = tiny(load_config("digits_dydit", f"steps={steps},init={base},warmup=2"), steps)
    c.peft.method = method
    return c


def test_peft_run_saves_only_the_trainable_tree_resumes_exactly_and_checks_its_base(
        base_workdirs, tmp_path):
    from dydit_jax import generate, main, train
    from dydit_jax.metrics import read_metrics
    import orbax.checkpoint as ocp
    base = str(base_workdirs / "base0")
    ref = tmp_path / "ref"
    main._run_mode(peft_config(base), str(ref))
    split = tmp_path / "split"
    c = peft_config(base)
    c.train.max_steps_per_run = 2
    main._run_mode(c, str(split))
    main._run_mode(peft_config(base), str(split))
    losses = lambda w: [(r["step"], r["loss"]) for r in read_metrics(w / "metrics.jsonl")]
    assert losses(split) == losses(ref) and len(losses(ref)) == 4   # bitwise

    # The checkpoint holds the trainable tree and the base's record, no base kernel.
    saved = ocp.StandardCheckpointer().restore(ref / "checkpoints" / "4" / "state")
    names = {"/".join(map(str, p)) for p, _ in
             jax.tree_util.tree_flatten_with_path(saved["params"])[0]}
    assert names and all(("lora_" in n) or ("router" in n) for n in names), sorted(names)[:5]
    from dydit_jax.checkpointing import TrainCheckpointer
    ck = TrainCheckpointer(str(ref / "checkpoints"))
    record = ck.base_record(4)
    ck.close()
    assert record["init_from"] == base and 0 < record["trainable_params"] < record["base_params"]

    # Sample mode rebuilds base + adapters: the same parameters as the end of training.
    c = peft_config(base)
    model = train.build_model(c)
    weights = generate.load_weights(c, str(ref), model)
    assert weights.step == 4 and peft.has_adapters(weights.params)
    # A different base is named, not silently used.
    wrong = peft_config(str(base_workdirs / "base1"))
    with pytest.raises(ValueError, match="trained on another base"):
        generate.load_weights(wrong, str(ref), model)
    with pytest.raises(ValueError, match="trained on another base"):
        main._run_mode(wrong, str(ref))


# slow: tests/test_train.py holds the sharded step to one device.
@pytest.mark.slow
def test_sharded_peft_step_equals_one_device():
    code = """
import jax, numpy as np, optax
from dydit_jax import peft, sharding as sl, train
from dydit_jax.diffusion import create_diffusion
from dydit_jax.peft.trainable import split_trainable
from test_peft import SPECS, build
assert jax.device_count() == 8
spec = SPECS["tdlora"]
model, base = build(scan=True, dynamic=False)
# SGD: an update linear in the gradient, so the two meshes' reduction orders show as float32
# rounding (Adam's m / sqrt(v) would turn rounding noise of ~0 gradients into +-lr steps).
tx = optax.sgd(0.1)
rules = (("kernel$|lora_A$|lora_B$", "fsdp"), (".*", "replicate"))
loss_fn = train.diffusion_loss_fn(peft.PeftModel(model, spec), create_diffusion(""))
batch = {"image": np.asarray(jax.random.normal(jax.random.PRNGKey(4), (8, 8, 8, 4))),
         "label": np.arange(8, dtype=np.int32)}

def run(mesh):
    tb, frozen = split_trainable(base, spec)
    init = train.peft_state_fn(model, spec, tx, base)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0), tb)
    sh = sl.tree_shardings(abstract, mesh, rules)
    fsh = sl.tree_shardings(frozen, mesh, rules)
    state = jax.jit(init, out_shardings=sh)(jax.random.PRNGKey(0), tb)
    step = jax.jit(train.make_train_step(loss_fn, tx, 0.9),
                   in_shardings=(sh, sl.batch_sharding(mesh), fsh),
                   out_shardings=(sh, sl.replicated(mesh)))
    frozen = jax.device_put(frozen, fsh)
    out = []
    for _ in range(2):
        state, m = step(state, sl.global_batch(batch, mesh), frozen)
        out.append(float(m["loss"]))
    return state, out

# The base fingerprint does not depend on the sharding (integer sums): the same on 8 devices.
from dydit_jax.peft.trainable import fingerprint
mesh8 = sl.create_mesh(1, 8)
placed = jax.device_put(base, sl.tree_shardings(base, mesh8, rules))
assert not placed["blocks"]["mlp"]["fc1"]["kernel"].sharding.is_fully_replicated
assert fingerprint(placed) == fingerprint(jax.device_get(base))

s1, l1 = run(sl.create_mesh(1, 1, devices=jax.devices()[:1]))
s8, l8 = run(sl.create_mesh(2, 4))
np.testing.assert_allclose(l8, l1, rtol=1e-5)
jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                       rtol=1e-5, atol=1e-7), s8["params"], s1["params"])
assert np.abs(np.asarray(s8["params"]["blocks"]["attn"]["qkv"]["lora_B"])).max() > 0
a = s8["params"]["blocks"]["mlp"]["fc1"]["lora_A"]
assert not a.sharding.is_fully_replicated, a.sharding
print("OK", l1)
"""
    assert "OK" in run_python(code, devices=8).stdout


def test_plain_lora_run_exports_to_peft_and_samples_from_base_plus_file(base_workdirs,
                                                                        tmp_path):
    from dydit_jax import config_lib, main
    base = str(base_workdirs / "base0")

    def config(mode="train"):
        c = tiny(load_config("digits", "steps=4,size=8,batch=8"), 4)
        c.train.init_from = base
        c.peft.method = "lora"
        c.mode = mode
        return c

    work = tmp_path / "lora"
    main._run_mode(config(), str(work))
    [own] = list((work / "samples").glob("step000004-*/samples.npz"))
    out = main._run_mode(config("export"), str(work))
    assert (tmp_path / "lora" / "adapters").is_dir() and out.endswith("step000004-official")
    c = config("sample")
    c.sample.update(checkpoint=base, adapters=out, output_dir=str(tmp_path / "from_file"))
    config_lib.validate(c)
    main._run_mode(c, str(tmp_path / "elsewhere"))
    with np.load(own) as a, np.load(tmp_path / "from_file" / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    # What the PEFT format cannot carry is refused with the reason.
    dyn = peft_config(base, method="lora")
    dyn.mode = "export"
    with pytest.raises(ValueError, match="routers"):
        main._run_mode(dyn, str(work))
    td = config("export")
    td.peft.method = "tdlora"
    with pytest.raises(config_lib.ConfigError, match="plain LoRA"):
        config_lib.validate(td)


def test_peft_config_errors_name_the_key_and_the_fix(tmp_path):
    from dydit_jax import config_lib

    def error(**changes):
        c = load_config("digits_dydit", "peft=tdlora")
        for key, value in changes.items():
            section, name = key.split("__")
            c[section][name] = value
        try:
            config_lib.validate(c)
            config_lib.check_sources(c, str(tmp_path / "w"))
        except config_lib.ConfigError as e:
            return str(e)
        return None

    assert error(peft__method="dora").startswith("config.peft.method='dora'")
    assert "config.peft.mixing='max'" in error(peft__mixing="max")
    assert "not a regex" in error(peft__targets="blocks(")
    assert "frozen" in error(train__init_from="")
    assert "set --config.peft.method=lora" in error(
        sample__adapters=str(tmp_path), sample__checkpoint=str(tmp_path))
    with pytest.raises(config_lib.ConfigError, match="valid: none, lora, tdlora"):
        load_config("digits_dydit", "peft=qlora")
    c = load_config("dit_xl", "lam=0.5,init=x,peft=tdlora")
    assert c.peft.method == "tdlora" and c.train.lr == 1e-4 and c.dynamic.enabled
    with pytest.raises(config_lib.ConfigError, match="init="):
        load_config("dit_xl", "peft=lora")


def test_flow_engine_with_tdlora_sit_equals_the_masked_sampler():
    """The SiT family through the same adapters: FlowEngine (merging per model call) against
    the masked flow sampler on the per-sample path."""
    from dydit_jax.engine import FlowEngine
    from dydit_jax.sampling import make_flow_sample_fn
    from dydit_jax.transport import create_transport
    from test_engine_flow import routed_sit
    spec = SPECS["tdlora"]
    model, variables = routed_sit()
    base = variables["params"]
    full = {"params": peft.combine(base, sharp_adapters(peft.init_adapters(base, spec,
                                                                           jax.random.PRNGKey(2),
                                                                           64)))}
    transport = create_transport("Linear", "velocity")
    kw = dict(sampler="ode", method="heun2", num_steps=6)
    rows = make_flow_sample_fn(peft.PeftModel(model, spec), transport, **kw)
    ref = np.asarray(rows(full, jax.random.PRNGKey(0), LABELS, 3.0))
    plain = np.asarray(make_flow_sample_fn(model, transport, **kw)(
        variables, jax.random.PRNGKey(0), LABELS, 3.0))
    assert np.abs(ref - plain).max() > 1e-3, "the adapters change the samples (>> TOL)"
    eng = FlowEngine(model, full, transport, grid=(0.5,), peft=spec, **kw)
    np.testing.assert_allclose(eng.sample(jax.random.PRNGKey(0), LABELS, 3.0), ref, **TOL)


def test_bfloat16_base_copy_computes_the_same_step_for_a_bfloat16_model():
    import ml_collections
    from dydit_jax import train
    spec = SPECS["tdlora"]
    model = DiT(**TINY, dtype=jnp.bfloat16)
    base = randomized(model.init(jax.random.PRNGKey(0), *inputs())["params"], 0.1, 0)
    trainable_base, frozen = split_trainable(base, spec)
    tx = optax.adam(1e-2)
    state = train.peft_state_fn(model, spec, tx, base)(jax.random.PRNGKey(0), trainable_base)
    state = dict(state, params=sharp_adapters(state["params"]))
    loss_fn = train.diffusion_loss_fn(peft.PeftModel(model, spec), create_diffusion(""))
    step = jax.jit(train.make_train_step(loss_fn, tx, 0.9))
    batch = {"image": jax.random.normal(jax.random.PRNGKey(4), (4, 8, 8, 4)),
             "label": jnp.array([0, 1, 2, 3])}
    config = ml_collections.ConfigDict(dict(peft=dict(base_dtype="compute"),
                                            model=dict(dtype="bfloat16")))
    half = train.cast_frozen(frozen, config)
    assert half["blocks_0"]["attn"]["qkv"]["kernel"].dtype == jnp.bfloat16
    s32, m32 = step(state, batch, frozen)
    s16, m16 = step(state, batch, half)
    np.testing.assert_array_equal(m16["loss"], m32["loss"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, s16["params"], s32["params"])
