"""Two cooperating processes (4 CPU devices each, gloo collectives) train exactly like one 8-device process."""

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
