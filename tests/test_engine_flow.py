"""The gathered engine on flow-matching models (dydit_jax.engine.FlowEngine): a dynamic SiT
sampled with fixed-grid ODE and SDE solvers, plans for continuous time.

Exactness: the engine's samples equal the masked sampler's (`sampling.make_flow_sample_fn`,
the release's path) at float32 atol = rtol = 1e-5, for ODE (Euler, Heun, RK4) and SDE
(Euler-Maruyama with the "Mean" last step, stochastic Heun) with CFG, on 1 and 8 devices, and
for the adaptive dopri5 (widths decided on device) the model function at any t (1e-5) and the
solve's accuracy against a tight reference (see the adaptive tests); one executable per batch size
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


# Adaptive solvers (dopri5, the release's default ODE). Their step sizes come from an error
# estimate, so two equally correct programs whose float32 roundings differ (~5e-7, the fixed-grid
# runs above) accept slightly different steps and land on different points of the solver's error
# band: the masked sampler itself moves by ~7e-4 between 1 and 8 devices. Equality of two
# adaptive solves is therefore a property of one CPU, not of the code. What the engine promises,
# and what these tests check, is (a) its model function equals the masked model at every t the
# solver may ask for (the exactness claim, float32 1e-5), (b) its solve is as accurate as the
# solver's tolerance allows, measured against a tight reference solve, and (c) the solver's
# step controller sees the same problem (accepted step counts within a few of each other).
ADAPTIVE = dict(rtol=1e-5, atol=1e-7)      # tight enough that the error band is small
REFERENCE = dict(rtol=1e-7, atol=1e-9)     # ~100x tighter: its own error is negligible


def recorded_times(model, variables, transport, **tol):
    """Every t at which the masked dopri5 CFG solve calls the model (rejected steps and all
    stages included), recorded by a host callback inside the solve."""
    calls = []
    solve = make_flow_solver(transport, sampler="ode", method="dopri5", num_steps=STEPS, **tol)
    y = jnp.concatenate([jnp.asarray(LABELS), jnp.full_like(jnp.asarray(LABELS), model.num_classes)])

    def model_fn(x, t):
        jax.debug.callback(lambda t: calls.append(np.float32(np.asarray(t).reshape(-1)[0])), t)
        return model.apply(variables, x, t, y, 3.0, method="forward_with_cfg")

    z = jax.random.normal(jax.random.PRNGKey(0), (len(LABELS), 8, 8, 4))
    jax.block_until_ready(jax.jit(lambda z: solve(z, model_fn))(jnp.concatenate([z, z])))
    jax.effects_barrier()
    return np.unique(np.asarray(calls, np.float32))


def test_adaptive_engine_model_function_equals_masked_model_at_any_t(sit, transport):
    """(a) The adaptive engine's model function (widths decided on device from t) equals the
    masked CFG model at every time the masked dopri5 solve evaluates and at random times, for
    states drawn at the scale of the trajectory: float32 1e-5, as the fixed-grid engine."""
    model, variables = sit
    eng = FlowEngine(model, variables, transport, sampler="ode", method="dopri5",
                     num_steps=STEPS, grid=COARSE, token_capacities=(0.5, 1.0), **ADAPTIVE)
    times = np.concatenate([recorded_times(model, variables, transport, **ADAPTIVE),
                            np.random.default_rng(0).uniform(0, 1, 16).astype(np.float32)])
    assert len(times) > 60                     # rejected steps and all six stages are in there
    y = jnp.concatenate([jnp.asarray(LABELS), jnp.full_like(jnp.asarray(LABELS), model.num_classes)])
    masked = jax.jit(lambda x, t: model.apply(variables, jnp.concatenate([x, x]),
                                              jnp.full((2 * len(x),), t), y, 3.0,
                                              method="forward_with_cfg")[0][:len(x)])
    complete = jax.jit(lambda x, t: model.apply(variables, jnp.concatenate([x, x]),
                                                jnp.full((2 * len(x),), t), y, 3.0,
                                                method="forward_with_cfg",
                                                complete=True)[0][:len(x)])
    widths_seen, far = set(), 0
    for i, t in enumerate(times):
        x = 2.0 * jax.random.normal(jax.random.PRNGKey(100 + i), (len(LABELS), 8, 8, 4))
        ref = np.asarray(masked(x, t))
        np.testing.assert_allclose(eng.model_output(x, t, LABELS, 3.0), ref, **TOL,
                                   err_msg=f"t={t}")
        far += np.abs(np.asarray(complete(x, t)) - ref).max() > 100 * TOL["atol"]
        widths_seen.add(tuple(np.asarray(model.apply(variables, jnp.float32(t)[None],
                                                     method=model.width_logits)[0] > 0).ravel()))
    assert len(widths_seen) > 3 and far == len(times)   # the widths change; the test has teeth
    assert eng.compile_count == 1                          # t is traced: one executable


def constant_width_sit():
    """A dynamic SiT whose width routers ignore t (logits +-8: a fixed mix of 1-3 of 4 heads and
    groups per block) and without token routing: its vector field is smooth in t and x, so the
    solver's error control applies. (With widths switching along t the field jumps in t, and a
    step straddling a jump is where an embedded error estimate does not bound the error: the
    routed test model's dopri5 solve lands 170-3400x its tolerance from the truth, the complete
    (smooth) model within 1.2x, measured while writing this test.)"""
    model, variables = routed_sit(dynamic_tokens=False, seed=2)
    rng = np.random.default_rng(2)
    params = dict(variables["params"])
    for l in range(model.depth):
        block = dict(params[f"blocks_{l}"])
        for name in ("head_router", "group_router"):
            k = block[name]["kernel"]
            bias = 8.0 * np.where(rng.uniform(size=k.shape[1]) < 0.5, -1.0, 1.0)
            block[name] = {"kernel": jnp.zeros_like(k), "bias": jnp.asarray(bias, jnp.float32)}
        params[f"blocks_{l}"] = block
    return model, {"params": params}


def rms_error(x, ref, atol, rtol):
    """diffrax's error norm (RMS over all entries of (x - ref) / (atol + rtol * |.|))."""
    scale = atol + rtol * np.maximum(np.abs(x), np.abs(ref))
    return float(np.sqrt(np.mean(((np.asarray(x) - ref) / scale) ** 2)))


