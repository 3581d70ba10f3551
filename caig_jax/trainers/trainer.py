"""The training engine: sharded state, a public jitted step, hooks, and a default loop built from them.

    trainer = Trainer(config, workdir, mesh, model, loss_fn)     # sharded state; nothing runs yet
    trainer.train(data, eval_fn)                                 # the default loop (resume, hooks, end eval)

A job with its own outer loop (preference rounds: sample -> render -> judge -> update) drives the same
pieces itself and keeps checkpoints, preemption-safe resume, metrics and the progress bar:

    trainer.restore()                                  # latest checkpoint: state, data position, job_state
    with trainer.session(total_steps) as session:     # SIGTERM flag, metric writer, progress bar
        while trainer.step < total_steps:
            trainer.job_state["round"] = ...          # small JSON state saved with every checkpoint
            metrics = session.run_step(batch)         # step + hooks (NaN stop, log, progress, eval, checkpoint)

State and step (MaxText / Levanter style):

    model --split--> graphdef, trainable params (nnx.State), frozen rest (nnx.State)
    state = {step, params, opt_state}                   # only the trainable set has gradients and moments
    Trainer.step(state, batch) -> (state, metrics)      # pure, jitted, donates `state`

- Optimiser: AdamW with linear warmup + cosine decay, global-norm gradient clipping (optax). Its moments get
  their parameter's sharding explicitly (`_opt_state_shardings`): left to GSPMD, `jax.jit(tx.init)` returns
  them replicated (seen on an fsdp x tensor mesh; `tests/test_trainer.py` checks every moment).
- Trainable set: `config.train.trainable` ('all' params, or 'lora' = only `nnx.LoRAParam`s) minus the
  parameter paths matching any regex in `config.train.freeze`. Frozen parameters take no gradients, no
  optimizer state and are not checkpointed (the job rebuilds them: same seed / same pretrained folder).
- Checkpoints (Orbax, async, keep-N) every `checkpoint_every` steps, at the end, and on SIGTERM (TPU
  preemption: save, then raise `Preempted`). They hold the state, the data iterator's position and the
  job's `job_state`, and restore onto the *current* mesh.
- Metrics are read back every step: the NaN/inf guard, the progress bar's input, and the host sync that keeps
  XLA:CPU's emulated collectives from piling up (see DESIGN.md section 4).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from caig_jax import parallel
from caig_jax.checkpoint import Checkpointer
from caig_jax.config_checks import ConfigError
from caig_jax.metrics import MetricWriter, Progress

log = logging.getLogger(__name__)

# loss_fn(model, batch, rng) -> (scalar loss, {name: scalar metric})
LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]
# eval_fn(model, step) -> {name: float}
EvalFn = Callable[[nnx.Module, int], Mapping[str, float]]
State = dict[str, Any]  # {'step': int32[], 'params': nnx.State, 'opt_state': optax state}


class DataIterator(Protocol):
    """Per-host batches (tree of numpy arrays, leading dim = this host's share) with a savable position."""

    def __next__(self) -> Mapping[str, np.ndarray]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class Preempted(SystemExit):
    """SIGTERM arrived; a checkpoint was saved. Exit code 143 (128 + SIGTERM) like an unhandled SIGTERM."""

    def __init__(self, step: int):
        super().__init__(143)
        self.step = step


def trainable_filter(
    trainable: str, freeze: tuple[str, ...] | list[str] = (), extra: tuple[str, ...] | list[str] = ()
) -> nnx.filterlib.Filter:
    """nnx filter of the trained parameters: (`trainable` kind or paths matching an `extra` regex) minus paths
    matching any `freeze` regex."""
    if trainable == "all":
        kind = nnx.Param
    elif trainable == "lora":
        kind = nnx.LoRAParam
    else:
        raise ValueError(f"config.train.trainable={trainable!r}: expected 'all' or 'lora'")

    def matcher(regexes):
        patterns = [re.compile(r) for r in regexes]
        return lambda path, _value: any(p.search("/".join(str(x) for x in path)) for p in patterns)

    return nnx.All(nnx.Param, nnx.Any(kind, matcher(extra)), nnx.Not(matcher(freeze)))


def make_optimizer(cfg: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW on a linear-warmup + cosine schedule, after global-norm clipping (`config.train`)."""
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.end_lr_ratio,
    )
    parts = [optax.clip_by_global_norm(cfg.clip_grad_norm)] if cfg.clip_grad_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    return optax.chain(*parts), schedule


def abstract_of(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct`s (with shardings) for a tree of arrays: a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _opt_state_shardings(tx: optax.GradientTransformation, params: Any, mesh: Mesh) -> Any:
    """Shardings of `tx.init(params)`: every parameter-shaped leaf (Adam's moments) like its parameter,
    everything else (counts) replicated."""
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    abstract = jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(
        tx, lambda _, sharding: sharding, abstract, param_shardings, transform_non_params=lambda _: replicated
    )


@dataclasses.dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]
    model: nnx.Module


class _SigtermFlag:
    """Turns SIGTERM into a flag checked after each step (main thread only; elsewhere signals stay as they are)."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint after the current step")
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Trainer:
    """Trains `model`'s trainable parameters on `mesh`.

    Args:
      config: the job config; uses `config.train` (`configs/_common.py:train_config`) and `config.seed`.
      workdir: checkpoints in `<workdir>/checkpoints`, metrics in `<workdir>/metrics.jsonl` + TensorBoard.
      mesh: the device mesh (the model's parameters must already live on it).
      model: an nnx.Module with sharded parameters (from `parallel.sharded_init` or a converter).
      loss_fn: `(model, batch, rng) -> (loss, metrics)`, pure; runs inside jit on the global batch, whose
        leaves are split over the mesh's batch axes on dim 0 (`parallel.global_batch`).

    Attributes:
      state: the current `{'step', 'params', 'opt_state'}` (sharded); `frozen`: the untrained rest.
      job_state: a small JSON-able dict saved with every checkpoint and restored by `restore` (an outer
        loop's round number, say).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str,
        mesh: Mesh,
        model: nnx.Module,
        loss_fn: LossFn,
    ):
        self.config = config
        self.workdir = workdir
        self.mesh = mesh
        self.loss_fn = loss_fn
        self.job_state: dict[str, Any] = {}
        train = config.train
        accum = train.grad_accum_steps
        shards = parallel.num_batch_shards(mesh)
        if train.batch_size % (accum * shards):
            raise ConfigError(
                f"config.train.batch_size={train.batch_size} must divide by grad_accum_steps={accum} times the "
                f"mesh's data*fsdp size={shards}"
            )
        if train.batch_size % jax.process_count():
            raise ConfigError(f"config.train.batch_size={train.batch_size} must divide by {jax.process_count()} hosts")

        self.filter = trainable_filter(train.trainable, tuple(train.freeze), tuple(train.extra_trainable))
        self.graphdef, params, self.frozen = nnx.split(model, self.filter, ...)
        self.num_trainable = sum(x.size for x in jax.tree.leaves(params))
        if self.num_trainable == 0:
            raise ValueError(
                f"no trainable parameters: trainable={train.trainable!r}, extra_trainable="
                f"{tuple(train.extra_trainable)}, freeze={tuple(train.freeze)} select nothing"
            )
        n_frozen = sum(x.size for x in jax.tree.leaves(nnx.state(self.frozen, nnx.Param)))
        log.info("parameters: %s trainable, %s frozen", f"{self.num_trainable:,}", f"{n_frozen:,}")

        self.tx, self.schedule = make_optimizer(train)
        self.state = self.init_state(params)
        self.checkpointer = Checkpointer(
            os.path.join(workdir, "checkpoints"),
            keep=train.keep_checkpoints,
            every=train.checkpoint_every,
            async_save=train.async_checkpoints,
        )
        self._jitted_step = self._build_step()
        self._data: DataIterator | None = None

    # ------------------------------------------------------------------------------------------------
    # State and the jitted step.
    # ------------------------------------------------------------------------------------------------
    def init_state(self, params: Any) -> State:
        """A fresh train state (step 0, new optimizer moments) for `params`, an nnx.State of the trainable set
        already on the mesh (e.g. from another run); the moments are created sharded like their parameters.
        Abstract `params` (`jax.ShapeDtypeStruct`s with shardings) give an abstract state: what `caig_jax.aot`
        lowers the step with."""
        replicated = NamedSharding(self.mesh, P())
        opt_shardings = _opt_state_shardings(self.tx, params, self.mesh)
        self.state_shardings = {
            "step": replicated, "params": jax.tree.map(lambda x: x.sharding, params), "opt_state": opt_shardings,
        }
        if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
            opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                     jax.eval_shape(self.tx.init, params), opt_shardings)
            return {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), "params": params,
                    "opt_state": opt_state}
        with jax.set_mesh(self.mesh):
            opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(params)
        return {"step": jax.device_put(jnp.zeros((), jnp.int32), replicated), "params": params, "opt_state": opt_state}

    def lower_step(self, batch: Mapping[str, jax.ShapeDtypeStruct]) -> jax.stages.Lowered:
        """The jitted step lowered for the current (possibly abstract) state and a batch of global shapes."""
        with jax.set_mesh(self.mesh):
            return self._jitted_step.lower(self.state, self.frozen, batch)

    def _build_step(self):
        graphdef, loss_fn, tx, schedule = self.graphdef, self.loss_fn, self.tx, self.schedule
        accum = self.config.train.grad_accum_steps
        seed = self.config.seed

        def loss_of(params, frozen, batch, rng):
            model = nnx.merge(graphdef, params, frozen)
            loss, metrics = loss_fn(model, batch, rng)
            return loss, dict(metrics)

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)

        def step(state, frozen, batch):
            rng = jax.random.fold_in(jax.random.key(seed), state["step"])
            params = state["params"]
            if accum == 1:
                (loss, metrics), grads = grad_fn(params, frozen, batch, rng)
            else:
                # [B, ...] -> [accum, B/accum, ...] taking every accum-th example, so each micro-batch
                # still spans every batch shard.
                micro = jax.tree.map(
                    lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch
                )
                shapes = jax.eval_shape(grad_fn, params, frozen, jax.tree.map(lambda x: x[0], micro), rng)
                zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

                def body(acc, inputs):
                    i, mb = inputs
                    out = grad_fn(params, frozen, mb, jax.random.fold_in(rng, i))
                    return jax.tree.map(jnp.add, acc, out), None

                ((loss, metrics), grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
                loss, metrics, grads = jax.tree.map(lambda x: x / accum, (loss, metrics, grads))
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            new_params = optax.apply_updates(params, updates)
            metrics = {
                **metrics,
                "loss": loss,
                "grad_norm": optax.global_norm(grads),
                "learning_rate": schedule(state["step"]),
            }
            return {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}, metrics

        return jax.jit(step, donate_argnums=(0,), out_shardings=(self.state_shardings, None))

    def step(self, state: State, batch: Mapping[str, jax.Array]) -> tuple[State, dict[str, jax.Array]]:
        """One optimizer step: `(state, global batch) -> (new state, metrics)`. Jitted; `state` is donated.

        `batch` leaves are global arrays on the mesh (`parallel.global_batch`). No hooks run: callers that
        want checkpoints, metrics and preemption use `session(...).run_step` or `train`.
        """
        with jax.set_mesh(self.mesh):
            return self._jitted_step(state, self.frozen, batch)

    # ------------------------------------------------------------------------------------------------
    # Checkpoints.
    # ------------------------------------------------------------------------------------------------
    @property
    def current_step(self) -> int:
        return int(self.state["step"])

    def model(self) -> nnx.Module:
        """The current model (trained params merged with the frozen rest)."""
        return nnx.merge(self.graphdef, self.state["params"], self.frozen)

    def restore(self, data: DataIterator | None = None) -> int | None:
        """Resumes from the newest checkpoint in the workdir that restores and verifies (older ones are tried
        when the newest is damaged; `Checkpointer.restore_latest`), onto the current mesh: the state, `data`'s
        position and `job_state`. Returns the restored step (None: no checkpoint, nothing changed)."""
        if data is not None:
            self._data = data
        found = self.checkpointer.restore_latest(abstract_of(self.state))
        if found is None:
            return None
        step, state, saved, meta = found
        self.state = state
        self.job_state = dict(saved.get("job", {}))
        if self._data is not None and saved.get("iterator"):
            self._data.set_state(saved["iterator"])
        log.info("resumed from %s/checkpoints step %d (saved on mesh %s)", self.workdir, step, meta.get("mesh"))
        return step

    def save(self, *, force: bool = False) -> bool:
        """Starts an async save of the state, the data position and `job_state` (on the interval, or `force`)."""
        saved = {"iterator": self._data.get_state() if self._data is not None else {}, "job": dict(self.job_state)}
        meta = {"mesh": dict(self.mesh.shape), "num_trainable": self.num_trainable}
        return self.checkpointer.save(self.current_step, self.state, saved, meta, force=force)

    # ------------------------------------------------------------------------------------------------
    # Hooks and loops.
    # ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, total_steps: int | None = None, eval_fn: EvalFn | None = None) -> Iterator["Session"]:
        """The hooks around a loop of steps: SIGTERM -> save + `Preempted`, metrics (JSONL + TensorBoard),
        progress bar, NaN stop, eval every `eval_every`, checkpoint every `checkpoint_every` and at
        `total_steps` (default `config.train.steps`). Saves in flight are finished on exit."""
        total = int(total_steps if total_steps is not None else self.config.train.steps)
        writer = MetricWriter(self.workdir, start_step=self.current_step)  # drops rows a killed run wrote past it
        progress = Progress(total, self.current_step, self.config.train.batch_size)
        try:
            with _SigtermFlag() as sigterm, jax.set_mesh(self.mesh):
                yield Session(self, total, writer, progress, sigterm, eval_fn)
        finally:
            progress.close()
            writer.close()
            self.checkpointer.wait()

    def train(self, data: DataIterator, eval_fn: EvalFn | None = None) -> TrainResult:
        """The default loop: resume, then `config.train.steps` steps over `data` with every hook, then a final
        `eval_fn` (its metrics under `eval/` in the result)."""
        total = self.config.train.steps
        self.restore(data)
        last: dict[str, float] = {}
        with self.session(total, eval_fn) as session:
            while self.current_step < total:
                last = session.run_step(next(data))
            if eval_fn is not None:
                evaluated = dict(eval_fn(self.model(), self.current_step))
                # Re-running a finished run (or one stopped after its last checkpoint) evaluates again but keeps
                # the one final row already written.
                if not session.writer.has_row(self.current_step, prefix="eval/"):
                    session.writer.write(self.current_step, evaluated, prefix="eval/")
                last.update({f"eval/{k}": v for k, v in evaluated.items()})
        return TrainResult(self.current_step, last, self.model())

    def close(self) -> None:
        self.checkpointer.close()


class Session:
    """The hooks of one loop (made by `Trainer.session`); `run_step` is the only method a loop needs."""

    def __init__(self, trainer: Trainer, total_steps: int, writer: MetricWriter, progress: Progress,
                 sigterm: _SigtermFlag, eval_fn: EvalFn | None):
        self.trainer, self.total_steps, self.writer, self.progress = trainer, total_steps, writer, progress
        self.sigterm, self.eval_fn = sigterm, eval_fn

    def run_step(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """One step on `batch` (this host's numpy share, or global `jax.Array`s already on the mesh), then the
        hooks. Returns the step's metrics as floats. Raises `NonFiniteLossError` or `Preempted`."""
        t, cfg = self.trainer, self.trainer.config.train
        t.state, metrics = t.step(t.state, parallel.global_batch(t.mesh, batch))
        step = t.current_step
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(metrics["loss"]):
            t.checkpointer.wait()
            abstract = abstract_of(t.state)
            t.state = None  # reading a checkpoint back needs the memory of one more state
            good = t.checkpointer.newest_verified_step(abstract)
            where = "no checkpoint verifies" if good is None else f"the newest verified checkpoint is step {good}"
            raise NonFiniteLossError(
                f"loss is {metrics['loss']} at step {step} (metrics: {metrics}). Training stopped; {where} in "
                f"{t.checkpointer.directory} and was not overwritten. Lower config.train.learning_rate or check the "
                "data around this step."
            )
        self.progress.update(metrics["loss"])
        if step % cfg.log_every == 0 or step == self.total_steps:
            self.writer.write(step, metrics, prefix="train/")
        if self.eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < self.total_steps:
            self.writer.write(step, self.eval_fn(t.model(), step), prefix="eval/")
        if self.sigterm.raised:
            t.save(force=True)
            t.checkpointer.wait()
            log.warning("checkpoint for step %d saved after SIGTERM; exiting", step)
            raise Preempted(step)
        if step % cfg.checkpoint_every == 0 or step == self.total_steps:
            t.save(force=step == self.total_steps)
        return metrics
