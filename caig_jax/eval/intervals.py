"""Confidence intervals that resample products (clusters), not pairs or ads.

The pairs of one product share its creatives and its click preferences, so they are not independent draws: an
interval that resamples pairs (a Wilson interval over N pairs, a pair bootstrap) is too narrow whenever a
model is right or wrong about a whole product at once. `clustered_bootstrap` resamples the products with
replacement (every pair of a drawn product comes along, a product drawn twice counts twice), recomputes the
statistic on each resample and returns the percentile interval (DESIGN.md section 5).

    lo, hi = clustered_bootstrap(lambda rows: correct[rows].mean(), products)      # any statistic of rows
    lo, hi = clustered_mean_interval(correct, products)                            # the same, vectorised
    product_bootstrap(per_product_values[, per_product_denominators])               # one entry per product

Both draw the same resamples for the same `seed`, so they give the same interval for a mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95


def _cluster_codes(clusters: Sequence) -> tuple[np.ndarray, int]:
    """int[N] cluster index per row (0..K-1, in order of first appearance of the sorted names), K."""
    clusters = np.asarray(clusters)
    if clusters.ndim != 1 or clusters.size == 0:
        raise ValueError(f"clusters must be a non-empty 1-D sequence (one product id per row); got {clusters.shape}")
    _, codes = np.unique(clusters, return_inverse=True)
    return codes.reshape(-1), int(codes.max()) + 1


def _draws(num_clusters: int, num_resamples: int, seed: int) -> np.ndarray:
    """int[R, K]: for each resample, K cluster indices drawn with replacement."""
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    return np.random.default_rng(seed).integers(0, num_clusters, size=(num_resamples, num_clusters))


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def clustered_bootstrap(
    statistic: Callable[[np.ndarray], float | None],
    clusters: Sequence,
    *,
    num_resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of `statistic` under resampling of whole clusters.

    Args:
      statistic: `rows -> value`, where `rows` is an int array of row indices (a drawn cluster's rows appear
        once per draw). None or NaN (undefined on that resample, e.g. a correlation of a constant) is skipped.
      clusters: one cluster id per row (the product of each pair); any hashable, sortable values.
      num_resamples: bootstrap resamples; each draws as many clusters as there are, with replacement.
      level: the interval's coverage (0.95: the 2.5% and 97.5% percentiles).
      seed: the resampling seed (the same seed draws the same clusters).

    Returns:
      (lo, hi); (nan, nan) when the statistic is undefined on every resample.
    """
    codes, k = _cluster_codes(clusters)
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(k + 1))
    rows_of = [order[starts[c]:starts[c + 1]] for c in range(k)]
    values = np.empty(num_resamples)
    for r, draw in enumerate(_draws(k, num_resamples, seed)):
        v = statistic(np.concatenate([rows_of[c] for c in draw]))
        values[r] = np.nan if v is None else float(v)
    return _percentiles(values, level)


def clustered_mean_interval(
    values: Sequence[float],
    clusters: Sequence,
    *,
    num_resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> tuple[float, float]:
    """`clustered_bootstrap` of the mean of per-row `values` (an accuracy: 0/1 per pair), vectorised: each
    resample's mean is sum(draws_c * sum_c) / sum(draws_c * n_c) over clusters c. Same draws, same interval."""
    values = np.asarray(values, np.float64).reshape(-1)
    codes, k = _cluster_codes(clusters)
    if codes.shape != values.shape:
        raise ValueError(f"values ({values.shape[0]}) and clusters ({codes.shape[0]}) must have one entry per row")
    sums = np.bincount(codes, weights=values, minlength=k)
    counts = np.bincount(codes, minlength=k).astype(np.float64)
    return _ratio_interval(sums, counts, num_resamples, level, seed)


def _ratio_interval(sums: np.ndarray, counts: np.ndarray, num_resamples: int, level: float, seed: int
                    ) -> tuple[float, float]:
    """Percentile interval of sum(sums) / sum(counts) over clusters resampled with `_draws`."""
    k = sums.shape[0]
    draws = _draws(k, num_resamples, seed)
    times = np.zeros((num_resamples, k))
    np.add.at(times, (np.arange(num_resamples)[:, None], draws), 1.0)
    den = times @ counts
    with np.errstate(invalid="ignore", divide="ignore"):
        return _percentiles(times @ sums / np.where(den > 0, den, np.nan), level)


def product_bootstrap(values: Sequence[float] | np.ndarray, denominators: Sequence[float] | np.ndarray | None = None,
                      *, resamples: int = 2000, level: float = DEFAULT_LEVEL, seed: int = 0
                      ) -> dict[str, float | int]:
    """Point estimate and clustered interval of `sum(values) / sum(denominators)` (default: the mean) when each
    entry is already one product's number (a product's mean CTR, or its correct tokens over its tokens).

    Returns `{"mean", "ci_low", "ci_high", "n_products"}`; NaN everywhere for no products.
    """
    num = np.asarray(values, np.float64).reshape(-1)
    den = np.ones_like(num) if denominators is None else np.asarray(denominators, np.float64).reshape(-1)
    if num.shape != den.shape:
        raise ValueError(f"{num.shape[0]} values but {den.shape[0]} denominators")
    n = num.shape[0]
    if n == 0 or den.sum() <= 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n_products": int(n)}
    low, high = _ratio_interval(num, den, resamples, level, seed)
    return {"mean": float(num.sum() / den.sum()), "ci_low": low, "ci_high": high, "n_products": int(n)}
