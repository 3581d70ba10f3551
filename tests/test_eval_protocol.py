"""Issue 13's evaluation protocol: product-clustered bootstrap intervals and the headline metrics, by hand."""

import numpy as np
import pytest
from scipy import stats

from caig_jax.eval import intervals
from caig_jax.eval.reward_accuracy import (
    copeland_top1,
    pairwise_metrics,
    top1_regret,
    wilson_interval,
)


# ------------------------------------------------------------------------------------------------
# Bootstrap intervals.
# ------------------------------------------------------------------------------------------------
def test_clustered_bootstrap_resamples_products_not_pairs():
    """10 products of 100 pairs each, the model right on every pair of 5 products and wrong on every pair of
    the other 5. A resample of products has X ~ Binomial(10, 1/2) right products, so its accuracy is X / 10 and
    the 95% percentile interval is [0.2, 0.8] (P(X <= 1) = 1.1% < 2.5% < P(X <= 2) = 5.5%); pairs taken as
    independent (Wilson over 1000 pairs) would claim [0.47, 0.53]."""
    products = np.repeat([f"p{i}" for i in range(10)], 100)
    correct = np.repeat([1.0] * 5 + [0.0] * 5, 100)
    lo, hi = intervals.clustered_mean_interval(correct, products, num_resamples=4000, seed=0)
    assert (lo, hi) == (pytest.approx(0.2), pytest.approx(0.8))
    w_lo, w_hi = wilson_interval(500, 1000)
    assert 0.46 < w_lo < 0.48 and 0.52 < w_hi < 0.54
    # The generic form draws the same products and gives the same interval.
    generic = intervals.clustered_bootstrap(lambda rows: correct[rows].mean(), products, num_resamples=4000, seed=0)
    assert generic == (pytest.approx(lo), pytest.approx(hi))


def test_clustered_bootstrap_small_cases():
    # One product: every resample is that product, the interval collapses to the estimate.
    assert intervals.clustered_mean_interval([1, 0, 1, 1], ["a"] * 4, num_resamples=50) == (0.75, 0.75)
    # Two products of unequal size: a resample's mean is one of 1 (a, a), 2/6 (a, b) or 0 (b, b), never else.
    values, clusters = np.array([1, 1, 0, 0, 0, 0.0]), np.array(list("aabbbb"))
    means = set()
    intervals.clustered_bootstrap(lambda rows: means.add(round(values[rows].mean(), 9)) or 0.0, clusters,
                                  num_resamples=200, seed=1)
    assert means == {1.0, round(2 / 6, 9), 0.0}
    # Resamples where the statistic is undefined (None) are skipped; the same seed gives the same interval.
    spearman = lambda rows: stats.spearmanr(values[rows], np.arange(6)[rows]).statistic  # noqa: E731
    with np.errstate(invalid="ignore"), pytest.warns(stats.ConstantInputWarning):
        a = intervals.clustered_bootstrap(spearman, clusters, num_resamples=100, seed=3)
        b = intervals.clustered_bootstrap(spearman, clusters, num_resamples=100, seed=3)
    assert a == b and -1.0 <= a[0] <= a[1] <= 1.0
    with pytest.raises(ValueError, match="one entry per row"):
        intervals.clustered_mean_interval([1.0, 0.0], ["a"])
    with pytest.raises(ValueError, match="non-empty"):
        intervals.clustered_bootstrap(lambda rows: 0.0, [])


# ------------------------------------------------------------------------------------------------
# Top-1 regret and true-ratio agreement, worked by hand.
# ------------------------------------------------------------------------------------------------
# Product A: a1 .030, a2 .020, a3 .010. The model prefers a2 over a1, a2 over a3, a1 over a3:
#   Copeland a2 = +2, a1 = 0, a3 = -2 -> a2 (regret (.03 - .02) / .03 = 1/3).
# Product B: b2 (left) vs b1 (right), tied logits -> left wins (prefers_left): b2 .040 chosen over b1 .050
#   (regret .2).
# Product C: a cycle c1 > c2 > c3 > c1 (every Copeland score 0): the CTR head's mean prediction breaks the tie,
#   highest for c3 (.03, as good as c2): regret 0, a hit.
ITEMS = ["A", "A", "A", "B", "C", "C", "C"]
LEFT = ["a1", "a2", "a1", "b2", "c1", "c2", "c3"]
RIGHT = ["a2", "a3", "a3", "b1", "c2", "c3", "c1"]
TRUE = np.array([[.030, .020], [.020, .010], [.030, .010], [.040, .050], [.020, .030], [.030, .030], [.030, .020]])
LOGITS = np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 0.0], [0.5, 0.5], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
CTR_PRED = np.array([[.01, .02], [.02, .01], [.01, .01], [.02, .02], [.01, .01], [.01, .05], [.05, .01]])


def test_copeland_top1_and_regret_by_hand():
    decision_left = LOGITS[:, 0] >= LOGITS[:, 1]
    chosen = copeland_top1(ITEMS, LEFT, RIGHT, decision_left, CTR_PRED[:, 0], CTR_PRED[:, 1])
    assert chosen == {"A": "a2", "B": "b2", "C": "c3"}
    r = top1_regret(ITEMS, LEFT, RIGHT, TRUE, chosen)
    assert r["items"].tolist() == ["A", "B", "C"]
    assert r["relative"] == pytest.approx([1 / 3, 0.2, 0.0])
    assert r["absolute"] == pytest.approx([0.01, 0.01, 0.0])
    assert r["hit"].tolist() == [0.0, 0.0, 1.0]
    # A uniformly random pick: A (0 + 1/3 + 2/3) / 3, B (0 + .2) / 2, C (1/3 + 0 + 0) / 3.
    assert r["random"] == pytest.approx([1 / 3, 0.1, 1 / 9])
    # Copeland ties with equal point scores go to the first id in sorted order.
    assert copeland_top1(["X"], ["x2"], ["x1"], [True], [0.0], [0.0]) == {"X": "x2"}
    assert copeland_top1(["X", "X"], ["x2", "x1"], ["x1", "x2"], [True, True], [0, 0], [0, 0]) == {"X": "x1"}


