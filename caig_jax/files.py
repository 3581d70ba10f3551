"""The file layer of workdirs: local folders and `gs://` buckets through one path abstraction (`etils.epath`).

Workdirs on a pod live on `gs://` (every host sees them); on one machine they are local folders. The writers of a
run (config.json, metrics.jsonl, TensorBoard events, reports, checkpoints' folders) go through the helpers here,
so both work the same way:

- local paths: plain files; `write_atomic` writes a temporary file and renames it (a file is complete or absent,
  never half-written: what resuming relies on).
- URIs (`gs://bucket/...`): `etils.epath`, whose `gs://` backend is fsspec's `gcs` filesystem (gcsfs, installed
  on the pod from requirements-gcs.txt) or `tf.io.gfile` when TensorFlow is installed. An object store has no
  rename and no append: an object appears whole when its upload finishes, so `write_atomic` writes it directly,
  and `Appender` rewrites the object with every row so far when it flushes.

Orbax writes checkpoint arrays through TensorStore, which has its own `gs://` driver; its folders and metadata go
through `etils.epath` like everything here.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import time
from typing import Any

import numpy as np
from etils import epath

from caig_jax.errors import PathError


def is_uri(path: str) -> bool:
    """Whether `path` is remote storage (`gs://...`, any `scheme://`) rather than a local path."""
    return "://" in os.fspath(path)


def check_uri_support(path: str) -> None:
    """Raises `PathError` before a run starts when this host cannot write a `gs://` workdir: etils.epath needs gcsfs
    (or TensorFlow) for `gs://`, and Orbax asks the bucket for its layout through google-cloud-storage. Both are in
    requirements-gcs.txt (launch/pod.py installs it for gs:// workdirs), not in requirements.txt."""
    scheme = os.fspath(path).split("://", 1)[0]
    if scheme != "gs":
        raise PathError(f"--workdir={path}: only local folders and gs:// buckets are supported, not {scheme}://")
    missing = [name for name, modules in (("gcsfs", ("gcsfs", "tensorflow")), ("google-cloud-storage",
                                          ("google.cloud.storage",))) if not any(_importable(m) for m in modules)]
    if missing:
        raise PathError(f"--workdir={path} is on GCS but this host lacks {' and '.join(missing)} (etils.epath reads "
                        "and writes gs:// through gcsfs; Orbax checks the bucket with google-cloud-storage)",
                        fix="pip install -r requirements-gcs.txt -c constraints.txt")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package (google.cloud) is missing
        return False


def gpath(path: str) -> epath.Path:
    return epath.Path(os.fspath(path))


def absolute(path: str) -> str:
    """A local path made absolute; a URI as it is (`os.path.abspath('gs://b/x')` would make it a local path)."""
    path = os.fspath(path)
    return path if is_uri(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    return os.path.exists(path) if not is_uri(path) else gpath(path).exists()


def isdir(path: str) -> bool:
    return os.path.isdir(path) if not is_uri(path) else gpath(path).is_dir()


def makedirs(path: str) -> None:
    """Creates the folder and its parents (an object store needs none: a no-op there beyond what epath does)."""
    if is_uri(path):
        gpath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def read_text(path: str) -> str:
    if not is_uri(path):
        with open(path) as f:
            return f.read()
    return gpath(path).read_text()


def write_atomic(path: str, data: bytes | str) -> None:
    """Writes `data` to `path`, complete or not at all: locally through a temporary file in the same folder and a
    rename (creates the folder); on an object store as one upload, which is atomic by itself."""
    payload = data.encode() if isinstance(data, str) else data
    if is_uri(path):
        target = gpath(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(payload)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any, *, indent: int = 2, default: Any = None) -> None:
    write_atomic(path, json.dumps(obj, indent=indent, default=default) + "\n")


def save_npz_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path, buffer.getvalue())


class Appender:
    """A text file written line by line (metrics.jsonl): a line-buffered append locally; on an object store, the
    whole text so far re-uploaded on `flush()` and at most every `upload_secs` on `write()` (objects cannot be
    appended to), so a preempted run loses at most that many seconds of rows."""

    def __init__(self, path: str, upload_secs: float = 30.0):
        self.path, self.upload_secs = os.fspath(path), upload_secs
        self._remote = is_uri(self.path)
        if self._remote:
            self._text = io.StringIO()
            if exists(self.path):
                self._text.write(read_text(self.path))
            self._uploaded = time.monotonic()
        else:
            self._file = open(self.path, "a", buffering=1)

    def write(self, line: str) -> None:
        if not self._remote:
            self._file.write(line)
            return
        self._text.write(line)
        if time.monotonic() - self._uploaded >= self.upload_secs:
            self.flush()

    def flush(self) -> None:
        if self._remote:
            write_atomic(self.path, self._text.getvalue())
            self._uploaded = time.monotonic()
        else:
            self._file.flush()

    def close(self) -> None:
        self.flush()
        if not self._remote:
            self._file.close()


class _UploadOnFlush:
    """A TensorBoard event file on an object store: events are kept in memory and the whole file is uploaded on
    every flush (tensorboardX's own `gs://` writer does the same through google-cloud-storage; this one goes
    through `etils.epath` like the rest of the workdir)."""

    def __init__(self, path: str):
        self.path, self._buffer = path, io.BytesIO()

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        write_atomic(self.path, self._buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EpathEventFiles:
    """tensorboardX's writer factory interface (`record_writer.register_writer_factory`)."""

    def open(self, path: str) -> _UploadOnFlush:
        return _UploadOnFlush(path)

    def directory_check(self, path: str) -> None:
        makedirs(path)


def use_epath_for_tensorboard(scheme: str = "gs") -> None:
    """Routes tensorboardX's event files under `scheme://` through `etils.epath` (its built-in `gs://` writer needs
    google-cloud-storage, which this project does not install)."""
    from tensorboardX import record_writer

    record_writer.register_writer_factory(scheme, _EpathEventFiles())
