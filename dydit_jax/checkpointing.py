"""Checkpoint I/O with orbax.

`save_params` / `load_params` write and read a bare parameter tree (converted official weights,
exported models); `TrainCheckpointer` manages the training checkpoints of a workdir.
"""
from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp


def save_params(path: str, params) -> None:
    """Writes `params` atomically (orbax writes to a temporary dir and renames on success)."""
    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=True)


def load_params(path: str, target=None):
    """Reads a tree written by `save_params`; `target` (arrays or ShapeDtypeStructs, possibly
    with shardings) fixes the structure, dtypes and placement."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no parameter checkpoint at {path!r}")
    from dydit_jax import convert_flux
    if convert_flux.is_streamed(path):     # one orbax item per block (stream_to_orbax)
        return convert_flux.load_streamed(path, target)
    with ocp.StandardCheckpointer() as ckptr:
        if target is None:
            return ckptr.restore(path)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        return ckptr.restore(path, abstract)


class TrainCheckpointer:
    """Training checkpoints: state (params, EMA, optimizer, step, rng), data cursor, config,
    and for PEFT runs the record of the frozen base ("base", `peft.trainable.base_record`).

    An orbax `CheckpointManager` underneath: saves are asynchronous and atomic (written to a
    temporary directory, renamed when complete), so a process killed at any moment leaves
    only complete checkpoints; unfinished temporary directories are cleaned up on start.
    Keeps the last `max_to_keep` plus every `keep_period`-th step. `restore_latest` walks back
    from the newest step when one cannot be read (corrupt or truncated files) and reports it.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, keep_period: int = 0,
                 async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            keep_period=keep_period or None,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data", "config", "base"))

    def save(self, step: int, state, data_state: dict, config_json: dict,
             base_record: dict | None = None) -> None:
        items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                     config=ocp.args.JsonSave(config_json))
        if base_record is not None:
            items["base"] = ocp.args.JsonSave(base_record)
        self._manager.save(step, args=ocp.args.Composite(**items))

    def base_record(self, step: int):
        """The "base" item of `step` (a PEFT run's frozen-base record), None if it has none."""
        if not os.path.isdir(os.path.join(self.directory, str(step), "base")):
            return None
        return self._manager.restore(step, args=ocp.args.Composite(
            base=ocp.args.JsonRestore()))["base"]

    def all_steps(self):
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state):
        """(state, data_state, step) of the newest readable checkpoint, or None if there is none.

        `abstract_state`: ShapeDtypeStructs with the target shardings (any mesh: a checkpoint
        written on 8 devices restores onto 1 and vice versa).
        """
        for step in reversed(self.all_steps()):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any read failure means "unusable"
                logging.warning("checkpoint at step %d in %s is unreadable (%s: %s); "
                                "falling back to the previous one", step, self.directory,
                                type(e).__name__, str(e).splitlines()[0][:200])
                continue
            return restored["state"], restored["data"], step
        return None

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
