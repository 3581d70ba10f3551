"""CTR-driven preference optimisation of the Prompt Model: DPO plus CAIG's product-centric PCPO.

With sequence log-probabilities summed over the response tokens (`sequence_logps`), pi the policy, ref the fixed
reference (the SFT Prompt Model), y+ / y- the chosen / rejected prompts, x the product and x^ the corrupted
product (CAIG paper; shared/DESIGN.md section 2):

  L_DPO  = -log sigmoid(beta * [(log pi(y+|x) - log ref(y+|x)) - (log pi(y-|x) - log ref(y-|x))])
  L_PCPO = -log sigmoid(beta * [(log pi(y+|x) - log pi(y+|x^)) - (log ref(y+|x) - log ref(y+|x^))])
  L      = mean(L_DPO) + w * mean(L_PCPO),   beta = 0.5 for both, w = 1.0 (w = 0 is plain DPO)

`-log sigmoid(z)` is computed as `-jax.nn.log_sigmoid(z)` (a softplus): finite, with exact gradients, for any z;
`log(sigmoid(z))` would give -inf and NaN gradients in float32 once z falls below about -88 (exp(-z) overflows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from caig_jax.objectives.sft import token_logps


def sequence_logps(logits, labels, loss_mask):
    """Sum of the labels' log-probabilities over the masked (response) positions, float32[B].

    Inputs as in `caig_jax.objectives.sft.sft_loss`: logits float[B, T, V]; labels int[B, T] aligned with the
    logits, anything (-100 included) at masked-out positions; loss_mask bool or float[B, T].
    """
    return jnp.sum(token_logps(logits, labels, loss_mask), axis=-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float = 0.5):
    """DPO on sequence log-probs, all float32[B].

    Returns:
      (loss, metrics): `loss` = mean L_DPO; metrics as TRL logs them, means over the batch:
      `rewards/chosen` = beta (log pi(y+) - log ref(y+)), `rewards/rejected` likewise for y-, `rewards/margins`
      = chosen - rejected, `rewards/accuracies` = share with chosen > rejected (strict: a tie counts as wrong),
      `logps/chosen` and `logps/rejected` (the policy's), and `dpo/loss`.
    """
    pc, pr, rc, rr = (jnp.asarray(x, jnp.float32) for x in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    chosen_rewards = beta * (pc - rc)
    rejected_rewards = beta * (pr - rr)
    loss = jnp.mean(-jax.nn.log_sigmoid(chosen_rewards - rejected_rewards))
    metrics = {
        "dpo/loss": loss,
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "logps/chosen": jnp.mean(pc),
        "logps/rejected": jnp.mean(pr),
    }
    return loss, metrics


def pcpo_loss(policy_chosen, policy_corrupt, ref_chosen, ref_corrupt, *, beta: float = 0.5):
    """PCPO on sequence log-probs of the same chosen prompt y+ given x and given x^, all float32[B].

    Returns:
      (loss, metrics): `loss` = mean L_PCPO; metrics, means over the batch: `pcpo/loss`, `pcpo/margin` =
      beta ((log pi(y+|x) - log pi(y+|x^)) - (log ref(y+|x) - log ref(y+|x^))), the argument of the sigmoid,
      and `pcpo/accuracy` = share with margin > 0 (the policy ties y+ to the true product more than ref does).
    """
    pc, pcor, rc, rcor = (jnp.asarray(x, jnp.float32) for x in (policy_chosen, policy_corrupt, ref_chosen, ref_corrupt))
    margin = beta * ((pc - pcor) - (rc - rcor))
    loss = jnp.mean(-jax.nn.log_sigmoid(margin))
    metrics = {
        "pcpo/loss": loss,
        "pcpo/margin": jnp.mean(margin),
        "pcpo/accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
    }
    return loss, metrics


def preference_loss(policy_chosen, policy_rejected, policy_corrupt, ref_chosen, ref_rejected, ref_corrupt, *,
                    beta: float = 0.5, pcpo_beta: float = 0.5, pcpo_weight: float = 1.0):
    """CAIG's objective `mean(L_DPO) + pcpo_weight * mean(L_PCPO)`, all inputs float32[B].

    `*_corrupt` are log-probs of the chosen prompt y+ given the corrupted product x^. With `pcpo_weight = 0`
    the loss and its gradients are plain DPO while the `pcpo/*` metrics still say how product-tied y+ is, so a
    DPO-only run can be compared with DPO + PCPO on them; a run that does not want those metrics calls
    `dpo_loss` alone and skips the corrupted forward passes.

    Returns:
      (loss, metrics): the combined loss and the metrics of `dpo_loss` and `pcpo_loss` (the trainer logs `loss`).
    """
    dpo, dpo_metrics = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta)
    pcpo, pcpo_metrics = pcpo_loss(policy_chosen, policy_corrupt, ref_chosen, ref_corrupt, beta=pcpo_beta)
    return dpo + pcpo_weight * pcpo, {**dpo_metrics, **pcpo_metrics}
