"""Product-clustered bootstrap intervals (resample products, not examples: the examples of one product are not
independent; shared/DESIGN.md section 5).

    product_bootstrap(values)                   # mean over products of one number per product
    product_bootstrap(num, den)                 # ratio of sums (e.g. correct tokens / tokens) over products

Both return `{"mean", "ci_low", "ci_high", "n_products"}` (the point estimate on all products, the percentile
interval of `level` from `resamples` resamples of the products with replacement, seeded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def product_bootstrap(values: Sequence[float] | np.ndarray, denominators: Sequence[float] | np.ndarray | None = None,
                      *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> dict[str, float | int]:
    """Point estimate and percentile interval of `sum(values) / sum(denominators)` (default: the mean) over
    products, one entry per product. NaN everywhere for no products."""
    num = np.asarray(values, np.float64).reshape(-1)
    den = np.ones_like(num) if denominators is None else np.asarray(denominators, np.float64).reshape(-1)
    if num.shape != den.shape:
        raise ValueError(f"{num.shape[0]} values but {den.shape[0]} denominators")
    n = num.shape[0]
    if n == 0 or den.sum() <= 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n_products": int(n)}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    dens = den[idx].sum(axis=1)
    stats = num[idx].sum(axis=1) / np.where(dens > 0, dens, np.nan)
    low, high = np.nanpercentile(stats, [50 * (1 - level), 50 * (1 + level)])
    return {"mean": float(num.sum() / den.sum()), "ci_low": float(low), "ci_high": float(high), "n_products": int(n)}
