"""User errors through `python -m caig_jax.main`: one or two lines on stderr, exit status 2, no traceback (unless
verbose); and the error family the modules' own errors belong to."""

import os
import subprocess
import sys

import pytest

from caig_jax.errors import MissingPathError, PathError, UserError

from ._smoke_utils import REPO


def _main(*args, env=None):
    """Runs `python -m caig_jax.main ARGS` from the repository root; returns (exit status, stderr)."""
    full_env = {k: v for k, v in os.environ.items() if k != "CAIG_VERBOSE"}
    full_env.update(PYTHONPATH=REPO, **(env or {}))
    proc = subprocess.run(
        [sys.executable, "-m", "caig_jax.main", *args], cwd=REPO, env=full_env, capture_output=True, text=True,
        timeout=120,
    )
    return proc.returncode, proc.stderr


def test_missing_config_file_is_one_line(tmp_path):
    workdir = tmp_path / "run"
    code, err = _main("--config=configs/nope.py", f"--workdir={workdir}")
    assert code == 2, err
    assert err.splitlines()[0] == "error: config file 'configs/nope.py' (from --config=configs/nope.py) does not exist"
    assert len(err.splitlines()) <= 2 and "Traceback" not in err
    assert not workdir.exists()


def test_workdir_that_is_a_file(tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("not a folder")
    code, err = _main("--config=configs/smoke.py:tiny", f"--workdir={file}", "--config.train.steps=1")
    assert code == 2, err
    assert err.splitlines()[0] == f"error: --workdir={file} is a file, not a folder"
    assert "Traceback" not in err
    code, err = _main("--config=configs/smoke.py:tiny", f"--workdir={file}/run", "--config.train.steps=1")
    assert (code, err.splitlines()[0]) == (2, f"error: --workdir={file}/run cannot be created: {file} is a file")


def test_verbose_shows_the_traceback(tmp_path):
    code, err = _main("--config=configs/nope.py", f"--workdir={tmp_path}", env={"CAIG_VERBOSE": "1"})
    assert code == 2 and "Traceback (most recent call last)" in err and "MissingPathError" in err
    assert err.splitlines()[-2].startswith("error: config file 'configs/nope.py'")


def test_error_family_keeps_the_builtin_bases():
    from caig_jax.checkpoint import CheckpointError
    from caig_jax.convert.common import CheckpointMismatchError
    from caig_jax.data.ctr_logs import DataError
    from caig_jax.data.product import MissingProductImageError, ProductImageError

    for cls in (DataError, CheckpointMismatchError, ProductImageError, CheckpointError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError), cls
    for cls in (MissingPathError, MissingProductImageError):
        assert issubclass(cls, UserError) and issubclass(cls, FileNotFoundError), cls
    assert issubclass(PathError, OSError)
    with pytest.raises(FileNotFoundError, match="x.json"):
        raise MissingPathError("x.json does not exist", fix="create it")
