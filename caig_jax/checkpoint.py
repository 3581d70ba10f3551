"""Orbax checkpointing of a train state plus the data iterator position.

- `CheckpointManager` with async saves, keep-N, a save interval, and forced saves (SIGTERM / end of run).
- Orbax writes each step into a temporary folder and renames it when complete, so a process killed
  (even with SIGKILL) in the middle of a save leaves every earlier checkpoint restorable; the partial
  folder is ignored and cleaned up by the next run.
- Restores go into an *abstract* state whose leaves carry the shardings of the **current** mesh, so a run
  saved on one mesh shape (or device count) resumes on another.

The train state is an arbitrary pytree (nnx.State, optax states, ...). It is stored as a nested dict of
arrays keyed by its pytree path, which keeps checkpoints readable with plain Orbax tools.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from caig_jax import parallel

log = logging.getLogger(__name__)


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def to_nested_dict(tree: Any) -> dict:
    """Pytree -> nested dict of leaves keyed by each leaf's path (stable across processes and meshes)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = out
        names = [_key_name(p) for p in path] or ["value"]
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = leaf
    return out


def from_nested_dict(template: Any, nested: dict) -> Any:
    """Inverse of `to_nested_dict`, using `template`'s tree structure."""
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, _ in paths_leaves:
        node = nested
        for name in [_key_name(p) for p in path] or ["value"]:
            node = node[name]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


class Checkpointer:
    """Thin wrapper around `ocp.CheckpointManager` for (train state, data position, metadata) triples.

    Args:
      directory: where checkpoints live (`<workdir>/checkpoints`).
      keep: how many recent checkpoints to keep.
      every: save interval in steps (`should_save`); forced saves ignore it.
      async_save: write in a background thread while training continues.
    """

    def __init__(self, directory: str, *, keep: int = 3, every: int = 100, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(1, every),
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, meta: dict | None = None, *, force: bool = False) -> bool:
        """Starts saving (async). Returns True when a save was started."""
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(to_nested_dict(state)),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta or {}),
            ),
            force=force,
        )
        if saved:
            log.info("checkpoint save started: step %d -> %s", step, self.directory)
        return saved

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """Restores (state, data_state, meta) onto the shardings carried by `abstract_state`'s leaves.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `sharding=` for the *current* mesh.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        target = to_nested_dict(abstract_state)
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"checkpoint {self.directory}/{step} does not match the current train state "
                f"(different model config or trainable set?): {e}"
            ) from e
        state = from_nested_dict(abstract_state, restored.state)
        return state, dict(restored.data or {}), dict(restored.meta or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(path: str, model: nnx.Module, mesh, *, trainable: Any = nnx.Param, step: int | None = None):
    """Reads only the trained parameters of a training checkpoint (no optimizer state) onto `mesh`.

    Args:
      path: a training workdir (holding `checkpoints/`) or a `checkpoints/` folder.
      model: the module to fill, concrete or abstract (`parallel.abstract_module`): the parameters selected by
        `trainable` are read from the checkpoint and placed by their logical axes on `mesh` (any mesh, not
        necessarily the one that saved them); the rest (a frozen tower the run rebuilt) is kept as it is.
      trainable: the nnx filter of the parameters the run trained (`trainers.trainer.trainable_filter`).
      step: the checkpoint step (default: the latest).

    Returns:
      (model with the restored parameters, step).
    """
    directory = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{path!r} holds no checkpoints (expected a training workdir or its checkpoints/)")
    manager = ocp.CheckpointManager(directory, item_names=("state", "data", "meta"),
                                    options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    available = manager.all_steps()
    if not available or (step is not None and step not in available):
        raise FileNotFoundError(f"{directory} has no checkpoint for step {step}; it has {sorted(available)}")
    step = max(available) if step is None else step
    graphdef, params, rest = nnx.split(model, trainable, ...)
    shardings = parallel.state_shardings(params, mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
    target = {"params": to_nested_dict(abstract)}
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
    except (ValueError, KeyError) as e:
        raise ValueError(f"checkpoint {directory}/{step} does not hold the parameters this model trains "
                         f"(different model config or trainable set?): {e}") from e
    finally:
        manager.close()
    params = from_nested_dict(params, restored.state["params"])
    leftover = [p for p, v in nnx.to_flat_state(rest) if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if leftover:
        raise ValueError(f"restore_params: {len(leftover)} parameters of the abstract model are not in the checkpoint "
                         f"(e.g. {'/'.join(map(str, leftover[0]))}); pass a concrete model that holds them")
    return nnx.merge(graphdef, params, rest), step
