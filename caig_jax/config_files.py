"""Loading `configs/NAME.py[:ARG]` files outside absl flag parsing (jobs that embed other jobs' configs)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys

from ml_collections import ConfigDict

from caig_jax.errors import MissingPathError, UserError

log = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_keys(config: ConfigDict, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a (nested) ConfigDict."""
    keys = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ConfigDict):
            keys.extend(config_keys(value, name + "."))
        else:
            keys.append(name)
    return keys


def add_config_root(path: str) -> None:
    """Puts the folder that holds `configs/` on sys.path, so configs can `from configs.common import ...`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)


def load_config(spec: str) -> ConfigDict:
    """Loads `path/to/config.py[:ARG]` by calling its `get_config(ARG)` (what --config does).

    A relative path that does not exist from the working directory is looked up from the repository root.
    """
    path, _, arg = spec.partition(":")
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(REPO_ROOT, path)
    add_config_root(path)
    module_spec = importlib.util.spec_from_file_location("_caig_config", path)
    if module_spec is None or module_spec.loader is None:
        raise MissingPathError(f"config file {path!r} not found")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def differing_keys(a, b, prefix: str = "") -> set[str]:
    """The dotted keys whose values differ between two nested dicts (e.g. a saved config and a new one)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = set()
        for k in set(a) | set(b):
            out |= differing_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


def config_json(config: ConfigDict) -> dict:
    """`config` as the JSON dict a workdir records it in (sorted keys, tuples as lists)."""
    return json.loads(json.dumps(config.to_dict(), sort_keys=True, default=list))


def added_keys(saved, current, prefix: str = "") -> dict[str, object]:
    """The dotted keys (with `current`'s values) that `current` has and `saved` lacks: added to a config file
    after `saved` was written."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return {}
    out: dict[str, object] = {}
    for key, value in current.items():
        if key not in saved:
            out[f"{prefix}{key}"] = value
        else:
            out.update(added_keys(saved[key], value, f"{prefix}{key}."))
    return out


def check_saved_config(saved: dict, current: dict, *, source: str, what: str, fix: str) -> dict[str, object]:
    """Refuses (`UserError`: `what`, the first five differing keys, `fix`) a `current` config that differs from the
    `saved` one (read from `source`) in a key both have, or lacks a key `saved` has.

    Keys only `current` has were added to the config files after `saved` was written. They are accepted, not
    refused: this codebase adds a key with a default that keeps the old behaviour (e.g. `model.attention`), so
    an older workdir stays usable. They are logged (a run that overrides such a key to a non-default value is
    accepted too) and returned ({dotted key: current value}).
    """
    added = added_keys(saved, current)
    diff = sorted(differing_keys(saved, current) - set(added))
    if diff:
        raise UserError(f"{what} (differs in {', '.join(diff[:5])}{', ...' if len(diff) > 5 else ''})", fix=fix)
    if added:
        log.warning("%s was made before these config keys existed; going on with them at: %s", source,
                    ", ".join(f"{k}={v!r}" for k, v in sorted(added.items())))
    return added
