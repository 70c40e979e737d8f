"""The gathered engine on flow-matching models (dydit_jax.engine.FlowEngine): a dynamic SiT
sampled with fixed-grid ODE and SDE solvers, plans for continuous time.

Exactness: the engine's samples equal the masked sampler's (`sampling.make_flow_sample_fn`,
the release's path) at float32 atol = rtol = 1e-5, for ODE (Euler, Heun, RK4) and SDE
(Euler-Maruyama with the "Mean" last step, stochastic Heun) with CFG, on 1 and 8 devices, and
for the adaptive dopri5 (widths decided on device) at 5e-5; one executable per batch size
whatever the number of solver times, nothing recompiled for new seeds, labels or CFG scales.

The test model is a tiny SiT with random weights everywhere (DiT's zero-initialised adaLN and
final layer too, so the velocity is not 0) and width routers scaled so that their logits move
by several units over t in [0, 1] and are far from 0 (the heads and groups in use change along
the trajectory: 1 to 3 of 4 in this model); token router biases at 0, so about half the tokens
skip the MLP.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CompileCounter, run_python
from dydit_jax.engine import FlowEngine, WidthPlan, solver_times
from dydit_jax.models.sit import SiT
from dydit_jax.sampling import make_flow_sample_fn, make_flow_solver
from dydit_jax.transport import create_transport
from dydit_jax.transport.utils import time_grid
from test_dit import TINY
from test_engine import COARSE, LABELS, TOL

STEPS = 10


def routed_sit(dynamic_tokens: bool = True, seed: int = 0):
    """A dynamic SiT (no learned sigma) whose routers switch widths along t in [0, 1]."""
    model = SiT(**{**TINY, "learn_sigma": False}, dynamic=True, dynamic_tokens=dynamic_tokens)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                        jnp.zeros((1,), jnp.int32))["params"]
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 64))

    def randomise(path, a):  # DiT zero-initialises these: give them weights
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if ("adaLN" in name or "final_layer" in name) and a.ndim == 2:
            return 0.5 * jax.random.normal(next(keys), a.shape) / np.sqrt(a.shape[0])
        return a

    params = jax.tree_util.tree_map_with_path(randomise, params)
    t_emb = np.asarray(model.apply({"params": params}, jnp.linspace(0, 1, 101),
                                   method=lambda m, t: m.t_embedder(t)))
    rng = np.random.default_rng(seed)
    for l in range(model.depth):
        block = params[f"blocks_{l}"]
        for name in ("head_router", "group_router"):
            kernel = rng.standard_normal(block[name]["kernel"].shape).astype(np.float32)
            kernel *= 4.0 / (t_emb @ kernel).std(0)   # logits move by ~4 units over t
            logits = t_emb @ kernel
            bias = -np.median(logits, 0) + rng.uniform(-2, 2, logits.shape[1])
            block[name] = {"kernel": jnp.asarray(kernel),
                           "bias": jnp.asarray(bias, jnp.float32)}
        if dynamic_tokens:
            last = sorted(block["token_router"])[-1]
            tr = block["token_router"][last]
            block["token_router"][last] = {"kernel": 50 * tr["kernel"],
                                           "bias": jnp.zeros_like(tr["bias"])}
    return model, {"params": params}


@pytest.fixture(scope="module")
def sit():
    return routed_sit()


@pytest.fixture(scope="module")
def transport():
    return create_transport("Linear", "velocity")


def masked_samples(model, variables, transport, sampler, method, seed=0, scale=3.0, **kw):
    fn = make_flow_sample_fn(model, transport, sampler=sampler, method=method,
                             num_steps=STEPS, **kw)
    return np.asarray(fn(variables, jax.random.PRNGKey(seed), LABELS, scale))


# ----------------------------------------------------------------------------------------------
# Plans for the solver's times
# ----------------------------------------------------------------------------------------------

def test_solver_times_are_the_times_the_model_is_called_at(transport):
    euler = make_flow_solver(transport, sampler="ode", method="euler", num_steps=STEPS)
    times, counts = solver_times(euler, (8, 8, 4), stochastic=False)
    np.testing.assert_array_equal(times, euler.time_grid()[:-1])   # t_0 .. t_{N-2}
    assert (counts == 1).all()
    heun = make_flow_solver(transport, sampler="ode", method="heun2", num_steps=STEPS)
    times, counts = solver_times(heun, (8, 8, 4), stochastic=False)
    assert counts.sum() == 2 * (STEPS - 1)            # two stages per step
    assert set(euler.time_grid()[:-1]) <= set(times) and times.max() <= 1.0
    # SDE: one model call per step for the drift and the score (the release makes two), and
    # one for the "Mean" last step at t1 = 1 - 0.04.
    sde = make_flow_solver(transport, sampler="sde", method="Euler", num_steps=STEPS)
    times, counts = solver_times(sde, (8, 8, 4), stochastic=True)
    np.testing.assert_array_equal(times, sde.time_grid())
    assert (counts == 1).all() and np.isclose(times[-1], 0.96)


def test_flow_plan_masks_persistence_and_checks(sit, tmp_path):
    model, variables = sit
    times = time_grid(0.0, 1.0, 21)
    plan = WidthPlan.build(model, variables, times)
    assert plan.timesteps.dtype == np.float32 and "times(21" in plan.schedule
    heads, groups = model.apply(variables, jnp.asarray(times), method=model.width_logits)
    np.testing.assert_array_equal(plan.head_masks[..., 1:], np.asarray(heads) > 0)
    np.testing.assert_array_equal(plan.group_masks[..., 1:], np.asarray(groups) > 0)
    assert len(np.unique(plan.head_counts)) > 1           # widths change along t
    loaded = WidthPlan.load(plan.save(tmp_path / "plan"))
    loaded.check(model, variables, times)
    with pytest.raises(ValueError, match="schedule"):
        loaded.check(model, variables, time_grid(0.0, 1.0, 20))
    with pytest.raises(ValueError, match="schedule"):     # integer timesteps are not flow times
        WidthPlan.build(model, variables, np.arange(21)).check(model, variables, times)


def test_widths_decided_on_device_equal_the_plan(sit):
    """`gathered.routed_widths` (adaptive solvers) gives, at any t, the plan's row for t."""
    from dydit_jax.engine import gathered
    model, variables = sit
    times = np.concatenate([time_grid(0.0, 1.0, 13), np.float32([0.123456, 0.987654])])
    buckets = WidthPlan.build(model, variables, times).bucketize(COARSE)
    rest, _ = gathered.split_params(model, variables)
    blocks = gathered.stacked_blocks(model, variables)
    route = jax.jit(lambda t: gathered.routed_widths(model, rest, blocks, t, buckets.sizes))
    for s, t in enumerate(times):
        widths = route(jnp.float32(t))
        for name, expected in buckets.arrays().items():
            np.testing.assert_array_equal(widths[name], expected[s], err_msg=f"{name} t={t}")


