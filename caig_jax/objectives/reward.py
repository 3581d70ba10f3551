"""CAIG's pairwise reward-model loss: `CE(cls_logits, label) + point_weight * MSE(ctr_pred, [left_ctr, right_ctr])`.

The classification head says which side of the left|right pair is better (label 0 = left has the higher
CTR, 1 = right); the CTR head regresses both raw CTRs (clicks / impressions, not log). The decision is
"left" iff `cls_logits[:, 0] >= cls_logits[:, 1]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reward_loss(cls_logits, ctr_pred, labels, ctrs, point_weight: float = 0.5):
    """CE + point_weight * MSE, in float32.

    Args:
      cls_logits: float32[B, 2] classification logits (left better, right better).
      ctr_pred: float32[B, 2] predicted [left_ctr, right_ctr].
      labels: int32[B], 0 when the left image has the higher CTR, 1 otherwise.
      ctrs: float32[B, 2] logged [left_ctr, right_ctr].
      point_weight: weight of the CTR regression term (CAIG: 0.5; 0 disables it).

    Returns:
      (loss, metrics): `loss` is the batch mean of the cross-entropy plus `point_weight` times the mean
      squared error over all 2B CTR values; metrics hold `ce`, `mse`, `accuracy` (cls decision vs label)
      and `ctr_accuracy` (does the CTR head order the pair like the label).
    """
    cls_logits = jnp.asarray(cls_logits, jnp.float32)
    ctr_pred = jnp.asarray(ctr_pred, jnp.float32)
    ctrs = jnp.asarray(ctrs, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    log_probs = jax.nn.log_softmax(cls_logits, axis=-1)
    ce = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))
    mse = jnp.mean((ctr_pred - ctrs) ** 2)
    loss = ce + point_weight * mse
    decision = jnp.where(prefers_left(cls_logits[:, 0], cls_logits[:, 1]), 0, 1)
    ctr_decision = jnp.where(prefers_left(ctr_pred[:, 0], ctr_pred[:, 1]), 0, 1)
    metrics = {
        "ce": ce,
        "mse": mse,
        "accuracy": jnp.mean((decision == labels).astype(jnp.float32)),
        "ctr_accuracy": jnp.mean((ctr_decision == labels).astype(jnp.float32)),
    }
    return loss, metrics


def prefers_left(left, right):
    """The one left|right decision rule of the project (models, oracle, reports): the left ad wins ties.

    `left`, `right`: scores of the two sides (cls logits, predicted or true CTRs), numpy or jax arrays or floats.
    Returns bool (array) `left >= right`.
    """
    return left >= right
