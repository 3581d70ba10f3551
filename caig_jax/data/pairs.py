"""CAIG's reward-pair construction from per-creative CTR logs.

The rule (CAIG's public data scripts, see shared/DESIGN.md), applied to the creatives of each item:

1. keep creatives with impressions > `min_impressions` (strictly greater, 1000 by default);
2. CTR = clicks / impressions; creatives with CTR = 0 never form a pair;
3. every pair (lo, hi) of an item's remaining creatives, with ctr_hi >= ctr_lo, is kept when
   `min_ratio <= ctr_hi / ctr_lo <= max_ratio` (1.05 and 1.20 by default);
4. each kept pair is shown left|right in a random order drawn from `seed`; label 0 = the left image has
   the higher CTR, 1 = the right one does.

Records are creatives (one dict per creative: aggregate daily rows first, as `caig_jax.data.ctr_logs`
does). The order of the output is deterministic: items in order of first appearance, pairs within an item
by ascending CTR of the lower creative, then of the higher one (CAIG's sorted double loop); one coin per
kept pair is drawn from `numpy.random.default_rng(seed)` in that order.
"""

from __future__ import annotations

import collections
import dataclasses
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

REQUIRED_KEYS = ("item_id", "image", "impressions", "clicks")


@dataclasses.dataclass(frozen=True)
class PairRule:
    """CAIG's pair thresholds (all configurable)."""

    min_impressions: int = 1000
    min_ratio: float = 1.05
    max_ratio: float = 1.20
    max_pairs_per_item: int = 0  # not CAIG's: > 0 keeps a seeded random subset of each item's kept pairs

    def __post_init__(self):
        if self.min_ratio < 1.0 or self.max_ratio < self.min_ratio:
            raise ValueError(
                f"pair rule needs 1 <= min_ratio <= max_ratio, got min_ratio={self.min_ratio}, "
                f"max_ratio={self.max_ratio}"
            )
        if self.min_impressions < 0:
            raise ValueError(f"min_impressions must be >= 0, got {self.min_impressions}")


@dataclasses.dataclass(frozen=True)
class IndexPair:
    """A kept pair as indices into the records list: `left`/`right` after the random order is drawn."""

    item_id: Any
    left: int
    right: int
    left_ctr: float
    right_ctr: float
    label: int  # 0: left has the higher CTR, 1: right has


def _count(record: Mapping[str, Any], key: str, where: str) -> int:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != int(value):
        raise ValueError(f"{where}: {key}={value!r} is not a whole number")
    value = int(value)
    if value < 0:
        raise ValueError(f"{where}: {key}={value} is negative")
    return value


def validate_record(record: Mapping[str, Any], where: str) -> tuple[int, int]:
    """Checks one creative record; returns (impressions, clicks). Raises ValueError/KeyError naming `where`."""
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise KeyError(f"{where}: missing key(s) {missing}; a record needs {list(REQUIRED_KEYS)}")
    impressions = _count(record, "impressions", where)
    clicks = _count(record, "clicks", where)
    if clicks > impressions:
        raise ValueError(f"{where}: clicks={clicks} > impressions={impressions}")
    return impressions, clicks


