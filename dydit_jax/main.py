"""Entry point: `python -m dydit_jax.main --config=configs/<name>.py[:args] --workdir=<dir>`.

Dispatches on `config.mode`: train | sample | plot (dynamic models' routing) | evaluate
(FID etc., dydit_jax/evaluate.py) | extract (VAE latent shards, dydit_jax/extract_latents.py).
Overrides:
`--config.train.batch_size=64`. `--config.help` lists every key of the config with its value
(after the config file and the overrides) and exits. A config error (an unknown key, a value
out of range, a missing file, a mesh that does not fit the devices) ends the run before
anything is compiled or written, with one line that names the key and what would be valid
(`config_lib.validate`, `check_sources`, `check_devices`).
"""
from __future__ import annotations

import logging
import os
import re
import sys

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from dydit_jax import config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and samples")
flags.mark_flags_as_required(["config"])


def run(config, workdir: str, check_files: bool = False):
    """Runs `config.mode` in `workdir` once its values (and the mesh) are checked; with
    `check_files` (the command line) also the files the mode reads and the workdir itself
    (API callers may hand in stand-ins instead)."""
    config_lib.validate(config)
    if check_files:
        config_lib.check_sources(config, workdir)
    import jax

    if config.distributed:
        jax.distributed.initialize()
    config_lib.check_devices(config, jax.device_count(), jax.process_count())
    from dydit_jax.compile_clock import persistent_cache, resolve_cache_dir
    with persistent_cache(resolve_cache_dir(config.compilation_cache_dir, workdir)):
        return _run_mode(config, workdir)


def _after_pretrain(config, workdir: str):
    """Trains the `pretrain` stage in <workdir>/pretrain (resumed like any run; skipped once
    this run has a checkpoint of its own) and returns the config starting from its EMA."""
    stage_dir = os.path.join(workdir, "pretrain")
    checkpoints = os.path.join(workdir, "checkpoints")
    # Finished orbax steps are directories named by the step (partial ones carry a suffix).
    if not (os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))):
        logging.warning("pretrain stage: training %s first", stage_dir)
        _run_mode(config_lib.pretrain_config(config), stage_dir)
    config = ml_collections.ConfigDict(config.to_dict())
    config.pretrain = ml_collections.ConfigDict()
    config.train.init_from = stage_dir
    return config


def _run_mode(config, workdir: str):
    if config.mode == "train" and config.pretrain.keys():
        config = _after_pretrain(config, workdir)
    if config.mode == "train":
        from dydit_jax import generate, train
        state = train.train_and_evaluate(config, workdir)
        key = "ema" if config.sample.use_ema else "params"
        params = state[key]
        if "frozen" in state:   # a PEFT run: the trainable tree on its frozen base
            from dydit_jax.peft import combine
            params = combine(state["frozen"], params)
        return generate.sample_from_workdir(config, workdir, params=params,
                                            step=int(state["step"]))
    if config.mode == "sample":
        from dydit_jax import generate
        return generate.sample_from_workdir(config, workdir)
    if config.mode == "plot":
        from dydit_jax import plots
        return plots.plot_from_workdir(config, workdir)
    if config.mode == "evaluate":
        from dydit_jax import evaluate
        return evaluate.evaluate_from_workdir(config, workdir)
    if config.mode == "export":
        from dydit_jax import generate
        return generate.export_adapters(config, workdir)
    if config.mode == "extract":
        from dydit_jax import extract_latents
        return extract_latents.extract_from_config(config, workdir)
    raise NotImplementedError(f"config.mode={config.mode!r} is not implemented yet; "
                              f"available: {', '.join(config_lib.MODES)}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # orbax logs every checkpoint step at INFO through absl; keep the console to warnings.
    logging.getLogger().setLevel(logging.WARNING)
    workdir = FLAGS.workdir or os.path.join("runs", os.path.splitext(
        os.path.basename(FLAGS["config"].config_filename.split(":")[0]))[0])
    try:
        run(FLAGS.config, workdir, check_files=True)
    except config_lib.ConfigError as e:
        sys.exit(f"error: {e}")


HELP = "--config.help"
OVERRIDE = re.compile(r"^--?(no)?config\.")


def parse_flags(argv):
    """absl's flag parsing, plus `--config.help` and flag errors in one line (`_flag_error`)."""
    show_help = HELP in argv
    argv = [arg for arg in argv if arg != HELP]
    sys.argv = argv   # config_flags reads the overrides from sys.argv, not from `argv`
    try:
        rest = FLAGS(argv)
    except (flags.Error, AttributeError, KeyError) as e:
        message = _flag_error(e, argv)
        if message is None:   # not a config error (a bug in a config file): the traceback
            raise
        sys.exit(f"error: {message}")
    config_file = FLAGS["config"].config_filename.split(":")[0]
    if not os.path.isfile(config_file):   # config_flags defers this error to the first read
        sys.exit(f"error: --config={config_file}: no such config file")
    if show_help:
        print("\n".join(config_lib.config_lines(FLAGS.config)))
        sys.exit(0)
    return rest


def _flag_error(error: Exception, argv):
    """One line for a flag parsing error: the `config_lib.ConfigError` it was raised from (a
    config file's `:arg`; config_flags re-raises it with a traceback in the message), the key
    an override names that the config lacks (ml_collections raises a multi-line
    AttributeError), or absl's own one-line message. None for anything else."""
    cause = error
    while cause is not None:
        if isinstance(cause, config_lib.ConfigError) and "\n" not in str(cause):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, (AttributeError, KeyError)):
        return _unknown_override(argv)
    return None if "\n" in str(error) else str(error)


def _unknown_override(argv):
    """The first `--config.<key>=` of `argv` whose key the config lacks, as an error message
    (the config is parsed again without the overrides to find it); None if there is none."""
    overrides = [arg for arg in argv if OVERRIDE.match(arg)]
    plain = [arg for arg in argv if not OVERRIDE.match(arg)]
    sys.argv = plain
    try:
        FLAGS(plain)
    except Exception:  # noqa: BLE001 - the original error is reported instead
        return None
    finally:
        sys.argv = argv
    for arg in overrides:
        error = config_lib.unknown_key_error(FLAGS.config, OVERRIDE.sub("", arg.split("=")[0]))
        if error is not None:
            return f"{error} (from {arg})"
    return None


if __name__ == "__main__":
    from dydit_jax import cpu_env
    cpu_env.reexec_with_malloc_tunables()   # huge pages for XLA:CPU's buffers (cpu_env.py)
    app.run(main, flags_parser=parse_flags)
