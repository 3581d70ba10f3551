"""Metric writing (TensorBoard event files + JSONL) and a console progress bar.

Only process 0 writes files; every process may call the methods. A `gs://` workdir works like a local one: every
file goes through `caig_jax.files` (etils.epath), TensorBoard's event files included.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from caig_jax import files


def _scalar(value) -> float:
    return float(np.asarray(value).reshape(()))


class MetricWriter:
    """Writes scalars to `<workdir>/tensorboard/` (tensorboardX) and `<workdir>/metrics.jsonl`.

    Args:
      workdir: the run's folder.
      start_step: the step the run (re)starts from: the restored checkpoint's step, or 0 for a fresh start.
        Rows written after it by an earlier, interrupted run are dropped from metrics.jsonl and purged from
        TensorBoard, so the steps that run again leave exactly one row each. None keeps every existing row.
    """

    def __init__(self, workdir: str, start_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._jsonl = None
        if self.enabled:
            files.makedirs(workdir)
            purge_step = None
            if start_step is not None:
                truncate_jsonl(self.jsonl_path, start_step)
                purge_step = start_step + 1
            if files.is_uri(workdir):
                files.use_epath_for_tensorboard(workdir.split("://", 1)[0])
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10, purge_step=purge_step)
            self._jsonl = files.Appender(self.jsonl_path)

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time()}
        for name, value in metrics.items():
            key = f"{prefix}{name}"
            v = _scalar(value)
            record[key] = v if math.isfinite(v) else str(v)
            self._tb.add_scalar(key, v, int(step))
        self._jsonl.write(json.dumps(record) + "\n")

    def has_row(self, step: int, prefix: str = "") -> bool:
        """Whether metrics.jsonl already holds a row at `step` with a metric named `prefix...` (process 0; other
        processes write nothing and get False)."""
        if not self.enabled:
            return False
        self._jsonl.flush()
        if files.exists(self.jsonl_path):
            for line in files.read_text(self.jsonl_path).splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("step") == step and any(k.startswith(prefix) for k in row if k not in ("step", "time")):
                    return True
        return False

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


def truncate_jsonl(path: str, step: int) -> int:
    """Drops the rows of a metrics JSONL file whose step is after `step` (and a partial last line, which a
    process killed mid-write leaves). Rewrites the file atomically; returns how many rows were dropped."""
    if not files.exists(path):
        return 0
    lines = files.read_text(path).splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if line.endswith("\n") and json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a torn or foreign line: dropped with the rows after the restored step
    dropped = sum(1 for line in lines if line.strip()) - len(kept)
    if dropped:
        files.write_atomic(path, "".join(kept))
    return dropped


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in files.read_text(path).splitlines() if line.strip()]


class Progress:
    """tqdm bar over training steps showing steps/s, examples/s, the loss and an ETA."""

    def __init__(self, total_steps: int, start_step: int, examples_per_step: int, desc: str = "train"):
        self.examples_per_step = examples_per_step
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
            disable=jax.process_index() != 0,
            smoothing=0.1,
        )
        self._last = time.perf_counter()

    def update(self, loss: float) -> None:
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{loss:.4g}", ex_per_s=f"{self.examples_per_step / max(dt, 1e-9):.1f}", refresh=False)

    def close(self) -> None:
        self._bar.close()
