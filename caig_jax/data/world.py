"""Measuring the synthetic marketplace against its own truth: the world report and truth-based match rates.

`caig_jax.data.market` is the world (products, painter, hidden click model, logs); this module measures it.
`simulation.make_market` writes `world_report(...)` into the market folder (`world_report.json`,
`world_report.md`); the demo job calls `match_rate_sibling` / `match_rate_cross` with a Prompt Model's prompts.

How a prompt is scored
----------------------
The true CTR of a prompt for a product is `market.true_ctr(market.compose_ad(cutout, prompt, size, seed),
product)` with the render settings `size` and `seed` (defaults `RENDER_SIZE` = 32 px, the click model's own
resolution, and `RENDER_SEED` = 0: one fixed seed, so two equal prompts make the same ad). The click model
reads only the outer ring of the ad downsampled to 32x32, which the product never reaches (`compose_ad` fits
it in the central 78%), so that number equals `market.ctr_from_looks(look, product)` with `look` the
background look of `market.paint_background(prompt, size, seed)` *exactly* (tests check it). `PromptLooks`
paints each prompt once per (size, seed) and caches its look; every product is then scored from the cache.

Figures of the world report (`world_report`; the keys are listed in `REPORT_KEYS`)
-------------------------------------------------------------------------------
- `oracle_accuracy`: on the CAIG test pairs (impressions > 1000, CTR > 0, 1.05 <= logged ratio <= 1.20; the
  `test` split), how often the logged label agrees with the true CTR order. One comparison rule everywhere:
  `caig_jax.objectives.reward.prefers_left` (left wins ties).
- `near_tie_share`: share of those pairs whose *true* CTR ratio is < 1.02 (they pass the filter on noise).
- `true_ratio_pairs`: how many test pairs have a true ratio in [1.05, 1.20] (the pairs on which a reward
  model's agreement with the true order is measured).
- `flat_stretch_share`: share of the world's creatives on a flat stretch of the appeal curve: where the slope
  of logit(true CTR) along the steepest direction in the (scaled) look space, by central differences
  (step 1e-3), is below `FLAT_FRACTION` (0.2) of the largest slope found over all creatives. Version 2's
  `tanh` had 55-57% there (|appeal| > 0.894); version 3's distance model is flat only where the CTR clip binds.
- `exact_feature_ceiling`: a logistic regression (numpy, Newton, no intercept) on the difference of the two
  ads' exact hidden features phi = [|x|^2, x (x) one-hot(category), x . c] (32 numbers; x = the ad's look,
  c = the product colour's look, both divided by `market.look_scale()`), trained on the *train* split's CAIG
  pairs with the logged labels, scored on the test pairs: accuracy vs the logged labels, and agreement with
  the true order on all test pairs and on the true-ratio pairs. The click model's order within a product is
  the sign of a linear function of these features, so the probe measures what the logs' noise allows, not
  a capacity limit.
- `prompt_ceiling`: per product, the best prompt of `market.sample_prompt`'s grammar
  ("<colour> <material> <scene>, <lighting>, <pattern>", every part optional, a colour when the head would
  be empty: 295,920 prompts), found by a documented search: every pattern-free prompt (32,880, exhaustive),
  then the 8 patterns added to each product's `SEARCH_TOP_K` best ones; the best over the union of all
  candidates. Its true CTR is the Prompt Model's ceiling; beside it the mean true CTR of `FLOOR_PROMPTS`
  random on-brief prompts (`sample_prompt(rng, category)`) and random prompts (`sample_prompt(rng)`, the floor).
- `sibling_separability`: over every ordered pair (p, q) of distinct same-category products, the share where
  p's best prompt is *strictly* better for p than q's best prompt (a shared best prompt, or one that makes
  the same ad, is not separated), and the median CTR ratio between the two.

Truth-based match rates
-----------------------
`match_rate_sibling(products, prompts)`: for each product p and each same-category product q (both with
prompts), is the ad rendered from a prompt written for p truly better *for p* than the ad from a prompt
written for q? 1 if better, 0.5 if equal (the same ad), 0 if worse; averaged over the prompt combinations and
over q, per product; the rate is the mean over products. A prompt-writer that ignores the product scores 0.5
(exactly, if it writes the same prompt for every product; in expectation, if it samples). `match_rate_cross`
does the same with q from the other categories. Both return the per-product values so callers can
bootstrap over products.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import math
import multiprocessing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from caig_jax.data import market as market_lib
from caig_jax.data import pairs as pairs_lib
from caig_jax.objectives.reward import prefers_left

RENDER_SIZE = market_lib.CLICK_MODEL_RES  # ads are scored as rendered at this size ...
RENDER_SEED = 0  # ... with this painter seed
FLAT_FRACTION = 0.2  # a creative is on a flat stretch when its slope is < this fraction of the largest slope
FLAT_STEP = 1e-3  # central-difference step, in units of market.look_scale()
NEAR_TIE_RATIO = 1.02
TRUE_RATIO_BAND = (1.05, 1.20)
SEARCH_TOP_K = 8  # stage 2 of the oracle-prompt search: patterns added to each product's 8 best prompts
FLOOR_PROMPTS = 64  # random (on-brief) prompts per category / world for the floors
TARGETS = {  # issue 13, fixed before tuning (tiny preset): name -> (comparison, bound)
    "sibling_separability": (">=", 0.80),
    "flat_stretch_share": ("<=", 0.15),
    "near_tie_share": ("<=", 0.15),
    "exact_feature_ceiling_true_ratio_pairs": (">=", 0.95),
}
REPORT_KEYS = ("version", "click_model", "render", "splits", "test_pairs", "oracle_accuracy", "near_tie_share",
               "true_ratio_pairs", "flat_stretch_share", "flat_stretch", "exact_feature_ceiling", "prompt_ceiling",
               "sibling_separability", "targets")


# ----------------------------------------------------------------------------------------------------------
# Prompts: the grammar and a cache of painted looks
# ----------------------------------------------------------------------------------------------------------


def prompt_grammar(patterns: bool = True) -> list[str]:
    """Every prompt `market.sample_prompt` can write, in a fixed order: "<colour> <material> <scene>,
    <lighting>, <pattern>" with each part optional (a head of colour/material/scene is never empty).
    295,920 prompts; 32,880 without a pattern (`patterns=False`)."""
    v = market_lib.VOCABULARY
    heads = [" ".join(p for p in parts if p) for parts in itertools.product(
        (None,) + v["colour"], (None,) + v["material"], (None,) + v["scene"])]
    heads = [h for h in heads if h]
    tails = list(itertools.product((None,) + v["lighting"], ((None,) + v["pattern"]) if patterns else (None,)))
    return [", ".join(p for p in (h, light, pattern) if p) for h in heads for light, pattern in tails]


def _paint_looks(prompts: Sequence[str], size: int, seed: int) -> np.ndarray:
    return np.array([market_lib.background_look(market_lib.paint_background(p, size, seed)) for p in prompts],
                    np.float32).reshape(len(prompts), 3)


class PromptLooks:
    """The background look of prompts rendered at (`size`, `seed`), painted once per prompt and cached.

    `looks(prompts)` -> float32[N, 3]; `ctr(prompts, product)` -> float64[N], the true CTR of the ads (equal to
    `market.true_ctr(market.compose_ad(cutout, prompt, size, seed), product)`: see the module docstring).
    """

    def __init__(self, size: int = RENDER_SIZE, seed: int = RENDER_SEED):
        if size < market_lib.CLICK_MODEL_RES:
            raise ValueError(f"render size must be >= {market_lib.CLICK_MODEL_RES}, got {size}")
        self.size, self.seed = int(size), int(seed)
        self._cache: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def looks(self, prompts: Sequence[str], workers: int = 0) -> np.ndarray:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            if workers > 1 and len(missing) >= 2000:
                chunks = [missing[k::workers * 4] for k in range(workers * 4)]
                ctx = multiprocessing.get_context("spawn")  # the parent may hold JAX threads: never fork it
                with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                    for chunk, looks in zip(chunks, pool.map(_paint_looks, chunks, itertools.repeat(self.size),
                                                             itertools.repeat(self.seed))):
                        self._cache.update(zip(chunk, looks))
            else:
                self._cache.update(zip(missing, _paint_looks(missing, self.size, self.seed)))
        if not len(prompts):
            return np.zeros((0, 3), np.float32)
        return np.stack([self._cache[p] for p in prompts])

    def ctr(self, prompts: Sequence[str], product: market_lib.Product) -> np.ndarray:
        return market_lib.ctr_from_looks(self.looks(prompts), product)


_SHARED: dict[tuple[int, int], PromptLooks] = {}


def prompt_looks(size: int = RENDER_SIZE, seed: int = RENDER_SEED) -> PromptLooks:
    """The process-wide `PromptLooks` for (size, seed): the market build and later callers share its cache."""
    key = (int(size), int(seed))
    if key not in _SHARED:
        _SHARED[key] = PromptLooks(*key)
    return _SHARED[key]


def prompt_ctr(prompt: str, product: market_lib.Product, size: int = RENDER_SIZE, seed: int = RENDER_SEED) -> float:
    """The true CTR for `product` of the ad rendered from `prompt` at (size, seed)."""
    return float(prompt_looks(size, seed).ctr([prompt], product)[0])


# ----------------------------------------------------------------------------------------------------------
# Truth-based match rates
# ----------------------------------------------------------------------------------------------------------


def _check_distinct(products: Sequence[market_lib.Product]) -> None:
    ids = [p.id for p in products]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"products must have distinct ids (results are keyed by id); repeated: {dup[:5]}")


def _as_prompt_lists(prompts: Mapping[str, str | Sequence[str]]) -> dict[str, list[str]]:
    out = {}
    for key, value in prompts.items():
        key = key.id if isinstance(key, market_lib.Product) else str(key)
        out[key] = [value] if isinstance(value, str) else [str(v) for v in value]
        if not out[key]:
            raise ValueError(f"no prompt for product {key}")
    return out


def _match_rate(products: Sequence[market_lib.Product], prompts: Mapping[str, str | Sequence[str]], same: bool,
                size: int, seed: int, looks: PromptLooks | None) -> dict[str, Any]:
    looks = looks or prompt_looks(size, seed)
    if (looks.size, looks.seed) != (size, seed):
        raise ValueError(f"looks cache renders at {(looks.size, looks.seed)}, asked for {(size, seed)}")
    lists = _as_prompt_lists(prompts)
    _check_distinct(products)
    products = [p for p in products if p.id in lists]
    distinct = list(dict.fromkeys(q for p in products for q in lists[p.id]))
    index = {q: k for k, q in enumerate(distinct)}
    all_looks = looks.looks(distinct)
    per_product: dict[str, float] = {}
    comparisons = ties = 0
    for p in products:
        partners = [q for q in products if q.id != p.id and (q.category == p.category) == same]
        if not partners:
            continue
        ctr = market_lib.ctr_from_looks(all_looks, p)  # p's true CTR of every distinct prompt's ad
        own = ctr[[index[s] for s in lists[p.id]]]
        values = []
        for q in partners:
            other = ctr[[index[s] for s in lists[q.id]]]
            score = np.where(own[:, None] > other[None, :], 1.0, np.where(own[:, None] == other[None, :], 0.5, 0.0))
            values.append(score.mean())
            comparisons += score.size
            ties += int((score == 0.5).sum())
        per_product[p.id] = float(np.mean(values))
    rate = float(np.mean(list(per_product.values()))) if per_product else math.nan
    return {"rate": rate, "per_product": per_product, "products": len(per_product), "comparisons": comparisons,
            "tie_share": ties / comparisons if comparisons else math.nan, "render": {"size": size, "seed": seed}}


def match_rate_sibling(products: Sequence[market_lib.Product], prompts: Mapping[str, str | Sequence[str]], *,
                       size: int = RENDER_SIZE, seed: int = RENDER_SEED,
                       looks: PromptLooks | None = None) -> dict[str, Any]:
    """Truth-based product-background match between same-category products.

    Args:
      products: the products (`market.Product`); those without prompts are skipped.
      prompts: product id (or Product) -> the prompt, or a list of prompts, written for that product.
      size, seed: how the ads are rendered (`market.compose_ad(cutout, prompt, size, seed)`); the CTRs are
        computed exactly from the background's look (see the module docstring).
      looks: a `PromptLooks` to use (default: the shared cache for (size, seed)).

    Returns:
      {"rate": mean over products, "per_product": {id: value}, "products", "comparisons", "tie_share", "render"}:
      a product's value is, over its same-category siblings q and every (prompt for p, prompt for q), the mean
      of 1 if the ad from p's prompt is truly better for p than the ad from q's prompt, 0.5 if equal, else 0.
      Products without a sibling are left out. Bootstrap over `per_product` for an interval.
    """
    return _match_rate(products, prompts, True, size, seed, looks)


def match_rate_cross(products: Sequence[market_lib.Product], prompts: Mapping[str, str | Sequence[str]], *,
                     size: int = RENDER_SIZE, seed: int = RENDER_SEED,
                     looks: PromptLooks | None = None) -> dict[str, Any]:
    """`match_rate_sibling` with q from the *other* categories (same arguments, same result layout)."""
    return _match_rate(products, prompts, False, size, seed, looks)


# ----------------------------------------------------------------------------------------------------------
# The per-product oracle prompt, floors, sibling separability
# ----------------------------------------------------------------------------------------------------------


def oracle_prompts(products: Sequence[market_lib.Product], *, looks: PromptLooks | None = None,
                   top_k: int = SEARCH_TOP_K, workers: int = 0, stage1: Sequence[str] | None = None) -> dict[str, Any]:
    """The best grammar prompt for every product (the documented search of the module docstring; `stage1`
    replaces the 32,880 pattern-free prompts of stage 1, e.g. by a sample of them in quick tests).

    Returns {"candidates": list of prompts searched (the union), "candidate_looks": float32[N, 3],
    "best": {id: index into candidates}, "ctr": {id: true CTR of the best prompt}, "stage1": n, "stage2": n}.
    Every product's best is the best over the same union, so no product's best beats another's for it.
    """
    _check_distinct(products)
    looks = looks or prompt_looks()
    stage1 = prompt_grammar(patterns=False) if stage1 is None else list(stage1)
    l1 = looks.looks(stage1, workers=workers)
    extra: set[str] = set()
    for p in products:
        c = market_lib.ctr_from_looks(l1, p)
        top = np.argpartition(-c, top_k - 1)[:top_k] if len(c) > top_k else np.arange(len(c))
        extra.update(f"{stage1[k]}, {pattern}" for k in top for pattern in market_lib.PATTERNS)
    stage2 = sorted(extra)
    candidates = stage1 + stage2
    cand_looks = np.concatenate([l1, looks.looks(stage2)], axis=0)
    best, ctr = {}, {}
    for p in products:
        c = market_lib.ctr_from_looks(cand_looks, p)
        k = int(np.argmax(c))  # the first of equal maxima (grammar order)
        best[p.id], ctr[p.id] = k, float(c[k])
    return {"candidates": candidates, "candidate_looks": cand_looks, "best": best, "ctr": ctr,
            "stage1": len(stage1), "stage2": len(stage2)}


def sibling_separability(products: Sequence[market_lib.Product], best_looks: Mapping[str, np.ndarray],
                         best_prompts: Mapping[str, str] | None = None) -> dict[str, Any]:
    """How often a product's own best prompt is strictly better for it than a same-category sibling's best.

    `best_looks`: product id -> look float[3] of its best prompt's background. Over every ordered pair (p, q)
    of distinct same-category products: separated iff ctr_p(best_p) > ctr_p(best_q) (strict). Returns
    {"rate", "pairs", "shared_best_prompt" (share of pairs with the same best prompt, if `best_prompts`),
    "median_ctr_ratio" (ctr_p(best_p) / ctr_p(best_q)), "per_product": {id: share of its siblings separated}}.
    """
    _check_distinct(products)
    by_cat: dict[str, list[market_lib.Product]] = {}
    for p in products:
        by_cat.setdefault(p.category, []).append(p)
    wins, ratios, shared, per_product = [], [], [], {}
    for members in by_cat.values():
        if len(members) < 2:
            continue
        stack = np.stack([np.asarray(best_looks[q.id], np.float32) for q in members])
        for i, p in enumerate(members):
            c = market_lib.ctr_from_looks(stack, p)
            others = np.delete(np.arange(len(members)), i)
            w = c[i] > c[others]
            wins.extend(w.tolist())
            ratios.extend((c[i] / c[others]).tolist())
            per_product[p.id] = float(w.mean())
            if best_prompts is not None:
                shared.extend(best_prompts[members[j].id] == best_prompts[p.id] for j in others)
    n = len(wins)
    return {"rate": float(np.mean(wins)) if n else math.nan, "pairs": n,
            "shared_best_prompt": float(np.mean(shared)) if shared else math.nan,
            "median_ctr_ratio": float(np.median(ratios)) if n else math.nan, "per_product": per_product}


def _floor_prompts(categories: Iterable[str], seed: int) -> tuple[list[str], dict[str, list[str]]]:
    """`FLOOR_PROMPTS` random prompts (shared by every product) and as many on-brief ones per category."""
    rng = np.random.default_rng([seed, 11])
    random_prompts = [market_lib.sample_prompt(rng) for _ in range(FLOOR_PROMPTS)]
    on_brief = {}
    for category in categories:
        crng = np.random.default_rng([seed, 12, list(market_lib.CATEGORIES).index(category)])
        on_brief[category] = [market_lib.sample_prompt(crng, category) for _ in range(FLOOR_PROMPTS)]
    return random_prompts, on_brief


def prompt_ceiling(products: Sequence[market_lib.Product], splits: Mapping[str, str], seed: int, *,
                   looks: PromptLooks | None = None, workers: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """The per-product oracle prompt against random on-brief and random prompts, and the sibling separability.
    Returns (prompt_ceiling, sibling_separability) report sections."""
    looks = looks or prompt_looks()
    search = oracle_prompts(products, looks=looks, workers=workers)
    random_prompts, on_brief = _floor_prompts(sorted({p.category for p in products}), seed)
    per_product = {}
    for p in products:
        k = search["best"][p.id]
        per_product[p.id] = {
            "category": p.category, "colour": p.attributes["colour"], "split": splits.get(p.id, ""),
            "oracle_prompt": search["candidates"][k], "oracle_ctr": search["ctr"][p.id],
            "random_on_brief_ctr": float(looks.ctr(on_brief[p.category], p).mean()),
            "random_ctr": float(looks.ctr(random_prompts, p).mean()),
        }

    def summary(ids: list[str]) -> dict[str, Any]:
        if not ids:
            return {"products": 0}
        mean = lambda key: float(np.mean([per_product[i][key] for i in ids]))  # noqa: E731
        out = {"products": len(ids), "oracle_prompt": mean("oracle_ctr"), "random_on_brief": mean("random_on_brief_ctr"),
               "random": mean("random_ctr")}
        out["oracle_over_random"] = out["oracle_prompt"] / out["random"]
        out["on_brief_over_random"] = out["random_on_brief"] / out["random"]
        return out

    split_names = sorted(set(splits.values()))
    ceiling = {
        "search": {"grammar_prompts": len(prompt_grammar()), "stage1_prompts": search["stage1"],
                   "stage2_prompts": search["stage2"], "top_k": SEARCH_TOP_K,
                   "description": "every pattern-free grammar prompt, then the 8 patterns on each product's "
                                  f"{SEARCH_TOP_K} best; best over the union"},
        "floor_prompts": FLOOR_PROMPTS,
        "mean_true_ctr": summary([p.id for p in products]),
        "per_split": {s: summary([p.id for p in products if splits.get(p.id) == s]) for s in split_names},
        "distinct_oracle_prompts": len({v["oracle_prompt"] for v in per_product.values()}),
        "per_product": per_product,
    }
    best_looks = {p.id: search["candidate_looks"][search["best"][p.id]] for p in products}
    best_prompts = {p.id: per_product[p.id]["oracle_prompt"] for p in products}
    sep = sibling_separability(products, best_looks, best_prompts)
    return ceiling, sep


# ----------------------------------------------------------------------------------------------------------
# The logs: CAIG pairs, oracle, near ties, flat stretch, exact-feature ceiling
# ----------------------------------------------------------------------------------------------------------


def item_product(item: Mapping[str, Any], seed: int) -> market_lib.Product:
    """The `market.Product` of a simulated item record."""
    return market_lib.Product(item["id"], item["category"], item["title"], dict(item["attributes"]), seed)


def _records(item: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"item_id": item["id"], "image": c["name"], "impressions": sum(r[1] for r in c["rows"]),
             "clicks": sum(r[2] for r in c["rows"]), "true_ctr": c["true_ctr"], "look": c.get("look"),
             "item": item} for c in item["creatives"]]


@dataclasses.dataclass
class SplitPairs:
    records: list[dict[str, Any]]
    pairs: list[pairs_lib.IndexPair]
    report: dict[str, int]

    def true_ctrs(self) -> np.ndarray:
        """float64[P, 2]: [left, right] true CTRs."""
        return np.array([[self.records[p.left]["true_ctr"], self.records[p.right]["true_ctr"]] for p in self.pairs],
                        np.float64).reshape(-1, 2)

    def labels(self) -> np.ndarray:
        return np.array([p.label for p in self.pairs], np.int64)


def caig_pairs(items: Sequence[Mapping[str, Any]], splits: Mapping[str, str], rule: pairs_lib.PairRule,
               seed: int, split_names: Sequence[str]) -> dict[str, SplitPairs]:
    """CAIG's pairs (the rule `rule`, left/right order from `seed`) of every split, from the simulated items."""
    out = {}
    for split in split_names:
        records = [r for item in items if splits[item["id"]] == split for r in _records(item)]
        pairs, report = pairs_lib.pair_indices(records, rule, seed=seed)
        out[split] = SplitPairs(records, pairs, report)
    return out


