"""caig_jax.data.pairs.build_pairs: CAIG's pair rule, labels, order, bad records."""

import itertools

import numpy as np
import pytest

from caig_jax.data.pairs import PairRule, build_pairs, pair_indices


def _rec(item, image, impressions, clicks):
    return {"item_id": item, "image": image, "impressions": impressions, "clicks": clicks}


def _caig_reference(records, min_impressions=1000, min_gap=5, max_gap=20):
    """CAIG's public script, transcribed: filter by impressions, sort by CTR, keep 1+min% <= r <= 1+max%."""
    by_item = {}
    for r in records:
        by_item.setdefault(r["item_id"], []).append(r)
    out = set()
    for item, items in by_item.items():
        items = [r for r in items if r["impressions"] > min_impressions]
        if len(items) < 2:
            continue
        with_ctr = sorted(((r, r["clicks"] / r["impressions"]) for r in items), key=lambda x: x[1])
        for i in range(len(with_ctr)):
            for j in range(i + 1, len(with_ctr)):
                (r1, c1), (r2, c2) = with_ctr[i], with_ctr[j]
                if c1 == 0 or c2 == 0:
                    continue
                if 1 + min_gap * 0.01 <= c2 / c1 <= 1 + max_gap * 0.01:
                    out.add((item, r2["image"], r1["image"]))  # (item, higher, lower)
    return out


def _as_set(pairs):
    return {(p["item_id"], p["left"], p["right"]) if p["label"] == 0 else (p["item_id"], p["right"], p["left"]) for p in pairs}


def test_rule_thresholds_by_hand():
    records = [
        _rec("a", "base", 10_000, 300),  # 3.0%
        _rec("a", "r104", 10_000, 312),  # ratio 1.04 -> too close
        _rec("a", "r110", 10_000, 330),  # 1.10 -> kept with base
        _rec("a", "r125", 10_000, 375),  # 1.25 -> too far from base, 1.136 from r110 -> kept
        _rec("a", "few", 1000, 33),  # impressions == 1000: not > 1000, dropped
        _rec("a", "zero", 5000, 0),  # CTR 0: dropped
        _rec("b", "only", 5000, 150),  # an item with one creative forms no pair
    ]
    pairs = build_pairs(records)
    got = _as_set(pairs)
    assert got == {("a", "r110", "base"), ("a", "r110", "r104"), ("a", "r125", "r110")}
    for p in pairs:
        assert set(p) == {"item_id", "left", "right", "left_ctr", "right_ctr", "label"}
        assert p["label"] == (0 if p["left_ctr"] > p["right_ctr"] else 1)
    # Thresholds are configurable.
    wide = _as_set(build_pairs(records, min_impressions=999, min_ratio=1.01, max_ratio=2.0))
    assert ("a", "r125", "base") in wide and ("a", "r125", "few") in wide
    assert not any("zero" in p for p in wide)


def test_matches_caig_reference_on_random_logs():
    rng = np.random.default_rng(0)
    records = []
    for item in range(40):
        for k in range(int(rng.integers(1, 9))):
            imp = int(rng.integers(200, 20_000))
            records.append(_rec(f"i{item}", f"i{item}_{k}", imp, int(rng.binomial(imp, rng.uniform(0.0, 0.05)))))
    assert _as_set(build_pairs(records)) == _caig_reference(records)
    assert _as_set(build_pairs(records, min_ratio=1.1, max_ratio=1.5)) == _caig_reference(records, 1000, 10, 50)


def test_left_right_order_is_random_by_seed_and_deterministic():
    rng = np.random.default_rng(1)
    records = [_rec(i // 6, f"{i}", 10_000, int(300 + rng.integers(0, 60))) for i in range(600)]
    a, b, c = build_pairs(records, seed=0), build_pairs(records, seed=0), build_pairs(records, seed=1)
    assert a == b
    assert _as_set(a) == _as_set(c)
    assert [p["label"] for p in a] != [p["label"] for p in c]
    labels = np.array([p["label"] for p in a])
    assert len(labels) > 200 and 0.4 < labels.mean() < 0.6


def test_pairs_stay_within_items():
    records = [_rec("x", "x1", 5000, 100), _rec("y", "y1", 5000, 110), _rec("x", "x2", 5000, 110)]
    pairs = build_pairs(records)
    assert _as_set(pairs) == {("x", "x2", "x1")}


def test_report_counts_drop_reasons():
    records = [
        _rec("a", "1", 10_000, 300), _rec("a", "2", 10_000, 330), _rec("a", "3", 10_000, 600),
        _rec("a", "4", 10_000, 300), _rec("a", "5", 500, 10), _rec("a", "6", 5000, 0), _rec("b", "7", 5000, 10),
    ]
    pairs, report = pair_indices(records, PairRule())
    assert report["creatives"] == 7 and report["items"] == 2
    assert report["creatives_low_impressions"] == 1 and report["creatives_zero_ctr"] == 1
    assert report["items_with_fewer_than_2_creatives"] == 1
    assert report["candidate_pairs"] == 6  # C(4, 2) for item a
    assert report["pairs_tied"] == 1 and report["pairs_kept"] == 2 == len(pairs)
    assert report["pairs_ratio_above_max"] == 3 and report["pairs_ratio_below_min"] == 0


@pytest.mark.parametrize(
    "bad, match",
    [
        (_rec("a", "x", 100, 101), "clicks=101 > impressions=100"),
        (_rec("a", "x", -5, 0), "negative"),
        (_rec("a", "x", 100.5, 1), "whole number"),
        ({"item_id": "a", "image": "x", "clicks": 3}, "missing key"),
    ],
)
def test_bad_records_raise_naming_the_record(bad, match):
    records = [_rec("a", "ok", 5000, 100), bad]
    with pytest.raises((ValueError, KeyError), match=match) as e:
        build_pairs(records)
    assert "record 1" in str(e.value)


def test_rule_validates_its_thresholds():
    with pytest.raises(ValueError, match="min_ratio"):
        build_pairs([], min_ratio=1.3, max_ratio=1.2)
    assert build_pairs([]) == []


def test_image_values_pass_through_unchanged():
    arrays = [np.full((2, 2, 3), k, np.uint8) for k in range(2)]
    pairs = build_pairs([_rec("a", arrays[0], 5000, 100), _rec("a", arrays[1], 5000, 110)])
    (p,) = pairs
    hi = p["left"] if p["label"] == 0 else p["right"]
    assert hi is arrays[1]
    assert list(itertools.chain(p["left"].ravel()[:1], p["right"].ravel()[:1])) in ([0, 1], [1, 0])


def test_max_pairs_per_item_keeps_a_seeded_subset():
    rng = np.random.default_rng(2)
    records = [_rec(i // 10, f"{i}", 10_000, int(200 + rng.integers(0, 200))) for i in range(100)]
    rule = PairRule(min_ratio=1.0001, max_ratio=100.0)
    full, full_report = pair_indices(records, rule, seed=0)
    capped, report = pair_indices(records, PairRule(min_ratio=1.0001, max_ratio=100.0, max_pairs_per_item=5), seed=0)
    per_item = {}
    for p in capped:
        per_item[p.item_id] = per_item.get(p.item_id, 0) + 1
    assert set(per_item.values()) == {5} and len(per_item) == 10
    assert set(capped) <= set(full)  # same pairs, same left/right coins
    assert report["pairs_kept"] == 50 and report["pairs_over_item_cap"] == full_report["pairs_kept"] - 50
    assert capped == pair_indices(records, PairRule(min_ratio=1.0001, max_ratio=100.0, max_pairs_per_item=5), seed=0)[0]
