"""Streaming safetensors reading and placement of tensors straight onto a device mesh.

A converter describes *where* each of our parameters comes from (`sources`: our path -> a callable that
reads and transforms one checkpoint tensor); `load_state` reads them one at a time and places each with
`jax.make_array_from_callback`, so a host only ever holds one tensor, and on a multi-host pod each host
only transfers the shards its devices own. Missing parameters, unexpected checkpoint keys and shape
mismatches are collected and reported together in one `CheckpointMismatchError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open

from caig_jax.errors import MissingPathError, UserError

_MAX_LISTED = 30


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint and the model disagree (missing / unexpected keys, shape mismatches)."""


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


class SafetensorsReader:
    """Lazy, tensor-by-tensor reader over one safetensors file, a sharded index, or a folder holding either.

    Args:
      path: a `.safetensors` file, a `*.safetensors.index.json` file, or a folder. In a folder, a single
        index file wins; otherwise all `*.safetensors` files in it are read together (keys must be unique).
    """

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.exists(path):
            raise MissingPathError(f"checkpoint path {path!r} does not exist")
        self.path = path
        self._key_to_file: dict[str, str] = {}
        if os.path.isdir(path):
            names = sorted(os.listdir(path))
            indices = [n for n in names if n.endswith(".safetensors.index.json")]
            files = [n for n in names if n.endswith(".safetensors")]
            if len(indices) == 1:
                self._read_index(os.path.join(path, indices[0]))
            elif files:
                for name in files:
                    self._add_file(os.path.join(path, name))
            else:
                raise MissingPathError(
                    f"no *.safetensors file or *.safetensors.index.json in {path!r} (found: {names[:20]})"
                )
        elif path.endswith(".index.json"):
            self._read_index(path)
        elif path.endswith(".safetensors"):
            self._add_file(path)
        else:
            raise ValueError(f"{path!r} is neither a folder, a .safetensors file nor a .safetensors.index.json")
        self._handles: dict[str, Any] = {}

    def _read_index(self, index_path: str) -> None:
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index_path}: not a safetensors index (expected a 'weight_map' object): {e}") from e
        folder = os.path.dirname(index_path)
        for key, name in weight_map.items():
            file = os.path.join(folder, name)
            if not os.path.exists(file):
                raise MissingPathError(f"{index_path} maps {key!r} to {name!r}, which does not exist")
            self._key_to_file[key] = file

    def _add_file(self, file: str) -> None:
        try:
            with safe_open(file, framework="numpy") as f:
                keys = list(f.keys())
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{file}: unreadable safetensors file: {e}") from e
        for key in keys:
            if key in self._key_to_file:
                raise ValueError(f"tensor {key!r} appears in both {self._key_to_file[key]} and {file}")
            self._key_to_file[key] = file

    def _handle(self, key: str):
        file = self._key_to_file[key]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="numpy")
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self._key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_to_file

    def _meta(self, key: str) -> tuple[str, tuple[int, ...]]:
        if key not in self._key_to_file:
            raise KeyError(f"tensor {key!r} not found in {self.path}")
        sl = self._handle(key).get_slice(key)
        return sl.get_dtype(), tuple(sl.get_shape())

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta(key)[1]

    def dtype(self, key: str) -> str:
        return self._meta(key)[0]

    def get(self, key: str) -> np.ndarray:
        """Reads one tensor; bf16 / fp16 are upcast to float32 (placement casts to the model's dtype)."""
        dtype, _ = self._meta(key)
        if dtype in ("BF16", "bfloat16"):
            # numpy has no bfloat16 dtype of its own: reinterpret the raw bytes as ml_dtypes.bfloat16.
            arr = _read_bf16(self._key_to_file[key], key)
        else:
            arr = self._handle(key).get_tensor(key)
        if arr.dtype in (np.float16, ml_dtypes.bfloat16):
            arr = arr.astype(np.float32)
        return arr


def _read_bf16(file: str, key: str) -> np.ndarray:
    """Reads a bf16 tensor from a safetensors file by its header offsets (numpy has no native bf16)."""
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        info = header[key]
        start, end = info["data_offsets"]
        f.seek(8 + header_len + start)
        raw = f.read(end - start)
    return np.frombuffer(raw, dtype=ml_dtypes.bfloat16).reshape(info["shape"])