def oracle_agreement(true_ctrs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """bool[P]: does the logged label (0 = left higher) agree with the true order (`prefers_left`)?"""
    true_ctrs = np.asarray(true_ctrs, np.float64).reshape(-1, 2)
    return prefers_left(true_ctrs[:, 0], true_ctrs[:, 1]) == (np.asarray(labels) == 0)


def true_ratio(true_ctrs: np.ndarray) -> np.ndarray:
    t = np.asarray(true_ctrs, np.float64).reshape(-1, 2)
    return t.max(axis=1) / t.min(axis=1)


def oracle_report(pairs_by_split: Mapping[str, SplitPairs], rule: pairs_lib.PairRule) -> dict[str, Any]:
    """How often the logged label agrees with the true CTR order on the pairs CAIG's rule keeps, per split."""
    out: dict[str, Any] = {"rule": dataclasses.asdict(rule), "splits": {}}
    for split, sp in pairs_by_split.items():
        agree = oracle_agreement(sp.true_ctrs(), sp.labels())
        per_cat: dict[str, list[bool]] = {}
        for p, a in zip(sp.pairs, agree):
            per_cat.setdefault(sp.records[p.left]["item"]["category"], []).append(bool(a))
        n = len(agree)
        acc = float(np.mean(agree)) if n else math.nan
        out["splits"][split] = {
            "pairs": n,
            "oracle_accuracy": acc,
            "oracle_ci95": 1.96 * math.sqrt(acc * (1 - acc) / n) if n else math.nan,
            "per_category": {c: float(np.mean(v)) for c, v in sorted(per_cat.items())},
            "pair_report": sp.report,
        }
    all_pairs = sum(s["pairs"] for s in out["splits"].values())
    out["oracle_accuracy"] = (
        sum(s["oracle_accuracy"] * s["pairs"] for s in out["splits"].values() if s["pairs"]) / all_pairs
        if all_pairs else math.nan
    )
    return out


def hidden_features(looks: np.ndarray, product: market_lib.Product) -> np.ndarray:
    """float64[N, 32]: the click model's exact hidden features of ads of `product` with background looks
    float[N, 3]: [|x|^2, x (x) one-hot(category) (30), x . c], x = look / look_scale, c = the product colour's
    look / look_scale. The click model's order of two ads of one product is the sign of a linear function of
    the difference of their features (|x - t|^2 = |x|^2 - 2 t . x + const, t linear in c per category): the
    form is given, the weights (every category's target, the colour's pull) are what a probe learns."""
    scale = market_lib.look_scale()
    x = np.asarray(looks, np.float64).reshape(-1, 3) / scale
    c = market_lib.colour_look(product.attributes["colour"]) / scale
    onehot = np.zeros(len(market_lib.CATEGORIES))
    onehot[list(market_lib.CATEGORIES).index(product.category)] = 1.0
    return np.concatenate([(x * x).sum(axis=1, keepdims=True), (x[:, :, None] * onehot[None, None, :]).reshape(len(x), -1),
                           (x @ c)[:, None]], axis=1)


def _pair_features(sp: SplitPairs, seed: int) -> np.ndarray:
    cache: dict[int, np.ndarray] = {}

    def phi(k: int) -> np.ndarray:
        if k not in cache:
            r = sp.records[k]
            cache[k] = hidden_features(np.asarray(r["look"])[None], item_product(r["item"], seed))[0]
        return cache[k]

    return np.array([phi(p.left) - phi(p.right) for p in sp.pairs]).reshape(len(sp.pairs), -1)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-4, steps: int = 50) -> np.ndarray:
    """Logistic regression without intercept by Newton's method (L2 `l2` on standardized features: a numerical
    guard, not tuned).
    Returns weights for the raw features."""
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    z = x / scale
    w = np.zeros(z.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(z @ w)))
        grad = z.T @ (p - y) / len(y) + l2 * w
        hess = (z * (p * (1 - p))[:, None]).T @ z / len(y) + l2 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w / scale


