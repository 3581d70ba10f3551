"""Reward-model evaluation plots (matplotlib, Agg backend: no display needed). Every function writes a PNG.

    calibration_plot(cls_logits, labels, path)       reliability diagram of P(left better), with counts
    ctr_scatter(ctr_pred, logged_ctrs, path)          CTR head vs logged CTRs (all 2N values)
    margin_vs_true_plot(margins, true_diff, path)     reward margin vs true CTR difference (synthetic world)
    per_category_bar(metrics, path)                   per-category accuracy with 95% CIs
    training_curves(metrics_jsonl_path, path)         loss / accuracy over steps from a trainer's metrics.jsonl
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from caig_jax import files  # noqa: E402
from caig_jax.eval import reward_accuracy  # noqa: E402

_BLUE, _ORANGE, _GREY, _GREEN, _RED = "#1f77b4", "#ff7f0e", "#7f7f7f", "#2ca02c", "#d62728"


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3, linestyle="--")


def _save(fig, path: str) -> str:
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, dpi=120, format=os.path.splitext(path)[1].lstrip(".") or "png")
    plt.close(fig)
    files.write_atomic(path, image.getvalue())  # a local folder or a gs:// workdir
    return path


def _sample(n: int, limit: int = 20000, seed: int = 0) -> np.ndarray:
    """Indices of at most `limit` points (scatter plots of huge evaluation sets stay readable and small)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def calibration_plot(cls_logits, labels, path: str, num_bins: int = 10) -> str:
    """Reliability diagram: predicted P(left better) vs the observed share of pairs whose left side won.

    Top: observed frequency per bin (points sized by count, with 95% Wilson bars) against the diagonal;
    bottom: how many pairs fall in each bin.
    """
    b = reward_accuracy.calibration_bins(np.asarray(cls_logits), np.asarray(labels), num_bins)
    ece = reward_accuracy.expected_calibration_error(np.asarray(cls_logits), np.asarray(labels), num_bins)
    centres = 0.5 * (b["edges"][:-1] + b["edges"][1:])
    used = b["counts"] > 0
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(5.5, 6.2), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], color=_GREY, linestyle="--", linewidth=1, label="perfectly calibrated")
    left_wins = np.round(b["observed"][used] * b["counts"][used]).astype(int)
    cis = np.array([reward_accuracy.wilson_interval(k, n) for k, n in zip(left_wins, b["counts"][used])])
    obs = b["observed"][used]
    # A bin whose pairs all went one way (observed 0 or 1) can get a Wilson bound a rounding error inside the point
    # (wilson_interval(3, 3) ends at 1 - 1e-16): matplotlib refuses negative bar lengths.
    yerr = np.maximum([obs - cis[:, 0], cis[:, 1] - obs], 0.0)
    ax.errorbar(b["mean_predicted"][used], obs, yerr=yerr, fmt="none",
                ecolor=_BLUE, alpha=0.5, capsize=3)
    sizes = 20 + 180 * b["counts"][used] / max(1, b["counts"].max())
    ax.scatter(b["mean_predicted"][used], obs, s=sizes, color=_BLUE, zorder=3, label="observed (size = pairs)")
    ax.plot(b["mean_predicted"][used], obs, color=_BLUE, linewidth=1, alpha=0.6)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    _style(ax, f"Calibration of P(left better)   ECE = {ece:.3f}, n = {int(b['counts'].sum())}", "",
           "observed share: left better")
    ax.legend(loc="upper left", fontsize=8)
    axc.bar(centres, b["counts"], width=0.9 / num_bins, color=_BLUE, alpha=0.7)
    for x, c in zip(centres, b["counts"]):
        if c:
            axc.text(x, c, str(int(c)), ha="center", va="bottom", fontsize=7)
    axc.set_ylim(0, max(1, b["counts"].max()) * 1.25)
    _style(axc, "", "predicted P(left better) = softmax(cls_logits)[0]", "pairs")
    return _save(fig, path)


