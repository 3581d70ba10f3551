"""The generic trainer every training job runs on.

A job hands the trainer a model already placed on the mesh, a loss function, a data iterator and
(optionally) an evaluation function; the trainer owns the loop:

    model --split--> graphdef, trainable params (nnx.State), frozen rest (nnx.State)
    state = {step, params, opt_state}          # only the trainable set has gradients and optimizer state
    step  = jax.jit(pure_step, donate_argnums=0)   # gradient accumulation via lax.scan over micro-batches

- Optimiser: AdamW with linear warmup + cosine decay, global-norm gradient clipping (optax).
- Trainable set: `config.train.trainable` ('all' params, or 'lora' = only `nnx.LoRAParam`s) minus the
  parameter paths matching any regex in `config.train.freeze` (e.g. 'vision_tower').
- Checkpoints (Orbax, async, keep-N) every `checkpoint_every` steps, at the end, and on SIGTERM (TPU
  preemption: save, then raise `Preempted`). A run started on a workdir with checkpoints resumes from the
  latest one, data position included, onto the *current* mesh. Frozen parameters are not checkpointed:
  they are rebuilt by the job (same seed / same pretrained checkpoint).
- The loss is read back every step: that is the NaN/inf guard (the run stops with a clear message and the
  last good checkpoint stays untouched), the progress bar's input, and the host sync that keeps XLA:CPU's
  emulated collectives from piling up.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from caig_jax import parallel
from caig_jax.checkpoint import Checkpointer
from caig_jax.metrics import MetricWriter, Progress

log = logging.getLogger(__name__)

# loss_fn(model, batch, rng) -> (scalar loss, {name: scalar metric})
LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]
# eval_fn(model, step) -> {name: float}
EvalFn = Callable[[nnx.Module, int], Mapping[str, float]]


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


def default_train_config() -> ml_collections.ConfigDict:
    """The `config.train` section shared by every training job (jobs override values, not keys)."""
    c = ml_collections.ConfigDict()
    c.steps = 100
    c.batch_size = 8  # global batch (all hosts); must divide by the mesh's data*fsdp size and grad_accum_steps
    c.grad_accum_steps = 1
    c.learning_rate = 1e-3
    c.warmup_steps = 10
    c.end_lr_ratio = 0.0  # cosine decays to learning_rate * end_lr_ratio
    c.weight_decay = 0.0
    c.b1 = 0.9
    c.b2 = 0.999
    c.clip_grad_norm = 1.0  # 0 disables clipping
    c.trainable = "all"  # 'all' | 'lora'
    c.extra_trainable = ()  # regexes of params trained whatever `trainable` says (e.g. new heads with LoRA)
    c.freeze = ()  # regexes over '/'-joined parameter paths: matching params get no grads, no optimizer state
    c.log_every = 10
    c.eval_every = 0  # 0: only at the end
    c.checkpoint_every = 50
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    return c


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


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@dataclasses.dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]
    model: nnx.Module


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks after each step (main thread only)."""

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
    """Trains `model` in place on `mesh`.

    Args:
      config: the job config; uses `config.train` (see `default_train_config`) and `config.seed`.
      workdir: checkpoints in `<workdir>/checkpoints`, metrics in `<workdir>/metrics.jsonl` + TensorBoard.
      mesh: the device mesh (the model's parameters must already live on it).
      model: an nnx.Module with sharded parameters (from `parallel.sharded_init` or a converter).
      loss_fn: `(model, batch, rng) -> (loss, metrics)`, pure; runs inside jit on the global batch.
      batch_spec: optional tree of PartitionSpecs for batch leaves (default: dim 0 over ('data','fsdp')).
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
        self.cfg = config.train
        self.workdir = workdir
        self.mesh = mesh
        self.loss_fn = loss_fn
        accum = self.cfg.grad_accum_steps
        shards = parallel.num_batch_shards(mesh)
        if self.cfg.batch_size % (accum * shards):
            raise ValueError(
                f"config.train.batch_size={self.cfg.batch_size} must divide by grad_accum_steps={accum} times the "
                f"mesh's data*fsdp size={shards}"
            )
        if self.cfg.batch_size % jax.process_count():
            raise ValueError(f"config.train.batch_size={self.cfg.batch_size} must divide by {jax.process_count()} hosts")

        self.filter = trainable_filter(self.cfg.trainable, tuple(self.cfg.freeze), tuple(self.cfg.extra_trainable))
        self.graphdef, params, self.frozen = nnx.split(model, self.filter, ...)
        n_trainable = sum(x.size for x in jax.tree.leaves(params))
        if n_trainable == 0:
            raise ValueError(
                f"no trainable parameters: trainable={self.cfg.trainable!r}, extra_trainable="
                f"{tuple(self.cfg.extra_trainable)}, freeze={tuple(self.cfg.freeze)} select nothing"
            )
        n_frozen = sum(x.size for x in jax.tree.leaves(nnx.state(self.frozen, nnx.Param)))
        log.info("parameters: %s trainable, %s frozen", f"{n_trainable:,}", f"{n_frozen:,}")
        self.num_trainable = n_trainable

        self.tx, self.schedule = make_optimizer(self.cfg)
        param_shardings = jax.tree.map(lambda x: x.sharding, params)
        with jax.set_mesh(mesh):
            # Optimizer moments are elementwise functions of the params, so GSPMD gives them the params'
            # shardings; scalars (counts) come out replicated.
            opt_state = jax.jit(self.tx.init)(params)
        opt_shardings = jax.tree.map(lambda x: x.sharding, opt_state)
        replicated = NamedSharding(mesh, P())
        self.state = {"step": jax.device_put(jnp.zeros((), jnp.int32), replicated), "params": params, "opt_state": opt_state}
        self.state_shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings}
        self.checkpointer = Checkpointer(
            f"{workdir}/checkpoints",
            keep=self.cfg.keep_checkpoints,
            every=self.cfg.checkpoint_every,
            async_save=self.cfg.async_checkpoints,
        )
        self._step_fn = self._build_step()

    # ------------------------------------------------------------------------------------------------
    # The jitted step.
    # ------------------------------------------------------------------------------------------------
    def _build_step(self):
        graphdef, loss_fn, tx, schedule = self.graphdef, self.loss_fn, self.tx, self.schedule
        accum = self.cfg.grad_accum_steps
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
                micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)

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

    # ------------------------------------------------------------------------------------------------
    # Public API.
    # ------------------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return int(self.state["step"])

    def model(self) -> nnx.Module:
        """The current model (trained params merged with the frozen rest)."""
        return nnx.merge(self.graphdef, self.state["params"], self.frozen)

    def maybe_restore(self, data: DataIterator | None) -> int | None:
        """Resumes from the latest checkpoint in the workdir, onto the current mesh. Returns its step."""
        step = self.checkpointer.latest_step()
        if step is None:
            return None
        state, data_state, meta = self.checkpointer.restore(_abstract(self.state), step)
        self.state = state
        if data is not None and data_state:
            data.set_state(data_state)
        log.info("resumed from %s/checkpoints step %d (saved on mesh %s)", self.workdir, step, meta.get("mesh"))
        return step

    def save(self, data: DataIterator | None, *, force: bool = False) -> bool:
        meta = {"mesh": dict(self.mesh.shape), "num_trainable": self.num_trainable}
        return self.checkpointer.save(self.step, self.state, data.get_state() if data else {}, meta, force=force)

    def train(self, data: DataIterator, eval_fn: EvalFn | None = None) -> TrainResult:
        cfg = self.cfg
        self.maybe_restore(data)
        writer = MetricWriter(self.workdir)
        progress = Progress(cfg.steps, self.step, cfg.batch_size)
        last: dict[str, float] = {}
        try:
            with _SigtermFlag() as sigterm, jax.set_mesh(self.mesh):
                while self.step < cfg.steps:
                    batch = parallel.global_batch(self.mesh, next(data))
                    self.state, metrics = self._step_fn(self.state, self.frozen, batch)
                    step = self.step
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if not math.isfinite(metrics["loss"]):
                        self.checkpointer.wait()
                        good = self.checkpointer.latest_step()
                        raise NonFiniteLossError(
                            f"loss is {metrics['loss']} at step {step} (metrics: {metrics}). Training stopped; the last "
                            f"good checkpoint is step {good} in {self.checkpointer.directory} and was not overwritten. "
                            "Lower config.train.learning_rate or check the data around this step."
                        )
                    last = metrics
                    progress.update(metrics["loss"])
                    if step % cfg.log_every == 0 or step == cfg.steps:
                        writer.write(step, metrics, prefix="train/")
                    if eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                        writer.write(step, eval_fn(self.model(), step), prefix="eval/")
                    if sigterm.raised:
                        self.save(data, force=True)
                        self.checkpointer.wait()
                        log.warning("checkpoint for step %d saved after SIGTERM; exiting", step)
                        raise Preempted(step)
                    if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                        self.save(data, force=step == cfg.steps)
            if eval_fn is not None:
                last.update({f"eval/{k}": v for k, v in eval_fn(self.model(), self.step).items()})
                writer.write(self.step, {k[5:]: v for k, v in last.items() if k.startswith("eval/")}, prefix="eval/")
        finally:
            progress.close()
            writer.close()
            self.checkpointer.wait()
        return TrainResult(self.step, last, self.model())

    def close(self) -> None:
        self.checkpointer.close()
