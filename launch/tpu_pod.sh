#!/usr/bin/env bash
# Launch one caig_jax job on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   e.g. launch/tpu_pod.sh caig-v4-32 us-central2-b configs/reward.py:7b gs://my-bucket/runs/rm7b
#
# Copies this repository to ~/caig_jax on all workers, installs the pinned requirements into a venv there
# (once; delete ~/caig_jax/.venv to reinstall), then runs the same command on all workers at once. JAX finds
# its peers through the TPU runtime (TPU_WORKER_HOSTNAMES), so caig_jax calls jax.distributed.initialize()
# itself. WORKDIR should be a GCS path (Orbax and the metric writers accept gs://) shared by all hosts.
# SIGTERM on preemption makes every host save a checkpoint; re-running this script resumes.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,11p' "$0"; exit 2
fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4; shift 4
REPO=$(cd "$(dirname "$0")/.." && pwd)

tar -C "$REPO" --exclude=.venv --exclude=.git --exclude=runs -czf /tmp/caig_jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/caig_jax.tgz "$TPU_NAME":/tmp/caig_jax.tgz --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e; mkdir -p ~/caig_jax && tar -C ~/caig_jax -xzf /tmp/caig_jax.tgz && cd ~/caig_jax
  if [ ! -d .venv ]; then
    python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -c constraints.txt && .venv/bin/pip install -q 'jax[tpu]==0.10.2'
  fi
  .venv/bin/python -m caig_jax.main --config=$CONFIG --workdir=$WORKDIR $*
"
