"""Atomic file writes: a file is either complete or absent, never half-written (what resuming relies on)."""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np


def write_atomic(path: str, data: bytes | str) -> None:
    """Writes `data` to `path` through a temporary file in the same folder and a rename (creates the folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any, *, indent: int = 2, default: Any = None) -> None:
    write_atomic(path, json.dumps(obj, indent=indent, default=default) + "\n")


def save_npz_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path, buffer.getvalue())
