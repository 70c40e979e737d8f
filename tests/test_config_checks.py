"""Config values checked up front (config_lib.validate / check_sources / check_devices), config
errors in one line on the command line, `--config.help`, and two API sharp edges: labels
outside the model's table and a noise array passed where the sampling loops take `rng`.

The bulk of the bad values goes through `validate` in process (pure Python, milliseconds);
the command line is exercised on the cases issue 14 names, each asserting a non-zero exit,
one stderr line naming the key and the value, no workdir and no compile (JAX_LOG_COMPILES=1
logs every trace and compile; `test_compile_log_is_seen_when_something_compiles` shows that a
run which does trace prints those lines through the same entry point).
"""
import importlib.util
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from dydit_jax import config_lib
from dydit_jax.config_lib import ConfigError, UnknownKeyError

COMPILE_LOG = ("Compiling", "Finished tracing")


def load(name="digits", arg=None, **overrides):
    """configs/<name>.py with dotted-key overrides: load(**{"sample.eta": -1.0})."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config(arg)
    for key, value in overrides.items():
        *sections, leaf = key.split(".")
        node = config
        for s in sections:
            node = node[s]
        node[leaf] = value
    return config


# (config file, overrides, the key the error must name). The message must also hold the value.
BAD_VALUES = [
    ("digits", {"sample.classes": (10,)}, "sample.classes"),
    ("digits", {"sample.classes": (-1,)}, "sample.classes"),
    ("digits", {"sample.classes": (3, 12)}, "sample.classes"),
    ("digits", {"sample.batch_size": -4}, "sample.batch_size"),
    ("digits", {"sample.per_class": 0}, "sample.per_class"),
    ("digits", {"train.batch_size": -1}, "train.batch_size"),
    ("digits", {"train.num_steps": 0}, "train.num_steps"),
    ("digits", {"train.log_every": 0}, "train.log_every"),
    ("digits", {"evaluate.batch_size": 0}, "evaluate.batch_size"),
    ("digits", {"evaluate.num_samples": 1}, "evaluate.num_samples"),
    ("digits", {"sample.num_steps": 0}, "sample.num_steps"),
    ("digits", {"sample.num_steps": 1001}, "sample.num_steps"),
    ("digits", {"sample.num_steps": 600}, "sample.num_steps"),   # ddim: no integer stride
    ("digits", {"evaluate.num_steps": 2000}, "evaluate.num_steps"),
    ("digits", {"sample.cfg_scale": -1.0}, "sample.cfg_scale"),
    ("digits", {"evaluate.cfg_scale": -0.5}, "evaluate.cfg_scale"),
    ("digits", {"sample.eta": -0.1}, "sample.eta"),
    ("digits", {"sample.sampler": "euler"}, "sample.sampler"),
    ("digits", {"evaluate.sampler": "plms"}, "evaluate.sampler"),
    ("digits", {"sample.engine": "fast"}, "sample.engine"),
    ("digits", {"sample.engine": "gathered"}, "sample.engine"),   # needs dynamic.enabled
    ("digits", {"model.name": "DiT-M/2"}, "model.name"),
    ("digits", {"model.name": "SiT-XL/2"}, "model.name"),         # needs transport.enabled
    ("digits", {"model.hidden_size": 0}, "model.hidden_size"),
    ("digits", {"model.hidden_size": 90}, "model.hidden_size"),   # 4 heads
    ("digits", {"model.depth": -2}, "model.depth"),
    ("digits", {"model.input_size": 15}, "model.input_size"),     # patch 2
    ("digits", {"model.dtype": "float16"}, "model.dtype"),
    ("digits", {"model.remat_policy": "everything"}, "model.remat_policy"),
    ("digits", {"model.numerics": "pytorch"}, "model.numerics"),
    ("digits", {"dynamic.target": 0.0}, "dynamic.target"),
    ("digits", {"dynamic.target": 1.5}, "dynamic.target"),
    ("digits", {"data.name": "cifar"}, "data.name"),
    ("digits", {"sample.classes": (0, 4), "model.num_classes": 5},
     "model.num_classes"),                                         # digits labels 0..9
    ("dit_s", {"data.name": "synthetic", "data.num_classes": 2000}, "data.num_classes"),
    ("digits", {"mode": "serve"}, "mode"),
    ("digits_sit", {"transport.path_type": "Cosine"}, "transport.path_type"),
    ("digits_sit", {"transport.prediction": "eps"}, "transport.prediction"),
    ("digits_sit", {"transport.loss_weight": "snr"}, "transport.loss_weight"),
    ("digits_sit", {"transport.sampler": "dde"}, "transport.sampler"),
    ("digits_sit", {"transport.method": "rk5"}, "transport.method"),
    ("digits_sit", {"transport.sampler": "sde", "transport.method": "heun2"},
     "transport.method"),
    ("digits_sit", {"transport.num_steps": 1}, "transport.num_steps"),
    ("digits_sit", {"transport.diffusion_form": "cosine"}, "transport.diffusion_form"),
    ("digits_sit", {"transport.last_step": "Mode"}, "transport.last_step"),
    ("flux_digits", {"flux.time_sampling": "cosine"}, "flux.time_sampling"),
    ("flux_digits", {"flux.true_cfg": 0.5}, "flux.true_cfg"),
    ("flux_digits", {"model.axes_dim": (2, 2, 2)}, "model.axes_dim"),
    ("flux_digits", {"text.encoders": "openai"}, "text.encoders"),
    ("flux_digits", {"text.dropout": 1.0}, "text.dropout"),
    ("flux_digits", {"flux.tdw": True}, "flux.tdw"),             # TDW without DyFLUX
    ("flux_digits", {"flux.capacities": (0.5, 1.5)}, "flux.capacities"),
    ("flux_digits", {"mode": "sample", "model.in_channels": 16}, "sample.vae_dir"),
    ("flux_digits", {"data.name": "digits"}, "data.name"),       # FLUX needs captions
    ("digits", {"data.name": "captioned_digits"}, "data.name"),  # a DiT takes no captions
]


@pytest.mark.parametrize("name,overrides,key", BAD_VALUES,
                         ids=[f"{k}={list(o.values())[-1]}" for _, o, k in BAD_VALUES])
def test_validate_names_the_key_the_value_and_what_is_valid(name, overrides, key):
    config = load(name, **overrides)
    with pytest.raises(ConfigError) as info:
        config_lib.validate(config)
    message = str(info.value)
    value = config_lib._get(config, key)
    assert message.startswith(f"config.{key}={value!r}: "), message
    assert "\n" not in message


def test_messages_say_what_would_be_valid():
    def error(name="digits", **overrides):
        with pytest.raises(ConfigError) as info:
            config_lib.validate(load(name, **overrides))
        return str(info.value)

    assert error(**{"sample.classes": (10,)}) == (
        "config.sample.classes=(10,): class ids must be in [0, num_classes=10) "
        "(config.model.num_classes); not 10")
    assert "1.0 disables guidance" in error(**{"sample.cfg_scale": -1.0})
    assert "[1, 1000] (config.diffusion.diffusion_steps)" in error(**{"sample.num_steps": 0})
    assert "e.g. 500" in error(**{"sample.num_steps": 600})
    assert "'nothing_saveable'" in error(**{"model.remat_policy": "everything"})
    assert "'official', 'diffusers'" in error(**{"model.numerics": "pytorch"})
    assert "set config.transport.enabled=True" in error(**{"model.name": "SiT-XL/2"})
    assert "DiT-{S,B,L,XL}/{2,4,8}" in error(**{"model.name": "DiT-M/2"})
    assert "'masked', 'static', 'gathered'" in error(**{"sample.engine": "fast"})
    assert "'dopri5'" in error("digits_sit", **{"transport.method": "rk5"})


def test_valid_values_pass():
    for name, arg in [("digits", None), ("digits_dydit", None), ("digits_sit", None),
                      ("dit_xl", "lam=0.5,init=converted"), ("sit_xl", None)]:
        config_lib.validate(load(name, arg))
    config_lib.validate(load("digits", **{"sample.classes": (0, 9), "sample.cfg_scale": 0.0,
                                          "sample.sampler": "ddpm", "sample.num_steps": 1000,
                                          "model.remat_policy": "dots_saveable",
                                          "model.dtype": "bfloat16"}))
    config_lib.validate(load("digits", **{"sample.num_steps": 334}))   # ddim stride 3
    config_lib.validate(load("digits_dydit", **{"sample.engine": "gathered"}))
    for sampler, method, last in [("sde", "Heun", None), ("sde", "euler", "None"),
                                  ("ode", "DOPRI5", "Mean"), ("ode", "heun2", "Tweedie")]:
        config_lib.validate(load("digits_sit", **{"transport.sampler": sampler,
                                                  "transport.method": method,
                                                  "transport.last_step": last}))
    # the digits labels only matter where data is read
    config_lib.validate(load("digits", **{"model.num_classes": 5, "mode": "sample",
                                          "sample.classes": (0, 4)}))


def test_unknown_keys_name_the_closest_key():
    config = load()
    config.unlock()
    config.sample.cfg_scal = 2.0
    with pytest.raises(UnknownKeyError, match="config.sample.cfg_scal; did you mean "
                                              r"config.sample.cfg_scale\?") as info:
        config_lib.validate(config)
    assert isinstance(info.value, KeyError) and not str(info.value).startswith("'")
    error = config_lib.unknown_key_error(load(), "sampel.cfg_scale")
    assert "did you mean config.sample.cfg_scale?" in str(error)
    assert config_lib.unknown_key_error(load(), "sample.classes.x") is not None
    assert config_lib.unknown_key_error(load(), "sample.cfg_scale") is None


def test_pretrain_stage_overrides_are_checked_like_the_config():
    """`config.pretrain` holds overrides of the config's sections: its stage is the config with
    them applied, and a bad key or value in it is named with its pretrain. prefix."""
    config = load("latte_digits")
    stage = config_lib.pretrain_config(config)
    assert (stage.model.num_frames, stage.data.num_frames, stage.train.num_steps) == (1, 1, 8000)
    assert not stage.pretrain.keys() and stage.mode == "train" and stage.train.batch_size == 32
    assert config.model.num_frames == 8 and config.train.num_steps == 2000   # not modified
    config.pretrain.data.num_frame = 1
    with pytest.raises(UnknownKeyError, match="config.pretrain.data.num_frame; did you mean "
                                              r"config.pretrain.data.num_frames\?"):
        config_lib.validate(config)
    config = load("latte_digits")
    config.pretrain.train.num_steps = 0
    with pytest.raises(ConfigError, match="in the pretrain stage.*config.train.num_steps=0"):
        config_lib.validate(config)
    config = load("latte_digits", **{"train.init_from": "runs/x"})
    with pytest.raises(ConfigError, match="config.train.init_from='runs/x'.*pretrain"):
        config_lib.validate(config)


def test_check_sources(tmp_path):
    def error(workdir=tmp_path / "run", name="digits", **overrides):
        with pytest.raises(ConfigError) as info:
            config_lib.check_sources(load(name, **overrides), str(workdir))
        return str(info.value)

    (tmp_path / "file").write_text("")
    assert error(workdir=tmp_path / "file") == (
        f"--workdir={str(tmp_path / 'file')!r} exists and is not a directory")
    for mode in ("sample", "plot", "evaluate"):
        assert error(mode=mode).startswith("config.sample.checkpoint='': ")
    missing = str(tmp_path / "missing")
    assert error(**{"mode": "sample", "sample.checkpoint": missing}).startswith(
        f"config.sample.checkpoint={missing!r}: no such file or directory")
    assert error(**{"train.init_from": missing}).startswith(f"config.train.init_from={missing!r}")
    assert "run mode=extract first" in error(**{"data.name": "latents"})
    assert error(**{"data.name": "latents", "data.path": missing}).startswith(
        f"config.data.path={missing!r}: no such file or directory; data.name=latents")
    assert error(**{"data.name": "imagenet", "data.data_dir": missing}).startswith(
        "config.data.data_dir=")
    assert "holds ucf101/ucf101_1" in error(**{"data.name": "ucf101", "data.data_dir": missing})
    assert "folder of video files" in error(**{"data.name": "video_folder",
                                               "data.data_dir": missing})
    assert error(**{"data.name": "imagenet", "data.download_and_prepare": True,
                    "data.manual_dir": missing}).startswith("config.data.manual_dir=")
    assert error(mode="extract").startswith("config.evaluate.vae_dir=None: mode=extract")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert error(mode="evaluate").startswith("config.evaluate.inception_path=None")
    assert error(**{"mode": "evaluate", "evaluate.inception_path": missing}).startswith(
        "config.evaluate.inception_path=")
    assert error(**{"mode": "evaluate", "evaluate.inception_path": str(tmp_path / "file"),
                    "evaluate.reference_batch": missing}).startswith(
        "config.evaluate.reference_batch=")
    assert error(**{"mode": "sample", "evaluate.vae_dir": missing}).startswith(
        "config.evaluate.vae_dir=")
    for mode in ("sample", "train"):
        assert error(**{"mode": mode, "sample.vae_dir": missing}).startswith(
            f"config.sample.vae_dir={missing!r}: no such file or directory")

    ok = dict(workdir=str(tmp_path / "run"))
    config_lib.check_sources(load(), **ok)                       # train from scratch
    config_lib.check_sources(load(mode="sample"), **ok)          # the workdir has checkpoints
    config_lib.check_sources(load(**{"mode": "sample", "sample.checkpoint": str(tmp_path)}),
                             str(tmp_path / "fresh"))
    config_lib.check_sources(load(**{"data.name": "latents", "data.path": "gs://b/latents",
                                     "train.init_from": "gs://b/dit"}), **ok)   # not local
    config_lib.check_sources(load(**{"data.name": "imagenet"}), **ok)   # tfds's default dir
    config_lib.check_sources(load(mode="sample"), "gs://bucket/run")


def test_check_devices():
    def error(devices, hosts=1, **overrides):
        with pytest.raises(ConfigError) as info:
            config_lib.check_devices(load(**overrides), devices, hosts)
        return str(info.value)

    assert error(8, **{"mesh.fsdp": 3}) == (
        "config.mesh.fsdp=3: must divide the 8 devices: valid: 1, 2, 4, 8")
    assert error(8, **{"mesh.data": 3, "mesh.fsdp": 2}).startswith(
        "config.mesh.data=3: mesh.data * mesh.fsdp = 3 * 2 must equal the 8 devices: set "
        "config.mesh.data=4 or -1")
    assert error(8, **{"train.batch_size": 30}).endswith("e.g. 24 or 32")
    assert error(8, **{"train.batch_size": 4}).endswith("e.g. 8")
    for data, fsdp in ((-1, 1), (-1, 8), (2, 4), (8, 1)):
        config_lib.check_devices(load(**{"mesh.data": data, "mesh.fsdp": fsdp}), 8, 2)
    config_lib.check_devices(load(**{"mode": "sample", "train.batch_size": 30}), 8)


def test_config_lines_list_every_key_with_its_value():
    lines = config_lib.config_lines(load(**{"sample.cfg_scale": 2.5}))
    assert "sample.cfg_scale = 2.5  # 1.0 disables guidance" in lines
    assert "model.name = 'custom'" in [line.split("  #")[0] for line in lines]
    config = load()
    leaves = [k for k in config_lib._flat_keys(config)
              if not isinstance(config_lib._get(config, k), type(config))]
    assert [line.split(" = ")[0] for line in lines] == leaves


def test_config_arg_errors_are_config_errors():
    with pytest.raises(UnknownKeyError, match="unknown config arg 'stepz'"):
        load(arg="stepz=3")
    with pytest.raises(ConfigError, match="init="):
        load("dit_xl", "lam=0.5")


# ----------------------------------------------------------------------------------------------
# The model and the samplers refuse labels outside the label table
# ----------------------------------------------------------------------------------------------

def test_model_refuses_concrete_labels_outside_its_table():
    from dydit_jax.models import DiT
    from test_dit import TINY   # num_classes 10, class_dropout_prob 0.1: row 10 is the null label

    small = dict(TINY, hidden_size=32, depth=1, num_heads=2)
    model = DiT(**small)
    x, t = jnp.zeros((2, 8, 8, 4)), jnp.zeros((2,))
    variables = model.init(jax.random.PRNGKey(0), x, t, jnp.array([0, 10]))
    for y in ([0, 11], [-1, 3]):
        with pytest.raises(ValueError, match=r"class ids must be in \[0, 10\) or 10 \(the null"):
            model.apply(variables, x, t, np.array(y))
    jax.jit(model.apply)(variables, x, t, jnp.array([0, 11]))   # traced: not checkable here
    no_null = DiT(**dict(small, class_dropout_prob=0.0))
    with pytest.raises(ValueError, match=r"labels \[10\] are outside the label table"):
        no_null.init(jax.random.PRNGKey(0), x, t, jnp.array([0, 10]))


def test_samplers_check_labels_before_compiling():
    from dydit_jax import sampling
    from dydit_jax.diffusion import create_diffusion
    from dydit_jax.engine.sampler import Engine
    from dydit_jax.models import DiT
    from dydit_jax.models.sit import SiT
    from dydit_jax.transport import create_transport
    from test_dit import TINY

    samplers = [sampling.make_sample_fn(DiT(**TINY), create_diffusion("5")),
                sampling.make_flow_sample_fn(SiT(**TINY), create_transport(), num_steps=3)]
    for sample in samplers:
        for labels in ([1, 11], jnp.array([-1, 2])):   # 10: the null label (unconditional)
            with pytest.raises(ValueError, match=r"class ids must be in \[0, 10\) or 10 \(the"):
                sample({}, jax.random.PRNGKey(0), labels, 4.0)
        assert sample.trace_count() == 0
    # Engine.sample / forward and FlowEngine.sample take their labels through Engine._labels.
    engine = types.SimpleNamespace(model=types.SimpleNamespace(num_classes=10,
                                                               class_dropout_prob=0.0))
    with pytest.raises(ValueError, match=r"labels \[10\]"):
        Engine._labels(engine, np.array([3, 10]))


def test_sampling_loops_refuse_noise_passed_as_rng():
    from dydit_jax.diffusion import create_diffusion

    diffusion = create_diffusion("5", learn_sigma=False)
    model_fn = lambda x, t: jnp.zeros_like(x)  # noqa: E731
    noise = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 1))
    for loop in (diffusion.p_sample_loop, diffusion.ddim_sample_loop,
                 diffusion.p_sample_loop_progressive):
        with pytest.raises(TypeError, match=r"got a float32 array of shape \(2, 4, 4, 1\) as rng; "
                                            r"pass the starting noise as noise=\.\.\. \(keyword\) "
                                            r"and a PRNG key as rng"):
            loop(model_fn, noise.shape, noise)
    out = diffusion.ddim_sample_loop(model_fn, noise.shape, noise=noise)   # the reference's way
    assert out.shape == noise.shape
    for key in (jax.random.PRNGKey(0), jax.random.key(0)):
        assert diffusion.ddim_sample_loop(model_fn, noise.shape, key).shape == noise.shape


# ----------------------------------------------------------------------------------------------
# The command line: one line, non-zero exit, no workdir, no compile
# ----------------------------------------------------------------------------------------------

def run_main(workdir, *overrides):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "dydit_jax.main", "--config=configs/digits.py",
                           f"--workdir={workdir}", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


CLI_CASES = [
    (("--config.mode=sample", "--config.sample.classes=(10,)"), "config.sample.classes=(10,): "),
    (("--config.mode=sample", "--config.sample.classes=(11,)"), "config.sample.classes=(11,): "),
    (("--config.mode=sample", "--config.sample.classes=(-1,)"), "config.sample.classes=(-1,): "),
    (("--config.sample.batch_size=-4",), "config.sample.batch_size=-4: "),
    (("--config.sample.per_class=0",), "config.sample.per_class=0: "),
    (("--config.mode=sample", "--config.sample.num_steps=0"), "config.sample.num_steps=0: "),
    (("--config.mode=sample", "--config.sample.num_steps=1001"),
     "config.sample.num_steps=1001: "),
    (("--config.train.batch_size=-1",), "config.train.batch_size=-1: "),
    (("--config.sample.cfg_scale=-1.0",), "config.sample.cfg_scale=-1.0: "),
    (("--config.sample.cfg_scal=2.0",), "unknown config key config.sample.cfg_scal; did you "
                                        "mean config.sample.cfg_scale? (from "
                                        "--config.sample.cfg_scal=2.0)"),
]


@pytest.mark.parametrize("overrides,message", CLI_CASES, ids=[c[0][-1] for c in CLI_CASES])
def test_command_line_errors_are_one_line_before_anything_runs(tmp_path, overrides, message):
    res = run_main(tmp_path / "run", *overrides)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines() == [res.stderr.strip()], res.stderr
    assert res.stderr.startswith(f"error: {message}"), res.stderr
    assert not (tmp_path / "run").exists()
    assert not any(line in res.stderr + res.stdout for line in COMPILE_LOG)


def test_compile_log_is_seen_when_something_compiles(tmp_path):
    """The control for the no-compile assertions: a sample run whose workdir has an (empty)
    checkpoints folder gets past the checks, traces the train state to restore and fails
    there; JAX_LOG_COMPILES=1 shows that trace through the same entry point."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    res = run_main(tmp_path / "run", "--config.mode=sample")
    assert res.returncode != 0 and "no checkpoint" in res.stderr
    assert "Finished tracing" in res.stderr


def test_config_help_lists_keys_and_values_and_runs_nothing(tmp_path):
    res = run_main(tmp_path / "run", "--config.sample.cfg_scale=2.5", "--config.help")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "sample.cfg_scale = 2.5  # 1.0 disables guidance" in lines
    assert "model.name = 'custom'" in [line.split("  #")[0] for line in lines]
    assert all(" = " in line for line in lines) and len(lines) > 100
    assert not (tmp_path / "run").exists()
    assert not any(line in res.stderr for line in COMPILE_LOG)
