"""Workdirs on `gs://` without a network: fsspec's in-memory filesystem registered as the `gcs` filesystem (what
gcsfs is on a pod), so `etils.epath` sends every `gs://` read and write of the run's writers to it.

Proven here: config/report JSON, metrics.jsonl (appends, truncation on resume) and TensorBoard event files of a
`gs://` workdir go through `caig_jax.files` / etils.epath to the `gs` filesystem, and nothing lands on the local
disk; the checkpoint manager keeps a `gs://` directory a URI. Not proven: a real GCS upload (no network here), nor
Orbax's array writes, which TensorStore's own `gs://` driver makes.
"""

import json
import os

import importlib

import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from caig_jax import files
from caig_jax.metrics import MetricWriter, read_jsonl


class FakeGCS(MemoryFileSystem):
    """An in-memory filesystem answering for `gs://` (its own store, not `memory://`'s)."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    def __init__(self, *args, finalize_on_close=False, **kwargs):  # gcsfs's option, which epath passes
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix):]
        return super()._strip_protocol(path)


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    # fsspec.register_implementation without the undo: the registry module, not the package's read-only view of it
    monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, "gcs", FakeGCS)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches the filesystem per protocol
    monkeypatch.chdir(tmp_path)  # a URI mistaken for a local path would land here
    yield FakeGCS.store
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    assert os.listdir(tmp_path) == [], "a gs:// write went to the local disk"


def test_json_writes_and_reads_go_to_the_bucket(fake_gcs):
    files.write_json_atomic("gs://bucket/run/config.json", {"job": "reward", "steps": 3})
    assert "/bucket/run/config.json" in fake_gcs
    assert files.exists("gs://bucket/run/config.json") and files.isdir("gs://bucket/run")
    assert json.loads(files.read_text("gs://bucket/run/config.json")) == {"job": "reward", "steps": 3}
    assert files.absolute("gs://bucket/run") == "gs://bucket/run"


def test_metric_writer_on_a_gs_workdir_writes_jsonl_and_tensorboard_there(fake_gcs):
    writer = MetricWriter("gs://bucket/run", start_step=0)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step}, prefix="train/")
    assert writer.has_row(2, "train/") and not writer.has_row(4, "train/")
    writer.close()
    assert [r["step"] for r in read_jsonl("gs://bucket/run/metrics.jsonl")] == [1, 2, 3]
    events = [k for k in fake_gcs if k.startswith("/bucket/run/tensorboard/events.out.tfevents")]
    assert len(events) == 1 and b"train/loss" in bytes(fake_gcs[events[0]].getvalue())

    resumed = MetricWriter("gs://bucket/run", start_step=2)  # a restart from step 2 drops the rows after it
    resumed.write(3, {"loss": 0.25}, prefix="train/")
    resumed.close()
    rows = read_jsonl("gs://bucket/run/metrics.jsonl")
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.25)]

    from caig_jax.eval.plots import training_curves

    training_curves("gs://bucket/run/metrics.jsonl", "gs://bucket/run/plots/training.png")  # a report's plot
    assert bytes(fake_gcs["/bucket/run/plots/training.png"].getvalue()).startswith(b"\x89PNG")


def test_checkpoint_manager_keeps_a_gs_directory_a_uri(fake_gcs, monkeypatch):
    from orbax.checkpoint._src.path import gcs_utils

    from caig_jax.checkpoint import Checkpointer, checkpoint_dir

    # Orbax asks the real bucket (google-cloud-storage) whether it has a hierarchical namespace: not here.
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)

    files.makedirs("gs://bucket/run/checkpoints")
    assert checkpoint_dir("gs://bucket/run") == "gs://bucket/run/checkpoints"
    checkpointer = Checkpointer("gs://bucket/run/checkpoints", async_save=False)
    assert checkpointer.directory == "gs://bucket/run/checkpoints" and checkpointer.latest_step() is None
    checkpointer.close()


def test_a_gs_workdir_without_a_gcs_client_is_one_clear_error(monkeypatch):
    from caig_jax.errors import PathError

    installed = set()
    monkeypatch.setattr(files, "_importable", lambda module: module in installed)
    with pytest.raises(PathError, match="lacks gcsfs and google-cloud-storage") as e:
        files.check_uri_support("gs://bucket/run")
    assert e.value.fix == "pip install -r requirements-gcs.txt -c constraints.txt"
    installed.update({"tensorflow", "google.cloud.storage"})  # tf.io.gfile serves gs:// in gcsfs's place
    files.check_uri_support("gs://bucket/run")
    with pytest.raises(PathError, match="not s3://"):
        files.check_uri_support("s3://bucket/run")
