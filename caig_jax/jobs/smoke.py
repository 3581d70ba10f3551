"""`smoke` job: the smallest real training job, exercising the whole foundation end to end.

A small MLP (`caig_jax.models.mlp`, logical axes `embed`/`mlp`, optionally LoRA-adapted) regresses a fixed
random non-linear function of its input (`caig_jax.data.regression`). Data are generated deterministically
from (seed, batch index), so a run can be interrupted and resumed to bit-identical parameters. It runs the
engine's default loop: sharded init on the mesh, jitted donated steps, gradient accumulation, warmup+cosine,
clipping, frozen subtrees / LoRA, Orbax checkpoints with the data position, TensorBoard + JSONL metrics,
progress bar, evaluation.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from caig_jax import parallel
from caig_jax.config_checks import Checks, common_checks, train_checks
from caig_jax.data.regression import RegressionData
from caig_jax.models.lora import apply_lora
from caig_jax.models.mlp import MLP
from caig_jax.trainers.trainer import Trainer

log = logging.getLogger(__name__)


def mse_loss(model: MLP, batch, rng):
    del rng
    pred = model(batch["x"])
    loss = jnp.mean((pred.astype(jnp.float32) - batch["y"]) ** 2)
    return loss, {"mse": loss}


def build_model(config: ml_collections.ConfigDict, mesh) -> MLP:
    m = config.model
    model = parallel.sharded_init(
        lambda: MLP(m.d_in, m.d_hidden, m.d_out, m.num_layers, rngs=nnx.Rngs(config.seed)), mesh
    )
    if m.lora_rank:
        apply_lora(model, rank=m.lora_rank, alpha=m.lora_alpha, target=m.lora_target, seed=config.seed)
    return model


def validate(config: ml_collections.ConfigDict) -> None:
    """Types and ranges of every key the job reads (`caig_jax.config_checks`); raises `ConfigError`."""
    checks = Checks(config)
    common_checks(checks)
    shape = checks.mesh(devices=jax.device_count())
    train_checks(checks, batch_shards=shape[0] * shape[1] if shape else None, processes=jax.process_count())
    for key in ("d_in", "d_out", "d_hidden", "num_layers"):
        checks.integer(f"model.{key}", min=1)
    checks.integer("model.lora_rank", min=0)
    checks.number("model.lora_alpha", min=0, min_open=True)
    checks.string("model.lora_target")
    checks.done()


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    validate(config)
    mesh = parallel.make_mesh(config.mesh.to_dict())
    log.info("mesh: %s", dict(mesh.shape))
    model = build_model(config, mesh)
    data = RegressionData(config.model.d_in, config.model.d_out, config.train.batch_size, config.seed)
    held_out = data.batch(index=-1, size=256)  # never a training index

    def evaluate(model, step):
        pred = model(jnp.asarray(held_out["x"]))
        return {"mse": float(jnp.mean((pred - held_out["y"]) ** 2))}

    trainer = Trainer(config, workdir, mesh, model, mse_loss)
    result = trainer.train(data, eval_fn=evaluate)
    trainer.close()
    report = {"step": result.step, **result.metrics}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        print(json.dumps(report, indent=2))
    return report
