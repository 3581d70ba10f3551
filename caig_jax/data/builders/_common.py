"""What the three TFDS builders share: TF-free preparation into array_record files, option checks, reruns.

Every builder is a `tfds.core.GeneratorBasedBuilder` whose `BuilderConfig` subclass carries the input
paths and options; `prepare(...)` builds it under `data_dir/<builder>/<config name>/<version>/` as
array_record files (readable with `tfds.data_source`, `tfds.builder_from_directory(...).as_data_source()`
and grain; TensorFlow is never imported). The options are stored in the dataset's metadata:

- same options again -> the existing dataset is reused, if its input files are unchanged;
- other options under the same config name -> `DataError`, unless `overwrite=True` (then rebuilt);
- input files changed since the build (every file a builder reads is fingerprinted into the metadata:
  `InputFiles`, size + modification time + SHA-256; a file whose size or time differs is hashed again) ->
  `DataError` naming the first changed file, unless `overwrite=True` (then rebuilt from the current files);
- a build that was interrupted leaves only an `incomplete.*` folder (TFDS writes there and renames at
  the end); `prepare` deletes such leftovers and builds again. Examples are keyed deterministically and
  every random choice is seeded, so the re-run produces the same dataset.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
from typing import Any

import tensorflow_datasets as tfds

from caig_jax.data.ctr_logs import DataError
from caig_jax.data.images import encode_image  # noqa: F401  (re-exported for the builders)

log = logging.getLogger(__name__)

FILE_FORMAT = "array_record"
_BASE_FIELDS = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}


def config_options(config: tfds.core.BuilderConfig) -> dict[str, Any]:
    """The builder-specific options of a config (everything but TFDS's own fields), JSON-normalised."""
    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _BASE_FIELDS}
    return json.loads(json.dumps(options))


# ---------------------------------------------------------------------------------------------------------------
# Input fingerprints.
# ---------------------------------------------------------------------------------------------------------------