def exact_feature_ceiling(pairs_by_split: Mapping[str, SplitPairs], seed: int, train: str = "train",
                          test: str = "test") -> dict[str, Any]:
    """The exact-feature ceiling (see the module docstring): trained on `train` pairs, scored on `test` pairs."""
    tr, te = pairs_by_split.get(train), pairs_by_split.get(test)
    if tr is None or te is None or not tr.pairs or not te.pairs:
        return {"train_pairs": len(tr.pairs) if tr else 0, "test_pairs": len(te.pairs) if te else 0,
                "accuracy": math.nan, "true_order_agreement": math.nan, "true_order_agreement_true_ratio_pairs": math.nan}
    w = fit_logistic(_pair_features(tr, seed), (tr.labels() == 0).astype(np.float64))
    score = _pair_features(te, seed) @ w  # = w . phi(left) - w . phi(right)
    left = prefers_left(score, 0.0)  # the one rule: left iff w.phi(left) >= w.phi(right)
    truth = te.true_ctrs()
    true_left = prefers_left(truth[:, 0], truth[:, 1])
    band = (true_ratio(truth) >= TRUE_RATIO_BAND[0]) & (true_ratio(truth) <= TRUE_RATIO_BAND[1])
    agree = left == true_left
    return {
        "train_pairs": len(tr.pairs), "test_pairs": len(te.pairs), "features": 32,
        "accuracy": float(np.mean(left == (te.labels() == 0))),
        "true_order_agreement": float(np.mean(agree)),
        "true_ratio_pairs": int(band.sum()),
        "true_order_agreement_true_ratio_pairs": float(np.mean(agree[band])) if band.any() else math.nan,
    }


