"""Preemption and crash safety, exact resumption, and restore onto other meshes / device counts."""

import os
import re
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


# ------------------------------------------------------------------------------------------------ integrity


def _train_state(sizes, num_devices, seed=0):
    """A trainer-shaped state ({step, params: nnx.State, opt_state: adamw}) of the tiny smoke model on a mesh."""
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from caig_jax.jobs import smoke

    mesh = parallel.make_mesh(sizes, devices=jax.devices()[:num_devices])
    config = smoke_config(sizes)
    config.seed = seed
    params = nnx.state(smoke.build_model(config, mesh), nnx.Param)
    with jax.set_mesh(mesh):
        opt_state = jax.jit(optax.adamw(1e-3).init)(params)
    step = jax.device_put(jnp.asarray(seed, jnp.int32), NamedSharding(mesh, PartitionSpec()))
    return {"step": step, "params": params, "opt_state": opt_state}


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


STEPS_SAVED = (10, 20, 30)


@pytest.fixture(scope="module")
def saved_steps(tmp_path_factory):
    """A checkpoint folder holding steps 10, 20, 30 saved on an fsdp=4 x tensor=2 mesh (each a different state)."""
    from caig_jax.checkpoint import Checkpointer

    directory = str(tmp_path_factory.mktemp("saved") / "checkpoints")
    checkpointer = Checkpointer(directory, keep=5, every=10)
    states = {}
    for step in STEPS_SAVED:
        states[step] = _train_state({"fsdp": 4, "tensor": 2}, 8, seed=step)
        assert checkpointer.save(step, states[step], {"position": step}, {"note": step})
        checkpointer.wait()
    checkpointer.close()
    return directory, states


@pytest.fixture(scope="module")
def on_4_devices():
    """The abstract train state on a 4-device data mesh: where the tests restore to."""
    return _abstract(_train_state({"data": 4}, 4))


@pytest.fixture()
def three_steps(saved_steps, tmp_path):
    """A fresh copy of `saved_steps` that a test may damage, and the saved states."""
    import shutil

    directory = str(tmp_path / "checkpoints")
    shutil.copytree(saved_steps[0], directory)
    return directory, saved_steps[1]


def _data_files(directory, step):
    root = os.path.join(directory, str(step), "state")
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files if os.path.basename(d) == "d")


def _restore_latest(directory, target, caplog):
    """restore_latest onto `target` (another mesh than the save's); returns (checkpointer, result, logged lines)."""
    import logging

    from caig_jax.checkpoint import Checkpointer

    checkpointer = Checkpointer(directory, keep=5, every=10)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="caig_jax.checkpoint"):
        result = checkpointer.restore_latest(target)
    lines = [r.getMessage() for r in caplog.records if r.name == "caig_jax.checkpoint"]
    return checkpointer, result, lines


def _assert_fell_back_to_20(directory, states, target, caplog):
    checkpointer, result, lines = _restore_latest(directory, target, caplog)
    step, state, data_state, meta = result
    assert (step, data_state, meta) == (20, {"position": 20}, {"note": 20})
    assert _leaves_equal(state, states[20])
    skipped = [line for line in lines if "trying an older step" in line]
    assert len(skipped) == 1 and skipped[0].startswith("checkpoint step 30 "), lines
    assert "\n" not in skipped[0] and len(skipped[0]) < 400, skipped[0]
    # The unusable step is moved aside, so the resumed run can save step 30 again.
    assert os.path.isdir(f"{directory}.unusable/30") and checkpointer.manager.all_steps() == [10, 20]
    assert checkpointer.last_verified_step == 20
    assert checkpointer.save(30, states[30], {}, force=True)
    checkpointer.close()
    return skipped[0]


def test_bit_flips_in_newest_step_fall_back_to_older(three_steps, on_4_devices, caplog):
    directory, states = three_steps
    largest = max(_data_files(directory, 30), key=os.path.getsize)
    data = bytearray(open(largest, "rb").read())
    start = len(data) // 3
    for i in range(start, min(len(data), start + 400)):
        data[i] ^= 0xFF
    open(largest, "wb").write(bytes(data))
    _assert_fell_back_to_20(directory, states, on_4_devices, caplog)


def test_wrong_data_that_reads_fine_fails_verification(three_steps, on_4_devices, caplog):
    """Step 30's arrays replaced by step 20's: TensorStore reads them without complaint; the fingerprint does not."""
    import shutil

    directory, states = three_steps
    shutil.rmtree(os.path.join(directory, "30", "state"))
    shutil.copytree(os.path.join(directory, "20", "state"), os.path.join(directory, "30", "state"))
    line = _assert_fell_back_to_20(directory, states, on_4_devices, caplog)
    assert "does not verify: fingerprint mismatch" in line


