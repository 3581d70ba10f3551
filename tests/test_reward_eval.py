"""Reward-model evaluation metrics against hand-computed values; reports and plots are written and readable."""

import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from caig_jax.eval import plots, reward_accuracy
from caig_jax.eval import report as report_lib
from caig_jax.eval.reward_accuracy import pairwise_metrics, wilson_interval

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Four pairs worked by hand. Row 2 is a tie (1, 1): it must be decided "left".
LOGITS = np.array([[2.0, 1.0], [0.0, 1.0], [1.0, 1.0], [3.0, 0.0]])  # decisions: L, R, L (tie), L
LABELS = np.array([0, 1, 0, 1])  # correct: yes, yes, yes, no -> 3/4
CTR_PRED = np.array([[0.02, 0.01], [0.01, 0.03], [0.02, 0.02], [0.01, 0.02]])  # decisions L, R, L, R -> 4/4
LOGGED = np.array([[0.030, 0.020], [0.010, 0.012], [0.020, 0.019], [0.015, 0.017]])
CATS = ["a", "b", "a", "b"]
TRUE = np.array([[0.03, 0.02], [0.01, 0.02], [0.02, 0.025], [0.01, 0.02]])  # true order: L, R, R, R


def _assert_png(path):
    assert os.path.getsize(path) > 5000, f"{path} is suspiciously small"
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, f"{path} is not a PNG"
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    assert img[..., :3].std() > 0.01, f"{path} is blank"


def test_wilson_interval_known_cases():
    lo, hi = wilson_interval(3, 4)
    # (p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z = 1.96, p = 0.75, n = 4
    assert lo == pytest.approx(0.30064, abs=1e-4) and hi == pytest.approx(0.95441, abs=1e-4)
    lo, hi = wilson_interval(0, 10)  # k = 0: lower bound 0, upper z^2 / (n + z^2)
    z2 = 1.959963984540054**2
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(z2 / (10 + z2), rel=1e-9)
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(10 / (10 + z2), rel=1e-9)
    lo, hi = wilson_interval(500, 1000)  # symmetric around 0.5, close to the normal interval for large n
    assert (lo + hi) / 2 == pytest.approx(0.5) and hi - 0.5 == pytest.approx(1.96 * math.sqrt(0.25 / 1000), rel=2e-3)


def test_accuracy_ties_go_left_per_category_and_ctr_head():
    m = pairwise_metrics(LOGITS, CTR_PRED, LABELS, LOGGED, categories=CATS)
    assert m["n"] == 4 and m["correct"] == 3 and m["accuracy"] == pytest.approx(0.75)
    assert m["accuracy_ci"] == pytest.approx(list(wilson_interval(3, 4)))
    # Ties going right would make row 2 wrong (2/4); a tie with label "right" is wrong.
    tie_right = pairwise_metrics(np.array([[1.0, 1.0]]), np.zeros((1, 2)), np.array([1]), np.ones((1, 2)))
    assert tie_right["accuracy"] == 0.0
    assert m["per_category"]["a"] == {"accuracy": 1.0, "ci": list(wilson_interval(2, 2)), "correct": 2, "n": 2}
    assert m["per_category"]["b"]["accuracy"] == 0.5 and m["per_category"]["b"]["n"] == 2
    assert m["ctr_accuracy"] == 1.0 and m["ctr_accuracy_ci"] == pytest.approx(list(wilson_interval(4, 4)))
    assert m["ctr_pearson"] == pytest.approx(stats.pearsonr(CTR_PRED.ravel(), LOGGED.ravel()).statistic)
    assert m["ctr_spearman"] == pytest.approx(stats.spearmanr(CTR_PRED.ravel(), LOGGED.ravel()).statistic)
    d_pred, d_log = CTR_PRED[:, 0] - CTR_PRED[:, 1], LOGGED[:, 0] - LOGGED[:, 1]
    assert m["ctr_diff_pearson"] == pytest.approx(stats.pearsonr(d_pred, d_log).statistic)
    assert m["ctr_mse"] == pytest.approx(np.mean((CTR_PRED - LOGGED) ** 2))
    assert m["oracle_accuracy"] is None and m["target_met"] is None  # no true CTRs: no oracle, no target


