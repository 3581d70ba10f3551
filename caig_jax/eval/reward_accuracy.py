"""Pairwise reward-model evaluation: accuracy with confidence intervals, the CTR head, the oracle, reports.

Pure numpy/scipy on per-pair arrays (no model code), so the training job, the evaluation sweep and a
notebook all compute the same numbers:

    metrics = pairwise_metrics(cls_logits, ctr_pred, labels, logged_ctrs, categories, true_ctrs)
    caig_jax.eval.report.write_report(metrics, "runs/reward_tiny", title="Reward model on held-out products")

Conventions (from CAIG's code): label 0 = the left image has the higher logged CTR; the model decides
"left" iff `cls_logits[:, 0] >= cls_logits[:, 1]` (ties go left); the CTR head decides "left" iff
`ctr_pred[:, 0] >= ctr_pred[:, 1]`; on the synthetic marketplace the true order is "left" iff
`true_ctr[:, 0] >= true_ctr[:, 1]` (`caig_jax.objectives.reward.prefers_left`, the one rule).

Every number in the returned dict is a Python float/int/bool (or None where undefined, e.g. a correlation
of a constant), so it goes straight to JSON and to the trainer's metric writer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from caig_jax.objectives.reward import prefers_left

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
TARGET_FRACTION = 0.8  # target: accuracy - 0.5 >= 0.8 * (oracle - 0.5)


class PairMetrics(dict):
    """The metrics dict, plus the per-pair arrays it was computed from in `.predictions` (for plots).

    A plain dict for everything else (JSON, `.items()`, the metric writer); `.predictions` is not serialised.
    """

    predictions: dict[str, np.ndarray] | None = None


# ================================================================================================
# Statistics.
# ================================================================================================
def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (well behaved at 0%, 100% and small n).

    `(p + z^2/2n -/+ z * sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`; (0, 1) when n == 0.
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _proportion(correct: np.ndarray) -> dict[str, Any]:
    n, k = int(correct.size), int(np.sum(correct))
    lo, hi = wilson_interval(k, n)
    return {"accuracy": k / n if n else None, "ci": [lo, hi], "correct": k, "n": n}


def correlations(x: np.ndarray, y: np.ndarray) -> tuple[float | None, float | None]:
    """(Pearson, Spearman) of two arrays (flattened); None where undefined (< 2 points or a constant input)."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None, None
    return float(stats.pearsonr(x, y).statistic), float(stats.spearmanr(x, y).statistic)


def prob_left(cls_logits: np.ndarray) -> np.ndarray:
    """float64[N]: P(left better) = softmax(logits)[0] = sigmoid(logit[0] - logit[1])."""
    margin = np.asarray(cls_logits, np.float64)[:, 0] - np.asarray(cls_logits, np.float64)[:, 1]
    return 0.5 * (1.0 + np.tanh(0.5 * margin))  # numerically stable sigmoid