def file_fingerprint(path: str) -> list | None:
    """`[size, mtime_ns, sha256 (first 32 hex digits)]` of a file; None when it does not exist."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return [stat.st_size, stat.st_mtime_ns, digest.hexdigest()[:32]]


class InputFiles:
    """The files a build reads, each fingerprinted when first added (`file_fingerprint`; an absent file is
    recorded as absent, so one appearing later counts as a change). `as_dict()` goes into the dataset's
    metadata (`metadata["inputs"]`) and `changed_inputs` compares it with the files on a later run."""

    def __init__(self):
        self._files: dict[str, list | None] = {}

    def add(self, *paths: str) -> None:
        for path in paths:
            if path and path not in self._files:
                self._files[path] = file_fingerprint(path)

    def as_dict(self) -> dict[str, list | None]:
        return dict(self._files)


def changed_inputs(recorded: dict[str, Any]) -> list[str]:
    """`"PATH (what changed)"` for every recorded input whose file differs now. A file with the recorded size and
    modification time is taken as unchanged; otherwise its content hash decides."""
    changed = []
    for path, old in recorded.items():
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            if old is not None:
                changed.append(f"{path} (deleted)")
            continue
        if old is None:
            changed.append(f"{path} (new: it did not exist)")
        elif stat.st_size != old[0]:
            changed.append(f"{path} (size {old[0]} -> {stat.st_size} bytes)")
        elif stat.st_mtime_ns != old[1] and file_fingerprint(path)[2] != old[2]:
            changed.append(f"{path} (content changed)")
    return changed


def prepare(builder_cls, config: tfds.core.BuilderConfig, data_dir: str, *, overwrite: bool = False,
            overwrite_hint: str = "overwrite=True"):
    """Builds (or reuses) the dataset of `builder_cls` with `config` under `data_dir`. Returns the builder.

    overwrite_hint: how the caller's user forces a rebuild (a job names its config key), for error messages.
    """
    tfds.disable_progress_bar()
    data_dir = os.path.abspath(data_dir)
    builder = builder_cls(data_dir=data_dir, config=config, file_format=FILE_FORMAT)
    path = str(builder.data_path)
    options = config_options(config)
    if os.path.exists(os.path.join(path, "dataset_info.json")):
        existing = tfds.builder_from_directory(path).info.metadata or {}
        if existing.get("options") == options:
            recorded = existing.get("inputs")
            if recorded is None:
                log.warning("%s records no input fingerprints (built by an older version): reused unchecked", path)
                return builder
            changed = changed_inputs(recorded)
            if not changed:
                return builder
            if not overwrite:
                more = f" and {len(changed) - 1} more file(s)" if len(changed) > 1 else ""
                raise DataError(
                    f"{path} was built from input files that have changed since: {changed[0]}{more}",
                    fix=f"rebuild it from the current files with {overwrite_hint}, or restore the files",
                )
            log.info("rebuilding %s: its input files changed (%s)", path, changed[0])
        elif not overwrite:
            raise DataError(
                f"{path} was built with other options than now ({_diff(existing.get('options'), options)})",
                fix=f"use another config name or data_dir, or rebuild it with {overwrite_hint}",
            )
        else:
            log.info("rebuilding %s: options changed", path)
        shutil.rmtree(path)
        builder = builder_cls(data_dir=data_dir, config=config, file_format=FILE_FORMAT)
    for stale in glob.glob(os.path.join(os.path.dirname(path), f"incomplete.*{os.path.basename(path)}")):
        log.info("removing %s left by an interrupted build", stale)
        shutil.rmtree(stale, ignore_errors=True)
    builder.download_and_prepare(download_dir=os.path.join(data_dir, "downloads"), file_format=FILE_FORMAT)
    return builder


def _diff(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return "no options recorded"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


DEFAULT_CONFIGS = ("market", "default")  # picked, in this order, when several configs exist and none is named


def dataset_dir(data_dir: str, builder_name: str, config_name: str | None = None) -> str:
    """Finds `data_dir/<builder_name>/<config>/<version>`, newest version, of the named config, else the only
    config, else the first of `DEFAULT_CONFIGS` present.

    `data_dir` may also be that folder itself or a market workdir holding `tfds/`.
    """
    if os.path.exists(os.path.join(data_dir, "dataset_info.json")):
        return data_dir
    for root in (data_dir, os.path.join(data_dir, "tfds")):
        base = os.path.join(root, builder_name)
        if not os.path.isdir(base):
            continue
        configs = [config_name] if config_name else sorted(
            c for c in os.listdir(base) if os.path.isdir(os.path.join(base, c)) and not c.startswith("incomplete"))
        found = [
            os.path.join(base, c, v)
            for c in configs
            if os.path.isdir(os.path.join(base, c))
            for v in os.listdir(os.path.join(base, c))
            if os.path.exists(os.path.join(base, c, v, "dataset_info.json"))
        ]
        configs_found = sorted({os.path.basename(os.path.dirname(p)) for p in found})
        if len(configs_found) > 1:
            preferred = [c for c in DEFAULT_CONFIGS if c in configs_found]
            if not preferred:
                raise DataError(f"{base} holds several configs {configs_found}; pass config_name=")
            found = [p for p in found if os.path.basename(os.path.dirname(p)) == preferred[0]]
        if found:
            return sorted(found, key=lambda p: tuple(int(x) for x in os.path.basename(p).split(".")))[-1]
    raise DataError(
        f"no prepared '{builder_name}' dataset{' ' + repr(config_name) if config_name else ''} under {data_dir!r} "
        f"(expected {os.path.join(data_dir, builder_name, '<config>', '<version>', 'dataset_info.json')})"
    )


def load_builder(data_dir: str, builder_name: str, config_name: str | None = None):
    """A read-only builder for a prepared dataset (no builder code or TensorFlow needed)."""
    return tfds.builder_from_directory(dataset_dir(data_dir, builder_name, config_name))