def test_unknown_methods_are_refused(sit, transport):
    model, variables = sit
    with pytest.raises(ValueError, match="unknown ode method"):
        FlowEngine(model, variables, transport, sampler="ode", method="rk45")


# ----------------------------------------------------------------------------------------------
# Exactness against the masked sampler
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,method", [("ode", "euler"), ("ode", "heun2"), ("ode", "rk4"),
                                            ("sde", "Euler"), ("sde", "Heun")])
def test_flow_engine_equals_masked_sampler(sit, transport, sampler, method):
    model, variables = sit
    eng = FlowEngine(model, variables, transport, sampler=sampler, method=method,
                     num_steps=STEPS, grid=COARSE, token_capacities=(0.5, 1.0))
    x1 = np.asarray(eng.sample(jax.random.PRNGKey(0), LABELS, 3.0))
    ref = masked_samples(model, variables, transport, sampler, method)
    np.testing.assert_allclose(x1, ref, **TOL)
    # The check has teeth: the complete model's samples differ by far more than the tolerance.
    complete = masked_samples(model, variables, transport, sampler, method, complete=True)
    assert np.abs(complete - ref).max() > 100 * TOL["atol"]
    assert 0.5 < eng.macs_ratio() < 0.95


def test_adaptive_ode_equals_masked_sampler(sit, transport):
    """dopri5 (diffrax, the release's default ODE): widths decided on device per model call,
    the doubled CFG state carried as the release does. Tolerance 5e-5: the step-size
    controller turns the two programs' float32 rounding differences (~5e-7, the fixed-grid
    runs above) into slightly different steps; the complete model differs by ~3e-2."""
    model, variables = sit
    eng = FlowEngine(model, variables, transport, sampler="ode", method="dopri5",
                     num_steps=STEPS, grid=COARSE, token_capacities=(0.5, 1.0))
    assert eng.adaptive and eng.warmup(len(LABELS)) == 1
    x1 = np.asarray(eng.sample(jax.random.PRNGKey(0), LABELS, 3.0))
    ref = masked_samples(model, variables, transport, "ode", "dopri5")
    np.testing.assert_allclose(x1, ref, atol=5e-5, rtol=5e-5)
    complete = masked_samples(model, variables, transport, "ode", "dopri5", complete=True)
    assert np.abs(complete - ref).max() > 100 * 5e-5
    assert eng.compile_count == 1


