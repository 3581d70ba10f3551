"""Two cooperating processes (4 CPU devices each, gloo collectives) train exactly like one 8-device process."""

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
