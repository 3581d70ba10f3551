"""Simulating the marketplace's logs and writing the world to disk (`make_market`).

The world itself (products, background painter, hidden click model, prompt grammar) is
`caig_jax.data.market`; what measures it (pairs, oracle, world report) is `caig_jax.data.world`. This module runs
the simulation: creatives, impressions and clicks per product, CreativeRanking-layout logs, LLaVA
conversations, the contact sheet and the reports; see `make_market`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import shutil
from typing import Any

import cv2
import numpy as np
from PIL import Image

from caig_jax.data import pairs as pairs_lib
from caig_jax.data import product as product_lib
from caig_jax.data import world as world_lib
from caig_jax.data.ctr_logs import DataError
from caig_jax.data.images import encode_image
from caig_jax.data.market import (
    _RING,
    CATEGORIES,
    CLICK_MODEL_RES,
    CTR_GAIN,
    CTR_RANGE,
    MARKET_VERSION,
    PRODUCT_CONTRAST,
    TYPICAL_DISTANCE,
    _stream,
    background_look,
    ctr_from_looks,
    make_product,
    paint_background,
    product_image,
    sample_prompt,
)
from caig_jax.files import write_atomic


@dataclasses.dataclass(frozen=True)
class MarketConfig:
    """What `make_market` simulates. `configs/market.py` holds the presets."""

    num_products: int = 500
    categories: tuple[str, ...] = tuple(CATEGORIES)
    min_creatives: int = 8
    max_creatives: int = 12
    image_size: int = 96  # composed ads (the logs' images)
    product_size: int = 128  # RGBA cut-outs
    on_brief: float = 0.4  # probability that a creative's prompt is on the category's brief
    impressions_median: float = 3000.0
    impressions_sigma: float = 0.5
    low_impression_fraction: float = 0.05  # creatives with impressions in [100, 1000)
    item_offset_sd: float = 0.25  # the product's own attractiveness, log-odds
    max_days: int = 3  # each creative's impressions are spread over 1..max_days daily rows
    split_fractions: tuple[tuple[str, float], ...] = (("train", 0.7), ("val", 0.1), ("test", 0.2))
    min_impressions: int = 1000  # the pair rule used for the oracle report
    min_ratio: float = 1.05
    max_ratio: float = 1.20
    contact_sheet_products: int = 10
    num_workers: int = 0  # >1: simulate items in that many processes

    @classmethod
    def make(cls, config: Any = None, **overrides: Any) -> MarketConfig:
        """From a MarketConfig, a mapping (e.g. a ConfigDict) or keyword overrides; unknown keys raise."""
        values: dict[str, Any] = {}
        if isinstance(config, MarketConfig):
            values = dataclasses.asdict(config)
        elif config is not None:
            values = dict(config.items() if hasattr(config, "items") else config)
        values.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown market option(s) {unknown}; known: {sorted(known)}")
        if "categories" in values:
            values["categories"] = tuple(values["categories"])
            bad = sorted(set(values["categories"]) - set(CATEGORIES))
            if bad:
                raise ValueError(f"unknown categories {bad}; known: {sorted(CATEGORIES)}")
        if "split_fractions" in values:
            sf = values["split_fractions"]
            values["split_fractions"] = tuple((str(k), float(v)) for k, v in (sf.items() if hasattr(sf, "items") else sf))
        cfg = cls(**values)
        if not 2 <= cfg.min_creatives <= cfg.max_creatives:
            raise ValueError(f"need 2 <= min_creatives <= max_creatives, got {cfg.min_creatives}, {cfg.max_creatives}")
        return cfg


def _png(image: np.ndarray) -> bytes:
    return encode_image(image, "png")


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()


def _item_category(cfg: MarketConfig, index: int) -> str:
    return cfg.categories[index % len(cfg.categories)]


def _simulate_item(out_dir: str, cfg: MarketConfig, seed: int, index: int) -> dict[str, Any]:
    """Draws one product and its creatives, writes their images, returns the item's log (cached on disk)."""
    cache = os.path.join(out_dir, "_work", f"item{index:05d}.json")
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    category = _item_category(cfg, index)
    product = make_product(index, category, seed)
    cutout = product_image(product, cfg.product_size)
    product_path = os.path.join(out_dir, "products", "images", f"{product.id}.png")
    if not os.path.exists(product_path):
        write_atomic(product_path, _png(cutout))
    placed = product_lib.place_product(cutout, size=cfg.image_size)
    rng = _stream(seed, index, 3)
    offset = float(rng.normal(0.0, cfg.item_offset_sd))
    creatives = []
    for j in range(int(rng.integers(cfg.min_creatives, cfg.max_creatives + 1))):
        on_brief = bool(rng.random() < cfg.on_brief)
        prompt = sample_prompt(rng, category if on_brief else None)
        bg_seed = int(rng.integers(0, 2**31 - 1))
        ad = product_lib.paste_product(paint_background(prompt, cfg.image_size, bg_seed), placed)
        look = background_look(ad)  # the click model's hidden feature of this ad (kept for the world report)
        ctr = float(ctr_from_looks(look, product, offset))  # == true_ctr(ad, product, offset)
        name = f"{product.id}_{j:02d}.png"
        path = os.path.join(out_dir, "logs", "images", name)
        if not os.path.exists(path):
            write_atomic(path, _png(ad))
        if rng.random() < cfg.low_impression_fraction:
            impressions = int(rng.integers(100, 1000))
        else:
            impressions = int(round(math.exp(rng.normal(math.log(cfg.impressions_median), cfg.impressions_sigma))))
            impressions = max(impressions, 1)
        days = int(rng.integers(1, cfg.max_days + 1))
        per_day = rng.multinomial(impressions, [1.0 / days] * days)
        first_day = int(rng.integers(0, 28 - days))
        rows = [[f"202406{first_day + d + 1:02d}", int(n), int(rng.binomial(int(n), ctr))] for d, n in enumerate(per_day)]
        creatives.append({"name": name, "prompt": prompt, "on_brief": on_brief, "bg_seed": bg_seed,
                          "true_ctr": ctr, "look": [float(v) for v in look], "rows": rows})
    item = {"id": product.id, "index": index, "category": category, "title": product.title,
            "attributes": product.attributes, "item_offset": offset, "creatives": creatives}
    write_atomic(cache, _json_bytes(item))
    return item


