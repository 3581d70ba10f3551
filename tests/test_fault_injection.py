"""Fault injection on the smoke job through `python -m caig_jax.main` (one process per start, as a user runs it).

20 trials, each: start the job, SIGKILL or SIGTERM it at a random moment (during start-up, between steps, in the
middle of an async checkpoint save, or after it finished), sometimes damage the newest complete checkpoint
(truncate a data file, flip bytes in one, or delete one of its files), then run the same command again to the
end. Every trial must end with parameters bit-identical to an uninterrupted run's and metrics.jsonl holding
exactly the uninterrupted run's rows (no duplicate, no missing step, the same values).

The schedule is drawn from a seeded generator (CAIG_FAULT_SEED, default 0) and printed with any failure.

Speed (41 process starts): the job processes share a JAX persistent compilation cache (the same compiled programs,
so results stay bit-identical; it saves the compilations of every start after the first) and see the test
extras hidden (a `sitecustomize` on their PYTHONPATH makes torch / diffusers unfindable, as in the
requirements.txt environment users run: tensorboardX imports torch whenever it can, 3-4 CPU-seconds a start).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from caig_jax import parallel
from caig_jax.checkpoint import Checkpointer
from caig_jax.trainers.trainer import abstract_of

from ._smoke_utils import REPO, smoke_config, trained_params

TRIALS = int(os.environ.get("CAIG_FAULT_TRIALS", "20"))
STEPS = 30
OVERRIDES = [f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=3", "--config.train.log_every=1",
             "--config.train.eval_every=10", "--config.train.keep_checkpoints=3"]


_HIDE_TEST_EXTRAS = """
import sys

class _Hidden:  # wraps each import finder: the test extras are not found, as in a requirements.txt environment
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "diffusers"):
            return None
        return self.inner.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

sys.meta_path[:] = [_Hidden(finder) for finder in sys.meta_path]
"""


@pytest.fixture(scope="module")
def job_env(tmp_path_factory) -> dict[str, str]:
    """The job processes' environment: one CPU device, a shared compilation cache, the test extras hidden."""
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(_HIDE_TEST_EXTRAS)
    env = {k: v for k, v in os.environ.items() if k not in ("CAIG_VERBOSE", "XLA_FLAGS")}
    env.update(PYTHONPATH=f"{site}{os.pathsep}{REPO}", PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return env


def _start(env: dict[str, str], workdir: str, log: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "caig_jax.main", "--config=configs/smoke.py:tiny", f"--workdir={workdir}", *OVERRIDES]
    with open(log, "a") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _run_to_end(env: dict[str, str], workdir: str, log: str) -> None:
    proc = _start(env, workdir, log)
    try:
        code = proc.wait(timeout=300)
    finally:
        proc.kill()
    assert code == 0, open(log).read()[-3000:]


def _metric_rows(workdir: str) -> dict[tuple[int, str], float]:
    """{(step, metric): value} of metrics.jsonl; fails on a torn line or a (step, metric) written twice."""
    rows: dict[tuple[int, str], float] = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for n, line in enumerate(f, 1):
            record = json.loads(line)
            for key, value in record.items():
                if key in ("step", "time"):
                    continue
                assert (record["step"], key) not in rows, f"metrics.jsonl line {n}: step {record['step']} {key} twice"
                rows[(record["step"], key)] = value
    return rows


def _train_rows(workdir: str) -> int:
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return sum('"train/loss"' in line for line in f)
    except FileNotFoundError:
        return 0


def _complete_steps(workdir: str) -> list[int]:
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


def _corrupt(workdir: str, how: str, rng: random.Random) -> str:
    """Damages the newest complete checkpoint; returns what was done."""
    step = _complete_steps(workdir)[-1]
    root = os.path.join(workdir, "checkpoints", str(step))
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names)
    data = [p for p in files if os.path.basename(os.path.dirname(p)) == "d"] or files
    if how == "delete":
        victim = rng.choice(files)
        os.remove(victim)
        return f"deleted {os.path.relpath(victim, workdir)}"
    victim = max(data, key=os.path.getsize)
    size = os.path.getsize(victim)
    if how == "truncate":
        os.truncate(victim, size // 2)
        return f"truncated {os.path.relpath(victim, workdir)} {size} -> {size // 2} bytes"
    raw = bytearray(open(victim, "rb").read())
    start = rng.randrange(max(1, len(raw) - 64))
    for i in range(start, min(len(raw), start + 64)):
        raw[i] ^= 0xFF
    with open(victim, "wb") as f:
        f.write(bytes(raw))
    return f"flipped 64 bytes at {start} of {os.path.relpath(victim, workdir)}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, job_env):
    """The uninterrupted run: its parameters, metric rows, and a restore target for the trials' checkpoints."""
    workdir = str(tmp_path_factory.mktemp("fault_reference"))
    _run_to_end(job_env, workdir, os.path.join(workdir, "log.txt"))
    config = smoke_config({"data": 1}, steps=STEPS, checkpoint_every=3, eval_every=10, keep_checkpoints=3)
    params, _, trainer = trained_params(config, workdir, parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    assert trainer.current_step == STEPS
    return abstract_of(trainer.state), params, _metric_rows(workdir)


def _params(workdir: str, abstract) -> dict[str, np.ndarray]:
    """The parameters of `workdir`'s newest checkpoint that restores and verifies (what a resume would load)."""
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=3, every=3)
    try:
        step, state, _, _ = checkpointer.restore_latest(abstract)
    finally:
        checkpointer.close()
    assert step == STEPS
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state["params"])}


