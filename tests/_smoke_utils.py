"""Shared helpers for the foundation tests: build the smoke config and read back trained params."""

import importlib.util
import os

import numpy as np
from flax import nnx

from caig_jax.metrics import read_jsonl
from caig_jax.jobs import smoke
from caig_jax.trainers.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_file(name: str, arg: str | None):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.get_config(arg)


def smoke_config(mesh=None, **train):
    _, c = load_config_file("smoke", "tiny")
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.async_checkpoints = True
    for k, v in train.items():
        if k.startswith("model_"):
            setattr(c.model, k[6:], v)
        else:
            setattr(c.train, k, v)
    if mesh:
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh.get("data", 1), mesh.get("fsdp", 1), mesh.get("tensor", 1)
    return c


def losses(workdir):
    return np.array([r["train/loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r])


def trained_params(config, workdir, mesh):
    """Restores the latest checkpoint of `workdir` into a trainer on `mesh`; returns {path: np.ndarray}."""
    model = smoke.build_model(config, mesh)
    trainer = Trainer(config, workdir, mesh, model, smoke.mse_loss)
    trainer.restore()
    params = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(trainer.state["params"])}
    shardings = {"/".join(map(str, p)): v.get_value().sharding for p, v in nnx.to_flat_state(trainer.state["params"])}
    trainer.close()
    return params, shardings, trainer