def _simulate_items(out_dir: str, cfg: MarketConfig, seed: int) -> list[dict[str, Any]]:
    indices = range(cfg.num_products)
    if cfg.num_workers > 1:
        ctx = multiprocessing.get_context("spawn")  # the parent may hold JAX threads: never fork it
        with concurrent.futures.ProcessPoolExecutor(cfg.num_workers, mp_context=ctx) as pool:
            return list(pool.map(_simulate_item, *zip(*[(out_dir, cfg, seed, i) for i in indices]), chunksize=8))
    return [_simulate_item(out_dir, cfg, seed, i) for i in indices]


def _assign_splits(cfg: MarketConfig, seed: int) -> dict[int, str]:
    """Whole items to splits, balanced over categories: items are dealt round-robin over categories (in a
    random order within each category), the smaller splits first, so every split sees every category as
    soon as it has that many items."""
    rng = np.random.default_rng([seed, 4])
    per_category = []
    for category in cfg.categories:
        members = [i for i in range(cfg.num_products) if _item_category(cfg, i) == category]
        per_category.append([members[k] for k in rng.permutation(len(members))])
    dealt = [m[r] for r in range(max(map(len, per_category))) for m in per_category if r < len(m)]
    n = len(dealt)
    names = [name for name, _ in cfg.split_fractions]
    fractions = np.array([f for _, f in cfg.split_fractions], np.float64)
    exact = fractions / fractions.sum() * n
    counts = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - counts))[: n - counts.sum()]:  # largest remainders get the leftovers
        counts[k] += 1
    out, start = {}, 0
    for k in np.argsort(fractions, kind="stable"):
        for i in dealt[start : start + counts[k]]:
            out[i] = names[k]
        start += counts[k]
    return out