def flat_stretch(items: Sequence[Mapping[str, Any]], seed: int) -> dict[str, Any]:
    """Share of creatives on a flat stretch of the appeal curve (definition: the module docstring)."""
    slopes = []
    scale = market_lib.look_scale()
    for item in items:
        product = item_product(item, seed)
        looks = np.array([c["look"] for c in item["creatives"]], np.float64).reshape(-1, 3)
        direction = (looks - market_lib.product_target(product)) / scale
        norm = np.linalg.norm(direction, axis=1, keepdims=True)
        direction = np.where(norm > 0, direction / np.maximum(norm, 1e-12), np.array([1.0, 0.0, 0.0]))
        step = FLAT_STEP * direction * scale  # FLAT_STEP in scaled units along the steepest direction

        def logit(lk):
            ctr = market_lib.ctr_from_looks(lk, product, item["item_offset"])
            return np.log(ctr / (1 - ctr))

        slopes.append(np.abs(logit(looks + step) - logit(looks - step)) / (2 * FLAT_STEP))
    slopes = np.concatenate(slopes) if slopes else np.zeros(0)
    top = float(slopes.max()) if slopes.size else math.nan
    clipped = [not (market_lib.CTR_RANGE[0] < c["true_ctr"] < market_lib.CTR_RANGE[1])
               for item in items for c in item["creatives"]]
    return {"share": float(np.mean(slopes < FLAT_FRACTION * top)) if slopes.size else math.nan,
            "max_slope": top, "fraction": FLAT_FRACTION, "creatives": int(slopes.size),
            "clipped_share": float(np.mean(clipped)) if clipped else math.nan}