def pair_indices(
    records: Sequence[Mapping[str, Any]],
    rule: PairRule = PairRule(),
    seed: int = 0,
) -> tuple[list[IndexPair], dict[str, int]]:
    """Applies CAIG's rule to `records`; returns the kept pairs and a report of counts and drop reasons.

    Report keys: creatives, items, creatives_low_impressions (<= min_impressions), creatives_zero_ctr,
    items_with_fewer_than_2_creatives (after the impressions filter), candidate_pairs (pairs of eligible
    creatives of one item), pairs_tied (equal CTR), pairs_ratio_below_min, pairs_ratio_above_max,
    pairs_over_item_cap (with `max_pairs_per_item`), pairs_kept. Zero-CTR creatives are dropped with the reason `creatives_zero_ctr` and form no candidates.
    """
    by_item: dict[Any, list[int]] = collections.OrderedDict()
    ctrs = np.zeros(len(records), np.float64)
    report = collections.Counter(creatives=len(records))
    for index, record in enumerate(records):
        impressions, clicks = validate_record(record, f"record {index}")
        by_item.setdefault(record["item_id"], [])
        if impressions <= rule.min_impressions:
            report["creatives_low_impressions"] += 1
            continue
        if clicks == 0:
            report["creatives_zero_ctr"] += 1
            continue
        ctrs[index] = clicks / impressions
        by_item[record["item_id"]].append(index)
    report["items"] = len(by_item)

    rng = np.random.default_rng(seed)
    cap_rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), 7])  # its own stream: coins stay the same
    pairs: list[IndexPair] = []
    for item_id, members in by_item.items():
        if len(members) < 2:
            report["items_with_fewer_than_2_creatives"] += 1
            continue
        item_start = len(pairs)
        members = sorted(members, key=lambda i: ctrs[i])  # stable: ties keep their input order
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                lo, hi = members[a], members[b]
                report["candidate_pairs"] += 1
                ratio = ctrs[hi] / ctrs[lo]
                if ratio == 1.0:
                    report["pairs_tied"] += 1
                elif ratio < rule.min_ratio:
                    report["pairs_ratio_below_min"] += 1
                elif ratio > rule.max_ratio:
                    report["pairs_ratio_above_max"] += 1
                else:
                    report["pairs_kept"] += 1
                    if rng.random() < 0.5:  # higher-CTR creative on the left
                        pairs.append(IndexPair(item_id, hi, lo, float(ctrs[hi]), float(ctrs[lo]), 0))
                    else:
                        pairs.append(IndexPair(item_id, lo, hi, float(ctrs[lo]), float(ctrs[hi]), 1))
        n_item = len(pairs) - item_start
        if rule.max_pairs_per_item and n_item > rule.max_pairs_per_item:
            keep = np.sort(cap_rng.choice(n_item, rule.max_pairs_per_item, replace=False))
            pairs[item_start:] = [pairs[item_start + k] for k in keep]
            report["pairs_over_item_cap"] += n_item - rule.max_pairs_per_item
    for key in (
        "creatives_low_impressions",
        "creatives_zero_ctr",
        "items_with_fewer_than_2_creatives",
        "candidate_pairs",
        "pairs_tied",
        "pairs_ratio_below_min",
        "pairs_ratio_above_max",
        "pairs_kept",
        "pairs_over_item_cap",
    ):
        report.setdefault(key, 0)
    report["pairs_kept"] -= report["pairs_over_item_cap"]
    return pairs, dict(report)


def build_pairs(
    records: Iterable[Mapping[str, Any]],
    *,
    min_impressions: int = 1000,
    min_ratio: float = 1.05,
    max_ratio: float = 1.20,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """CAIG's reward pairs from creative records.

    Args:
      records: dicts with `item_id`, `image` (any value: a path, a name, an array), `impressions` and
        `clicks` (whole numbers, 0 <= clicks <= impressions; anything else raises naming the record).
      min_impressions, min_ratio, max_ratio: the rule's thresholds (see the module docstring).
      seed: seeds the left/right order.

    Returns:
      A list of dicts `{item_id, left, right, left_ctr, right_ctr, label}`: `left`/`right` are the records'
      `image` values, `label` is 0 when the left image has the higher CTR and 1 otherwise.
    """
    records = list(records)
    rule = PairRule(min_impressions=min_impressions, min_ratio=min_ratio, max_ratio=max_ratio)
    pairs, _ = pair_indices(records, rule, seed)
    return [
        {
            "item_id": p.item_id,
            "left": records[p.left]["image"],
            "right": records[p.right]["image"],
            "left_ctr": p.left_ctr,
            "right_ctr": p.right_ctr,
            "label": p.label,
        }
        for p in pairs
    ]