_DESCRIBE_PRODUCT_Q = (
    "Describe the product in this image.",
    "What product is shown in this picture? Describe it briefly.",
    "Give a short description of this product.",
)
_DESCRIBE_BACKGROUND_Q = (
    "Describe the background of this advertising image.",
    "What does the background of this ad look like?",
)
_TITLE_Q = ("Write a short product title for this advertising image.", "Give this product a title.")
PROMPT_INSTRUCTIONS = (  # the background-prompt task's instructions (SFT data; the preference rounds)
    "The product is '{title}'. Write a background prompt for an advertising image of this product.",
    "Write a Stable Diffusion background prompt for the product '{title}'.",
)


def _conversations(items: list[dict[str, Any]], rng: np.random.Generator) -> dict[str, list[dict[str, Any]]]:
    """The three pre-training task families as LLaVA conversation lists (image paths relative to the root)."""
    fam: dict[str, list[dict[str, Any]]] = {"describe_product": [], "describe_background": [], "background_prompt": []}
    turn = lambda q, a: [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]  # noqa: E731
    for item in items:
        a = item["attributes"]
        cat = CATEGORIES[item["category"]]
        product_image_path = f"products/images/{item['id']}.png"
        fam["describe_product"].append({
            "id": f"{item['id']}_product",
            "image": product_image_path,
            "conversations": turn(str(rng.choice(_DESCRIBE_PRODUCT_Q)),
                                  f"A {a['colour']} {cat.noun} made of {a['material']} by {a['brand']}. "
                                  f"Title: {item['title']}."),
        })
        for c in item["creatives"][:3]:
            if rng.random() < 0.5:
                q, ans, kind = str(rng.choice(_DESCRIBE_BACKGROUND_Q)), f"The {cat.noun} is shown on a background of {c['prompt']}.", "bg"
            else:
                q, ans, kind = str(rng.choice(_TITLE_Q)), item["title"], "title"
            fam["describe_background"].append({
                "id": f"{c['name'][:-4]}_{kind}", "image": f"logs/images/{c['name']}", "conversations": turn(q, ans)})
        for c in item["creatives"]:
            fam["background_prompt"].append({
                "id": f"{c['name'][:-4]}_prompt",
                "image": product_image_path,
                "conversations": turn(str(rng.choice(PROMPT_INSTRUCTIONS)).format(title=item["title"]), c["prompt"]),
            })
    return fam