def test_oracle_accuracy_vs_true_and_target():
    m = pairwise_metrics(LOGITS, CTR_PRED, LABELS, LOGGED, categories=CATS, true_ctrs=TRUE)
    # Logged labels L, R, L, R against the true order L, R, R, R: 3/4 agree.
    assert m["oracle_accuracy"] == pytest.approx(0.75) and m["n_true"] == 4
    assert m["oracle_accuracy_ci"] == pytest.approx(list(wilson_interval(3, 4)))
    # Model decisions L, R, L, L against the true order L, R, R, R: 2/4.
    assert m["accuracy_vs_true"] == pytest.approx(0.5)
    margin, true_diff = LOGITS[:, 0] - LOGITS[:, 1], TRUE[:, 0] - TRUE[:, 1]
    assert m["margin_true_pearson"] == pytest.approx(stats.pearsonr(margin, true_diff).statistic)
    assert m["margin_true_spearman"] == pytest.approx(stats.spearmanr(margin, true_diff).statistic)
    # accuracy - 0.5 = 0.25 >= 0.8 * (0.75 - 0.5) = 0.2
    assert m["target_met"] is True and m["target_threshold"] == pytest.approx(0.7)
    # Same model, a better oracle: labels L, R, R, R agree 4/4 with the truth, the model gets 2/4.
    m2 = pairwise_metrics(LOGITS, CTR_PRED, np.array([0, 1, 1, 1]), LOGGED, true_ctrs=TRUE)
    assert m2["oracle_accuracy"] == 1.0 and m2["accuracy"] == 0.5 and m2["target_met"] is False
    # NaN true CTRs (real logs) mean "unknown"; partly NaN rows are left out of the oracle only.
    unknown = pairwise_metrics(LOGITS, CTR_PRED, LABELS, LOGGED, true_ctrs=np.full((4, 2), np.nan))
    assert unknown["oracle_accuracy"] is None and unknown["target_met"] is None
    part = TRUE.copy()
    part[3] = np.nan
    m3 = pairwise_metrics(LOGITS, CTR_PRED, LABELS, LOGGED, true_ctrs=part)
    assert m3["n_true"] == 3 and m3["oracle_accuracy"] == pytest.approx(2 / 3) and m3["n"] == 4


def test_metrics_agree_with_the_training_loss_metrics():
    from caig_jax.objectives.reward import reward_loss

    rng = np.random.default_rng(0)
    logits, ctr_pred = rng.normal(size=(64, 2)).astype(np.float32), rng.uniform(size=(64, 2)).astype(np.float32)
    labels, ctrs = rng.integers(0, 2, 64).astype(np.int32), rng.uniform(size=(64, 2)).astype(np.float32)
    _, lm = reward_loss(logits, ctr_pred, labels, ctrs)
    m = pairwise_metrics(logits, ctr_pred, labels, ctrs)
    assert m["accuracy"] == pytest.approx(float(lm["accuracy"]))
    assert m["ctr_accuracy"] == pytest.approx(float(lm["ctr_accuracy"]))
    assert m["ctr_mse"] == pytest.approx(float(lm["mse"]), rel=1e-5)


def test_calibration_bins_and_ece():
    # P(left) = sigmoid(margin): margins 0 -> 0.5 (bin 5), large -> ~1 (bin 9), very negative -> ~0 (bin 0).
    logits = np.array([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [10.0, 0.0], [-10.0, 0.0]])
    labels = np.array([0, 1, 0, 0, 0])
    b = reward_accuracy.calibration_bins(logits, labels)
    assert b["counts"].tolist() == [1, 0, 0, 0, 0, 2, 0, 0, 0, 2]
    assert b["observed"][5] == 0.5 and b["observed"][9] == 1.0 and b["observed"][0] == 1.0
    p0 = 1 / (1 + math.exp(10))
    expected = (2 * 0.0 + 2 * p0 + 1 * (1 - p0)) / 5  # bins 5 and 9 nearly calibrated, bin 0 badly
    assert reward_accuracy.expected_calibration_error(logits, labels) == pytest.approx(expected, abs=1e-6)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="cls_logits must be float\\[N, 2\\]"):
        pairwise_metrics(LOGITS[:3], CTR_PRED, LABELS, LOGGED)
    with pytest.raises(ValueError, match="labels must be 0"):
        pairwise_metrics(LOGITS, CTR_PRED, np.array([0, 1, 2, 0]), LOGGED)
    with pytest.raises(ValueError, match="categories"):
        pairwise_metrics(LOGITS, CTR_PRED, LABELS, LOGGED, categories=["a"])
    with pytest.raises(ValueError, match="NaN"):
        pairwise_metrics(np.full((4, 2), np.nan), CTR_PRED, LABELS, LOGGED)
    # A constant CTR head has no correlation: None, not NaN (strict JSON).
    assert pairwise_metrics(LOGITS, np.zeros((4, 2)), LABELS, LOGGED)["ctr_pearson"] is None