def test_headline_metrics_by_hand():
    # Logged labels: the left of each pair won its logs except in pairs 0 and 3.
    labels = np.array([1, 0, 0, 1, 0, 0, 0])
    logged = np.where(labels[:, None] == 0, [[0.02, 0.01]], [[0.01, 0.02]])
    m = pairwise_metrics(LOGITS, CTR_PRED, labels, logged, true_ctrs=TRUE, items=ITEMS, left_ids=LEFT,
                         right_ids=RIGHT, num_resamples=200)
    # Decisions R L L L L L L vs labels R L L R L L L: 6/7 (the paper's metric).
    assert m["accuracy"] == pytest.approx(6 / 7) and m["products"] == 3
    # True order (left wins ties): L L L R R L L; the logged labels agree on 1, 2, 3, 5, 6 (oracle 5/7).
    assert m["oracle_accuracy"] == pytest.approx(5 / 7)
    # True ratios: 1.5, 2, 3, 1.25, 1.5, 1.0, 1.5: none in [1.05, 1.20].
    assert m["true_ratio_pairs"] == 0 and m["true_ratio_agreement"] is None and m["true_ratio_agreement_ci"] is None
    assert m["top1_regret"] == pytest.approx((1 / 3 + 0.2 + 0) / 3) and m["top1_products"] == 3
    assert m["top1_hit_rate"] == pytest.approx(1 / 3)
    assert m["top1_regret_random"] == pytest.approx((1 / 3 + 0.1 + 1 / 9) / 3)
    # The logged labels' Copeland picks: A: a2 beats a1, a2 beats a3, a1 beats a3 -> a2 (1/3); B: b1 (0);
    # C: the same cycle, logged CTR ties (.015 mean each) -> c1 (first id): (.03 - .02) / .03 = 1/3.
    assert m["top1_regret_logged"] == pytest.approx((1 / 3 + 0 + 1 / 3) / 3)
    margin, diff = LOGITS[:, 0] - LOGITS[:, 1], TRUE[:, 0] - TRUE[:, 1]
    assert m["margin_true_spearman"] == pytest.approx(stats.spearmanr(margin, diff).statistic)
    lo, hi = m["margin_true_spearman_ci"]
    assert -1 <= lo <= hi <= 1
    for key in ("accuracy_product_ci", "oracle_accuracy_product_ci", "top1_regret_ci"):
        lo, hi = m[key]
        assert 0 <= lo <= hi <= 1, key
    assert m["bootstrap"] == {"resamples": 200, "level": 0.95, "clusters": "products", "seed": 0}


def test_true_ratio_agreement_by_hand():
    # True ratios 1.10 (in), 1.15 (in), 1.30 (out), 1.01 (out), 1.12 (in); products p, p, q, q, r.
    true = np.array([[0.110, 0.100], [0.100, 0.115], [0.130, 0.100], [0.100, 0.101], [0.100, 0.112]])
    # Decisions L, L, R, R, R: against the true order L, R, L, R, R -> agree on rows 0, 3, 4; in the band 0, 4.
    logits = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    labels = np.array([0, 0, 0, 1, 1])  # logged agrees with the truth on rows 0, 2, 3, 4; in the band 0, 4
    m = pairwise_metrics(logits, np.zeros((5, 2)), labels, np.full((5, 2), 0.1), true_ctrs=true,
                         items=list("ppqqr"), left_ids=list("abcde"), right_ids=list("fghij"), num_resamples=500)
    assert m["true_ratio_pairs"] == 3
    assert m["true_ratio_agreement"] == pytest.approx(2 / 3) and m["true_ratio_oracle"] == pytest.approx(2 / 3)
    assert m["accuracy_vs_true"] == pytest.approx(3 / 5)
    # Band rows by product: p holds rows 0 (agrees) and 1 (does not), r holds row 4 (agrees); a resample of two
    # products is (p, p) -> 1/2, (p, r) -> 2/3 or (r, r) -> 1, so the interval lies in [1/2, 1].
    lo, hi = m["true_ratio_agreement_ci"]
    assert 0.5 - 1e-9 <= lo <= hi <= 1.0


def test_without_ids_only_the_product_interval():
    m = pairwise_metrics(LOGITS, CTR_PRED, np.zeros(7, int), np.full((7, 2), 0.1), items=ITEMS, num_resamples=50)
    assert m["products"] == 3 and len(m["accuracy_product_ci"]) == 2 and "top1_regret" not in m
    none = pairwise_metrics(LOGITS, CTR_PRED, np.zeros(7, int), np.full((7, 2), 0.1), true_ctrs=TRUE, items=ITEMS,
                            left_ids=LEFT, right_ids=RIGHT, num_resamples=0)
    assert none["accuracy_product_ci"] is None and none["true_ratio_agreement_ci"] is None
    assert none["margin_true_spearman_ci"] is None and none["top1_regret"] == pytest.approx((1 / 3 + 0.2) / 3)
