"""Prompt Models in the marketplace: render their prompts into ads, judge ads with the reward model, and score
prompts with the marketplace's hidden truth (true CTR, match rates), the pieces the preference rounds and the CAIG
demo's final evaluation share.

    market = World(render_config, market_dir, mesh)     # products, cut-outs, the renderer, true CTRs
    judge = Judge(reward_workdir, mesh)                 # the RM's left|right verdicts
    result = evaluate_policy(model, inputs, judge, market, pids, samples=4, temperature=1.0, seed=0,
                             generation=config.generation, baseline=sft_result)
    lift = relative_lift(result_ctrs, sft_ctrs)         # product-bootstrap comparisons of per-product numbers
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

import caig_jax.render as render
from caig_jax.data import market as market_lib
from caig_jax.data import world
from caig_jax.data.ctr_logs import load_rgb
from caig_jax.data.preference_inputs import instruction
from caig_jax.data.reward_inputs import build_inputs as build_rm_inputs
from caig_jax.errors import UserError
from caig_jax.eval.intervals import product_bootstrap
from caig_jax.eval.sft import MarketTruth
from caig_jax.models.prompt_model import generate_replies
from caig_jax.objectives.reward import prefers_left
from caig_jax.trainers.reward import judge_pairs
from caig_jax.trainers.reward import load_trained as load_reward_model


class AdRenderer:
    """Ads around untouched products (a job config's `render` section): `kind='market'` paints backgrounds with the
    marketplace's painter (`market.compose_ad`); `'sd'` inpaints them with the JAX SD-1.5 + ControlNet renderer
    (`caig_jax.render.from_pretrained(sd_path, controlnet_path=...)`, CAIG's settings: Euler-ancestral, `steps`,
    CFG `guidance_scale`, control scale 1.0, product pasted back)."""

    def __init__(self, render_config, mesh):
        c = self.config = render_config
        if c.kind not in ("market", "sd"):
            raise UserError(f"config.render.kind={c.kind!r}: expected 'market' or 'sd'")
        self.pipeline = None
        if c.kind == "sd":
            if not c.sd_path:
                raise UserError("config.render.kind='sd' needs config.render.sd_path (a diffusers SD-1.5 folder)",
                                fix="pass --config.render.sd_path=DIR [--config.render.controlnet_path=DIR]")
            # `render.dtype` (parameters and compute): bfloat16 in the inference presets; float32 by default.
            self.pipeline = render.from_pretrained(c.sd_path, controlnet_path=c.controlnet_path or None, mesh=mesh,
                                                   attention=c.get("attention", "auto"),
                                                   dtype=jnp.dtype(c.get("dtype", "float32")))

    def ads(self, rgba: np.ndarray, prompts: list[str]) -> list[np.ndarray]:
        """uint8[H, W, 3] per prompt for one product cut-out uint8[h, w, 4] (SD: the prompts as one batch)."""
        c = self.config
        if self.pipeline is None:
            return [market_lib.compose_ad(rgba, p, c.size, seed=c.seed) for p in prompts]
        return list(self.pipeline.inpaint_product([rgba] * len(prompts), prompts, steps=c.steps,
                                                  guidance_scale=c.guidance_scale, seed=c.seed))


class World:
    """The marketplace the rounds run in: products, their PM input images and cut-outs, and the `AdRenderer` of
    the job's `render` section. True CTRs are the click model's on the ad actually rendered (`market.true_ctr`)."""

    def __init__(self, render_config, market_dir: str, mesh):
        self.truth = MarketTruth.load(market_dir)
        self.renderer = AdRenderer(render_config, mesh)
        self.kind, self.size, self.seed = render_config.kind, render_config.size, render_config.seed
        self._images: dict[str, np.ndarray] = {}
        self._cutouts: dict[str, np.ndarray] = {}
        self._ads: dict[tuple[str, str], np.ndarray] = {}

    def products(self, split: str) -> list[str]:
        ids = sorted(p for p, s in self.truth.splits.items() if s == split)
        if not ids:
            raise UserError(f"the marketplace in {self.truth.market_dir} has no {split!r} products")
        return ids

    def pm_image(self, pid: str) -> np.ndarray:
        """The product image as the PM saw it in SFT: the cut-out composited over white by the function the
        conversation dataset's builder reads it with (plain RGB conversion had put it on black)."""
        if pid not in self._images:
            self._images[pid] = load_rgb(self.truth.image_paths[pid])
        return self._images[pid]

    def cutout(self, pid: str) -> np.ndarray:
        if pid not in self._cutouts:
            self._cutouts[pid] = self.truth.cutout(pid)
        return self._cutouts[pid]

    def ad(self, pid: str, prompt: str) -> np.ndarray:
        if self.kind == "market":  # the painter is cheap and exact: nothing to cache
            return self.renderer.ads(self.cutout(pid), [prompt])[0]
        key = (pid, prompt)
        if key not in self._ads:  # one product at a time: one compiled program, cached by (product, prompt)
            self._ads[key] = self.renderer.ads(self.cutout(pid), [prompt])[0]
        return self._ads[key]

    def true_ctr(self, pid: str, prompt: str) -> float:
        if self.kind == "market":  # exact and cheap: from the painted background's look
            return world.prompt_ctr(prompt, self.truth.products[pid], size=self.size, seed=self.seed)
        return market_lib.true_ctr(self.ad(pid, prompt), self.truth.products[pid])

    def product(self, pid: str) -> market_lib.Product:
        return self.truth.products[pid]


class Judge:
    """The reward model of `reward_workdir` judging ad pairs of one product (its decision rule)."""

    def __init__(self, reward_workdir: str, mesh):
        self.model, self.config = load_reward_model(reward_workdir, mesh)
        self.inputs, self.llava_config = build_rm_inputs(self.config, reward_workdir, self.config.data.dir)
        self.mesh = mesh

    def logits(self, market: World, pids: list[str], left: list[str], right: list[str]) -> np.ndarray:
        """float32[N, 2]: the RM's cls logits for (ad from `left[i]`, ad from `right[i]`) of product `pids[i]`."""
        products = [market.product(p) for p in pids]
        return self.ad_logits([market.ad(p, a) for p, a in zip(pids, left)],
                              [market.ad(p, b) for p, b in zip(pids, right)], [p.title for p in products],
                              [p.category for p in products], [p.attributes for p in products])

    def ad_logits(self, left_ads, right_ads, titles: list[str], categories: list[str], attributes: list[dict]
                  ) -> np.ndarray:
        """float32[N, 2]: the RM's cls logits for the ad pairs (uint8[H, W, 3] each) of products with these titles,
        categories ("" when unknown) and attribute dicts ({} when unknown)."""
        return judge_pairs(self.model, self.config, self.inputs, self.llava_config, left_ads, right_ads, titles,
                           categories, [json.dumps(a) for a in attributes], self.mesh)


def round_robin(sizes: Sequence[int], rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(row, left option, right option) for every pair of each row's `sizes[row]` options, the sides of a pair at
    random (one draw per pair, rows and pairs in order)."""
    pairs = []
    for row, n in enumerate(sizes):
        for i in range(n):
            for j in range(i + 1, n):
                pairs.append((row, i, j) if rng.random() < 0.5 else (row, j, i))
    return pairs


def tally(pairs: Sequence[tuple[int, int, int]], logits: np.ndarray, sizes: Sequence[int]
          ) -> tuple[list[np.ndarray], list[list[dict[str, Any]]]]:
    """Each row's wins (float64[n]) and judged pairs `{"left", "right", "rm_logits", "winner"}` from the RM's
    logits float32[P, 2] of `round_robin`'s pairs, decided by `objectives.reward.prefers_left`."""
    wins = [np.zeros(n) for n in sizes]
    judged: list[list[dict[str, Any]]] = [[] for _ in sizes]
    for (row, left, right), lg in zip(pairs, logits, strict=True):
        winner = left if prefers_left(lg[0], lg[1]) else right
        wins[row][winner] += 1
        judged[row].append({"left": left, "right": right, "rm_logits": [float(lg[0]), float(lg[1])],
                            "winner": winner})
    return wins, judged


def sample_prompts(model, inputs, market: World, pids: list[str], templates: list[int], *, samples: int,
                   temperature: float, seed: int, config) -> list[list[str]]:
    """`samples` prompts per product from `model` (one instruction template per product)."""
    images = [market.pm_image(p) for p in pids for _ in range(samples)]
    conversations = [instruction(market.product(p).title, k) for p, k in zip(pids, templates) for _ in range(samples)]
    replies = generate_replies(model, inputs, images, conversations, max_new_tokens=config.max_new_tokens,
                               temperature=temperature, seed=seed, batch_size=config.batch_size,
                               prompt_length=config.prompt_length or None)
    return [replies[i * samples:(i + 1) * samples] for i in range(len(pids))]



def evaluate_policy(model, inputs, judge: Judge | None, market: World, pids: list[str], *, samples: int,
                    temperature: float, seed: int, generation, baseline: dict | None = None) -> dict[str, Any]:
    """The held-out figures of one Prompt Model on products `pids`: greedy and `samples` prompts at `temperature`
    each (one of CAIG's two instruction templates per product), their true CTR (per product and its product-
    bootstrap mean), the truth-based sibling / cross-category match rates of the sampled prompts and, given the
    SFT PM's result as `baseline` and a `judge`, the RM's win rate of this PM's first sample against the SFT PM's.
    `generation`: the sampler's settings (`max_new_tokens`, `batch_size`, `prompt_length`)."""
    templates = [i % 2 for i in range(len(pids))]
    greedy = [s[0] for s in sample_prompts(model, inputs, market, pids, templates, samples=1, temperature=0.0,
                                           seed=seed, config=generation)]
    sampled = sample_prompts(model, inputs, market, pids, templates, samples=samples, temperature=temperature,
                             seed=seed + 1, config=generation)
    ctr = {p: float(np.mean([market.true_ctr(p, q) for q in qs])) for p, qs in zip(pids, sampled)}
    ctr_greedy = {p: market.true_ctr(p, q) for p, q in zip(pids, greedy)}
    products = [market.product(p) for p in pids]
    # Match rates score prompts with the marketplace painter (exact and cheap) whatever the rounds render with.
    sibling = world.match_rate_sibling(products, dict(zip(pids, sampled)), size=market.size, seed=market.seed)
    cross = world.match_rate_cross(products, dict(zip(pids, sampled)), size=market.size, seed=market.seed)
    result: dict[str, Any] = {
        "products": pids, "greedy": greedy, "sampled": sampled,
        "true_ctr": product_bootstrap(list(ctr.values()), seed=seed),
        "true_ctr_greedy": product_bootstrap(list(ctr_greedy.values()), seed=seed),
        "true_ctr_per_product": ctr, "true_ctr_greedy_per_product": ctr_greedy,
        "match_rate_sibling": {"rate": sibling["rate"], "per_product": sibling["per_product"]},
        "match_rate_cross": {"rate": cross["rate"], "per_product": cross["per_product"]},
    }
    if baseline is not None and judge is not None:
        rng = np.random.default_rng([seed, 77])
        ours = [qs[0] for qs in sampled]
        theirs = [qs[0] for qs in baseline["sampled"]]
        flips = rng.random(len(pids)) < 0.5
        left = [a if f else b for a, b, f in zip(ours, theirs, flips)]
        right = [b if f else a for a, b, f in zip(ours, theirs, flips)]
        logits = judge.logits(market, pids, left, right)
        wins = [float(prefers_left(lg[0], lg[1]) == f) for lg, f in zip(logits, flips)]
        result["rm_win_rate_vs_sft"] = product_bootstrap(wins, seed=seed)
    return result


def scalars(result: dict[str, Any]) -> dict[str, float]:
    out = {"true_ctr": result["true_ctr"]["mean"], "true_ctr_greedy": result["true_ctr_greedy"]["mean"],
           "match_rate_sibling": result["match_rate_sibling"]["rate"],
           "match_rate_cross": result["match_rate_cross"]["rate"]}
    if "rm_win_rate_vs_sft" in result:
        out["rm_win_rate_vs_sft"] = result["rm_win_rate_vs_sft"]["mean"]
    return out


# ================================================================================================
# Comparisons of per-product numbers (product-bootstrap intervals; products are the resampled unit).
# ================================================================================================
def _aligned(*per_product: Mapping[str, float]) -> list[np.ndarray]:
    keys = sorted(per_product[0])
    for other in per_product[1:]:
        if sorted(other) != keys:
            raise ValueError(f"per-product values over different products: {len(keys)} vs {len(other)}")
    return [np.asarray([float(m[k]) for k in keys], np.float64) for m in per_product]


def relative_lift(method: Mapping[str, float], base: Mapping[str, float], *, seed: int = 0,
                  resamples: int = 2000) -> dict[str, float | int]:
    """`mean(method) / mean(base) - 1` over the same products (0.10 = +10%), with the percentile interval of the
    same ratio over resampled products: `{"mean", "ci_low", "ci_high", "n_products"}`."""
    m, b = _aligned(method, base)
    out = product_bootstrap(m, b, seed=seed, resamples=resamples)
    return {**out, "mean": out["mean"] - 1.0, "ci_low": out["ci_low"] - 1.0, "ci_high": out["ci_high"] - 1.0}


def gap_closed(method: Mapping[str, float], base: Mapping[str, float], oracle: Mapping[str, float], *,
               seed: int = 0, resamples: int = 2000) -> dict[str, float | int]:
    """The share of the base -> oracle gap of mean true CTR that `method` closes,
    `(mean(method) - mean(base)) / (mean(oracle) - mean(base))` (1 = as good as the oracle, 0 = no better than
    the base, < 0 worse), with its interval over resampled products."""
    m, b, o = _aligned(method, base, oracle)
    return product_bootstrap(m - b, o - b, seed=seed, resamples=resamples)


def paired_difference(a: Mapping[str, float], b: Mapping[str, float], *, seed: int = 0, resamples: int = 2000
                      ) -> dict[str, float | int]:
    """`mean(a - b)` over the products both have a value for, with its interval over resampled products."""
    common = sorted(set(a) & set(b))
    x, y = _aligned({k: a[k] for k in common}, {k: b[k] for k in common})
    return product_bootstrap(x - y, seed=seed, resamples=resamples)
