"""The one entry point: `python -m caig_jax.main --config=configs/NAME.py[:PRESET] --workdir=DIR`.

`--config.key=value` overrides any (locked) config key; a misspelt key fails with the closest valid keys.
`config.job` picks the job module below, whose `run(config, workdir)` does the work. Multi-process launches
(TPU pod slices, local multi-process) initialise `jax.distributed` first; see `caig_jax.parallel`.

Errors: a `caig_jax.errors.UserError` (bad config, path, input data, checkpoint) is printed as one or two lines
(`error: ...`, `  fix: ...`) and exits with status 2; `--verbose` or CAIG_VERBOSE=1 adds its traceback. Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import re
import sys
import traceback
from typing import NoReturn

from absl import app, flags
from ml_collections import config_flags

from caig_jax import files, parallel
from caig_jax.config_files import add_config_root, config_keys, load_config
from caig_jax.errors import MissingPathError, PathError, UserError, format_user_error

# config.job -> module with `run(config, workdir)`. Imported lazily so a job only pays for what it uses.
JOBS = {name: f"caig_jax.jobs.{name}"
        for name in ("smoke", "market", "render", "reward", "baselines", "eval_sweep", "sft", "preference", "caig",
                     "generate")}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Job config file, `configs/NAME.py[:PRESET]`.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs (resumes if it exists).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of user errors too (or set CAIG_VERBOSE=1).")


def _verbose() -> bool:
    if os.environ.get("CAIG_VERBOSE", "") not in ("", "0"):
        return True
    return _VERBOSE.value if flags.FLAGS.is_parsed() else "--verbose" in sys.argv


def _exit_with_user_error(error: UserError) -> NoReturn:
    """Prints `error` as one or two lines on stderr (with its traceback first when verbose) and exits with 2."""
    if _verbose():
        traceback.print_exception(error)
    sys.stderr.write(format_user_error(error) + "\n")
    sys.exit(2)


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
    """Orbax logs every save phase at INFO through absl, JAX each backend it could not find (TPU on a CPU host);
    keep their warnings, drop the chatter. TFDS warns about every builder made from a config object, which is
    how all of ours are made: dropped too."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return not any(s in record.pathname for s in ("orbax", "xla_bridge"))
        return not str(record.msg).startswith("Using custom data configuration")


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
        msg = _unknown_override_message(argv, e) or str(e)
        if "Error whilst parsing config file" in msg and not _verbose():
            # ml_collections embeds the config file's whole traceback; its last line is the message.
            flag, _, rest = msg.partition(": ")
            msg = f"{flag}: {rest.strip().splitlines()[-1]}"
        sys.stderr.write(f"error: {msg}\n")
        sys.exit(2)


def _check_config_loaded(config) -> None:
    """ml_collections defers a config file that cannot be loaded (missing, unreadable) to the config's first use,
    as an OSError chaining the loader's (two tracebacks); this raises a `PathError` naming the file instead."""
    try:
        config.job  # noqa: B018  (the first access raises the deferred error)
    except OSError as e:
        spec = flags.FLAGS["config"].config_filename
        path = spec.split(":", 1)[0]
        if not os.path.exists(path):
            raise MissingPathError(
                f"config file {path!r} (from --config={spec}) does not exist",
                fix="pass --config=configs/NAME.py[:PRESET], relative to where you run, or an absolute path",
            ) from e
        reason = str(e.__cause__ or e).splitlines()[-1].strip()
        raise PathError(f"config file {path!r} (from --config={spec}) cannot be loaded: {reason}") from e


def _check_workdir(workdir: str) -> None:
    """Raises `PathError` when `workdir` cannot be the run's folder: a file, or (its nearest existing parent) not
    writable. Creates nothing, so a run stopped by a later error leaves no empty folder behind."""
    if "://" in workdir:
        files.check_uri_support(workdir)  # a missing GCS client is named now, not at the first checkpoint
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise PathError(f"--workdir={workdir} is a file, not a folder", fix="pass a folder path (created if missing)")
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise PathError(f"--workdir={workdir} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == os.path.abspath(workdir) else f"cannot be created in {existing}"
        raise PathError(f"--workdir={workdir} {what} (permission denied)", fix="pass a folder you can write to")


def main(argv: list[str]) -> None:
    del argv
    try:
        _run_job()
    except UserError as e:
        _exit_with_user_error(e)


def _run_job() -> None:
    config = _CONFIG.value
    if config is None or _WORKDIR.value is None:
        raise app.UsageError("both --config=configs/NAME.py[:PRESET] and --workdir=DIR are required")
    _check_config_loaded(config)
    if config.job not in JOBS:
        raise app.UsageError(f"config.job={config.job!r} is not a job; known jobs: {sorted(JOBS)}")
    _check_workdir(_WORKDIR.value)

    quiet_library_logs()
    parallel.set_cpu_devices(config.get("cpu_devices", 0))
    parallel.maybe_initialize_distributed()
    job = importlib.import_module(JOBS[config.job])
    job.run(config, _WORKDIR.value)


def run() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
