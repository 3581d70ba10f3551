"""Evaluation sweep: planning (globs, steps, eval sets), sharded evaluation with padding, resumable tables.

The model comes from a toy stand-in for the reward model's sweep interface (tests/_eval_sweep_fixtures.py): a
jitted linear scorer sharded over the 8-device mesh, so every number the sweep reports can be recomputed
in numpy from the same data.
"""

import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from caig_jax import parallel
from caig_jax.eval import pairwise
from caig_jax.jobs import eval_sweep as sweep

from . import _eval_sweep_fixtures as fx
from ._smoke_utils import REPO, load_config_file

N_TEST, N_VAL = 13, 11  # prime sizes: never a multiple of the batch or the mesh


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two toy training workdirs (a: steps 100, 200; b: step 100), one without checkpoints, two data splits."""
    root = tmp_path_factory.mktemp("sweep_world")
    data = str(root / "data")
    fx.make_eval_data(data, "test", N_TEST, seed=1)
    fx.make_eval_data(data, "val", N_VAL, seed=2)
    runs = root / "runs"
    fx.make_checkpoint(str(runs / "reward_a"), [100, 200], data_dir=data, seed=0)
    fx.make_checkpoint(str(runs / "reward_b"), [100], data_dir=data, seed=1)
    os.makedirs(runs / "reward_unfinished" / "checkpoints" / "300.orbax-checkpoint-tmp-1")  # a save in progress
    for split in ("test", "val"):  # the checks below compare decisions: keep every pair away from a tie
        d = fx.load_eval_data(data, split)
        for seed, step in ((0, 100), (0, 200), (1, 100)):
            s = fx.scores(d["x"], fx.weights_for(seed, step))
            assert np.abs(s[:, 0] - s[:, 1]).min() > 1e-3
    return {"root": root, "data": data, "runs": str(runs)}


def sweep_config(world, **overrides):
    _, c = load_config_file("eval_sweep", "tiny")
    c.checkpoints = f"{world['runs']}/reward_*"
    c.eval_sets = f"test=self:test,val={world['data']}:val"
    c.batch_size = 5
    c.write_reports = False
    for k, v in overrides.items():
        if k == "mesh":
            c.mesh.data, c.mesh.fsdp, c.mesh.tensor = v
        else:
            setattr(c, k, v)
    return c


def _check_row(row, world, seed, step, split):
    expected = fx.expected_metrics(world["data"], split, fx.weights_for(seed, step))
    assert row["n"] == expected["n"] == (N_TEST if split == "test" else N_VAL)
    assert row["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    assert [row["accuracy_ci_low"], row["accuracy_ci_high"]] == pytest.approx(expected["accuracy_ci"])
    assert row["ctr_accuracy"] == pytest.approx(expected["ctr_accuracy"], abs=1e-12)
    assert row["ctr_pearson"] == pytest.approx(expected["ctr_pearson"], abs=1e-5)
    assert row["ctr_spearman"] == pytest.approx(expected["ctr_spearman"], abs=1e-5)
    assert row["oracle_accuracy"] == pytest.approx(expected["oracle_accuracy"], abs=1e-12)
    assert row["margin_true_spearman"] == pytest.approx(expected["margin_true_spearman"], abs=1e-5)
    assert row["target_met"] == expected["target_met"]


# ------------------------------------------------------------------------------------------------
# Planning.
# ------------------------------------------------------------------------------------------------
def test_parse_eval_sets():
    sets = sweep.parse_eval_sets("test=self:test, other=/data/tfds:val,gcs=gs://bucket/tfds,plain=/x/y")
    assert [(e.name, e.data_dir, e.split) for e in sets] == [
        ("test", "self", "test"), ("other", "/data/tfds", "val"), ("gcs", "gs://bucket/tfds", "test"),
        ("plain", "/x/y", "test"),
    ]
    assert sweep.parse_eval_sets([{"name": "v", "data_dir": "d", "split": "val"}]) == [sweep.EvalSet("v", "d", "val")]
    with pytest.raises(ValueError, match="NAME=DATA_DIR"):
        sweep.parse_eval_sets("just_a_path")
    with pytest.raises(ValueError, match="unique"):
        sweep.parse_eval_sets("a=x:test,a=y:test")


def test_plan_globs_steps_and_skips_unfinished(world, caplog):
    runs = world["runs"]
    sets = sweep.parse_eval_sets("t=self:test")
    plan = sweep.plan_rows(f"{runs}/reward_*", "latest", sets)
    assert [(os.path.basename(r.checkpoint), r.step) for r in plan] == [("reward_a", 200), ("reward_b", 100)]
    assert "reward_unfinished" in caplog.text  # globbed, no complete checkpoint: skipped with a warning
    plan = sweep.plan_rows(f"{runs}/reward_a,{runs}/reward_*", "all", sets)  # duplicates collapse
    steps = [(os.path.basename(r.checkpoint), r.step) for r in plan]
    assert steps == [("reward_a", 100), ("reward_a", 200), ("reward_b", 100)]
    assert len({r.row_id for r in plan}) == 3
    assert [r.step for r in sweep.plan_rows(f"{runs}/reward_a", "100", sets)] == [100]
    with pytest.raises(ValueError, match="available checkpoints"):
        sweep.plan_rows(f"{runs}/reward_a", "150", sets)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        sweep.plan_rows(f"{runs}/reward_unfinished", "latest", sets)  # explicit: an error
    with pytest.raises(FileNotFoundError, match="not a directory"):
        sweep.plan_rows(f"{runs}/nope", "latest", sets)
    with pytest.raises(FileNotFoundError, match="names no directory"):
        sweep.plan_rows(f"{runs}/zzz_*", "latest", sets)


# ------------------------------------------------------------------------------------------------
# Sharded evaluation.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mesh_shape,batch_size", [((8, 1, 1), 5), ((2, 2, 2), 3), ((1, 4, 2), 13)])
def test_evaluate_pads_to_the_mesh_and_drops_pad_rows(world, devices, mesh_shape, batch_size, tmp_path):
    mesh = parallel.make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
    model, config = fx.load_trained(f"{world['runs']}/reward_a", mesh, step=200)
    seen = []

    def predict(m, batch, mesh_):
        seen.append(len(batch["label"]))
        return fx.predict_batch(m, batch, mesh_)

    path = str(tmp_path / "predictions.process{process}.npz")
    metrics = pairwise.evaluate(predict, model, fx.pair_batches(config, world["data"], "test", batch_size), mesh,
                                predictions_path=path)
    shards = parallel.num_batch_shards(mesh)
    assert all(b % shards == 0 for b in seen), f"batches {seen} not padded to {shards} batch shards"
    expected = fx.expected_metrics(world["data"], "test", fx.weights_for(0, 200))
    assert metrics["n"] == N_TEST and metrics["accuracy"] == expected["accuracy"]
    assert metrics["per_category"] == expected["per_category"]
    assert metrics["ctr_pearson"] == pytest.approx(expected["ctr_pearson"], abs=1e-5)
    with np.load(tmp_path / "predictions.process0.npz") as f:
        assert f["index"].tolist() == list(range(N_TEST))  # every pair once, in order, no pad rows
        s = fx.scores(fx.load_eval_data(world["data"], "test")["x"], fx.weights_for(0, 200))
        np.testing.assert_allclose(f["cls_logits"], s, rtol=1e-5, atol=1e-6)
        assert f["category"].tolist() == list(fx.load_eval_data(world["data"], "test")["category"])


def test_evaluate_rejects_predictions_of_the_wrong_rows(world, devices):
    mesh = parallel.make_mesh({"data": -1})
    model, config = fx.load_trained(f"{world['runs']}/reward_a", mesh)

    def gathered_twice(m, batch, mesh_):  # e.g. an all-gather of every host's rows
        out = fx.predict_batch(m, batch, mesh_)
        return {k: np.concatenate([v, v]) for k, v in out.items()}

    with pytest.raises(ValueError, match="this process's rows only"):
        batches = fx.pair_batches(config, world["data"], "test", 4)
        pairwise.evaluate(gathered_twice, model, batches, mesh)


def test_local_rows_reads_each_replica_once(devices):
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    np.testing.assert_array_equal(parallel.local_rows(parallel.global_batch(mesh, x)), x)
    assert pairwise.local_batch_multiple(mesh) == 4


# ------------------------------------------------------------------------------------------------
# The job: 2 checkpoints x 2 eval sets, resume, new rows only.
# ------------------------------------------------------------------------------------------------
def test_sweep_end_to_end_resume_and_new_rows(world, devices, tmp_path, monkeypatch):
    fx.install(monkeypatch)
    fx.CALLS.clear()
    workdir = str(tmp_path / "sweep")
    rows = sweep.run(sweep_config(world, write_reports=True), workdir)

    assert len(rows) == 4
    got = {(os.path.basename(r["checkpoint"]), r["step"], r["eval_set"]) for r in rows}
    assert got == {("reward_a", 200, "test"), ("reward_a", 200, "val"),
                   ("reward_b", 100, "test"), ("reward_b", 100, "val")}
    for r in rows:
        seed = 0 if r["checkpoint"].endswith("reward_a") else 1
        _check_row(r, world, seed, r["step"], r["split"])
        assert r["data_dir"] == world["data"]  # `self` resolved through the checkpoint's config
    assert fx.CALLS["load"] == 2  # one model load per checkpoint, shared by its eval sets
    batches_per_pass = -(-N_TEST // 5) + -(-N_VAL // 5)
    assert fx.CALLS["predict"] == 2 * batches_per_pass

    with open(os.path.join(workdir, "results.csv")) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and tuple(table[0]) == sweep.COLUMNS
    assert json.load(open(os.path.join(workdir, "results.json"))) == rows
    md = open(os.path.join(workdir, "results.md")).read()
    assert md.count("reward_a") == 2 and md.count("reward_b") == 2 and "95% CI" in md
    assert len(os.listdir(os.path.join(workdir, "rows"))) == 4
    for r in rows:
        assert os.path.exists(os.path.join(workdir, "predictions", r["row_id"], "predictions.process0.npz"))
        assert os.path.exists(os.path.join(workdir, "reports", r["row_id"], "plots", "calibration.png"))

    # Re-run: every row is done, nothing is loaded or predicted, the table is rebuilt.
    os.remove(os.path.join(workdir, "results.md"))
    fx.CALLS.clear()
    again = sweep.run(sweep_config(world), workdir)
    assert fx.CALLS["predict"] == 0 and fx.CALLS["load"] == 0
    assert again == rows and os.path.exists(os.path.join(workdir, "results.md"))

    # All steps: only reward_a's step 100 is new (2 rows), then one table of 6.
    fx.CALLS.clear()
    more = sweep.run(sweep_config(world, steps="all"), workdir)
    assert len(more) == 6 and fx.CALLS["load"] == 1 and fx.CALLS["predict"] == batches_per_pass
    for r in more:
        if r["step"] == 100 and r["checkpoint"].endswith("reward_a"):
            _check_row(r, world, 0, 100, r["split"])


def test_main_entry_runs_the_sweep(world, tmp_path):
    """`python -m caig_jax.main --config=configs/eval_sweep.py:tiny` with command-line overrides."""
    workdir = str(tmp_path / "cli")
    cmd = [sys.executable, "-m", "tests._eval_sweep_fixtures", "--config=configs/eval_sweep.py:tiny",
           f"--workdir={workdir}", f"--config.checkpoints={world['runs']}/reward_b",
           "--config.eval_sets=test=self:test", "--config.batch_size=6", "--config.write_reports=False"]
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "reward_b" in proc.stdout and "95% CI" in proc.stdout  # the table is printed
    rows = json.load(open(os.path.join(workdir, "results.json")))
    assert len(rows) == 1
    _check_row(rows[0], world, 1, 100, "test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_write_their_own_shards_and_one_table(world, tmp_path):
    """2 processes x 4 CPU devices: unequal shards (7 and 6 pairs, 3 vs 2 batches of 3), one table from process 0."""
    workdir = str(tmp_path / "mp")
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "JAX_PLATFORMS": "cpu", "CAIG_CPU_COLLECTIVES": "gloo", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid)}
        cmd = [sys.executable, "-m", "tests._eval_sweep_fixtures", "--config=configs/eval_sweep.py:tiny",
               f"--workdir={workdir}", f"--config.checkpoints={world['runs']}/reward_a",
               f"--config.eval_sets=test=self:test,val={world['data']}:val", "--config.batch_size=6",
               "--config.write_reports=False", "--config.mesh.data=4", "--config.mesh.fsdp=2"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
    rows = json.load(open(os.path.join(workdir, "results.json")))
    assert len(rows) == 2
    for r in rows:
        _check_row(r, world, 0, 200, r["split"])
        folder = os.path.join(workdir, "predictions", r["row_id"])
        shards = [np.load(os.path.join(folder, f"predictions.process{k}.npz")) for k in range(2)]
        n = N_TEST if r["split"] == "test" else N_VAL
        assert [len(s["index"]) for s in shards] == [(n + 1) // 2, n // 2]  # each host: only its strided shard
        assert sorted(np.concatenate([s["index"] for s in shards]).tolist()) == list(range(n))