def ctr_scatter(ctr_pred, logged_ctrs, path: str) -> str:
    """Predicted vs logged CTR, left and right values in two colours, with the y = x line and correlations."""
    pred, logged = np.asarray(ctr_pred, np.float64), np.asarray(logged_ctrs, np.float64)
    pearson, spearman = reward_accuracy.correlations(pred, logged)
    idx = _sample(pred.shape[0])
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(logged[idx, 0], pred[idx, 0], s=10, alpha=0.5, color=_BLUE, label="left image")
    ax.scatter(logged[idx, 1], pred[idx, 1], s=10, alpha=0.5, color=_ORANGE, label="right image")
    lo = float(min(pred.min(), logged.min()))
    hi = float(max(pred.max(), logged.max()))
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color=_GREY, linestyle="--", linewidth=1, label="y = x")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    fmt = reward_accuracy.fmt_number
    stats_text = f"Pearson {fmt(pearson)}, Spearman {fmt(spearman)}"
    _style(ax, f"CTR head vs logged CTR (n = {2 * pred.shape[0]} values)\n{stats_text}",
           "logged CTR (clicks / impressions)", "predicted CTR")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def margin_vs_true_plot(margins, true_diff, path: str) -> str:
    """Reward margin (logit[0] - logit[1]) against the true CTR difference (left - right), synthetic world.

    Points are coloured by whether the model's decision agrees with the true order; the quadrants where it
    does are shaded.
    """
    margins, true_diff = np.asarray(margins, np.float64), np.asarray(true_diff, np.float64)
    pearson, spearman = reward_accuracy.correlations(margins, true_diff)
    agree = (margins >= 0) == (true_diff >= 0)
    idx = _sample(margins.shape[0])
    fig, ax = plt.subplots(figsize=(6, 5))
    xr = float(np.max(np.abs(true_diff))) * 1.1 or 1.0
    yr = float(np.max(np.abs(margins))) * 1.1 or 1.0
    ax.fill_between([0, xr], 0, yr, color=_GREEN, alpha=0.06)
    ax.fill_between([-xr, 0], -yr, 0, color=_GREEN, alpha=0.06)
    ax.axhline(0, color=_GREY, linewidth=0.8)
    ax.axvline(0, color=_GREY, linewidth=0.8)
    sel_a, sel_d = idx[agree[idx]], idx[~agree[idx]]
    ax.scatter(true_diff[sel_a], margins[sel_a], s=10, alpha=0.6, color=_GREEN,
               label=f"agrees with true order ({agree.mean():.1%})")
    ax.scatter(true_diff[sel_d], margins[sel_d], s=10, alpha=0.6, color=_RED, label="disagrees")
    ax.set_xlim(-xr, xr)
    ax.set_ylim(-yr, yr)
    _style(ax, f"Reward margin vs true CTR difference (n = {margins.size})\n"
               f"Pearson {reward_accuracy.fmt_number(pearson)}, "
               f"Spearman {reward_accuracy.fmt_number(spearman)}",
           "true CTR difference (left - right)", "reward margin logit[0] - logit[1]")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def per_category_bar(metrics: Mapping[str, Any], path: str) -> str:
    """Per-category accuracy with 95% CI error bars and pair counts; chance, overall and oracle as lines."""
    per = metrics.get("per_category") or {}
    if not per:
        raise ValueError("per_category_bar needs metrics['per_category'] (pass categories to pairwise_metrics)")
    names = list(per)
    acc = np.array([per[c]["accuracy"] for c in names])
    lo = np.array([per[c]["ci"][0] for c in names])
    hi = np.array([per[c]["ci"][1] for c in names])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(names) + 2.5), 4.5))
    x = np.arange(len(names))
    ax.bar(x, acc, color=_BLUE, alpha=0.75, yerr=[acc - lo, hi - acc], capsize=4, ecolor="black")
    for xi, c in zip(x, names):
        ax.text(xi, 0.02, f"n={per[c]['n']}", ha="center", va="bottom", fontsize=7, rotation=90, color="white")
    ax.axhline(0.5, color=_GREY, linestyle="--", linewidth=1, label="chance (50%)")
    if metrics.get("accuracy") is not None:
        ax.axhline(metrics["accuracy"], color=_ORANGE, linewidth=1.2, label=f"overall ({metrics['accuracy']:.1%})")
    if metrics.get("oracle_accuracy") is not None:
        ax.axhline(metrics["oracle_accuracy"], color=_GREEN, linestyle=":", linewidth=1.5,
                   label=f"oracle ({metrics['oracle_accuracy']:.1%})")
    ax.set_xticks(x, [n.replace("_", " ") for n in names], rotation=30, ha="right")
    ax.set_ylim(0, 1.16)  # headroom above 100% for the legend, so it never covers a bar
    ax.set_yticks(np.linspace(0, 1, 6))
    _style(ax, "Pairwise accuracy per category (95% Wilson CI)", "category", "accuracy")
    ax.legend(loc="upper center", fontsize=8, ncol=3, framealpha=0.9)
    return _save(fig, path)


