"""Two cooperating processes (4 CPU devices each, gloo collectives) train exactly like one 8-device process."""

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from caig_jax.jobs import smoke

from ._smoke_utils import REPO, losses, smoke_config

STEPS = 15


@pytest.mark.slow
def test_two_process_run_matches_single_process(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": REPO, "DEVICES_PER_PROCESS": "4"}
    env.pop("XLA_FLAGS", None)
    workdir = str(tmp_path / "mp")
    proc = subprocess.run(
        ["bash", "launch/local_multiprocess.sh", "2", "configs/smoke.py:tiny", workdir,
         f"--config.train.steps={STEPS}", "--config.train.log_every=1", f"--config.train.checkpoint_every={STEPS}",
         "--config.mesh.data=4", "--config.mesh.fsdp=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    single = str(tmp_path / "single")
    smoke.run(smoke_config({"data": 4, "fsdp": 2}, steps=STEPS, checkpoint_every=STEPS), single)
    np.testing.assert_allclose(losses(workdir), losses(single), rtol=1e-5, atol=1e-6)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(STEPS)))


@pytest.mark.slow
def test_two_process_reward_step_and_checkpoint_restore_match_one_process(tmp_path, devices):
    """The tiny reward model (scanned, remat) on fsdp 4 x tensor 2 spread over two processes: two steps, an Orbax
    save, a restore into a freshly initialised model, a third step; the losses equal one 8-device process's."""
    from . import _multiprocess_reward

    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "CAIG_CPU_COLLECTIVES": "gloo",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_NUM_PROCESSES": "2",
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{20000 + os.getpid() % 10000}"}
    out = tmp_path / "losses.json"
    procs = [subprocess.Popen([sys.executable, "-m", "tests._multiprocess_reward", str(tmp_path / "mp"), str(out)],
                              cwd=REPO, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
    single = _multiprocess_reward.run(str(tmp_path / "single"))
    np.testing.assert_allclose(json.loads(out.read_text()), single, rtol=1e-5)
    assert os.path.isdir(tmp_path / "mp" / "checkpoints" / "2")


@pytest.fixture(scope="module")
def reward_checkpoint(tmp_path_factory):
    """A tiny reward run of two steps on a 60-product marketplace: a real checkpoint, tokenizer and TFDS data."""
    from caig_jax.config_files import load_config
    from caig_jax.data import market_datasets
    from caig_jax.jobs import reward

    root = str(tmp_path_factory.mktemp("market"))
    market = load_config(os.path.join(REPO, "configs", "market.py:tiny"))
    market.market.num_products, market.market.contact_sheet_products, market.pairs.image_size = 60, 4, 32
    market_datasets.build_world(market, root, verbose=False)
    data_dir = os.path.join(root, "tfds")
    config = load_config(os.path.join(REPO, "configs", "reward.py:tiny"))
    config.data.dir = data_dir
    config.train.steps, config.train.batch_size, config.train.warmup_steps = 2, 8, 1
    config.train.checkpoint_every, config.train.eval_every, config.train.log_every = 2, 1000, 1
    config.ablation_point_weights, config.eval.final_test, config.eval.bootstrap_resamples = (), False, 10
    workdir = str(tmp_path_factory.mktemp("reward_run"))
    reward.run(config, workdir)
    return workdir, data_dir


@pytest.mark.slow
def test_two_process_eval_sweep_writes_the_one_process_table_and_reads_only_its_shard(reward_checkpoint, tmp_path,
                                                                                    devices):
    """The sweep with the real reward interface (checkpoint restore, TFDS pairs, tokenizer) over two processes
    writes the table a one-process run writes (the markdown byte for byte; every CSV/JSON value but the timing), and
    each process read exactly its strided shard of each split, the two shards covering it once."""
    from . import _multiprocess_eval_sweep as sweep_mp

    checkpoint, data_dir = reward_checkpoint
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "CAIG_CPU_COLLECTIVES": "gloo",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_NUM_PROCESSES": "2",
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{21000 + os.getpid() % 10000}"}
    reads_path = str(tmp_path / "reads.process{process}.json")
    procs = [subprocess.Popen([sys.executable, "-m", "tests._multiprocess_eval_sweep", checkpoint, data_dir,
                               str(tmp_path / "mp"), reads_path], cwd=REPO, env={**env, "JAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
    single_reads = sweep_mp.run(checkpoint, data_dir, str(tmp_path / "single"))

    mp, single = tmp_path / "mp", tmp_path / "single"
    assert (mp / "results.md").read_bytes() == (single / "results.md").read_bytes()
    mp_rows, single_rows = (json.loads((d / "results.json").read_text()) for d in (mp, single))
    assert len(mp_rows) == len(single_rows) == 2
    for a, b in zip(mp_rows, single_rows):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    mp_csv, single_csv = ([{k: v for k, v in row.items() if k != "seconds"} for row in
                           csv.DictReader(io.StringIO((d / "results.csv").read_text()))] for d in (mp, single))
    assert mp_csv == single_csv and len(mp_csv) == 2

    reads = [json.loads(open(reads_path.format(process=k)).read()) for k in range(2)]
    for split in ("test", "val"):
        n = len(single_reads[split])
        assert single_reads[split] == list(range(n)) and n == {r["split"]: r["n"] for r in mp_rows}[split]
        for k in range(2):
            assert reads[k][split] == list(range(k, n, 2)), (split, k)  # only its strided shard, each pair once