def test_adaptive_engine_solve_within_the_solvers_tolerance(transport):
    """(b) The engine's dopri5 solve and the masked one both land within the solver's error
    tolerance of a reference solve 100x tighter, in the solver's own RMS norm: the controller
    keeps every accepted step's local error estimate <= 1 in that norm, so the global error of
    n accepted steps is at most about n (errors add; the Lipschitz growth over t in [0, 1] of
    this small field is O(1)). (c) The accepted step counts differ by at most 2: roundings that
    differ at the 1e-7 level can flip an accept / reject decision near the threshold, each flip
    changing the count by one. Teeth: the complete model's solve is far outside the bound."""
    model, variables = constant_width_sit()
    eng = FlowEngine(model, variables, transport, sampler="ode", method="dopri5",
                     num_steps=STEPS, grid=COARSE, **ADAPTIVE)
    assert eng.adaptive and eng.warmup(len(LABELS)) == 1
    x_eng, st_eng = eng.sample(jax.random.PRNGKey(0), LABELS, 3.0, return_stats=True)

    def masked(complete=False, **tol):
        fn = make_flow_sample_fn(model, transport, sampler="ode", method="dopri5",
                                 num_steps=STEPS, return_stats=True, complete=complete, **tol)
        x, st = fn(variables, jax.random.PRNGKey(0), LABELS, 3.0)
        return np.asarray(x), {k: int(v) for k, v in st.items()}

    ref, _ = masked(**REFERENCE)
    x_masked, st_masked = masked(**ADAPTIVE)
    for name, x, st in (("engine", x_eng, st_eng), ("masked", x_masked, st_masked)):
        n = st["num_accepted_steps"]
        assert n >= 3, st
        assert rms_error(x, ref, **ADAPTIVE) <= n, (name, rms_error(x, ref, **ADAPTIVE), st)
    assert abs(st_eng["num_accepted_steps"] - st_masked["num_accepted_steps"]) <= 2
    x_complete, st_c = masked(complete=True, **ADAPTIVE)
    assert rms_error(x_complete, ref, **ADAPTIVE) > 100 * st_c["num_accepted_steps"]
    assert eng.compile_count == 1


