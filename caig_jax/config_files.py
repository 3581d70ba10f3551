"""Loading `configs/NAME.py[:ARG]` files outside absl flag parsing (jobs that embed other jobs' configs)."""

from __future__ import annotations

import importlib.util
import os
import sys

from ml_collections import ConfigDict

from caig_jax.errors import MissingPathError

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
