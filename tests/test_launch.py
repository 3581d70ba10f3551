"""`launch/pod.py --dry_run` prints the exact gcloud TPU VM and xpk commands, in order, and runs nothing."""

import subprocess
import sys

from ._smoke_utils import REPO

COMMON = ["--zone=us-east5-a", "--accelerator=v5p-128", "--config=configs/reward.py:7b", "--workdir=gs://b/rm7b",
          "--dry_run"]


def _dry_run(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, "launch/pod.py", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_tpu_vm_dry_run_creates_copies_installs_runs_everywhere_and_deletes():
    lines = _dry_run("--tpu=caig", "--spot", "--env=LIBTPU_INIT_ARGS=--xla_enable_async_all_gather=true", *COMMON,
                     "--", "--config.train.steps=10")
    assert lines[0] == ("gcloud compute tpus tpu-vm create caig --zone=us-east5-a --accelerator-type=v5p-128 "
                        "--version=v2-alpha-tpuv5 --spot")
    assert lines[1] == "tar -czf /tmp/caig_jax.tgz --exclude=.venv --exclude=.git --exclude=runs ."
    assert lines[2] == ("gcloud compute tpus tpu-vm scp /tmp/caig_jax.tgz caig:/tmp/caig_jax.tgz --zone=us-east5-a "
                        "--worker=all")
    assert lines[3].startswith("gcloud compute tpus tpu-vm ssh caig --zone=us-east5-a --worker=all --command ")
    assert "pip install -q -r requirements.txt -c constraints.txt" in lines[3]
    assert "-r requirements-tpu.txt" in lines[3]
    assert lines[3].endswith("pip install -q -r requirements-gcs.txt -c constraints.txt'")  # a gs:// workdir
    assert lines[4] == (
        "gcloud compute tpus tpu-vm ssh caig --zone=us-east5-a --worker=all --command 'set -o pipefail; "
        "cd ~/caig_jax && mkdir -p logs && PYTHONUNBUFFERED=1 LIBTPU_INIT_ARGS=--xla_enable_async_all_gather=true "
        ".venv/bin/python -m caig_jax.main --config=configs/reward.py:7b --workdir=gs://b/rm7b "
        "--config.train.steps=10 2>&1 | tee logs/$(hostname).log'")
    assert lines[5] == "gcloud compute tpus tpu-vm delete caig --zone=us-east5-a --quiet"
    assert len(lines) == 6


def test_xpk_dry_run_and_runtime_defaults():
    lines = _dry_run("--xpk", "--cluster=gke", "--project=p", *COMMON)
    where = "--cluster=gke --zone=us-east5-a --project=p"
    assert lines[0].startswith(f"xpk workload create {where} --workload=caig-jax --tpu-type=v5p-128 --num-slices=1 "
                               "--base-docker-image=python:3.11-slim '--command=")
    assert "PYTHONUNBUFFERED=1 python -m caig_jax.main --config=configs/reward.py:7b --workdir=gs://b/rm7b'" in lines[0]
    assert lines[1:] == [f"xpk workload list {where} --wait-for-job-completion=caig-jax",
                         f"xpk workload delete {where} --workload=caig-jax"]
    assert "python -m pip install -q -r requirements-gcs.txt -c constraints.txt && " in lines[0]
    v4 = _dry_run("--keep", *[a.replace("v5p-128", "v4-64") for a in COMMON])
    assert "--version=tpu-ubuntu2204-base" in v4[0] and not any(" delete " in line for line in v4)
    local = _dry_run("--tpu=caig", *[a.replace("gs://b/rm7b", "/mnt/shared/rm7b") for a in COMMON])
    assert "requirements-gcs.txt" not in local[3]  # a shared local filesystem needs no GCS client
