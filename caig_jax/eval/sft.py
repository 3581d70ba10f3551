"""Held-out evaluation of a Prompt Model (PM) after knowledge pre-training (SFT), per task family.

    truth = MarketTruth.load(market_dir)                 # the marketplace's products, cut-outs, oracle prompts
    result = evaluate_prompt_model(model, inputs, data, buckets, mesh, truth=truth)

What is measured on the conversations of a held-out split (`data`, a `caig_jax.data.sft_inputs.ConversationData`):

- every family: the answer tokens' loss (token-mean NLL) and token accuracy (argmax == label), teacher forced;
- `describe_product` (product cut-out -> "A {colour} {noun} made of ..."): the greedy reply's colour and
  category read by `parse_description` and compared exactly with the reference answer's (the colour and
  category questions: both must come from the image, the question names neither);
- `background_prompt` (product cut-out + title -> a background prompt): prompts sampled with the KV-cache sampler
  (greedy, and `samples` at temperature 1.0), the share that parse *fully* into the world's vocabulary
  (`parses_fully`), and with the marketplace (`truth`) their true CTR: `world.prompt_looks(size, seed)`, the
  look of `market.compose_ad(cutout, prompt, size, seed)`'s background, through `market.ctr_from_looks` (equal to
  `market.true_ctr` of that ad; 32 px, seed 0 as the world report renders), beside `on_brief` random on-brief
  prompts per product (`market.sample_prompt(rng, category)`) and the per-product oracle prompt of the world
  report.

Intervals resample products (`caig_jax.eval.intervals.product_bootstrap`): a product's conversations, samples
and baselines move together; differences are paired per product.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from caig_jax import parallel
from caig_jax.data import market as market_lib
from caig_jax.data import world as world_lib
from caig_jax.data.product import load_product_image
from caig_jax.data.sft_inputs import ConversationData, decode_image, eval_batches
from caig_jax.eval.intervals import product_bootstrap
from caig_jax.models.llava import LlavaModel
from caig_jax.models.processing import LlavaInputs
from caig_jax.models.prompt_model import generate_replies
from caig_jax.objectives.sft import token_logps

DESCRIBE_FAMILY = "describe_product"
PROMPT_FAMILY = "background_prompt"
# The targets of the SFT issue (tiny preset), fixed before tuning: name -> (comparison, bound).
TARGETS = {
    "greedy_parse_rate": (">=", 0.95),
    "category_exact_match": (">=", 0.90),
    "colour_exact_match": (">=", 0.90),
    "sampled_minus_on_brief_true_ctr": (">=", 0.0),
}


# ================================================================================================
# Parsing replies.
# ================================================================================================
def parses_fully(prompt: str) -> bool:
    """True when the world's parser (`market.parse_prompt`) finds at least one descriptor and the prompt holds
    nothing else: every occurrence of the phrases it found removed (longest first, whole words, case-insensitive),
    only spaces and commas are left. Words the painter would ignore make it False."""
    found = market_lib.parse_prompt(prompt).descriptors()
    if not found:
        return False
    rest = prompt.lower()
    for phrase in sorted(found, key=len, reverse=True):
        rest = re.sub(r"\b" + re.escape(phrase) + r"\b", " ", rest)
    return re.fullmatch(r"[\s,]*", rest) is not None


@functools.lru_cache(maxsize=1)
def _description_regex() -> re.Pattern:
    nouns = sorted((c.noun for c in market_lib.CATEGORIES.values()), key=len, reverse=True)
    return re.compile(r"^\s*an?\s+(.*?)\s+(" + "|".join(re.escape(n) for n in nouns) + r")\b", re.IGNORECASE)


def parse_description(text: str) -> tuple[str | None, str | None]:
    """(colour, category name) of a describe-product answer "A {colour} {noun} made of ...", or None for a part
    that is not there (a category is a `market.CATEGORIES` key; the colour is the words between the article
    and the noun, lowercased)."""
    m = _description_regex().match(text)
    if not m:
        return None, None
    noun = m.group(2).lower()
    category = next(name for name, c in market_lib.CATEGORIES.items() if c.noun == noun)
    return m.group(1).strip().lower() or None, category


# ================================================================================================
# The marketplace's truth.
# ================================================================================================
@dataclasses.dataclass
class MarketTruth:
    """The products of a marketplace folder (`caig_jax.data.simulation.make_market`'s layout) and its oracle."""

    market_dir: str
    products: dict[str, market_lib.Product]
    image_paths: dict[str, str]
    splits: dict[str, str]
    oracle: dict[str, dict[str, Any]]  # id -> {"oracle_prompt", "oracle_ctr", ...} (world_report.json)

    @classmethod
    def load(cls, market_dir: str) -> MarketTruth:
        with open(os.path.join(market_dir, "market_config.json")) as f:
            seed = int(json.load(f)["seed"])
        with open(os.path.join(market_dir, "products", "products.json")) as f:
            entries = json.load(f)
        products, paths, splits = {}, {}, {}
        for e in entries:
            products[e["id"]] = market_lib.Product(e["id"], e["category"], e["new_caption"], dict(e["attributes"]),
                                                   seed)
            paths[e["id"]] = os.path.join(market_dir, "products", e["image"])
            splits[e["id"]] = e.get("split", "")
        oracle = {}
        report = os.path.join(market_dir, "world_report.json")
        if os.path.exists(report):
            with open(report) as f:
                oracle = json.load(f)["prompt_ceiling"]["per_product"]
        return cls(market_dir, products, paths, splits, oracle)

    def cutout(self, product_id: str) -> np.ndarray:
        return load_product_image(self.image_paths[product_id])


def on_brief_prompts(product: market_lib.Product, count: int, seed: int) -> list[str]:
    """`count` random on-brief prompts for `product` (the world report's floor distribution), seeded per product."""
    rng = np.random.default_rng([seed, 7, int(product.id[len("item"):]) if product.id.startswith("item") else 0])
    return [market_lib.sample_prompt(rng, product.category) for _ in range(count)]


# ================================================================================================
# Teacher-forced answer metrics.
# ================================================================================================
@functools.partial(jax.jit, static_argnums=0)
def _row_stats(graphdef, state, batch):
    model = nnx.merge(graphdef, state)
    logits = model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                   image_layout=batch["image_layout"])
    logits, labels, mask = logits[:, :-1], batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].astype(jnp.float32)
    nll = -jnp.sum(token_logps(logits, labels, mask), axis=-1)
    correct = jnp.sum(jnp.where(jnp.argmax(logits, axis=-1) == labels, mask, 0.0), axis=-1)
    return nll, correct, jnp.sum(mask, axis=-1)