def _float(v) -> float:
    try:
        return float(v)  # the metric writer stores non-finite values as strings ("nan", "inf")
    except (TypeError, ValueError):
        return math.nan


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], _float(r[key])) for r in records if key in r and "step" in r]
    if not pts:
        return np.zeros(0), np.zeros(0)
    s, v = np.array(pts, np.float64).T
    return s, v


def training_curves(metrics_jsonl_path: str, path: str) -> str:
    """Loss (left) and accuracy (right) over steps from `<workdir>/metrics.jsonl`.

    Lines are `{"step", "time", "train/loss", "train/accuracy", ..., "eval/..."}`; train series are drawn
    as thin raw lines plus a moving average, eval series as markers. Loss components (`train/ce`,
    `train/mse`) are drawn when present.
    """
    if not files.exists(metrics_jsonl_path):
        raise FileNotFoundError(f"no metrics file at {metrics_jsonl_path}")
    records = [json.loads(line) for line in files.read_text(metrics_jsonl_path).splitlines() if line.strip()]
    keys = sorted({k for r in records for k in r} - {"step", "time"})
    loss_keys = [k for k in keys if k.split("/", 1)[-1] in ("loss", "ce", "mse")]
    acc_keys = [k for k in keys if "accuracy" in k.split("/", 1)[-1] and not k.endswith(("_ci", "_lo", "_hi"))]
    if not loss_keys and not acc_keys:
        raise ValueError(f"{metrics_jsonl_path} has no loss or accuracy series (keys: {keys[:20]})")
    fig, (axl, axa) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, group in ((axl, loss_keys), (axa, acc_keys)):
        for i, key in enumerate(group):
            s, v = _series(records, key)
            if s.size == 0:
                continue
            c = colours[i % len(colours)]
            if key.startswith("train/") and s.size > 5:
                w = max(2, s.size // 20)
                smooth = np.convolve(v, np.ones(w) / w, mode="valid")
                ax.plot(s, v, color=c, alpha=0.25, linewidth=0.8)
                ax.plot(s[w - 1:], smooth, color=c, linewidth=1.8, label=f"{key} (moving avg {w})")
            else:
                ax.plot(s, v, color=c, marker="o", markersize=4, linewidth=1.2, label=key)
        ax.legend(fontsize=8)
    if acc_keys:
        axa.axhline(0.5, color=_GREY, linestyle="--", linewidth=1)
    _style(axl, "Loss", "step", "loss")
    _style(axa, "Accuracy (dashed: chance)", "step", "accuracy")
    fig.suptitle(f"Training curves: {os.path.dirname(os.path.abspath(metrics_jsonl_path))}", fontsize=9)
    return _save(fig, path)
