"""The Prompt Model (PM) as the engine trains and loads it: construction from a run config, the SFT loss, loading.

    model = build_model(config, llava_config, mesh)          # pretrained folder or tiny random; LoRA by config
    loss_fn = make_loss_fn(config.train.grad_accum_steps)    # masked next-token NLL on the assistant tokens
    model, config, inputs = load_trained(workdir, mesh)      # a training workdir's latest (or given) step

`config` is an SFT run's config (`configs/sft.py`); batches come from `caig_jax.data.sft_inputs`. What trains is
`config.train.trainable` ('all' or 'lora') minus `config.train.freeze` (CAIG: LoRA r128 a256 on every LLM linear,
vision tower and adapter frozen; see the config).
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import ml_collections
from flax import nnx

from caig_jax import parallel
from caig_jax.checkpoint import restore_params
from caig_jax.data.sft_inputs import build_inputs
from caig_jax.models import attention
from caig_jax.models.llava import LlavaConfig, LlavaModel, set_remat, set_scan
from caig_jax.models.llava import from_pretrained as llava_from_pretrained
from caig_jax.models.lora import apply_lora, lora_train_mode
from caig_jax.models.processing import LlavaInputs
from caig_jax.objectives.sft import sft_loss, token_logps
from caig_jax.trainers.trainer import trainable_filter


def build_model(config: ml_collections.ConfigDict, llava_config: LlavaConfig, mesh) -> LlavaModel:
    """The PM on `mesh`: a LLaVA(-NeXT) folder (`model.pretrained`, any layout `from_pretrained` reads) or a
    randomly initialised tiny model born sharded; LoRA adapters on the LLM when `model.lora_rank` > 0."""
    dtype = jnp.dtype(config.model.dtype)
    if config.model.pretrained:
        model = llava_from_pretrained(config.model.pretrained, dtype=dtype, mesh=mesh)
    else:
        # The init program runs once: compiling it without LLVM optimisation halves its CPU time (~9 -> ~5 s).
        model = parallel.sharded_init(lambda: LlavaModel(llava_config, rngs=nnx.Rngs(config.seed), dtype=dtype), mesh,
                                      compiler_options={"xla_backend_optimization_level": 0})
    set_scan(set_remat(model, config.model.get("remat_policy", "none")), config.model.get("scan_layers", False))
    if config.model.lora_rank:
        apply_lora(model.language_model, rank=config.model.lora_rank, alpha=config.model.lora_alpha,
                   target=config.model.lora_target, seed=config.seed, dropout=config.model.lora_dropout)
    return attention.configure(model, config.model.get("attention", "auto"), mesh, dtype)


def make_loss_fn(grad_accum_steps: int = 1):
    """The engine's `loss_fn(model, batch, rng)` for SFT batches: next-token NLL on the masked (assistant) tokens.

    The token mean is exact: with one micro-batch it is `sft_loss` on the whole (global) batch; with gradient
    accumulation the engine averages micro-batch losses, so each micro-batch returns its NLL sum times the batch's
    `loss_weight` (accum / the masked tokens of the whole global batch, from `SFTBatches(token_weights=True)`),
    whose average over the micro-batches is the global batch's token mean.
    """

    def loss_fn(model, batch, rng):
        lora_train_mode(model, rng)  # adapter dropout, when configured (a no-op otherwise)
        logits = model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                       image_layout=batch["image_layout"])
        # Position t predicts token t + 1: logits[:, :-1] against input_ids[:, 1:], masked by loss_mask[:, 1:].
        logits, labels, mask = logits[:, :-1], batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:]
        loss, metrics = sft_loss(logits, labels, mask)
        if grad_accum_steps > 1:
            weight = batch["loss_weight"][:, None]
            loss = -jnp.sum(token_logps(logits, labels, mask) * weight)
        return loss, {"token_accuracy": metrics["token_accuracy"], "tokens": metrics["tokens"]}

    return loss_fn


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} is not an SFT training workdir (no config.json)")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    config.workdir = workdir
    return config


def load_trained(workdir: str, mesh, step: int | None = None
                 ) -> tuple[LlavaModel, ml_collections.ConfigDict, LlavaInputs]:
    """(PM with the trained parameters of `step` (default: latest), run config, its inputs) of an SFT workdir, on
    `mesh` (any mesh). Only parameters are read; the untrained rest is rebuilt as the run built it (same seed or
    the same pretrained folder). LoRA adapters stay unmerged (`caig_jax.models.lora.merge_lora` folds them)."""
    config = read_run_config(workdir)
    inputs, llava_config = build_inputs(config, workdir, config.data.dir)
    model = build_model(config, llava_config, mesh)
    train = config.train
    trained = trainable_filter(train.trainable, tuple(train.freeze), tuple(train.extra_trainable))
    model, _ = restore_params(workdir, model, mesh, trainable=trained, step=step)
    return model, config, inputs
