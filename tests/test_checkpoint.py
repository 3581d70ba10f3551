"""Preemption and crash safety, exact resumption, and restore onto other meshes / device counts."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from caig_jax import parallel

from ._smoke_utils import REPO, smoke_config, trained_params

STEPS = 60
OVERRIDES = [f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=10", "--config.train.log_every=1"]


def _launch(workdir, *extra):
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["PYTHONPATH"] = REPO
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "caig_jax.main", "--config=configs/smoke.py:tiny", f"--workdir={workdir}", *OVERRIDES, *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_to_end(workdir):
    proc = _launch(workdir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def _wait_for(proc, needle, timeout=240):
    """Reads the child's output until `needle` appears; returns everything read."""
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"never saw {needle!r}; output:\n{''.join(seen)[-3000:]}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    _run_to_end(workdir)
    config = smoke_config({"data": 8}, steps=STEPS)
    params, _, trainer = trained_params(config, workdir, parallel.make_mesh({"data": 8}))
    assert trainer.current_step == STEPS
    return workdir, params


def _assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_interrupted_run_resumes_to_identical_params(tmp_path, uninterrupted, sig):
    workdir = str(tmp_path / "run")
    proc = _launch(workdir)
    # SIGKILL right as an async save begins, so the kill lands in the middle of writing step 30.
    _wait_for(proc, "checkpoint save started: step 30")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, out[-2000:]
        assert "saved after SIGTERM" in out
    else:
        assert proc.returncode == -signal.SIGKILL
    out = _run_to_end(workdir)
    assert "resumed from" in out
    config = smoke_config({"data": 8}, steps=STEPS)
    params, _, trainer = trained_params(config, workdir, parallel.make_mesh({"data": 8}))
    assert trainer.current_step == STEPS
    _assert_same_params(params, uninterrupted[1])


def test_partial_save_folder_is_ignored(tmp_path, uninterrupted):
    """What SIGKILL mid-save leaves behind (an unfinalised tmp folder) never shadows the last good step."""
    import shutil

    workdir = str(tmp_path / "copy")
    shutil.copytree(uninterrupted[0], workdir)
    ckpts = os.path.join(workdir, "checkpoints")
    shutil.copytree(os.path.join(ckpts, str(STEPS)), os.path.join(ckpts, f"{STEPS + 10}.orbax-checkpoint-tmp-1"))
    config = smoke_config({"data": 8}, steps=STEPS + 10)
    _, _, trainer = trained_params(config, workdir, parallel.make_mesh({"data": 8}))
    assert trainer.current_step == STEPS


@pytest.mark.parametrize(
    "sizes,num_devices",
    [({"fsdp": 4, "tensor": 2}, 8), ({"tensor": 8}, 8), ({"data": 4}, 4), ({"fsdp": 2, "tensor": 2}, 4)],
    ids=["fsdp4_tensor2", "tensor8", "data4_on_4_devices", "fsdp2_tensor2_on_4_devices"],
)
def test_restore_onto_another_mesh(uninterrupted, sizes, num_devices):
    workdir, reference = uninterrupted
    mesh = parallel.make_mesh(sizes, devices=jax.devices()[:num_devices])
    config = smoke_config(sizes, steps=STEPS)
    params, shardings, _ = trained_params(config, workdir, mesh)
    _assert_same_params(params, reference)
    for name, sharding in shardings.items():
        assert sharding.mesh.shape == mesh.shape, name
        assert len(sharding.device_set) == num_devices
