"""The reward model as the engine trains and loads it: construction from a run config, the loss, loading.

    model = build_model(config, llava_config, mesh)           # pretrained folder or tiny random, LoRA by config
    loss_fn = make_loss_fn(config.loss.point_weight)          # CE + point_weight * MSE at the last non-pad token
    model, config = load_trained(workdir, mesh)               # a training workdir's latest (or given) step

`config` is a reward run's config (`configs/reward.py`); its inputs come from `caig_jax.data.reward_inputs`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from caig_jax import parallel
from caig_jax.checkpoint import restore_params
from caig_jax.data.loader import resize_pair
from caig_jax.data.reward_inputs import build_inputs, pair_model_inputs
from caig_jax.models import attention
from caig_jax.models.llava import LlavaConfig, set_remat, set_scan
from caig_jax.models.lora import apply_lora
from caig_jax.models.processing import LlavaInputs
from caig_jax.models.reward import RewardModel, predict_batch
from caig_jax.models.reward import from_pretrained as reward_from_pretrained
from caig_jax.objectives.reward import reward_loss
from caig_jax.trainers.trainer import trainable_filter


def build_model(config: ml_collections.ConfigDict, llava_config: LlavaConfig, mesh) -> RewardModel:
    """The reward model on `mesh`: pretrained (heads loaded, or initialised when the folder has none) or a
    randomly initialised tiny model born sharded; LoRA adapters on the LLM when `model.lora_rank` > 0."""
    dtype = jnp.dtype(config.model.dtype)
    if config.model.pretrained:
        model = reward_from_pretrained(config.model.pretrained, dtype=dtype, mesh=mesh,
                                       init_missing_heads=True, seed=config.seed)
    else:
        model = parallel.sharded_init(lambda: RewardModel(llava_config, rngs=nnx.Rngs(config.seed), dtype=dtype), mesh)
    set_remat(model.backbone, config.model.get("remat_policy", "none"))
    attention.configure(model, config.model.get("attention", "auto"), mesh, dtype)
    set_scan(model.backbone, config.model.get("scan_layers", False))
    if config.model.lora_rank:
        apply_lora(model.backbone.language_model, rank=config.model.lora_rank, alpha=config.model.lora_alpha,
                   target=config.model.lora_target, seed=config.seed)
    return model


def make_loss_fn(point_weight: float):
    """The engine's `loss_fn(model, batch, rng)` for reward batches (`caig_jax.data.reward_inputs`)."""

    def loss_fn(model, batch, rng):
        del rng
        cls_logits, ctr_pred = model(
            batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
            image_layout=batch["image_layout"],
        )
        return reward_loss(cls_logits, ctr_pred, batch["label"], batch["ctr"], point_weight)

    return loss_fn


def load_trained(workdir: str, mesh, step: int | None = None) -> tuple[RewardModel, ml_collections.ConfigDict]:
    """(reward model with the trained parameters of `step` (default: latest), run config) of a reward training
    workdir, on `mesh` (any mesh). Only parameters are read (no optimizer state); the untrained rest (a frozen
    tower) is rebuilt as the run built it. The returned config has `workdir` set (pair_batches needs it)."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{workdir} is not a reward training workdir (no config.json)")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    config.workdir = workdir
    _, llava_config = build_inputs(config, workdir, config.data.dir)
    model = build_model(config, llava_config, mesh)
    train = config.train
    trained = trainable_filter(train.trainable, tuple(train.freeze), tuple(train.extra_trainable))
    model, _ = restore_params(workdir, model, mesh, trainable=trained, step=step)
    return model, config


def judge_pairs(model: RewardModel, config: ml_collections.ConfigDict, inputs: LlavaInputs, llava_config: LlavaConfig,
                left_ads: Sequence[np.ndarray], right_ads: Sequence[np.ndarray], captions: Sequence[str],
                categories: Sequence[str], attributes: Sequence[str], mesh, *, batch_size: int = 64) -> np.ndarray:
    """The RM's verdict on ad pairs of the same products: `cls_logits` float32[N, 2] (left better, right better;
    `objectives.reward.prefers_left` decides), for left and right ads uint8[H, W, 3] (any size; each is resized
    to the run's `data.image_size` and put side by side, as the training pairs were). `config` and `inputs` are
    the reward run's (`load_trained` / `data.reward_inputs.build_inputs`); this process's rows only."""
    size = config.data.image_size
    pairs = np.stack([resize_pair(np.concatenate([np.asarray(a), np.asarray(b)], axis=1), size)
                      for a, b in zip(left_ads, right_ads, strict=True)])
    rows = []
    for start in range(0, len(pairs), batch_size):
        part = slice(start, start + batch_size)
        batch = pair_model_inputs(pairs[part], captions[part], categories[part], attributes[part], inputs,
                                  llava_config, config.model.max_text_len)
        padded, n = parallel.pad_to_multiple(batch, parallel.num_batch_shards(mesh) // jax.process_count())
        rows.append(predict_batch(model, padded, mesh)["cls_logits"][:n])
    return np.concatenate(rows, axis=0)