def answer_stats(model: LlavaModel, data: ConversationData, buckets: Sequence[int], mesh, batch_size: int = 64
                 ) -> dict[str, np.ndarray]:
    """Per example: `nll` (summed over its answer tokens), `correct` (argmax == label count), `tokens`."""
    graphdef, state = nnx.split(model)
    n = len(data)
    out = {k: np.zeros(n, np.float64) for k in ("nll", "correct", "tokens")}
    for indices, length, valid in eval_batches(data, buckets, batch_size):
        batch = data.batch(indices, length)
        with jax.set_mesh(mesh):
            stats = _row_stats(graphdef, state, parallel.global_batch(mesh, batch))
        for key, value in zip(("nll", "correct", "tokens"), stats):
            out[key][indices[:valid]] = parallel.local_rows(value)[:valid]
    return out


def family_metrics(data: ConversationData, stats: Mapping[str, np.ndarray], seed: int = 0) -> dict[str, dict]:
    """Per family: loss and token accuracy (token means) with product-bootstrap intervals, tokens, examples."""
    out = {}
    for family in data.families:
        idx = [i for i, r in enumerate(data.records) if r.family == family]
        products = sorted({data.records[i].product for i in idx})
        where = {p: k for k, p in enumerate(products)}
        per = {k: np.zeros(len(products)) for k in ("nll", "correct", "tokens")}
        for i in idx:
            for k in per:
                per[k][where[data.records[i].product]] += stats[k][i]
        loss = product_bootstrap(per["nll"], per["tokens"], seed=seed)
        acc = product_bootstrap(per["correct"], per["tokens"], seed=seed)
        out[family] = {"loss": loss["mean"], "loss_ci": [loss["ci_low"], loss["ci_high"]],
                       "token_accuracy": acc["mean"], "token_accuracy_ci": [acc["ci_low"], acc["ci_high"]],
                       "tokens": int(per["tokens"].sum()), "examples": len(idx), "products": len(products)}
    return out


