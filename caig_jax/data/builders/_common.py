"""What the three TFDS builders share: TF-free preparation into array_record files, option checks, reruns.

Every builder is a `tfds.core.GeneratorBasedBuilder` whose `BuilderConfig` subclass carries the input
paths and options; `prepare(...)` builds it under `data_dir/<builder>/<config name>/<version>/` as
array_record files (readable with `tfds.data_source`, `tfds.builder_from_directory(...).as_data_source()`
and grain; TensorFlow is never imported). The options are stored in the dataset's metadata:

- same options again -> the existing dataset is reused;
- other options under the same config name -> `DataError`, unless `overwrite=True` (then rebuilt);
- a build that was interrupted leaves only an `incomplete.*` folder (TFDS writes there and renames at
  the end); `prepare` deletes such leftovers and builds again. Examples are keyed deterministically and
  every random choice is seeded, so the re-run produces the same dataset.
"""

from __future__ import annotations

import dataclasses
import glob
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


def prepare(builder_cls, config: tfds.core.BuilderConfig, data_dir: str, *, overwrite: bool = False):
    """Builds (or reuses) the dataset of `builder_cls` with `config` under `data_dir`. Returns the builder."""
    tfds.disable_progress_bar()
    data_dir = os.path.abspath(data_dir)
    builder = builder_cls(data_dir=data_dir, config=config, file_format=FILE_FORMAT)
    path = str(builder.data_path)
    options = config_options(config)
    if os.path.exists(os.path.join(path, "dataset_info.json")):
        existing = tfds.builder_from_directory(path).info.metadata or {}
        if existing.get("options") == options:
            return builder
        if not overwrite:
            raise DataError(
                f"{path} was built with other options than now ({_diff(existing.get('options'), options)}); "
                "use another config name or data_dir, or pass overwrite=True to rebuild it"
            )
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
