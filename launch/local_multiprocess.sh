#!/usr/bin/env bash
# Run one caig_jax job as N cooperating processes on this machine (exercises the multi-host code paths:
# per-host data shards, jax.make_array_from_process_local_data, multi-process Orbax saves).
#
#   launch/local_multiprocess.sh N CONFIG WORKDIR [--config.key=value ...]
#   e.g. launch/local_multiprocess.sh 2 configs/smoke.py:tiny /tmp/smoke_mp
#
# Each process gets DEVICES_PER_PROCESS (default 4) emulated CPU devices; caig_jax.parallel sees
# JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID and calls jax.distributed.initialize().
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,10p' "$0"; exit 2
fi
N=$1 CONFIG=$2 WORKDIR=$3; shift 3
PYTHON=${PYTHON:-python3}
PORT=${PORT:-$((20000 + RANDOM % 10000))}
export JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$N" JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}"
export CAIG_CPU_COLLECTIVES=gloo
pids=()
for ((i = 0; i < N; i++)); do
  JAX_PROCESS_ID=$i "$PYTHON" -m caig_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