# ----------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------


def _target_check(name: str, value: float) -> dict[str, Any]:
    op, bound = TARGETS[name]
    met = (value >= bound) if op == ">=" else (value <= bound)
    return {"target": f"{op} {bound}", "value": value, "met": bool(met) if not math.isnan(value) else False}


def world_report(items: Sequence[Mapping[str, Any]], splits: Mapping[str, str], rule: pairs_lib.PairRule, seed: int,
                 *, pairs_by_split: Mapping[str, SplitPairs] | None = None, looks: PromptLooks | None = None,
                 workers: int = 0, split_names: Sequence[str] = ("train", "val", "test")) -> dict[str, Any]:
    """Every figure of the module docstring for a simulated world (`items` as `simulation._simulate_item` returns
    them, `splits`: item id -> split). Deterministic. Keys: `REPORT_KEYS`."""
    if pairs_by_split is None:
        pairs_by_split = caig_pairs(items, splits, rule, seed, split_names)
    test = pairs_by_split.get("test")
    truth = test.true_ctrs() if test is not None else np.zeros((0, 2))
    ratios = true_ratio(truth)
    n_test = len(truth)
    products = [item_product(item, seed) for item in items]
    ceiling, sep = prompt_ceiling(products, splits, seed, looks=looks, workers=workers)
    flat = flat_stretch(items, seed)
    exact = exact_feature_ceiling(pairs_by_split, seed)
    oracle = float(np.mean(oracle_agreement(truth, test.labels()))) if n_test else math.nan
    near_tie = float(np.mean(ratios < NEAR_TIE_RATIO)) if n_test else math.nan
    report = {
        "version": market_lib.MARKET_VERSION,
        "click_model": {
            "formula": "logit(CTR) = logit(base_ctr[category]) + item_offset + CTR_GAIN * (TYPICAL_DISTANCE - "
                       "|(look - target_p) / look_scale|), target_p = target[category] - PRODUCT_CONTRAST * "
                       "(look(colour_p) - mean look of the category's palette); CTR clipped to CTR_RANGE",
            "CTR_GAIN": market_lib.CTR_GAIN, "TYPICAL_DISTANCE": market_lib.TYPICAL_DISTANCE,
            "PRODUCT_CONTRAST": market_lib.PRODUCT_CONTRAST, "CTR_RANGE": list(market_lib.CTR_RANGE),
            "look_scale": market_lib.look_scale().round(6).tolist(),
        },
        "render": {"size": (looks or prompt_looks()).size, "seed": (looks or prompt_looks()).seed},
        "splits": {s: {"products": sum(v == s for v in splits.values()), "pairs": len(sp.pairs)}
                   for s, sp in pairs_by_split.items()},
        "test_pairs": n_test,
        "oracle_accuracy": oracle,
        "near_tie_share": near_tie,
        "true_ratio_pairs": int(((ratios >= TRUE_RATIO_BAND[0]) & (ratios <= TRUE_RATIO_BAND[1])).sum()),
        "flat_stretch_share": flat["share"],
        "flat_stretch": flat,
        "exact_feature_ceiling": exact,
        "prompt_ceiling": ceiling,
        "sibling_separability": sep,
    }
    report["targets"] = {
        "sibling_separability": _target_check("sibling_separability", sep["rate"]),
        "flat_stretch_share": _target_check("flat_stretch_share", flat["share"]),
        "near_tie_share": _target_check("near_tie_share", near_tie),
        "exact_feature_ceiling_true_ratio_pairs": _target_check(
            "exact_feature_ceiling_true_ratio_pairs", exact["true_order_agreement_true_ratio_pairs"]),
    }
    return report


