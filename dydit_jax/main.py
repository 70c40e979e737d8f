"""Entry point: `python -m dydit_jax.main --config=configs/<name>.py[:args] --workdir=<dir>`.

Dispatches on `config.mode`: train | sample | plot (dynamic models' routing) | evaluate
(FID etc., dydit_jax/evaluate.py) | extract (VAE latent shards, dydit_jax/extract_latents.py).
Overrides:
`--config.train.batch_size=64`; unknown keys are errors that name the key.
"""
from __future__ import annotations

import logging
import os

from absl import app, flags
from ml_collections import config_flags

from dydit_jax import config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and samples")
flags.mark_flags_as_required(["config"])


def run(config, workdir: str):
    config_lib.validate(config)
    import jax

    if config.distributed:
        jax.distributed.initialize()
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
    if config.mode == "train":
        from dydit_jax import generate, train
        state = train.train_and_evaluate(config, workdir)
        key = "ema" if config.sample.use_ema else "params"
        return generate.sample_from_workdir(config, workdir, params=state[key])
    if config.mode == "sample":
        from dydit_jax import generate
        return generate.sample_from_workdir(config, workdir)
    if config.mode == "plot":
        from dydit_jax import plots
        return plots.plot_from_workdir(config, workdir)
    if config.mode == "evaluate":
        from dydit_jax import evaluate
        return evaluate.evaluate_from_workdir(config, workdir)
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
    run(FLAGS.config, workdir)


if __name__ == "__main__":
    from dydit_jax import cpu_env
    cpu_env.reexec_with_malloc_tunables()   # huge pages for XLA:CPU's buffers (cpu_env.py)
    app.run(main)
