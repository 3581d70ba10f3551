"""Metric files on resume: rows after the restored step (written by the interrupted run) are dropped."""

import json
import os

from caig_jax.metrics import MetricWriter, read_jsonl


def test_metrics_are_truncated_to_the_restored_step(tmp_path):
    workdir = str(tmp_path)
    writer = MetricWriter(workdir)
    for step in range(1, 8):
        writer.write(step, {"loss": 1.0 / step}, prefix="train/")
    writer.close()
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 8, "train/loss": 0.1})[:9])  # a row torn by SIGKILL
    # Resumed from the step-5 checkpoint: steps 6.. run again and are written once.
    writer = MetricWriter(workdir, start_step=5)
    for step in range(6, 9):
        writer.write(step, {"loss": 2.0}, prefix="train/")
    writer.close()
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["train/loss"] for r in rows[5:]] == [2.0, 2.0, 2.0]
