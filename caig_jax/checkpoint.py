"""Orbax checkpointing of a train state plus the data iterator position, with verified restores.

- `CheckpointManager` with async saves, keep-N, a save interval, and forced saves (SIGTERM / end of run).
- Orbax writes each step into a temporary folder and renames it when complete, so a process killed
  (even with SIGKILL) in the middle of a save leaves every earlier checkpoint restorable; the partial
  folder is ignored and cleaned up by the next run.
- Restores go into an *abstract* state whose leaves carry the shardings of the **current** mesh, so a run
  saved on one mesh shape (or device count) resumes on another.
- What Orbax lacks, added here: each step stores a **fingerprint** (`fingerprint`: a 64-bit digest per state
  leaf, computed on device, plus digests of the data-position and metadata JSON items) in its own `fingerprint`
  item, and every restore recomputes it on what was restored and compares, so a checkpoint damaged on disk (a
  flipped bit, a truncated or missing file) is never used silently. `restore_latest` walks from the newest step
  to older ones until one restores and verifies, logging one line per step it skips, and moves the skipped
  steps aside to `<directory>.unusable/` (so later saves of those step numbers do not collide with them).
- `restore_params` reads only the trained parameters of a step (no optimizer state) onto any mesh, verified
  against the same fingerprint: how a trained model is loaded for evaluation or as another job's input.

The train state is an arbitrary pytree (nnx.State, optax states, ...) and is handed to Orbax as is:
`StandardSave` / `StandardRestore` take nnx.State and optax's namedtuple states directly (observed with
Orbax 0.12.8 and Flax 0.12.8: a {step, params: nnx.State, opt_state: adamw state} tree saved on an
fsdp=4 x tensor=2 mesh restores into an abstract tree on a 4-device data mesh, bit-identical). The keys on
disk are the pytree paths (`params/hidden/0/kernel/value`), readable with plain Orbax tools.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from caig_jax import files, parallel
from caig_jax.errors import UserError

log = logging.getLogger(__name__)

FINGERPRINT_ALGORITHM = "fmix32-sum-2x32-v1"
_STATE_MISMATCH_FIX = (
    "if the model config or the trainable set changed since these checkpoints were written, use a new --workdir; "
    "otherwise move the damaged steps out of the checkpoint folder, or start over in a new --workdir"
)


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be restored or does not verify; the message names the folder and step(s)."""


# ------------------------------------------------------------------------------------------------------------
# Fingerprint: a 64-bit digest per leaf, exact over the bits, independent of sharding.
# ------------------------------------------------------------------------------------------------------------


def _fmix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's finaliser: a bijection on uint32 in which every input bit flips ~half the output bits."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The leaf's bits as uint32 words: 32-bit dtypes as is, narrower ones zero-extended, 64-bit ones as 2 words."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if x.dtype.itemsize >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)


def _linear_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major element index (mod 2^32), built from per-axis iotas so that it keeps the leaf's sharding."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _leaf_digest(x: jax.Array) -> jax.Array:
    """uint32[2]: two wrapping sums over the elements of bijective mixes of (word, position).

    Changing any one element changes its term in both sums, so every single-element change (any number of
    flipped bits in it) is always detected; other changes collide with probability ~2^-64. Moving a value to
    another position changes the sums too. Integer sums are exact and order-free, so the digest does not
    depend on how the leaf is sharded.
    """
    words = _words(jnp.asarray(x))
    mixed = _fmix32(words ^ _fmix32(_linear_index(words.shape) ^ np.uint32(0x9E3779B9)))
    second = _fmix32(mixed + np.uint32(0x27D4EB2F))
    return jnp.stack([jnp.sum(mixed, dtype=jnp.uint32), jnp.sum(second, dtype=jnp.uint32)])


_digests = jax.jit(lambda leaves: [_leaf_digest(x) for x in leaves])


def _path_name(path: tuple) -> str:
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
        else:
            names.append(str(entry))
    return "/".join(names) or "value"


def _layout(leaf: Any) -> str:
    """`dtype[shape]` of an array or `jax.ShapeDtypeStruct` leaf, e.g. `float32[64,16]`."""
    return f"{leaf.dtype}[{','.join(str(d) for d in leaf.shape)}]"