def world_report_markdown(report: Mapping[str, Any]) -> str:
    """The world report as a markdown section (written as `world_report.md` beside `world_report.json`)."""
    e, c, s = report["exact_feature_ceiling"], report["prompt_ceiling"], report["sibling_separability"]
    m = c["mean_true_ctr"]
    r = report["render"]
    lines = [
        f"## World report (market version {report['version']})", "",
        f"Click model: `{report['click_model']['formula']}`.", "",
        f"CAIG test pairs (impressions > 1000, CTR > 0, 1.05 <= logged ratio <= 1.20): {report['test_pairs']}.", "",
        "| figure | value | target |", "|---|---|---|",
        f"| oracle accuracy (logged label vs true order, `prefers_left`) | {report['oracle_accuracy']:.3f} | - |",
        f"| test pairs with true ratio < {NEAR_TIE_RATIO} | {report['near_tie_share']:.3f} | "
        f"{report['targets']['near_tie_share']['target']} |",
        f"| test pairs with true ratio in [{TRUE_RATIO_BAND[0]}, {TRUE_RATIO_BAND[1]}] | {report['true_ratio_pairs']} | - |",
        f"| creatives on a flat stretch (slope < {FLAT_FRACTION} of max) | {report['flat_stretch_share']:.3f} | "
        f"{report['targets']['flat_stretch_share']['target']} |",
        f"| exact-feature ceiling: accuracy vs logged labels | {e['accuracy']:.3f} | - |",
        f"| exact-feature ceiling: agreement with the true order, all test pairs | {e['true_order_agreement']:.3f} | - |",
        f"| exact-feature ceiling: agreement with the true order, true-ratio pairs | "
        f"{e['true_order_agreement_true_ratio_pairs']:.3f} | "
        f"{report['targets']['exact_feature_ceiling_true_ratio_pairs']['target']} |",
        f"| sibling separability (strict wins of own best prompt) | {s['rate']:.3f} ({s['pairs']} pairs) | "
        f"{report['targets']['sibling_separability']['target']} |",
        f"| same best prompt as a sibling | {s['shared_best_prompt']:.3f} | - |",
        f"| median CTR ratio own best / sibling's best | {s['median_ctr_ratio']:.3f} | - |",
        "",
        f"Prompt ceiling (ads rendered at {r['size']} px, seed {r['seed']}; search: {c['search']['description']}, "
        f"{c['search']['stage1_prompts']} + {c['search']['stage2_prompts']} prompts of a "
        f"{c['search']['grammar_prompts']}-prompt grammar; {c['distinct_oracle_prompts']} distinct best prompts):",
        "", "| products | oracle prompt | random on-brief | random (floor) | oracle / random |", "|---|---|---|---|---|",
        f"| all ({m['products']}) | {m['oracle_prompt']:.4f} | {m['random_on_brief']:.4f} | {m['random']:.4f} | "
        f"{m['oracle_over_random']:.2f} |",
    ]
    for split, v in c["per_split"].items():
        if v.get("products"):
            lines.append(f"| {split} ({v['products']}) | {v['oracle_prompt']:.4f} | {v['random_on_brief']:.4f} | "
                         f"{v['random']:.4f} | {v['oracle_over_random']:.2f} |")
    lines += ["", "Targets (issue 13): " + ", ".join(
        f"{k} {v['value']:.3f} ({v['target']}: {'met' if v['met'] else 'NOT met'})" for k, v in report["targets"].items()), ""]
    return "\n".join(lines)
