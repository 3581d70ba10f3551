"""The list-wise losses of the paper's reward-model baselines: VAM (WWW 2021) and CG4CTR (WWW 2024 Companion).

Both score one creative at a time and train per product over the list of its creatives. A batch holds L lists
padded to K creatives: `scores float32[L, K]`, the logged `clicks` and `impressions float32[L, K]` and
`mask bool[L, K]` (False on padding). Pure functions of arrays, in float32; padded slots never contribute.

    VAM:    s = (clicks + a) / (impressions + a + b)                    (smoothed CTR, a Beta prior)
            y = softmax(1000 * s) over the list                          (rank label)
            loss = CE(y, softmax(scores)) + 0.5 * mean (point - 100 * s)^2
    CG4CTR: c = clicks / impressions,  q = c / sum(c)                    (soft label)
            w = impressions / mean(impressions of the list)              (impression weight, mean 1 per list)
            loss = 0.9 * -sum_i w_i q_i log softmax(scores)_i + 0.1 * mean w_i (sigmoid(scores_i) - c_i)^2

CG4CTR's one scalar is the CTR logit: its sigmoid is the point prediction, its softmax over the list the
ranking (a shift of every score in a list changes the point term only). The impression weights make the
list-wise optimum softmax(scores) proportional to w_i q_i (clicks, not CTR), the price of trusting the
well-measured creatives more; the pairwise decision reads the scores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e9  # logit of a padded slot: exp() is exactly 0 in float32


def _masked_log_softmax(x, mask):
    return jax.nn.log_softmax(jnp.where(mask, x, _NEG), axis=-1)


def _list_mean(values, lists):
    """Mean over the lists that hold at least one creative (float32[L] -> scalar)."""
    lists = lists.astype(jnp.float32)
    return jnp.sum(values * lists) / jnp.maximum(jnp.sum(lists), 1.0)


def smoothed_ctr(clicks, impressions, prior_clicks: float, prior_non_clicks: float):
    """VAM's smoothed CTR `(clicks + a) / (impressions + a + b)`, elementwise."""
    clicks, impressions = jnp.asarray(clicks, jnp.float32), jnp.asarray(impressions, jnp.float32)
    return (clicks + prior_clicks) / (impressions + prior_clicks + prior_non_clicks)


def vam_loss(scores, points, clicks, impressions, mask, *, prior_clicks: float, prior_non_clicks: float,
             label_temperature: float = 1000.0, point_weight: float = 0.5, point_scale: float = 100.0):
    """VAM: list-wise CE against softmax(label_temperature * smoothed CTR) + point_weight * point MSE.

    Args:
      scores: float32[L, K] ranking scores; points: float32[L, K] the point head (predicts point_scale * CTR).
      clicks, impressions: float32[L, K] logged counts; mask: bool[L, K], False on padded slots.
      prior_clicks, prior_non_clicks: a and b of the smoothed CTR.

    Returns:
      (loss, metrics): `listwise` (mean over lists), `point` (mean squared error over the real creatives),
      `top1_accuracy` (the list's top score is its best smoothed CTR).
    """
    mask = jnp.asarray(mask, bool)
    scores, points = jnp.asarray(scores, jnp.float32), jnp.asarray(points, jnp.float32)
    s = smoothed_ctr(clicks, impressions, prior_clicks, prior_non_clicks)
    label = jnp.exp(_masked_log_softmax(label_temperature * s, mask))
    listwise = -jnp.sum(jnp.where(mask, label * _masked_log_softmax(scores, mask), 0.0), axis=-1)
    lists = jnp.any(mask, axis=-1)
    listwise = _list_mean(listwise, lists)
    count = jnp.maximum(jnp.sum(mask), 1)
    point = jnp.sum(jnp.where(mask, (points - point_scale * s) ** 2, 0.0)) / count
    loss = listwise + point_weight * point
    return loss, {"listwise": listwise, "point": point, "top1_accuracy": _top1(scores, s, mask, lists)}


def cg4ctr_loss(scores, clicks, impressions, mask, *, list_weight: float = 0.9, point_weight: float = 0.1):
    """CG4CTR: list_weight * impression-weighted soft-label CE + point_weight * impression-weighted point MSE.

    Args:
      scores: float32[L, K] CTR logits; clicks, impressions: float32[L, K]; mask: bool[L, K].

    Returns:
      (loss, metrics): `listwise` (mean over lists), `point` (weighted squared error, mean over the real
      creatives), `top1_accuracy` (the list's top score is its best logged CTR).
    """
    mask = jnp.asarray(mask, bool)
    scores = jnp.asarray(scores, jnp.float32)
    clicks, impressions = jnp.asarray(clicks, jnp.float32), jnp.asarray(impressions, jnp.float32)
    ctr = jnp.where(mask, clicks / jnp.maximum(impressions, 1.0), 0.0)
    soft = ctr / jnp.maximum(jnp.sum(ctr, axis=-1, keepdims=True), 1e-12)
    n = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1)
    mean_impressions = jnp.sum(jnp.where(mask, impressions, 0.0), axis=-1, keepdims=True) / n
    weight = jnp.where(mask, impressions / jnp.maximum(mean_impressions, 1e-12), 0.0)
    lists = jnp.any(mask, axis=-1)
    listwise = _list_mean(-jnp.sum(jnp.where(mask, weight * soft * _masked_log_softmax(scores, mask), 0.0), -1),
                          lists)
    point = jnp.sum(weight * (jax.nn.sigmoid(scores) - ctr) ** 2 * mask) / jnp.maximum(jnp.sum(mask), 1)
    loss = list_weight * listwise + point_weight * point
    return loss, {"listwise": listwise, "point": point, "top1_accuracy": _top1(scores, ctr, mask, lists)}


def _top1(scores, target, mask, lists):
    pick = jnp.argmax(jnp.where(mask, scores, _NEG), axis=-1)
    best = jnp.max(jnp.where(mask, target, -jnp.inf), axis=-1)
    hit = jnp.take_along_axis(target, pick[:, None], axis=-1)[:, 0] >= best
    return _list_mean(hit.astype(jnp.float32), lists)