@pytest.mark.slow
def test_twenty_random_faults_resume_to_the_uninterrupted_run(tmp_path, job_env, reference):
    abstract, want_params, want_rows = reference
    assert {k for k in want_rows if k[1] == "train/loss"} == {(s, "train/loss") for s in range(1, STEPS + 1)}
    seed = int(os.environ.get("CAIG_FAULT_SEED", "0"))
    rng = random.Random(seed)
    done: list[str] = []
    started = time.time()
    for trial in range(TRIALS):
        workdir = str(tmp_path / f"trial{trial:02d}")
        log = str(tmp_path / f"trial{trial:02d}.log")
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        target = rng.choice([0] + list(range(1, STEPS + 3)))  # train rows seen before the signal; 0: start-up
        corruption = rng.choice([None, None, "truncate", "bitflip", "delete"])
        proc = _start(job_env, workdir, log)
        if target == 0:
            time.sleep(rng.uniform(0.2, 3.0))
        else:
            deadline = time.time() + 240
            while proc.poll() is None and _train_rows(workdir) < target and time.time() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.05))
        what = f"trial {trial} (CAIG_FAULT_SEED={seed}): {signal.Signals(sig).name} after {target} train rows"
        if proc.poll() is None:
            proc.send_signal(sig)
        else:
            what += " (the run had already finished)"
        code = proc.wait(timeout=120)
        assert code in (0, 143, -signal.SIGKILL, -signal.SIGTERM), f"{what}: exit {code}\n{open(log).read()[-3000:]}"
        what += f", exit {code}, complete steps {_complete_steps(workdir)}"
        if corruption and len(_complete_steps(workdir)) >= 2:
            what += "; " + _corrupt(workdir, corruption, rng)
        done.append(what)
        _run_to_end(job_env, workdir, log)
        context = "\n".join(done) + "\n" + open(log).read()[-3000:]
        got_params = _params(workdir, abstract)
        assert got_params.keys() == want_params.keys(), context
        for key in want_params:
            assert np.array_equal(got_params[key], want_params[key]), f"{key} differs after\n{context}"
        assert _metric_rows(workdir) == want_rows, f"metrics.jsonl differs from the uninterrupted run after\n{context}"
    print(f"{TRIALS} trials in {time.time() - started:.0f} s:\n" + "\n".join(done))