def test_adaptive_engine_on_routed_widths_is_as_accurate_as_the_masked_solve(sit, transport):
    """The routed model (widths switch along t, tokens skip): there the error control does not
    bound the error (see `constant_width_sit`), so the claim is relative: the engine's solve
    lands closer to the tight reference than a tenth of the complete model's distance (the
    dynamic model's own solve error is ~6e-4, the complete model is 3e-2 away), and its
    accepted step count is within 2 + 20 % of the masked solve's (the jumps make the
    controller's decisions sensitive to rounding)."""
    model, variables = sit
    eng = FlowEngine(model, variables, transport, sampler="ode", method="dopri5",
                     num_steps=STEPS, grid=COARSE, token_capacities=(0.5, 1.0), **ADAPTIVE)
    x_eng, st_eng = eng.sample(jax.random.PRNGKey(0), LABELS, 3.0, return_stats=True)
    fn = make_flow_sample_fn(model, transport, sampler="ode", method="dopri5",
                             num_steps=STEPS, return_stats=True, **REFERENCE)
    ref = np.asarray(fn(variables, jax.random.PRNGKey(0), LABELS, 3.0)[0])
    fn = make_flow_sample_fn(model, transport, sampler="ode", method="dopri5",
                             num_steps=STEPS, return_stats=True, **ADAPTIVE)
    x_masked, st_masked = fn(variables, jax.random.PRNGKey(0), LABELS, 3.0)
    complete = masked_samples(model, variables, transport, "ode", "dopri5", complete=True,
                              **ADAPTIVE)
    bound = 0.1 * np.abs(complete - ref).max()
    assert np.abs(np.asarray(x_masked) - ref).max() < bound
    assert np.abs(np.asarray(x_eng) - ref).max() < bound
    n_e, n_m = st_eng["num_accepted_steps"], int(st_masked["num_accepted_steps"])
    assert abs(n_e - n_m) <= 2 + 0.2 * n_m, (n_e, n_m)


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

# slow: the DiT engine's 8-device test covers the shard_map path SiT shares.
@pytest.mark.slow
def test_flow_engine_on_a_mesh_of_8_devices(sit, transport, tmp_path):
    """Batch split over 8 devices: SDE (Heun) samples equal the masked sampler's on 1 device
    (fixed grid: 1e-5); the adaptive engine (dopri5, doubled CFG state) on the mesh: its model
    function equals the 1-device masked model at random t (1e-5), and its solve lands within
    the solver's tolerance of a tight 1-device reference (see the adaptive tests above: the
    error norm is a cross-device sum, so the accepted steps follow the summation order and
    equality of solves across device counts is not a property of the code)."""
    model, variables = sit
    np.save(tmp_path / "ref.npy", masked_samples(model, variables, transport, "sde", "Heun"))
    times = np.float32([0.137, 0.5, 0.862])
    x = 2.0 * np.asarray(jax.random.normal(jax.random.PRNGKey(7), (len(LABELS), 8, 8, 4)))
    y = np.concatenate([LABELS, np.full_like(LABELS, model.num_classes)])
    outs = [np.asarray(model.apply(variables, np.concatenate([x, x]), np.full(16, t), y, 3.0,
                                   method="forward_with_cfg")[0][:8]) for t in times]
    np.savez(tmp_path / "outs.npz", x=x, times=times, outs=np.stack(outs))
    smooth, smooth_vars = constant_width_sit()
    fn = make_flow_sample_fn(smooth, transport, sampler="ode", method="dopri5",
                             num_steps=STEPS, **REFERENCE)
    np.save(tmp_path / "tight.npy", np.asarray(fn(smooth_vars, jax.random.PRNGKey(0), LABELS,
                                                  3.0)))
    code = f"""
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from dydit_jax.engine import FlowEngine
from dydit_jax.transport import create_transport
from test_engine import COARSE, LABELS, TOL
from test_engine_flow import (ADAPTIVE, STEPS, constant_width_sit, rms_error, routed_sit)
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
                 mesh=mesh, **ADAPTIVE)
ref = np.load({str(tmp_path / "outs.npz")!r})
for t, out in zip(ref["times"], ref["outs"]):
    np.testing.assert_allclose(eng.model_output(ref["x"], t, LABELS, 3.0), out, **TOL)
smooth, smooth_vars = constant_width_sit()
eng = FlowEngine(smooth, smooth_vars, create_transport("Linear", "velocity"), sampler="ode",
                 method="dopri5", num_steps=STEPS, grid=COARSE, mesh=mesh, **ADAPTIVE)
x1, stats = eng.sample(jax.random.PRNGKey(0), LABELS, 3.0, return_stats=True)
assert x1.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 4), x1.sharding
err = rms_error(x1, np.load({str(tmp_path / "tight.npy")!r}), **ADAPTIVE)
assert err <= stats["num_accepted_steps"], (err, stats)
print("OK")
"""
    res = run_python(code, devices=8)
    assert "OK" in res.stdout
    # diffrax's runtime error callback inside the solve used to make XLA gather the saved
    # states of the sharded dopri5 solve onto one device (integrators.ode: throw=False).
    assert "Involuntary full rematerialization" not in res.stderr
