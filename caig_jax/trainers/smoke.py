"""`smoke` job: the smallest real training job, exercising the whole foundation end to end.

A small MLP (logical axes `embed`/`mlp`, optionally LoRA-adapted) regresses a fixed random non-linear
function of its input. Data are generated deterministically from (seed, batch index), so a run can be
interrupted and resumed to bit-identical parameters. It runs the generic trainer: sharded init on the
mesh, jitted donated steps, gradient accumulation, warmup+cosine, clipping, frozen subtrees / LoRA,
Orbax checkpoints with the data position, TensorBoard + JSONL metrics, progress bar, evaluation.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from caig_jax import parallel
from caig_jax.models import layers
from caig_jax.models.lora import apply_lora
from caig_jax.trainers.trainer import Trainer

log = logging.getLogger(__name__)


class MLP(nnx.Module):
    """`float32[B, d_in] -> float32[B, d_out]`: Linear -> GELU -> (Linear -> GELU)* -> Linear."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, num_layers: int, *, rngs: nnx.Rngs):
        self.inp = layers.linear(d_in, d_hidden, ("embed_no_fsdp", "mlp"), rngs=rngs)
        self.hidden = nnx.List(
            [layers.linear(d_hidden, d_hidden, ("mlp", "embed"), rngs=rngs) for _ in range(num_layers)]
        )
        self.out = layers.linear(d_hidden, d_out, ("mlp", "embed_no_fsdp"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.inp(x))
        for layer in self.hidden:
            h = jax.nn.gelu(layer(h))
        return self.out(h)


class RegressionData:
    """Batches `{'x': float32[b, d_in], 'y': float32[b, d_out]}` with y = tanh(x @ W1) @ W2 + noise.

    Batch `i` depends only on (seed, i); `b` is this host's share of the global batch.
    """

    def __init__(self, d_in: int, d_out: int, global_batch: int, seed: int, noise: float = 0.01):
        rng = np.random.default_rng(10_000 + seed)
        self.w1 = rng.normal(size=(d_in, 32)).astype(np.float32) / np.sqrt(d_in)
        self.w2 = rng.normal(size=(32, d_out)).astype(np.float32) / np.sqrt(8.0)
        self.d_in, self.global_batch, self.seed, self.noise = d_in, global_batch, seed, noise
        self.index = 0
        self.local = global_batch // jax.process_count()

    def batch(self, index: int, size: int | None = None) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, index + 1])  # index -1 is the held-out set
        x = rng.normal(size=(size or self.global_batch, self.d_in)).astype(np.float32)
        y = np.tanh(x @ self.w1) @ self.w2 + self.noise * rng.normal(size=(x.shape[0], self.w2.shape[1]))
        return {"x": x, "y": y.astype(np.float32)}

    def __next__(self) -> dict[str, np.ndarray]:
        full = self.batch(self.index)
        self.index += 1
        start = jax.process_index() * self.local
        return {k: v[start : start + self.local] for k, v in full.items()}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
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
