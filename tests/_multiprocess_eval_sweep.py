"""The eval sweep on a real (tiny) reward checkpoint and its TFDS data, run by `test_multiprocess.py` as two
`jax.distributed` processes (4 CPU devices each) and in the test process (8 devices, one process).

    python -m tests._multiprocess_eval_sweep CHECKPOINT DATA_DIR WORKDIR READS.json
    # under JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID

Every example the sweep reads from a ctr_logs split goes through a recording wrapper around the data source
(`caig_jax.data.reward_inputs.reward_pair_source`), so the test can check that each process read only its
shard: the indices read, per split, go to READS.json with `{process}` replaced by the process index.
"""

import json
import sys
import threading

import jax

from caig_jax import parallel
from caig_jax.config_files import load_config
from caig_jax.data import reward_inputs
from caig_jax.jobs import eval_sweep

from ._smoke_utils import REPO

MESH = {"data": 4, "fsdp": 2}


def sweep_config(checkpoint: str, data_dir: str):
    config = load_config(f"{REPO}/configs/eval_sweep.py:tiny")
    config.checkpoints = checkpoint
    config.eval_sets = f"test=self:test,val={data_dir}:val"
    config.batch_size = 8  # global: 4 per process, so each split takes several unequal steps
    config.write_reports = False
    config.mesh.data, config.mesh.fsdp = MESH["data"], MESH["fsdp"]
    return config


class _RecordingSource:
    """A random-access source that notes every index read (grain may read from several threads)."""

    def __init__(self, source, reads: list[int]):
        self._source, self._reads, self._lock = source, reads, threading.Lock()

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index):
        with self._lock:
            self._reads.append(int(index))
        return self._source[index]

    def __getattr__(self, name):
        return getattr(self._source, name)


def record_reads() -> dict[str, list[int]]:
    """Wraps the ctr_logs source the sweep's `pair_batches` opens; returns {split: indices read} (filled in as
    the sweep reads)."""
    reads: dict[str, list[int]] = {}
    original = reward_inputs.reward_pair_source

    def recording(data_dir, split, config_name=None):
        return _RecordingSource(original(data_dir, split, config_name), reads.setdefault(split, []))

    reward_inputs.reward_pair_source = recording
    return reads


def run(checkpoint: str, data_dir: str, workdir: str) -> dict[str, list[int]]:
    reads = record_reads()
    eval_sweep.run(sweep_config(checkpoint, data_dir), workdir)
    return {split: sorted(indices) for split, indices in reads.items()}


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")  # as the test session (conftest.py)
    parallel.maybe_initialize_distributed()
    checkpoint, data_dir, workdir, reads_path = sys.argv[1:5]
    result = run(checkpoint, data_dir, workdir)
    with open(reads_path.format(process=jax.process_index()), "w") as f:
        json.dump(result, f)