# ================================================================================================
# The whole evaluation.
# ================================================================================================
def _first_per_product(data: ConversationData, family: str) -> dict[str, int]:
    first: dict[str, int] = {}
    for i, r in sorted(enumerate(data.records), key=lambda ir: ir[1].id):
        if r.family == family and r.product not in first:
            first[r.product] = i
    return dict(sorted(first.items()))


def evaluate_prompt_model(model: LlavaModel, inputs: LlavaInputs, data: ConversationData, buckets: Sequence[int],
                          mesh, *, truth: MarketTruth | None = None, samples: int = 4, on_brief: int = 16,
                          max_new_tokens: int = 40, temperature: float = 1.0, seed: int = 0, batch_size: int = 64,
                          render_size: int = world_lib.RENDER_SIZE, render_seed: int = world_lib.RENDER_SEED,
                          ) -> dict[str, Any]:
    """Every metric of the module docstring on `data` (one held-out split). Without `truth` (a dataset that is not
    the marketplace) the CTR figures are left out. Returns a JSON-able dict (see `caig_jax.eval.sft_report`)."""
    stats = answer_stats(model, data, buckets, mesh, batch_size)
    result: dict[str, Any] = {"examples": len(data), "products": len({r.product for r in data.records}),
                              "families": family_metrics(data, stats, seed)}

    describe = _first_per_product(data, DESCRIBE_FAMILY)
    prompt = _first_per_product(data, PROMPT_FAMILY)
    rows = list(describe.values()) + list(prompt.values())
    if not rows:
        return result
    images = [decode_image(data.records[i].image) if data.records[i].image is not None else None for i in rows]
    turns = [data.records[i].prompt_turns(0) for i in rows]
    lengths = [len(x) for x in inputs.prompts(images if any(im is not None for im in images) else None, turns,
                                              pad_patches_to=model.config.max_patches)["input_ids"]]
    prompt_length = int(-(-max(lengths) // 16) * 16)
    gen = functools.partial(generate_replies, model, inputs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            prompt_length=prompt_length)
    greedy = gen(images, turns, temperature=0.0)

    if describe:
        d_replies = greedy[: len(describe)]
        per, examples = [], []
        for (pid, i), reply in zip(describe.items(), d_replies):
            colour, category = parse_description(data.records[i].answer())
            got_colour, got_category = parse_description(reply)
            if category is None:
                continue  # a reference outside the marketplace's answer format: no exact match to score
            per.append((got_category == category, got_colour == colour))
            examples.append({"product": pid, "reference": data.records[i].answer(), "generated": reply})
        if per:
            cat, col = np.asarray(per, np.float64).T
            result["describe"] = {"category_exact_match": product_bootstrap(cat, seed=seed),
                                  "colour_exact_match": product_bootstrap(col, seed=seed), "replies": examples}

    if prompt:
        p_ids, p_rows = list(prompt), list(prompt.values())
        p_images, p_turns = images[len(describe):], turns[len(describe):]
        p_greedy = greedy[len(describe):]
        sampled = [gen(p_images, p_turns, temperature=temperature, seed=seed + 1 + s) for s in range(samples)]
        sampled = [list(x) for x in zip(*sampled)]  # [product][sample]
        per_product = []
        for k, (pid, i) in enumerate(zip(p_ids, p_rows)):
            entry = {"product": pid, "question": data.records[i].prompt_turns(0)[-1]["content"],
                     "greedy": p_greedy[k], "samples": sampled[k],
                     "greedy_parses": parses_fully(p_greedy[k]),
                     "samples_parse": [parses_fully(s) for s in sampled[k]]}
            per_product.append(entry)
        greedy_parse = np.asarray([e["greedy_parses"] for e in per_product], np.float64)
        sample_parse = np.asarray([np.mean(e["samples_parse"]) for e in per_product], np.float64)
        prompts_out: dict[str, Any] = {
            "products": len(per_product), "samples_per_product": samples, "temperature": temperature,
            "greedy_parse_rate": product_bootstrap(greedy_parse, seed=seed),
            "sampled_parse_rate": product_bootstrap(sample_parse, seed=seed),
            "per_product": per_product,
        }
        known = [e for e in per_product if truth is not None and e["product"] in truth.products]
        if known:
            looks = world_lib.prompt_looks(render_size, render_seed)
            for e in known:
                product = truth.products[e["product"]]
                e["category"], e["colour"] = product.category, product.attributes["colour"]
                e["greedy_ctr"] = float(looks.ctr([e["greedy"]], product)[0])
                e["sample_ctrs"] = looks.ctr(e["samples"], product).tolist()
                briefs = on_brief_prompts(product, on_brief, seed)
                e["on_brief_ctr"] = float(looks.ctr(briefs, product).mean())
                e["on_brief_example"] = briefs[0]
                if product.id in truth.oracle:
                    e["oracle_prompt"] = truth.oracle[product.id]["oracle_prompt"]
                    e["oracle_ctr"] = float(looks.ctr([e["oracle_prompt"]], product)[0])
            g = np.asarray([e["greedy_ctr"] for e in known])
            s = np.asarray([np.mean(e["sample_ctrs"]) for e in known])
            b = np.asarray([e["on_brief_ctr"] for e in known])
            ctr = {"greedy": product_bootstrap(g, seed=seed), "sampled": product_bootstrap(s, seed=seed),
                   "random_on_brief": product_bootstrap(b, seed=seed),
                   "sampled_minus_on_brief": product_bootstrap(s - b, seed=seed),
                   "greedy_minus_on_brief": product_bootstrap(g - b, seed=seed),
                   "sampled_over_on_brief": float(s.mean() / b.mean())}
            with_oracle = [e for e in known if "oracle_ctr" in e]
            if with_oracle:
                o = np.asarray([e["oracle_ctr"] for e in with_oracle])
                ctr["oracle"] = product_bootstrap(o, seed=seed)
                so = np.asarray([np.mean(e["sample_ctrs"]) for e in with_oracle])
                bo = np.asarray([e["on_brief_ctr"] for e in with_oracle])
                # The share of the on-brief -> oracle gap the PM's samples close (per product means).
                ctr["sampled_gap_closed"] = float((so.mean() - bo.mean()) / (o.mean() - bo.mean()))
            ctr["render"] = {"size": render_size, "seed": render_seed, "on_brief_prompts_per_product": on_brief}
            prompts_out["true_ctr"] = ctr
        result["prompts"] = prompts_out
    result["targets"] = check_targets(result)
    return result


def headline(result: Mapping[str, Any]) -> dict[str, float]:
    """The target metrics' values (NaN when not measured)."""
    nan = float("nan")
    d, p = result.get("describe", {}), result.get("prompts", {})
    ctr = p.get("true_ctr", {})
    return {
        "greedy_parse_rate": p.get("greedy_parse_rate", {}).get("mean", nan),
        "category_exact_match": d.get("category_exact_match", {}).get("mean", nan),
        "colour_exact_match": d.get("colour_exact_match", {}).get("mean", nan),
        "sampled_minus_on_brief_true_ctr": ctr.get("sampled_minus_on_brief", {}).get("mean", nan),
    }


def check_targets(result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, value in headline(result).items():
        op, bound = TARGETS[name]
        met = bool(value >= bound) if op == ">=" else bool(value <= bound)
        out[name] = {"value": value, "target": f"{op} {bound}", "met": met and not np.isnan(value)}
    return out


def scalar_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """Flat `{name: float}` of the result for TensorBoard / metrics.jsonl."""
    out = {}
    for family, m in result.get("families", {}).items():
        out[f"{family}/loss"] = m["loss"]
        out[f"{family}/token_accuracy"] = m["token_accuracy"]
    for key in ("category_exact_match", "colour_exact_match"):
        if key in result.get("describe", {}):
            out[f"describe_product/{key}"] = result["describe"][key]["mean"]
    p = result.get("prompts", {})
    for key in ("greedy_parse_rate", "sampled_parse_rate"):
        if key in p:
            out[f"background_prompt/{key}"] = p[key]["mean"]
    for key, value in p.get("true_ctr", {}).items():
        if isinstance(value, Mapping) and "mean" in value:
            out[f"background_prompt/true_ctr_{key}"] = value["mean"]
        elif isinstance(value, float):
            out[f"background_prompt/true_ctr_{key}"] = value
    return out
