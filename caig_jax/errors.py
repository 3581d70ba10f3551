"""The one family of user-facing errors: things the user can fix (config, paths, input data, checkpoints).

`caig_jax.main` prints a `UserError` as one or two lines on stderr (`error: <what and where>`, then
`  fix: <how>` when the error knows it) and exits with status 2, without a traceback (`--verbose` or
CAIG_VERBOSE=1 shows it). Any other exception is a bug and keeps its traceback.

Each module's own error classes (`DataError`, `CheckpointMismatchError`, `ProductImageError`,
`CheckpointError`, ...) derive from `UserError` *and* from the built-in class they always were
(`ValueError`, `FileNotFoundError`), so callers that catch the built-in class keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix. The message says what is wrong and where (file, line, key, step).

    Args:
      message: what is wrong and where, on one line when possible.
      fix: how to fix it, when the raiser knows (printed by `caig_jax.main` as a second line).
    """

    def __init__(self, message: str, *, fix: str | None = None):
        super().__init__(message)
        self.fix = fix


class PathError(UserError, OSError):
    """A file or folder the user named cannot be used (it is a file where a folder is needed, not writable...)."""


class MissingPathError(PathError, FileNotFoundError):
    """A file or folder the user named does not exist."""


def format_user_error(error: UserError) -> str:
    """The one or two lines `caig_jax.main` prints: `error: <message>` and `  fix: <how>` when known."""
    lines = [f"error: {error}"]
    if error.fix:
        lines.append(f"  fix: {error.fix}")
    return "\n".join(lines)
