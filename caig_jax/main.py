"""The one entry point: `python -m caig_jax.main --config=configs/NAME.py[:PRESET] --workdir=DIR`.

`--config.key=value` overrides any (locked) config key; a misspelt key fails with the closest valid keys.
`config.job` picks the job module below, whose `run(config, workdir)` does the work. Multi-process launches
(TPU pod slices, local multi-process) initialise `jax.distributed` first; see `caig_jax.parallel`.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from caig_jax.config_files import add_config_root, config_keys, load_config

# config.job -> module with `run(config, workdir)`. Imported lazily so a job only pays for what it uses.
JOBS = {name: f"caig_jax.jobs.{name}" for name in ("smoke", "market", "render", "reward", "eval_sweep")}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Job config file, `configs/NAME.py[:PRESET]`.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs (resumes if it exists).")


def _unknown_override_message(argv: list[str], error: Exception) -> str | None:
    """Names the misspelt `--config.X` override and the closest valid keys, or None if not that error."""
    overrides = [m.group(1) for a in argv if (m := re.match(r"--config\.([\w.]+)=", a))]
    if not overrides:
        return None
    # Re-load the config file without overrides to know the valid keys.
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return None
    try:
        base = load_config(spec)
    except Exception:  # noqa: BLE001  (the config file itself is broken: let the original error speak)
        return None
    valid = config_keys(base)
    bad = [o for o in overrides if o not in valid]
    if not bad:
        return None
    lines = []
    for key in bad:
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
        hint = f" Closest valid keys: {', '.join(close)}." if close else ""
        lines.append(f"--config.{key}: no such key in {spec}.{hint}")
    return "\n".join(lines)


class _DropLibraryInfo(logging.Filter):
    """Orbax logs every save phase at INFO through absl; keep its warnings, drop the chatter."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def quiet_library_logs() -> None:
    for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
        handler.addFilter(_DropLibraryInfo())


def _parse_flags(argv: list[str]) -> list[str]:
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec:
        add_config_root(spec.partition(":")[0])
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001  (turn any override failure into one readable message)
        msg = _unknown_override_message(argv, e)
        sys.stderr.write(f"error: {msg or e}\n")
        sys.exit(2)


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    if config is None or _WORKDIR.value is None:
        raise app.UsageError("both --config=configs/NAME.py[:PRESET] and --workdir=DIR are required")
    if config.job not in JOBS:
        raise app.UsageError(f"config.job={config.job!r} is not a job; known jobs: {sorted(JOBS)}")

    from caig_jax import parallel

    parallel.set_cpu_devices(config.get("cpu_devices", 0))
    parallel.maybe_initialize_distributed()
    quiet_library_logs()
    job = importlib.import_module(JOBS[config.job])
    job.run(config, _WORKDIR.value)


def run() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
