"""Metrics: JSON lines in the workdir plus TensorBoard event files, written by process 0 only."""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np


class MetricWriter:
    """`write(step, {"loss": ..., ...})` appends one JSON line and the TensorBoard scalars."""

    def __init__(self, workdir: str, filename: str = "metrics.jsonl"):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, filename)
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        values = {k: _to_python(v) for k, v in scalars.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _to_python(v):
    v = np.asarray(v)
    if v.ndim == 0:
        return v.item()
    return v.tolist()


def read_metrics(path: str):
    """All JSON lines of a metrics file; for a resumed run the last entry of each step wins."""
    by_step = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]