@pytest.fixture(scope="module")
def synthetic_metrics():
    rng = np.random.default_rng(1)
    n = 400
    true = rng.uniform(0.01, 0.05, (n, 2))
    logged = true * (1 + 0.2 * rng.normal(size=(n, 2)))
    labels = np.where(logged[:, 0] >= logged[:, 1], 0, 1)
    logits = np.stack([300 * (true[:, 0] - true[:, 1]) + rng.normal(size=n), np.zeros(n)], axis=1)
    ctr_pred = true + 0.003 * rng.normal(size=(n, 2))
    cats = rng.choice(["home_decor", "shoes", "toys", "beauty"], n)
    return pairwise_metrics(logits, ctr_pred, labels, logged, categories=cats, true_ctrs=true)


def test_write_report_and_compare_runs(tmp_path, synthetic_metrics):
    jsonl = tmp_path / "metrics.jsonl"
    with open(jsonl, "w") as f:
        for step in range(0, 200, 10):
            f.write(json.dumps({"step": step, "time": 0.0, "train/loss": 0.7 * math.exp(-step / 100) + 0.1,
                                "train/ce": 0.69 - step / 1000, "train/accuracy": 0.5 + step / 800}) + "\n")
        f.write(json.dumps({"step": 200, "time": 0.0, "train/loss": "nan", "eval/accuracy": 0.71}) + "\n")
    m = synthetic_metrics
    other = dict(m, accuracy=0.61, target_met=False)
    table = reward_accuracy.compare_runs({"point_weight=0.5": m, "point_weight=0.0": other})
    lines = table.splitlines()
    assert len(lines) == 4 and "point_weight=0.5" in lines[2] and "61.0%" in lines[3]
    assert f"{100 * m['accuracy']:.1f}%" in lines[2]

    paths = report_lib.write_report(m, str(tmp_path / "report"), title="Toy RM",
                                         extra_sections={"Ablation": table}, metrics_jsonl=str(jsonl))
    for name in ("calibration", "ctr_scatter", "margin_vs_true", "per_category", "training_curves"):
        _assert_png(paths[name])
    md = open(paths["report.md"]).read()
    for heading in ("# Toy RM", "## Overall", "## Per category", "## CTR head", "## Synthetic world", "## Target",
                    "## Ablation", "plots/calibration.png"):
        assert heading in md, heading
    assert f"{100 * m['accuracy']:.1f}%" in md and "home_decor" in md
    # Strict JSON (no NaN tokens), and the numbers round-trip.
    report = json.loads(open(paths["report.json"]).read(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert report["metrics"]["accuracy"] == pytest.approx(m["accuracy"])
    assert report["metrics"]["per_category"]["shoes"]["n"] == m["per_category"]["shoes"]["n"]
    assert set(report["plots"]) == {"calibration", "ctr_scatter", "margin_vs_true", "per_category", "training_curves"}


def test_report_without_arrays_and_plot_errors(tmp_path, synthetic_metrics):
    plain = dict(synthetic_metrics)  # a plain dict (e.g. read back from JSON) carries no per-pair arrays
    paths = report_lib.write_report(plain, str(tmp_path), title="from JSON")
    assert "per_category" in paths and "calibration" not in paths
    with pytest.raises(ValueError, match="per_category"):
        plots.per_category_bar({"accuracy": 0.5}, str(tmp_path / "x.png"))
    with pytest.raises(FileNotFoundError):
        plots.training_curves(str(tmp_path / "missing.jsonl"), str(tmp_path / "y.png"))