def torch_layout_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Our parameter shape at `path` in PyTorch's layout (the layout of the files we read), for messages that name
    a file: Linear kernels `[in, out]` -> `[out, in]`, conv kernels `[kh, kw, in, out]` -> `[out, in, kh, kw]`."""
    shape = tuple(shape)
    if path.endswith("kernel"):
        if len(shape) == 2:
            return shape[::-1]
        if len(shape) == 4:
            return (shape[3], shape[2], shape[0], shape[1])
    return shape


def flat_paths(state: Any) -> dict[str, Any]:
    """`{'a/b/kernel': Variable}` for an nnx.State."""
    return {"/".join(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}


def load_state(
    abstract_state: Any,
    sources: Mapping[str, Callable[[], np.ndarray]],
    *,
    unexpected: Iterable[str] = (),
    what: str = "checkpoint",
    source_names: Mapping[str, str] | None = None,
    file_shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
) -> Any:
    """Fills an abstract nnx.State (leaves: ShapeDtypeStruct with NamedSharding) from `sources`.

    Args:
      abstract_state: from `caig_jax.parallel.abstract_with_shardings`.
      sources: our flat param path ('a/b/kernel') -> zero-argument callable returning the tensor, already
        transformed to our layout (e.g. Linear weights as `[in, out]`).
      unexpected: checkpoint keys that no parameter consumed (reported as errors).
      what: names the checkpoint in error messages (e.g. its path).
      source_names: our path -> checkpoint key, to name the checkpoint tensor in shape-mismatch messages.
      file_shapes: our path -> (the tensor's shape in the file, the shape the model expects in the file's layout),
        from the file's header. Given, shapes are checked before any tensor is read and mismatches are reported
        in the file's layout, together with missing and unexpected keys.

    Returns:
      The concrete nnx.State, every leaf a sharded `jax.Array` of the abstract leaf's dtype.

    Raises:
      CheckpointMismatchError listing every missing parameter, unexpected key and shape mismatch.
    """
    source_names = source_names or {}
    file_shapes = file_shapes or {}
    targets = flat_paths(abstract_state)
    missing = sorted(set(targets) - set(sources))
    extra_sources = sorted(set(sources) - set(targets))
    unexpected = sorted(set(unexpected)) + [f"{source_names.get(p, p)} (-> {p}, no such parameter)" for p in extra_sources]
    mismatched = [
        f"{source_names.get(path, path)} -> {path}: file shape {got}, model expects {expected} in the file's layout "
        f"(ours: {tuple(targets[path].get_value().shape)})"
        for path, (got, expected) in sorted(file_shapes.items())
        if path in targets and tuple(got) != tuple(expected)
    ]
    problems: list[str] = []
    if missing:
        problems.append(_listing("parameters missing from the checkpoint", missing))
    if unexpected:
        problems.append(_listing("unexpected checkpoint keys", unexpected))
    if mismatched:
        problems.append(_listing("shape mismatches", mismatched))
    if problems:
        raise CheckpointMismatchError(f"{what} does not match the model:\n" + "\n".join(problems))

    loaded: dict[str, Any] = {}
    for path, var in targets.items():
        target = var.get_value()
        array = np.asarray(sources[path]())
        if tuple(array.shape) != tuple(target.shape):
            mismatched.append(
                f"{source_names.get(path, path)} -> {path}: shape {tuple(array.shape)} once in our layout, "
                f"model expects {tuple(target.shape)}"
            )
            continue
        array = array.astype(target.dtype)
        sharding = getattr(target, "sharding", None)
        if sharding is None:
            loaded[path] = jax.numpy.asarray(array)
        else:
            loaded[path] = jax.make_array_from_callback(array.shape, sharding, lambda idx, a=array: a[idx])
        del array
    if mismatched:
        raise CheckpointMismatchError(f"{what} does not match the model:\n" + _listing("shape mismatches", mismatched))

    flat = nnx.to_flat_state(abstract_state)
    filled = [(path, var.replace(loaded["/".join(str(p) for p in path)])) for path, var in flat]
    return nnx.from_flat_state(filled)