def test_flow_engine_without_tokens_and_guidance(transport):
    model, variables = routed_sit(dynamic_tokens=False, seed=1)
    eng = FlowEngine(model, variables, transport, sampler="ode", method="heun2",
                     num_steps=STEPS, grid="exact", use_cfg=False)
    ref = masked_samples(model, variables, transport, "ode", "heun2", use_cfg=False)
    np.testing.assert_allclose(eng.sample(jax.random.PRNGKey(0), LABELS), ref, **TOL)


def test_flow_forward_at_a_plan_time_equals_the_masked_model(sit, transport):
    model, variables = sit
    eng = FlowEngine(model, variables, transport, sampler="ode", method="euler",
                     num_steps=STEPS, grid=COARSE)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (len(LABELS), 8, 8, 4)))
    for step in (0, eng.plan.num_steps - 1):
        t = np.full((len(LABELS),), eng.plan.timesteps[step], np.float32)
        ref, _ = model.apply(variables, x, t, LABELS)
        np.testing.assert_allclose(eng.forward(x, step, LABELS), ref, **TOL)


# ----------------------------------------------------------------------------------------------
# Compile counts
# ----------------------------------------------------------------------------------------------

def test_flow_engine_compiles_once_whatever_the_number_of_times(sit, transport):
    """Counted, not timed: 49 RK4 steps call the model at 148 distinct times with varying
    widths; the run is one executable (a `lax.switch` per block over the bucket grid), built in
    `warmup`; later runs with new seeds, labels and CFG scales compile nothing at all."""
    model, variables = sit
    eng = FlowEngine(model, variables, transport, sampler="ode", method="rk4", num_steps=50,
                     grid=COARSE, token_capacities=(0.5, 1.0))
    assert eng.plan.num_steps > 100 and len(eng.buckets.block_signatures()) > 1
    assert eng.warmup(batch_size=len(LABELS)) == 1
    with CompileCounter() as counter:
        a = eng.sample(jax.random.PRNGKey(0), LABELS, 3.0)
        b = eng.sample(jax.random.PRNGKey(1), LABELS[::-1], 1.5)
        jax.block_until_ready(b)
    assert counter.count == 0 and eng.compile_count == 1
    assert np.isfinite(np.asarray(a)).all() and not np.allclose(a, b)


# ----------------------------------------------------------------------------------------------
# 8 simulated devices
# ----------------------------------------------------------------------------------------------

def test_flow_engine_on_a_mesh_of_8_devices(sit, transport, tmp_path):
    """Batch split over 8 devices: SDE (Heun) samples equal the masked sampler's on 1 device;
    adaptive ODE (dopri5, doubled CFG state) samples equal the masked sampler's on the same
    mesh (the solver's error norm is a cross-device sum: the masked sampler itself moves by
    ~7e-4 between 1 and 8 devices, as its step sizes follow the summation order)."""
    model, variables = sit
    np.save(tmp_path / "ref.npy", masked_samples(model, variables, transport, "sde", "Heun"))
    code = f"""
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from dydit_jax.engine import FlowEngine
from dydit_jax.transport import create_transport
from test_engine import COARSE, LABELS, TOL
from test_engine_flow import STEPS, routed_sit
assert jax.device_count() == 8
mesh = Mesh(np.array(jax.devices()), ("data",))
model, variables = routed_sit()
eng = FlowEngine(model, variables, create_transport("Linear", "velocity"), sampler="sde",
                 method="Heun", num_steps=STEPS, grid=COARSE, token_capacities=(0.5, 1.0),
                 mesh=mesh)
x1 = eng.sample(jax.random.PRNGKey(0), LABELS, 3.0)
assert x1.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 4), x1.sharding
np.testing.assert_allclose(x1, np.load({str(tmp_path / "ref.npy")!r}), **TOL)
eng = FlowEngine(model, variables, create_transport("Linear", "velocity"), sampler="ode",
                 method="dopri5", num_steps=STEPS, grid=COARSE, token_capacities=(0.5, 1.0),
                 mesh=mesh)
x1 = eng.sample(jax.random.PRNGKey(0), LABELS, 3.0)
assert x1.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 4), x1.sharding
from dydit_jax.sampling import make_flow_sample_fn, sample_shardings
ref = make_flow_sample_fn(model, create_transport("Linear", "velocity"), sampler="ode",
                          method="dopri5", num_steps=STEPS, **sample_shardings(mesh))(
    variables, jax.random.PRNGKey(0), LABELS, 3.0)
np.testing.assert_allclose(x1, ref, atol=5e-5, rtol=5e-5)
print("OK")
"""
    res = run_python(code, devices=8)
    assert "OK" in res.stdout
    # diffrax's runtime error callback inside the solve used to make XLA gather the saved
    # states of the sharded dopri5 solve onto one device (integrators.ode: throw=False).
    assert "Involuntary full rematerialization" not in res.stderr
