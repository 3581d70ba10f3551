"""The Prompt Model under preference optimisation: policy and reference, sequence log-probs, the DPO + PCPO loss.

    policy, sft_config, inputs = build_policy(config, mesh)    # the SFT PM (LoRA merged) + fresh LoRA adapters
    ref = reference_state(trainer)                             # the policy with its adapters at zero = the SFT PM
    logps = sequence_logps_of(trainer.graphdef, ref, trainer.frozen, batch, mesh)   # float32[B], no gradients
    loss_fn = make_loss_fn(config)                             # L = mean L_DPO + w * mean L_PCPO

The policy is the SFT PM with every LoRA it trained folded into its weights (`merge_lora`) plus new adapters on
the LLM's linear layers: only the adapters train (`train.trainable='lora'`), the vision tower and the projector
are frozen. The adapters start with B = 0, so the reference (the SFT PM, fixed for all rounds) is exactly the
policy with its adapter parameters zeroed: one model in memory, reference log-probs from the same program.

Batches (one per step) hold three sequences per example, each as the keys of
`caig_jax.data.preference_inputs.sequence_batch` with a prefix: `chosen_*` (x, y+), `rejected_*` (x, y-),
`corrupt_*` (x^, y+); and the reference's log-probs `ref_chosen`, `ref_rejected`, `ref_corrupt` float32[B].
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from caig_jax.checkpoint import restore_params
from caig_jax.errors import MissingPathError
from caig_jax.models import attention
from caig_jax.models.llava import LlavaModel, set_remat, set_scan
from caig_jax.models.lora import apply_lora, lora_train_mode, merge_lora
from caig_jax.models.processing import LlavaInputs
from caig_jax.objectives.preference import preference_loss, sequence_logps
from caig_jax.trainers.sft import load_trained as load_sft
from caig_jax.trainers.trainer import Trainer, trainable_filter

SEQUENCES = ("chosen", "rejected", "corrupt")
MODEL_KEYS = ("input_ids", "attention_mask", "loss_mask", "pixel_values", "image_layout")


def build_policy(config: ml_collections.ConfigDict, mesh) -> tuple[LlavaModel, ml_collections.ConfigDict,
                                                                   LlavaInputs]:
    """(policy on `mesh`, the SFT run's config, its inputs): the SFT PM of `config.sft_workdir`, LoRA merged, with
    new adapters (`config.lora`: rank, alpha, dropout, target) on the LLM."""
    model, sft_config, inputs = load_sft(config.sft_workdir, mesh)
    merge_lora(model)
    set_remat(model, config.model.remat_policy)
    attention.configure(model, config.model.attention, mesh, model.language_model.dtype)
    set_scan(model, config.model.get("scan_layers", False))
    apply_lora(model.language_model, rank=config.lora.rank, alpha=config.lora.alpha, target=config.lora.target,
               seed=config.seed, dropout=config.lora.dropout)
    return model, sft_config, inputs


def load_trained(workdir: str, mesh) -> tuple[LlavaModel, ml_collections.ConfigDict, LlavaInputs]:
    """(policy with its latest trained adapters, the preference run's config, its inputs) of a preference workdir
    on `mesh`: the SFT PM it started from is rebuilt (`build_policy`) and only the adapters are read."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise MissingPathError(f"{workdir} is not a preference training workdir (no config.json)")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    model, _, inputs = build_policy(config, mesh)
    train = config.train
    trained = trainable_filter(train.trainable, tuple(train.freeze), tuple(train.extra_trainable))
    model, _ = restore_params(workdir, model, mesh, trainable=trained)
    return model, config, inputs


def _logps(model: LlavaModel, batch, prefix: str) -> jax.Array:
    """float32[B]: sum of log p(token) over the answer tokens of the `prefix` sequences (next-token aligned)."""
    logits = model(batch[f"{prefix}_input_ids"], batch[f"{prefix}_pixel_values"],
                   attention_mask=batch[f"{prefix}_attention_mask"], image_layout=batch[f"{prefix}_image_layout"])
    return sequence_logps(logits[:, :-1], batch[f"{prefix}_input_ids"][:, 1:], batch[f"{prefix}_loss_mask"][:, 1:])


@functools.partial(jax.jit, static_argnums=(0, 4))
def _all_logps(graphdef, params, frozen, batch, prefixes):
    model = nnx.merge(graphdef, params, frozen)
    return {p: _logps(model, batch, p) for p in prefixes}


def reference_params(trainer: Trainer):
    """The trained (adapter) parameters set to zero: merged with `trainer.frozen`, the SFT PM itself."""
    return jax.tree.map(jnp.zeros_like, trainer.state["params"])


def sequence_logps_of(trainer: Trainer, params, batch, prefixes=SEQUENCES) -> dict[str, jax.Array]:
    """{prefix: float32[B]} answer log-probs under `params` (the policy's or `reference_params`), no gradients.
    `batch` leaves are global arrays on the trainer's mesh."""
    with jax.set_mesh(trainer.mesh):
        return _all_logps(trainer.graphdef, params, trainer.frozen, batch, tuple(prefixes))


def make_loss_fn(config: ml_collections.ConfigDict):
    """The engine's `loss_fn(model, batch, rng)`: `mean L_DPO + pcpo.weight * mean L_PCPO` on the batch's three
    sequences against the stored reference log-probs (`caig_jax.objectives.preference`)."""
    beta, pcpo_beta, weight = config.dpo.beta, config.pcpo.beta, config.pcpo.weight

    def loss_fn(model, batch, rng):
        lora_train_mode(model, rng)  # adapter dropout (a no-op at rate 0)
        logps = {p: _logps(model, batch, p) for p in SEQUENCES}
        # Plain DPO (weight 0) still reports the pcpo/* metrics: how tied to the product y+ has become.
        corrupt = logps["corrupt"] if weight else jax.lax.stop_gradient(logps["corrupt"])
        loss, metrics = preference_loss(logps["chosen"], logps["rejected"], corrupt, batch["ref_chosen"],
                                        batch["ref_rejected"], batch["ref_corrupt"], beta=beta, pcpo_beta=pcpo_beta,
                                        pcpo_weight=weight)
        return loss, metrics

    return loss_fn
