"""Launch one caig_jax job on a Cloud TPU pod slice: TPU VMs through gcloud, or a GKE cluster through xpk.

    # TPU VM slice: create, copy the code, install, run on every worker (logs streamed), delete
    python launch/pod.py --tpu=caig-v5p --zone=us-east5-a --accelerator=v5p-128 \
        --config=configs/reward.py:7b --workdir=gs://BUCKET/runs/rm7b --dry_run -- --config.train.steps=10

    # GKE through xpk (the cluster exists): build an image from this checkout, run, follow, delete the workload
    python launch/pod.py --xpk --cluster=my-cluster --zone=us-east5-a --accelerator=v5p-128 \
        --config=configs/reward.py:7b --workdir=gs://BUCKET/runs/rm7b --dry_run

`--dry_run` prints the exact commands, one per line, and runs nothing. Without it the commands run in order and
the first failure stops the launch (the slice is still deleted unless `--keep`). Arguments after `--` go to
`caig_jax.main`. Every worker runs the same command; `caig_jax.parallel.maybe_initialize_distributed` finds
its peers through the TPU runtime. WORKDIR should be a `gs://` path that every host can reach.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

# The TPU VM software version for each generation (Cloud TPU's "TPU software versions" page).
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite",
            "v6e": "v2-alpha-tpuv6e"}
REMOTE_DIR = "~/caig_jax"
ARCHIVE = "/tmp/caig_jax.tgz"
# Pinned installs on the workers: the project's requirements, then jax's TPU extra at the project's JAX pin.
INSTALL = ("python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -c constraints.txt "
           "&& .venv/bin/pip install -q -r requirements-tpu.txt")
# A gs:// workdir also needs the GCS clients (etils.epath's gcsfs backend, Orbax's google-cloud-storage).
INSTALL_GCS = " && .venv/bin/pip install -q -r requirements-gcs.txt -c constraints.txt"


def install_command(args: argparse.Namespace) -> str:
    return INSTALL + (INSTALL_GCS if args.workdir.startswith("gs://") else "")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/NAME.py:PRESET")
    parser.add_argument("--workdir", required=True, help="gs://BUCKET/path shared by every host")
    parser.add_argument("--accelerator", required=True, help="slice type, e.g. v5p-128, v5litepod-256, v4-64")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default="", help="gcloud project (default: gcloud's configured one)")
    parser.add_argument("--tpu", default="caig-jax", help="TPU VM name (gcloud path)")
    parser.add_argument("--runtime", default="", help="TPU software version (default: by generation, RUNTIMES)")
    parser.add_argument("--spot", action="store_true", help="spot capacity (preemptible: SIGTERM saves, rerun resumes)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="env var on every worker")
    parser.add_argument("--keep", action="store_true", help="do not delete the slice / workload at the end")
    parser.add_argument("--xpk", action="store_true", help="launch on GKE with xpk instead of TPU VMs")
    parser.add_argument("--cluster", default="", help="xpk: the GKE cluster")
    parser.add_argument("--workload", default="caig-jax", help="xpk: the workload name")
    parser.add_argument("--base_image", default="python:3.11-slim", help="xpk: image the code is layered on")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args, extra = parser.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    args.job_args = extra
    generation = args.accelerator.rsplit("-", 1)[0]
    if not args.runtime:
        if generation not in RUNTIMES:
            parser.error(f"--accelerator={args.accelerator}: no default runtime for {generation!r}; pass --runtime")
        args.runtime = RUNTIMES[generation]
    if args.xpk and not args.cluster:
        parser.error("--xpk needs --cluster")
    for kv in args.env:
        if "=" not in kv:
            parser.error(f"--env={kv!r}: expected KEY=VALUE")
    return args


def job_command(args: argparse.Namespace, python: str = "python") -> str:
    """The command every worker runs (in the code's folder), env first; unbuffered so logs stream."""
    env = ["PYTHONUNBUFFERED=1", *args.env]
    main = [python, "-m", "caig_jax.main", f"--config={args.config}", f"--workdir={args.workdir}", *args.job_args]
    return " ".join(shlex.quote(x) for x in [*env, *main])


def _join(argv: list[str]) -> str:
    return " ".join(shlex.quote(x) for x in argv)


def tpu_vm_commands(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(the launch commands in order, the clean-up commands that run even after a failure)."""
    where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    ssh_all = [*tpu, "ssh", args.tpu, *where, "--worker=all", "--command"]
    create = [*tpu, "create", args.tpu, *where, f"--accelerator-type={args.accelerator}", f"--version={args.runtime}"]
    if args.spot:
        create.append("--spot")
    run = (f"set -o pipefail; cd {REMOTE_DIR} && mkdir -p logs && {job_command(args, '.venv/bin/python')} 2>&1 "
           f"| tee logs/$(hostname).log")
    launch = [
        _join(create),
        _join(["tar", "-czf", ARCHIVE, "--exclude=.venv", "--exclude=.git", "--exclude=runs", "."]),
        _join([*tpu, "scp", ARCHIVE, f"{args.tpu}:{ARCHIVE}", *where, "--worker=all"]),
        _join([*ssh_all, f"mkdir -p {REMOTE_DIR} && tar -C {REMOTE_DIR} -xzf {ARCHIVE} && cd {REMOTE_DIR} "
                         f"&& {install_command(args)}"]),
        # --worker=all runs the command on every host at once and streams each one's output here.
        _join([*ssh_all, run]),
    ]
    cleanup = [] if args.keep else [_join([*tpu, "delete", args.tpu, *where, "--quiet"])]
    return launch, cleanup


def xpk_commands(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """xpk builds an image from this checkout (`--base-docker-image`), runs the command on every VM of the slice."""
    where = [f"--cluster={args.cluster}", f"--zone={args.zone}"] + (
        [f"--project={args.project}"] if args.project else [])
    install = install_command(args).replace(".venv/bin/", "").replace("python3 -m venv .venv && ", "")
    # xpk copies the current directory into the image's working directory; install there, then run.
    command = f"{install.replace('pip install', 'python -m pip install')} && {job_command(args)}"
    launch = [
        _join(["xpk", "workload", "create", *where, f"--workload={args.workload}", f"--tpu-type={args.accelerator}",
               "--num-slices=1", f"--base-docker-image={args.base_image}", f"--command={command}"]),
        _join(["xpk", "workload", "list", *where, f"--wait-for-job-completion={args.workload}"]),
    ]
    cleanup = [] if args.keep else [_join(["xpk", "workload", "delete", *where, f"--workload={args.workload}"])]
    return launch, cleanup


def main(argv: list[str]) -> int:
    args = parse(argv)
    launch, cleanup = (xpk_commands if args.xpk else tpu_vm_commands)(args)
    if args.dry_run:
        print("\n".join(launch + cleanup))
        return 0
    status = 0
    try:
        for command in launch:
            print(f"+ {command}", flush=True)
            status = subprocess.run(command, shell=True, check=False).returncode
            if status:
                break
    finally:
        for command in cleanup:
            print(f"+ {command}", flush=True)
            subprocess.run(command, shell=True, check=False)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