def _contact_sheet(out_dir: str, items: list[dict[str, Any]], cfg: MarketConfig, tile: int = 128) -> np.ndarray:
    """One row per category: the cut-out on a checkerboard, then its ads sorted by true CTR (annotated)."""
    chosen, seen = [], set()
    for item in items:
        if item["category"] not in seen and len(chosen) < cfg.contact_sheet_products:
            chosen.append(item)
            seen.add(item["category"])
    rows = []
    ncol = 6
    for item in chosen:
        cut = np.asarray(Image.open(os.path.join(out_dir, "products", "images", f"{item['id']}.png")).convert("RGBA"))
        cut = cv2.resize(cut, (tile, tile), interpolation=cv2.INTER_AREA)
        yy, xx = np.mgrid[0:tile, 0:tile]
        checker = np.where(((yy // 8 + xx // 8) % 2)[..., None] == 0, 230, 200).astype(np.float32)
        a = cut[..., 3:].astype(np.float32) / 255.0
        tiles = [(cut[..., :3] * a + checker * (1 - a)).astype(np.uint8)]
        cv2.putText(tiles[0], item["category"][:16], (3, tile - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
        ads = sorted(item["creatives"], key=lambda c: -c["true_ctr"])[: ncol - 1]
        for c in ads:
            ad = np.asarray(Image.open(os.path.join(out_dir, "logs", "images", c["name"])).convert("RGB"))
            ad = np.ascontiguousarray(cv2.resize(ad, (tile, tile), interpolation=cv2.INTER_CUBIC))
            imp = sum(r[1] for r in c["rows"])
            logged = sum(r[2] for r in c["rows"]) / max(imp, 1)
            ad[-14:] = (ad[-14:].astype(np.float32) * 0.35).astype(np.uint8)
            cv2.putText(ad, f"true {100 * c['true_ctr']:.1f}% log {100 * logged:.1f}%", (3, tile - 4),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.3, (255, 255, 255), 1, cv2.LINE_AA)
            tiles.append(ad)
        while len(tiles) < ncol:
            tiles.append(np.full((tile, tile, 3), 255, np.uint8))
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def _fingerprint(cfg: MarketConfig, seed: int) -> str:
    click_model = [PRODUCT_CONTRAST, CTR_GAIN, TYPICAL_DISTANCE, list(CTR_RANGE), CLICK_MODEL_RES, _RING]
    blob = json.dumps({"config": dataclasses.asdict(cfg), "seed": seed, "version": MARKET_VERSION,
                       "click_model": click_model}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]




def make_market(out_dir: str, config: Any = None, *, seed: int = 0, overwrite: bool = False, verbose: bool = True,
                **overrides: Any) -> dict[str, Any]:
    """Simulates the marketplace into `out_dir` and returns its report (also written as `report.json`).

    `config`: a `MarketConfig`, a mapping of its fields (e.g. `config.market` of configs/market.py), or
    None; keyword `overrides` win. Layout written under `out_dir`:

        products/images/<item>.png                RGBA cut-outs
        products/products.json                    CAIG tiny.json layout + category, attributes, split
        logs/images/<item>_<k>.png                composed ads (the CreativeRanking images folder)
        logs/list/{train,val,test}_data_list.txt  item_id, image_name, date, impressions, clicks (tab-separated)
        logs/truth.tsv                            image_name, true_ctr, item_id, prompt, on_brief (simulation only)
        conversations/<family>_<split>.json       LLaVA JSON: describe_product, describe_background,
                                                  background_prompt (image paths relative to out_dir)
        oracle.json, report.json, contact_sheet.png, market_config.json, COMPLETE
        world_report.json, world_report.md        the world's figures (`caig_jax.data.world.world_report`)

    Re-running with the same config and seed reuses a complete world; an interrupted run resumes (every
    file is written atomically and every item has its own random stream, so the result is identical).
    A world made with another config raises unless `overwrite=True`.
    """
    cfg = MarketConfig.make(config, **overrides)
    fp = _fingerprint(cfg, seed)
    done = os.path.join(out_dir, "COMPLETE")
    config_path = os.path.join(out_dir, "market_config.json")
    previous = None  # the fingerprint of what is already in out_dir (finished or not)
    if os.path.exists(done):
        with open(done) as f:
            previous = f.read().strip()
        if previous == fp:
            with open(os.path.join(out_dir, "report.json")) as f:
                return json.load(f)
    elif os.path.exists(config_path):
        with open(config_path) as f:
            previous = json.load(f).get("fingerprint")
    if previous is not None and previous != fp:
        if not overwrite:
            raise DataError(f"{out_dir} holds a market made with another config or seed (fingerprint {previous}, "
                            f"now {fp}); use another directory or overwrite=True")
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(config_path, _json_bytes({"config": dataclasses.asdict(cfg), "seed": seed, "fingerprint": fp}))

    items = _simulate_items(out_dir, cfg, seed)
    split_of_index = _assign_splits(cfg, seed)
    splits = {item["id"]: split_of_index[item["index"]] for item in items}

    products = [{"id": it["id"], "image": f"images/{it['id']}.png", "new_caption": it["title"],
                 "category": it["category"], "attributes": it["attributes"], "split": splits[it["id"]]} for it in items]
    write_atomic(os.path.join(out_dir, "products", "products.json"), _json_bytes(products))

    for split, _ in cfg.split_fractions:
        lines = [f"{it['id']}\t{c['name']}\t{r[0]}\t{r[1]}\t{r[2]}" for it in items if splits[it["id"]] == split
                 for c in it["creatives"] for r in c["rows"]]
        write_atomic(os.path.join(out_dir, "logs", "list", f"{split}_data_list.txt"), ("\n".join(lines) + "\n").encode())
    truth = ["image_name\ttrue_ctr\titem_id\tprompt\ton_brief"] + [
        f"{c['name']}\t{c['true_ctr']:.6f}\t{it['id']}\t{c['prompt']}\t{int(c['on_brief'])}" for it in items for c in it["creatives"]]
    write_atomic(os.path.join(out_dir, "logs", "truth.tsv"), ("\n".join(truth) + "\n").encode())

    rng = np.random.default_rng([seed, 5])
    families = {split: _conversations([it for it in items if splits[it["id"]] == split], rng) for split, _ in cfg.split_fractions}
    conversation_files = {}
    for split, fam in families.items():
        for name, entries in fam.items():
            rel = f"conversations/{name}_{split}.json"
            write_atomic(os.path.join(out_dir, rel), _json_bytes(entries))
            conversation_files.setdefault(split, []).append(rel)

    rule = pairs_lib.PairRule(cfg.min_impressions, cfg.min_ratio, cfg.max_ratio)
    pairs_by_split = world_lib.caig_pairs(items, splits, rule, seed, [s for s, _ in cfg.split_fractions])
    oracle = world_lib.oracle_report(pairs_by_split, rule)
    write_atomic(os.path.join(out_dir, "oracle.json"), _json_bytes(oracle))
    world = world_lib.world_report(items, splits, rule, seed, pairs_by_split=pairs_by_split, workers=cfg.num_workers)
    write_atomic(os.path.join(out_dir, "world_report.json"), _json_bytes(world))
    write_atomic(os.path.join(out_dir, "world_report.md"), world_lib.world_report_markdown(world).encode())
    sheet = _contact_sheet(out_dir, items, cfg)
    write_atomic(os.path.join(out_dir, "contact_sheet.png"), _png(sheet))

    all_ctr = np.array([c["true_ctr"] for it in items for c in it["creatives"]])
    impressions = np.array([sum(r[1] for r in c["rows"]) for it in items for c in it["creatives"]])
    report = {
        "seed": seed,
        "fingerprint": fp,
        "products": len(items),
        "products_per_split": {s: sum(v == s for v in splits.values()) for s, _ in cfg.split_fractions},
        "creatives": int(all_ctr.size),
        "true_ctr_percentiles": dict(zip(("p5", "p25", "p50", "p75", "p95"),
                                         np.percentile(all_ctr, [5, 25, 50, 75, 95]).round(5).tolist())),
        "impressions_median": float(np.median(impressions)),
        "creatives_over_min_impressions": float(np.mean(impressions > cfg.min_impressions)),
        "conversations": {s: {n: len(v) for n, v in fam.items()} for s, fam in families.items()},
        "conversation_files": conversation_files,
        "oracle": oracle,
        "world": {k: world[k] for k in ("test_pairs", "oracle_accuracy", "near_tie_share", "true_ratio_pairs",
                                        "flat_stretch_share", "targets")}
                 | {"exact_feature_ceiling": world["exact_feature_ceiling"],
                    "prompt_ceiling": world["prompt_ceiling"]["mean_true_ctr"],
                    "sibling_separability": {k: v for k, v in world["sibling_separability"].items() if k != "per_product"}},
        "paths": {"products": "products/products.json", "logs": "logs", "truth": "logs/truth.tsv",
                  "contact_sheet": "contact_sheet.png", "oracle": "oracle.json", "world_report": "world_report.json",
                  "world_report_md": "world_report.md"},
    }
    write_atomic(os.path.join(out_dir, "report.json"), _json_bytes(report))
    write_atomic(done, fp.encode())
    if verbose:
        per = ", ".join(f"{s} {v['oracle_accuracy']:.3f} ({v['pairs']} pairs)" for s, v in oracle["splits"].items())
        print(f"market: {len(items)} products, {all_ctr.size} creatives in {out_dir}; oracle accuracy {per}")
        print("world: " + ", ".join(f"{k} {v['value']:.3f} ({v['target']})" for k, v in world["targets"].items()))
    return report