def test_truncated_newest_step_falls_back(three_steps, on_4_devices, caplog):
    directory, states = three_steps
    for path in _data_files(directory, 30):
        os.truncate(path, os.path.getsize(path) // 2)
    _assert_fell_back_to_20(directory, states, on_4_devices, caplog)


def test_deleted_state_folder_falls_back(three_steps, on_4_devices, caplog):
    import shutil

    directory, states = three_steps
    shutil.rmtree(os.path.join(directory, "30", "state"))
    assert "cannot be restored" in _assert_fell_back_to_20(directory, states, on_4_devices, caplog)


def test_changed_data_position_or_missing_fingerprint_falls_back(three_steps, on_4_devices, caplog):
    """The JSON items are covered too (a wrong data position would silently change the resumed run)."""
    import json
    import shutil

    directory, states = three_steps
    with open(os.path.join(directory, "30", "data", "metadata"), "w") as f:
        json.dump({"position": 31}, f)
    assert "its data item differs" in _assert_fell_back_to_20(directory, states, on_4_devices, caplog)
    shutil.rmtree(os.path.join(directory, "30", "fingerprint"))
    assert "has no fingerprint/ item" in _assert_fell_back_to_20(directory, states, on_4_devices, caplog)


def test_all_steps_corrupted_is_one_clear_error(three_steps, on_4_devices, caplog):
    from caig_jax.checkpoint import CheckpointError
    from caig_jax.errors import UserError

    directory, _ = three_steps
    for step in STEPS_SAVED:
        for path in _data_files(directory, step):
            os.truncate(path, os.path.getsize(path) // 2)
    expected = rf"no checkpoint in {directory} could be restored: steps? 30"
    with pytest.raises(CheckpointError, match=expected) as e:
        _restore_latest(directory, on_4_devices, caplog)
    # Steps failing for the same reason are listed together ("steps 30, 20: ..."); whether two truncated
    # steps give the same message depends on their byte sizes, so check every step is named once.
    named = re.findall(r"(?:^|; |restored: )steps? ([\d, ]+):", str(e.value))
    assert sorted(int(s) for group in named for s in group.split(", ")) == sorted(STEPS_SAVED)
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError) and e.value.fix
    assert not os.path.exists(f"{directory}.unusable")  # nothing is moved when nothing restores


def test_changed_model_names_the_first_differing_leaf(three_steps):
    from caig_jax.checkpoint import CheckpointError, Checkpointer

    directory, _ = three_steps
    state = _train_state({"data": 8}, 8)
    state["params"]["out"]["bias"] = state["params"]["out"]["bias"].replace(jax.numpy.zeros((5,)))
    expected = r"steps 30, 20, 10: does not match the current train state: .* saved float32\[4\], now float32\[5\]"
    with pytest.raises(CheckpointError, match=expected):
        Checkpointer(directory).restore_latest(_abstract(state))


def test_empty_folder_restores_nothing(tmp_path, on_4_devices):
    from caig_jax.checkpoint import Checkpointer

    checkpointer = Checkpointer(str(tmp_path / "checkpoints"))
    assert checkpointer.restore_latest(on_4_devices) is None
    assert checkpointer.newest_verified_step(on_4_devices) is None
    assert checkpointer.last_verified_step is None


def test_newest_verified_step_skips_a_damaged_step_without_moving_it(three_steps, on_4_devices):
    from caig_jax.checkpoint import Checkpointer

    directory, _ = three_steps
    for path in _data_files(directory, 30):
        os.truncate(path, 0)
    checkpointer = Checkpointer(directory, keep=5)
    assert checkpointer.newest_verified_step(on_4_devices) == 20
    assert checkpointer.last_verified_step == 20 and checkpointer.latest_step() == 30


def test_fingerprint_is_the_same_across_meshes_and_catches_one_bit():
    import jax.numpy as jnp

    from caig_jax.checkpoint import fingerprint

    on_8 = _train_state({"fsdp": 4, "tensor": 2}, 8)
    on_4 = jax.tree.map(
        lambda x, target: jax.device_put(x, target.sharding), on_8, _train_state({"data": 2, "fsdp": 2}, 4)
    )
    assert {len(x.sharding.device_set) for x in jax.tree.leaves(on_4)} == {4}
    reference = fingerprint(on_8)
    assert fingerprint(on_4) == reference
    kernel = on_8["params"]["inp"]["kernel"].get_value()
    bits = np.asarray(kernel).view(np.uint32).copy()
    bits[3, 5] ^= 1 << 30
    one_bit = jax.device_put(bits.view(np.float32), kernel.sharding)
    flipped = jax.tree.map(lambda x: one_bit if x is kernel else x, on_8)
    changed = {k for k, v in fingerprint(flipped).items() if v != reference[k]}
    assert changed == {"params/inp/kernel/value"}
    # Other dtypes: narrower than 32 bits, integers, booleans.
    bf16 = jnp.arange(15, dtype=jnp.bfloat16).reshape(3, 5)
    for value in (bf16, jnp.arange(7, dtype=jnp.int8), jnp.array([True, False])):
        assert fingerprint({"x": value}) != fingerprint({"x": jnp.roll(value, 1)})


def test_restore_verifies_onto_another_mesh(saved_steps, on_4_devices):
    """The digests saved on an fsdp=4 x tensor=2 mesh of 8 devices verify on a 4-device data mesh."""
    from caig_jax.checkpoint import Checkpointer, fingerprint

    directory, states = saved_steps
    state, _, _ = Checkpointer(directory).restore(on_4_devices, 30)
    assert {len(x.sharding.device_set) for x in jax.tree.leaves(state)} == {4}
    assert fingerprint(state) == fingerprint(states[30])