def _layouts(state: Any) -> dict[str, str]:
    return {_path_name(path): _layout(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def fingerprint(state: Any) -> dict[str, str]:
    """`{leaf path: "dtype[shape]:digest"}` for every array leaf of `state`, computed on the leaves' devices.

    One jitted pass over all leaves; only 8 bytes per leaf come back to the host. Works for sharded and
    multi-host arrays (each digest is a full reduction, replicated on every device).
    """
    paths_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    digests = _digests([leaf for _, leaf in paths_leaves])
    out = {}
    for (path, leaf), digest in zip(paths_leaves, digests, strict=True):
        words = np.asarray(digest.addressable_data(0))
        out[_path_name(path)] = f"{_layout(leaf)}:{int(words[0]):08x}{int(words[1]):08x}"
    return out


def _layout_problem(saved: dict, abstract_state: Any) -> str | None:
    """None when the saved fingerprint record covers exactly `abstract_state`'s leaves with the same dtypes and
    shapes, else one line saying how they differ (a changed model config or trainable set, or an old format)."""
    if saved.get("algorithm") != FINGERPRINT_ALGORITHM:
        return f"has a fingerprint of another kind ({saved.get('algorithm')!r}, expected {FINGERPRINT_ALGORITHM!r})"
    saved_layouts = {path: label.rsplit(":", 1)[0] for path, label in saved["leaves"].items()}
    now = _layouts(abstract_state)
    if saved_layouts.keys() != now.keys():
        only_saved, only_now = sorted(saved_layouts.keys() - now.keys()), sorted(now.keys() - saved_layouts.keys())
        return (
            f"does not match the current train state: {len(only_saved)} leaves only in the checkpoint "
            f"{only_saved[:3]}, {len(only_now)} only in the current state {only_now[:3]}"
        )
    differ = [p for p in now if now[p] != saved_layouts[p]]
    if differ:
        return (
            f"does not match the current train state: {len(differ)} leaves differ, first {differ[0]}: saved "
            f"{saved_layouts[differ[0]]}, now {now[differ[0]]}"
        )
    return None


def _json_digest(value: Any) -> str:
    """Digest of a JSON item (data position, metadata) as JsonSave writes it; tuples and lists digest alike."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _record(state: Any, data_state: dict, meta: dict) -> dict:
    """The `fingerprint` item of a step: per-leaf digests of the state and digests of the two JSON items."""
    return {
        "algorithm": FINGERPRINT_ALGORITHM,
        "leaves": fingerprint(state),
        "json": {"data": _json_digest(data_state), "meta": _json_digest(meta)},
    }


def _content_problem(saved: dict, state: Any, data_state: dict, meta: dict) -> str | None:
    """None when what was restored has the saved digests, else one line naming the first differing leaf or item."""
    expected, got = saved["leaves"], fingerprint(state)
    bad = [path for path in expected if expected[path] != got[path]]
    if bad:
        return (
            f"does not verify: fingerprint mismatch in {len(bad)} of {len(expected)} leaves, first {bad[0]}: saved "
            f"{expected[bad[0]]}, restored {got[bad[0]]}"
        )
    for name, value in (("data", data_state), ("meta", meta)):
        if saved["json"][name] != _json_digest(value):
            return f"does not verify: its {name} item differs from what was saved"
    return None


def _is_failed_read_report(exc: BaseException | None) -> bool:
    """Orbax/TensorStore's leftovers of a failed restore: see `_drop_failed_read_reports`."""
    if isinstance(exc, RuntimeError):
        return str(exc) == "Event loop is closed"
    return isinstance(exc, ValueError) and re.match(r"[A-Z_]{4,}: .*tensorstore_spec", str(exc), re.S) is not None


class _FailedReadLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _is_failed_read_report(record.exc_info[1]))


def _drop_failed_read_reports() -> None:
    """Installs (once) filters for the late reports a failed restore leaves behind, which would bury its one line.

    When one array of a step fails to read (a truncated file), Orbax's event loop stops while TensorStore reads
    of the other arrays are still in flight. Observed for one truncated file: ~20 `RuntimeError('Event loop is
    closed')` tracebacks through `sys.unraisablehook`, and `asyncio` logging "Future exception was never
    retrieved" with a TensorStore error and its spec dump when the futures are collected. Only those two kinds
    are dropped; every other report goes where it went before.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_failed_read_reports", False):
        return

    def hook(unraisable):
        if not _is_failed_read_report(unraisable.exc_value):
            previous(unraisable)

    hook.drops_failed_read_reports = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_FailedReadLogFilter())


def _one_line(error: BaseException, limit: int = 300) -> str:
    """A short reason for a failed restore: the innermost cause's first line; for a TensorStore error its status
    code and last clause (`OUT_OF_RANGE: ... Error reading Byte range [0, 5622) of local file "..."`), without the
    spec dump that follows."""
    while error.__cause__ is not None:
        error = error.__cause__
    line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    line = line.split(" [tensorstore_spec", 1)[0]
    if status := re.match(r"([A-Z_]{4,}): (.*)", line):
        line = f"{status.group(1)}: ... {status.group(2).rsplit(': ', 1)[-1]}"
    text = f"{type(error).__name__}: {line}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------------------
# The checkpointer.
# ------------------------------------------------------------------------------------------------------------


class Checkpointer:
    """Thin wrapper around `ocp.CheckpointManager` for (train state, data position, metadata) triples.

    Args:
      directory: where checkpoints live (`<workdir>/checkpoints`).
      keep: how many recent checkpoints to keep.
      every: save interval in steps (`should_save`); forced saves ignore it.
      async_save: write in a background thread while training continues.

    Attributes:
      last_verified_step: the newest step this process has read back and verified (by `restore`,
        `restore_latest` or `newest_verified_step`), or None. Steps saved since were fingerprinted from the
        in-memory state but not read back.
    """

    def __init__(self, directory: str, *, keep: int = 3, every: int = 100, async_save: bool = True):
        self.directory = files.absolute(directory)  # a gs:// URI stays one
        self.last_verified_step: int | None = None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(1, every),
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta", "fingerprint")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, meta: dict | None = None, *, force: bool = False) -> bool:
        """Starts saving (async) `state`, its fingerprint, `data_state` and `meta`. Returns True when a save was
        started. The fingerprint is computed (on device, blocking until done) only for steps that are saved."""
        if not (force or self.manager.should_save(step)):
            return False
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta or {}),
                fingerprint=ocp.args.JsonSave(_record(state, data_state, meta or {})),
            ),
            force=force,
        )
        if saved:
            log.info("checkpoint save started: step %d -> %s", step, self.directory)
        return saved

    def _restore_step(self, abstract_state: Any, step: int) -> tuple[tuple[Any, dict, dict] | None, str]:
        """((state, data_state, meta), "") when `step` restores and verifies, else (None, one-line reason).

        The small fingerprint record is read first, so that a step written for another model config or
        trainable set is named by its first differing leaf before any array is read.
        """
        _drop_failed_read_reports()
        if not files.isdir(os.path.join(self.directory, str(step), "fingerprint")):
            return None, "has no fingerprint/ item (written before caig_jax verified checkpoints, or deleted)"
        try:
            saved = self.manager.restore(step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore())).fingerprint
            problem = _layout_problem(dict(saved or {}), abstract_state)
            if problem:
                return None, problem
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # noqa: BLE001  (Orbax / TensorStore raise many types; all mean "unusable step")
            return None, f"cannot be restored: {_one_line(e)}"
        data_state, meta = dict(restored.data or {}), dict(restored.meta or {})
        problem = _content_problem(saved, restored.state, data_state, meta)
        if problem:
            return None, problem
        self.last_verified_step = step
        return (restored.state, data_state, meta), ""

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """Restores (state, data_state, meta) of `step` (default: the latest) and verifies its fingerprint.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `sharding=` for the *current* mesh; the
        state comes back on those shardings. Raises `CheckpointError` (folder, step, reason) when the step
        cannot be read or does not verify.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        restored, reason = self._restore_step(abstract_state, step)
        if restored is None:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} {reason}", fix=_STATE_MISMATCH_FIX)
        return restored

    def _newest_restorable(self, abstract_state: Any) -> tuple[int, tuple[Any, dict, dict], list[int]] | None:
        """(step, restored triple, newer steps that failed) for the newest step that restores and verifies.

        None when there are no steps; `CheckpointError` listing every step's reason when none restores.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        failures: list[tuple[int, str]] = []
        for step in steps:
            restored, reason = self._restore_step(abstract_state, step)
            if restored is not None:
                return step, restored, [s for s, _ in failures]
            log.warning("checkpoint step %d %s; trying an older step", step, reason)
            failures.append((step, reason))
        by_reason: dict[str, list[int]] = {}
        for step, reason in failures:
            by_reason.setdefault(reason, []).append(step)
        listed = "; ".join(f"step{'s' * (len(s) > 1)} {', '.join(map(str, s))}: {r}" for r, s in by_reason.items())
        raise CheckpointError(f"no checkpoint in {self.directory} could be restored: {listed}", fix=_STATE_MISMATCH_FIX)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
        """Resumes from the newest step that restores and verifies: `(step, state, data_state, meta)`.

        Steps that fail (unreadable, truncated or missing files, shape mismatch, fingerprint mismatch) are
        logged in one line each and moved to `<directory>.unusable/<step>`, so the run's later saves of those
        step numbers do not collide. Returns None only when there are no checkpoint steps at all; raises
        `CheckpointError` naming every step's reason when steps exist but none restores (never a silent
        fresh start).
        """
        found = self._newest_restorable(abstract_state)
        if found is None:
            return None
        step, (state, data_state, meta), failed = found
        if failed:
            self._move_aside(failed)
        return step, state, data_state, meta

    def newest_verified_step(self, abstract_state: Any) -> int | None:
        """The newest step that restores and verifies (read back onto `abstract_state`'s shardings), or None.

        For messages that must name a checkpoint known to be good (the NaN stop). Reads whole steps, so it
        needs device memory for one more copy of the state: drop a state that is being discarded first.
        """
        try:
            found = self._newest_restorable(abstract_state)
        except CheckpointError:
            return None
        return None if found is None else found[0]

    def _move_aside(self, steps: list[int]) -> None:
        target = f"{self.directory}.unusable"
        if jax.process_index() == 0:
            os.makedirs(target, exist_ok=True)
            for step in steps:
                dest = os.path.join(target, str(step))
                if os.path.exists(dest):
                    dest = f"{dest}.{int(time.time())}"
                shutil.move(os.path.join(self.directory, str(step)), dest)
                log.warning("moved unusable checkpoint step %d to %s", step, dest)
        multihost_utils.sync_global_devices("caig_jax.checkpoint.move_aside")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def checkpoint_dir(path: str) -> str:
    """The checkpoints folder of a training workdir (`<path>/checkpoints`), or `path` when it is one."""
    nested = os.path.join(path, "checkpoints")
    return nested if files.isdir(nested) else path


def restore_params(path: str, model: nnx.Module, mesh, *, trainable: Any = nnx.Param, step: int | None = None):
    """Reads only the trained parameters of a training checkpoint (no optimizer state) onto `mesh`, verified.

    Args:
      path: a training workdir (holding `checkpoints/`) or a `checkpoints/` folder.
      model: the module to fill, concrete or abstract (`parallel.abstract_module`): the parameters selected by
        `trainable` are read from the checkpoint and placed by their logical axes on `mesh` (any mesh, not
        necessarily the one that saved them); the rest (a frozen tower the run rebuilt) is kept as it is.
      trainable: the nnx filter of the parameters the run trained (`trainers.trainer.trainable_filter`).
      step: the checkpoint step (default: the latest).

    Returns:
      (model with the restored parameters, step). Raises `CheckpointError` when the step lacks a parameter of
      `model`'s trained set or its parameters do not match the step's fingerprint.
    """
    directory = checkpoint_dir(path)
    if not files.isdir(directory):
        raise CheckpointError(f"{path!r} holds no checkpoints (expected a training workdir or its checkpoints/)")
    manager = ocp.CheckpointManager(directory, item_names=("state", "data", "meta", "fingerprint"),
                                    options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    try:
        available = manager.all_steps()
        if not available or (step is not None and step not in available):
            raise CheckpointError(f"{directory} has no checkpoint for step {step}; it has {sorted(available)}")
        step = max(available) if step is None else step
        graphdef, params, rest = nnx.split(model, trainable, ...)
        shardings = parallel.state_shardings(params, mesh)
        abstract = {"params": jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)}
        saved = manager.restore(step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore())).fingerprint
        expected = {k: v for k, v in dict(saved or {}).get("leaves", {}).items() if k.startswith("params/")}
        missing = sorted(set(_layouts(abstract)) - set(expected))
        if missing:
            raise CheckpointError(f"checkpoint step {step} in {directory} does not hold {len(missing)} parameters this "
                                  f"model trains (first {missing[0]})", fix=_STATE_MISMATCH_FIX)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True))).state
    finally:
        manager.close()
    got = fingerprint(restored)
    bad = [p for p in got if got[p] != expected[p]]
    if bad:
        raise CheckpointError(f"checkpoint step {step} in {directory} does not verify: {len(bad)} parameters differ "
                              f"from their fingerprint, first {bad[0]}", fix=_STATE_MISMATCH_FIX)
    leftover = [p for p, v in nnx.to_flat_state(rest) if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if leftover:
        raise CheckpointError(f"restore_params: {len(leftover)} parameters of the abstract model are not in the "
                              f"checkpoint (e.g. {'/'.join(map(str, leftover[0]))}); pass a concrete model holding them")
    return nnx.merge(graphdef, restored["params"], rest), step
