"""Masked next-token NLL: the knowledge pre-training (SFT) loss of CAIG's Prompt Model.

`loss = sum_{b,t} m[b,t] * -log softmax(logits[b,t])[labels[b,t]] / sum_{b,t} m[b,t]`, the token mean over the
whole batch, as transformers' causal-LM cross-entropy with ignored labels (-100) computes it (stage 1 of
shared/DESIGN.md section 1: supervised fine-tuning on e-commerce conversations, loss on the answer tokens).

Input conventions, shared with `caig_jax.objectives.preference`:
  * `labels` are already aligned with `logits`: label t is the target of position t (the caller shifts);
  * `loss_mask` is bool or float, 1 on the tokens that count (answer tokens), 0 elsewhere;
  * labels at masked-out positions may hold anything, -100 included: they are never gathered.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logps(logits, labels, loss_mask):
    """Log-probability of each label, float32[B, T], 0 where `loss_mask` is 0.

    Args:
      logits: float[B, T, V] (any float dtype; the softmax runs in float32).
      labels: int[B, T], label t is the target of position t.
      loss_mask: bool or float[B, T]; a float mask weights each token's log-prob.
    """
    logits = jnp.asarray(logits, jnp.float32)
    mask = jnp.asarray(loss_mask, jnp.float32)
    # Masked-out labels (-100, pad ids, anything) become index 0 so that the gather never reads out of range.
    safe_labels = jnp.where(mask != 0, jnp.asarray(labels, jnp.int32), 0)
    picked = jnp.take_along_axis(logits, safe_labels[..., None], axis=-1)[..., 0]
    # logit[label] - logsumexp(logits) is log_softmax at the label without a second [B, T, V] array.
    return (picked - jax.nn.logsumexp(logits, axis=-1)) * mask


def sft_loss(logits, labels, loss_mask):
    """Token-mean masked NLL over the whole batch.

    Args:
      logits: float[B, T, V].
      labels: int[B, T], aligned with `logits`; values at masked-out positions are ignored (-100 is fine).
      loss_mask: bool or float[B, T].

    Returns:
      (loss, metrics): `loss` float32[] is the NLL summed over masked tokens divided by their number (0 when
      the mask is all zero, with zero gradients); metrics hold `nll_sum`, `tokens` (the number of masked
      tokens, the mask's sum) and `token_accuracy` (share of masked tokens whose argmax is the label).
    """
    mask = jnp.asarray(loss_mask, jnp.float32)
    nll_sum = -jnp.sum(token_logps(logits, labels, mask))
    tokens = jnp.sum(mask)
    # An empty mask (e.g. a batch of prompts cut before the answer) divides 0 by 1 rather than by 0.
    denominator = jnp.where(tokens > 0, tokens, 1.0)
    correct = jnp.argmax(logits, axis=-1) == jnp.asarray(labels, jnp.int32)
    metrics = {
        "nll_sum": nll_sum,
        "tokens": tokens,
        "token_accuracy": jnp.sum(jnp.where(correct, mask, 0.0)) / denominator,
    }
    return nll_sum / denominator, metrics