def calibration_bins(cls_logits: np.ndarray, labels: np.ndarray, num_bins: int = 10) -> dict[str, np.ndarray]:
    """Reliability-diagram data for P(left better): per equal-width bin the mean predicted probability,
    the observed frequency of "left better" (label 0) and the count. Empty bins hold NaN means.
    """
    p = prob_left(cls_logits)
    left = (np.asarray(labels) == 0).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, num_bins - 1)
    counts = np.bincount(which, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(which, weights=p, minlength=num_bins) / counts
        freq = np.bincount(which, weights=left, minlength=num_bins) / counts
    return {"edges": edges, "mean_predicted": mean_p, "observed": freq, "counts": counts}


def expected_calibration_error(cls_logits: np.ndarray, labels: np.ndarray, num_bins: int = 10) -> float:
    """Sum over bins of |observed - predicted| weighted by the bin's share of pairs."""
    b = calibration_bins(cls_logits, labels, num_bins)
    used = b["counts"] > 0
    weights = b["counts"][used] / b["counts"].sum()
    return float(np.sum(weights * np.abs(b["observed"][used] - b["mean_predicted"][used])))


# ================================================================================================
# Metrics.
# ================================================================================================
def _check_inputs(cls_logits, ctr_pred, labels, logged_ctrs, categories, true_ctrs):
    cls_logits = np.asarray(cls_logits, np.float64)
    ctr_pred = np.asarray(ctr_pred, np.float64)
    logged_ctrs = np.asarray(logged_ctrs, np.float64)
    labels = np.asarray(labels)
    n = labels.shape[0] if labels.ndim == 1 else -1
    if n <= 0:
        raise ValueError(f"labels must be a non-empty int[N] array, got shape {labels.shape}")
    for name, x in (("cls_logits", cls_logits), ("ctr_pred", ctr_pred), ("logged_ctrs", logged_ctrs)):
        if x.shape != (n, 2):
            raise ValueError(f"{name} must be float[N, 2] with N={n} (the number of labels), got shape {x.shape}")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError(f"labels must be 0 (left better) or 1 (right better); got values {np.unique(labels)[:10]}")
    if not np.all(np.isfinite(cls_logits)):
        raise ValueError("cls_logits contain NaN/inf: the model's outputs are broken")
    if categories is not None:
        categories = np.asarray([c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in categories])
        if categories.shape != (n,):
            raise ValueError(f"categories must be a list of N={n} strings, got {categories.shape[0]}")
    if true_ctrs is not None:
        true_ctrs = np.asarray(true_ctrs, np.float64)
        if true_ctrs.shape != (n, 2):
            raise ValueError(f"true_ctrs must be float[N, 2] with N={n}, got shape {true_ctrs.shape}")
    return cls_logits, ctr_pred, labels.astype(np.int64), logged_ctrs, categories, true_ctrs


def pairwise_metrics(
    cls_logits,
    ctr_pred,
    labels,
    logged_ctrs,
    categories: Sequence[str] | None = None,
    true_ctrs=None,
) -> PairMetrics:
    """Every reward-model number of the issue, from per-pair arrays.

    Args:
      cls_logits: float[N, 2] classification logits (left better, right better).
      ctr_pred: float[N, 2] the CTR head's [left, right] predictions.
      labels: int[N], 0 = the left image has the higher logged CTR.
      logged_ctrs: float[N, 2] logged [left, right] CTRs.
      categories: optional N product categories (per-category accuracy).
      true_ctrs: optional float[N, 2] true CTRs of the synthetic world (NaN rows, as in real logs, are ignored;
        all-NaN means unknown).

    Returns:
      PairMetrics (a dict) with
        n, accuracy, accuracy_ci [lo, hi] (95% Wilson), correct;
        per_category {name: {accuracy, ci, correct, n}} (when categories are given);
        ctr_accuracy, ctr_accuracy_ci: the CTR head's own ordering accuracy against the labels;
        ctr_pearson, ctr_spearman: predicted vs logged CTR over all 2N values; ctr_diff_pearson,
        ctr_diff_spearman: predicted vs logged within-pair difference (left - right); ctr_mse;
        calibration_ece: expected calibration error of P(left better) (10 bins);
      and when true CTRs are known:
        n_true, oracle_accuracy, oracle_accuracy_ci: how often the logged label agrees with the true order;
        accuracy_vs_true, accuracy_vs_true_ci: the model's decision against the true order;
        margin_true_pearson, margin_true_spearman: reward margin (logit[0] - logit[1]) vs true CTR difference;
        target_threshold (0.5 + 0.8 * (oracle - 0.5)) and target_met (accuracy - 0.5 >= 0.8 * (oracle - 0.5)).
      `.predictions` holds the input arrays (for plots).
    """
    cls_logits, ctr_pred, labels, logged_ctrs, categories, true_ctrs = _check_inputs(
        cls_logits, ctr_pred, labels, logged_ctrs, categories, true_ctrs
    )
    n = labels.shape[0]
    decision = np.where(prefers_left(cls_logits[:, 0], cls_logits[:, 1]), 0, 1)
    correct = decision == labels
    overall = _proportion(correct)
    m = PairMetrics(n=n, accuracy=overall["accuracy"], accuracy_ci=overall["ci"], correct=overall["correct"])

    if categories is not None:
        m["per_category"] = {str(c): _proportion(correct[categories == c]) for c in sorted(set(categories.tolist()))}

    ctr_decision = np.where(prefers_left(ctr_pred[:, 0], ctr_pred[:, 1]), 0, 1)
    ctr = _proportion(ctr_decision == labels)
    m["ctr_accuracy"], m["ctr_accuracy_ci"] = ctr["accuracy"], ctr["ci"]
    m["ctr_pearson"], m["ctr_spearman"] = correlations(ctr_pred, logged_ctrs)
    m["ctr_diff_pearson"], m["ctr_diff_spearman"] = correlations(
        ctr_pred[:, 0] - ctr_pred[:, 1], logged_ctrs[:, 0] - logged_ctrs[:, 1]
    )
    m["ctr_mse"] = float(np.mean((ctr_pred - logged_ctrs) ** 2))
    m["calibration_ece"] = expected_calibration_error(cls_logits, labels)

    known = None
    if true_ctrs is not None:
        known = np.all(np.isfinite(true_ctrs), axis=1)
        if not known.any():
            known = None
    if known is not None:
        t = true_ctrs[known]
        true_decision = np.where(prefers_left(t[:, 0], t[:, 1]), 0, 1)
        oracle = _proportion(true_decision == labels[known])
        vs_true = _proportion(decision[known] == true_decision)
        m["n_true"] = int(known.sum())
        m["oracle_accuracy"], m["oracle_accuracy_ci"] = oracle["accuracy"], oracle["ci"]
        m["accuracy_vs_true"], m["accuracy_vs_true_ci"] = vs_true["accuracy"], vs_true["ci"]
        margin = cls_logits[known, 0] - cls_logits[known, 1]
        m["margin_true_pearson"], m["margin_true_spearman"] = correlations(margin, t[:, 0] - t[:, 1])
        m["target_threshold"] = 0.5 + TARGET_FRACTION * (oracle["accuracy"] - 0.5)
        m["target_met"] = bool(overall["accuracy"] - 0.5 >= TARGET_FRACTION * (oracle["accuracy"] - 0.5))
    else:
        m["oracle_accuracy"] = None
        m["target_met"] = None

    m.predictions = {
        "cls_logits": cls_logits,
        "ctr_pred": ctr_pred,
        "labels": labels,
        "logged_ctrs": logged_ctrs,
        **({"categories": categories} if categories is not None else {}),
        **({"true_ctrs": true_ctrs} if true_ctrs is not None and known is not None else {}),
    }
    return m


# ================================================================================================
# Markdown.
# ================================================================================================
def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _ci(ci: Sequence[float] | None) -> str:
    return "—" if ci is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def fmt_number(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _yes_no(x: bool | None) -> str:
    return "—" if x is None else ("yes" if x else "no")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def compare_runs(metrics_by_name: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table with one row per run (e.g. `point_weight=0.5` vs `point_weight=0.0`), same columns."""
    header = ["run", "n", "accuracy", "95% CI", "CTR-head accuracy", "CTR Pearson", "CTR Spearman", "ECE",
              "oracle", "accuracy vs true", "margin–true Spearman", "target met"]
    rows = []
    for name, m in metrics_by_name.items():
        rows.append([
            name, m.get("n", "—"), _pct(m.get("accuracy")), _ci(m.get("accuracy_ci")), _pct(m.get("ctr_accuracy")),
            fmt_number(m.get("ctr_pearson")), fmt_number(m.get("ctr_spearman")),
            fmt_number(m.get("calibration_ece")), _pct(m.get("oracle_accuracy")), _pct(m.get("accuracy_vs_true")),
            fmt_number(m.get("margin_true_spearman")),
            _yes_no(m.get("target_met")),
        ])
    return _table(header, rows)


def report_markdown(metrics: Mapping[str, Any], *, title: str, plots: Mapping[str, str] | None = None,
                    extra_sections: Mapping[str, str] | None = None) -> str:
    """The report's markdown (paths in `plots` are written relative to the report)."""
    m, plots = metrics, dict(plots or {})
    out = [f"# {title}", ""]
    out += ["## Overall", "", _table(["metric", "value"], [
        ["pairs", m["n"]],
        ["pairwise accuracy", f"{_pct(m['accuracy'])} (95% CI {_ci(m['accuracy_ci'])}; {m['correct']}/{m['n']})"],
        ["decision rule", "left iff logit[0] >= logit[1]"],
        ["calibration error (ECE, 10 bins)", fmt_number(m.get("calibration_ece"))],
    ]), ""]
    if m.get("per_category"):
        out += ["## Per category", "", _table(["category", "pairs", "accuracy", "95% CI"], [
            [c, v["n"], _pct(v["accuracy"]), _ci(v["ci"])] for c, v in m["per_category"].items()
        ]), ""]
    out += ["## CTR head", "", _table(["metric", "value"], [
        ["ordering accuracy (ctr[0] >= ctr[1] vs label)",
         f"{_pct(m['ctr_accuracy'])} (95% CI {_ci(m['ctr_accuracy_ci'])})"],
        ["Pearson, predicted vs logged CTR (2N values)", fmt_number(m.get("ctr_pearson"))],
        ["Spearman, predicted vs logged CTR (2N values)", fmt_number(m.get("ctr_spearman"))],
        ["Pearson, within-pair difference (left - right)", fmt_number(m.get("ctr_diff_pearson"))],
        ["Spearman, within-pair difference (left - right)", fmt_number(m.get("ctr_diff_spearman"))],
        ["MSE", fmt_number(m.get("ctr_mse"), 6)],
    ]), ""]
    if m.get("oracle_accuracy") is not None:
        gap, need = m["accuracy"] - 0.5, TARGET_FRACTION * (m["oracle_accuracy"] - 0.5)
        out += ["## Synthetic world: oracle and true CTRs", "", _table(["metric", "value"], [
            ["pairs with known true CTRs", m["n_true"]],
            ["oracle accuracy (logged label agrees with the true CTR order)",
             f"{_pct(m['oracle_accuracy'])} (95% CI {_ci(m['oracle_accuracy_ci'])})"],
            ["model accuracy against the TRUE order",
             f"{_pct(m['accuracy_vs_true'])} (95% CI {_ci(m['accuracy_vs_true_ci'])})"],
            ["Pearson, reward margin vs true CTR difference", fmt_number(m.get("margin_true_pearson"))],
            ["Spearman, reward margin vs true CTR difference", fmt_number(m.get("margin_true_spearman"))],
        ]), ""]
        out += ["## Target", "", "accuracy - 0.5 >= 0.8 * (oracle - 0.5)", "", _table(["", "value"], [
            ["accuracy - 0.5", f"{100 * gap:.1f} points"],
            ["0.8 * (oracle - 0.5)", f"{100 * need:.1f} points (accuracy >= {_pct(m['target_threshold'])})"],
            ["target met", f"**{_yes_no(m['target_met'])}**"],
        ]), ""]
    for heading, body in (extra_sections or {}).items():
        out += [f"## {heading}", "", body.rstrip(), ""]
    if plots:
        out += ["## Plots", ""]
        for name, path in plots.items():
            out += [f"### {name.replace('_', ' ')}", "", f"![{name}]({path})", ""]
    return "\n".join(out).rstrip() + "\n"


def to_jsonable(x: Any) -> Any:
    """Numpy scalars -> Python, non-finite floats -> None (strict JSON has no NaN)."""
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    return x
