"""The synthetic marketplace: painter vocabulary, composition, hidden click model, world on disk, market job."""

import dataclasses
import filecmp
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from caig_jax.data import ctr_logs as logs_lib
from caig_jax.data import loader, market
from caig_jax.data import product as product_lib
from caig_jax.data import simulation
from caig_jax.data import world as world_lib
from caig_jax.data.builders.llava_conversations import check_conversation
from caig_jax.data.ctr_logs import DataError
from caig_jax.data.pairs import PairRule, pair_indices
from caig_jax.jobs import market as market_job
from caig_jax.objectives.reward import prefers_left

SMALL = dict(num_products=20, min_creatives=3, max_creatives=5, image_size=32, product_size=48,
             contact_sheet_products=4, impressions_median=3000.0)


def _luma(img):
    return float((img.astype(np.float32) @ np.array([0.299, 0.587, 0.114])).mean())


def test_parse_prompt_longest_phrase_first_and_unknown_words_ignored():
    p = market.parse_prompt("A pastel pink Marble kitchen counter, warm lighting, bokeh and glitter")
    assert p.colours == ("pastel pink",) and p.materials == ("marble",) and p.scenes == ("kitchen counter",)
    assert p.lighting == ("warm lighting",) and p.patterns == ("bokeh",)
    assert market.parse_prompt("glitter unicorn").descriptors() == ()


def test_paint_background_is_deterministic_and_follows_the_vocabulary():
    a = market.paint_background("white studio backdrop", 48, seed=1)
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, market.paint_background("white studio backdrop", 48, seed=1))
    assert not np.array_equal(market.paint_background("wooden kitchen counter", 48, 1),
                              market.paint_background("wooden kitchen counter", 48, 2))  # seed moves texture
    assert _luma(a) > _luma(market.paint_background("black studio backdrop", 48, 1)) + 100
    warm = market.paint_background("grey studio backdrop, warm lighting", 48, 0).astype(int)
    cool = market.paint_background("grey studio backdrop, cool lighting", 48, 0).astype(int)
    assert (warm[..., 0] - warm[..., 2]).mean() > (cool[..., 0] - cool[..., 2]).mean() + 30
    assert _luma(market.paint_background("grey studio backdrop, dim light", 48, 0)) < _luma(
        market.paint_background("grey studio backdrop, bright daylight", 48, 0)) - 40
    garden = market.paint_background("garden", 48, 0).astype(int)
    assert (garden[..., 1] - (garden[..., 0] + garden[..., 2]) / 2).mean() > 20


def test_compose_ad_places_like_the_renderer_and_keeps_product_pixels():
    product = market.make_product(3, "coffee_mug", seed=0)
    rgba = market.product_image(product, 64)
    assert rgba.shape == (64, 64, 4) and rgba[..., 3].any() and not rgba[..., 3].all()
    ad = market.compose_ad(rgba, "blue studio backdrop", size=80, seed=0)
    placed = product_lib.place_product(rgba, size=80)
    opaque = placed[..., 3] == 255
    np.testing.assert_array_equal(ad[opaque], placed[..., :3][opaque])
    bg = market.paint_background("blue studio backdrop", 80, 0)
    np.testing.assert_array_equal(ad[placed[..., 3] == 0], bg[placed[..., 3] == 0])


def test_every_category_draws_distinct_products():
    cutouts = {c: market.product_image(market.make_product(i, c, 0), 48) for i, c in enumerate(market.CATEGORIES)}
    assert len(cutouts) >= 8
    shapes = {c: (v[..., 3] > 128) for c, v in cutouts.items()}
    names = list(shapes)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert (shapes[names[i]] != shapes[names[j]]).mean() > 0.05, (names[i], names[j])
    p = market.make_product(7, "lipstick", 0)
    assert p.title.endswith("lipstick") and set(p.attributes) >= {"colour", "material", "brand", "price"}


def test_true_ctr_prefers_each_categorys_own_look():
    """The category still matters: for a product of each category, its category's ideal prompt beats most
    other categories' ideal prompts (the product's colour moves the optimum from there: see the next tests)."""
    products = {c: market.make_product(i, c, 0) for i, c in enumerate(market.CATEGORIES)}
    rgba = market.product_image(products["smartphone"], 64)
    ads = {c: market.compose_ad(rgba, market.CATEGORIES[c].ideal, 96, 0) for c in market.CATEGORIES}
    for c, p in products.items():
        own = market.true_ctr(ads[c], p)
        others = [market.true_ctr(ads[o], p) for o in market.CATEGORIES if o != c]
        assert own >= np.median(others), c
    dark, bright = ads["smartphone"], ads["t_shirt"]
    assert market.true_ctr(dark, products["smartphone"]) > 1.3 * market.true_ctr(bright, products["smartphone"])
    assert market.true_ctr(bright, products["t_shirt"]) > 1.3 * market.true_ctr(dark, products["t_shirt"])
    with pytest.raises(TypeError, match="Product"):
        market.true_ctr(dark, "smartphone")  # v2's signature: the truth now depends on the product


def test_true_ctr_and_make_product_are_deterministic_and_total():
    for index, category in ((0, "lipstick"), (7, "lipstick"), (123456, "water_bottle"), (-3, "headphones"), (3, "sneaker")):
        p = market.make_product(index, category, seed=5)
        assert p == market.make_product(index, category, seed=5) and p.category == category
        assert p.attributes["colour"] in market.CATEGORIES[category].product_colours
        assert p.attributes["colour"] in p.title and p.title.endswith(market.CATEGORIES[category].noun)
        np.testing.assert_array_equal(market.product_image(p, 40), market.product_image(p, 40))
    assert market.make_product(1, "handbag", 0) != market.make_product(1, "handbag", 1)
    assert market.make_product(-3, "handbag", 0) != market.make_product(3, "handbag", 0)
    with pytest.raises(ValueError, match="unknown category"):
        market.make_product(0, "spaceship", 0)
    p = market.make_product(4, "coffee_mug", 0)
    rgba = market.product_image(p, 64)
    for size in (32, 33, 100, 512):
        ad = market.compose_ad(rgba, "teal marble kitchen counter, warm lighting", size, 1)
        a, b = market.true_ctr(ad, p), market.true_ctr(ad.copy(), p)
        assert a == b and 0.0 < a < 1.0 and isinstance(a, float)
    with pytest.raises(ValueError, match="at least 32"):
        market.true_ctr(np.zeros((31, 31, 3), np.uint8), p)


def test_true_ctr_depends_on_the_product_colour_not_only_the_category():
    """Same-category siblings of different colours want different backgrounds: a light product's shoppers
    prefer a darker background than a dark product's shoppers do."""
    shirts = [market.make_product(i, "t_shirt", 0) for i in range(200)]
    white = next(p for p in shirts if p.attributes["colour"] == "white")
    black = next(p for p in shirts if p.attributes["colour"] == "black")
    assert market.product_target(white)[0] < market.product_target(black)[0]  # luma of the ideal look
    rgba = market.product_image(white, 64)
    lighter, darker = (market.compose_ad(rgba, prompt, 64, 0) for prompt in
                       ("white paper bedroom, bright daylight", "beige linen bedroom, dim light"))
    assert market.true_ctr(darker, white) / market.true_ctr(lighter, white) > market.true_ctr(
        darker, black) / market.true_ctr(lighter, black)


def test_true_ctr_levels_and_low_resolution_visibility():
    rng = np.random.default_rng(0)
    product = market.make_product(1, "handbag", 0)
    rgba = market.product_image(product, 64)
    ctrs, small = [], []
    for k in range(40):
        ad = market.compose_ad(rgba, market.sample_prompt(rng), 128, k)
        ctrs.append(market.true_ctr(ad, product))
        # What a reward model sees at 32 px carries the whole signal: same CTR from the downsized ad.
        small.append(market.true_ctr(np.asarray(Image.fromarray(ad).resize((32, 32), Image.BOX)), product))
        assert market.true_ctr(ad, product) == ctrs[-1]  # deterministic
    ctrs = np.array(ctrs)
    assert market.CTR_RANGE[0] <= ctrs.min() and ctrs.max() <= market.CTR_RANGE[1]
    assert 0.01 <= np.median(ctrs) <= 0.05 and ctrs.max() / ctrs.min() > 2
    np.testing.assert_allclose(np.log(small), np.log(ctrs), atol=0.03)


def test_scoring_from_the_background_look_equals_scoring_the_composed_ad():
    """The world report scores prompts from cached background looks; that is exactly true_ctr of the ad."""
    rng = np.random.default_rng(1)
    for size in (32, 64):
        cache = world_lib.PromptLooks(size=size, seed=3)
        for k in range(12):
            product = market.make_product(k, list(market.CATEGORIES)[k % 10], 0)
            rgba = market.product_image(product, 48)
            prompt = market.sample_prompt(rng, product.category if k % 2 else None)
            ad = market.compose_ad(rgba, prompt, size, 3)
            assert cache.ctr([prompt], product)[0] == market.true_ctr(ad, product)
            assert world_lib.prompt_ctr(prompt, product, size, 3) == market.true_ctr(ad, product)
            np.testing.assert_array_equal(cache.looks([prompt])[0], market.background_look(ad))
    assert world_lib.PromptLooks().looks([]).shape == (0, 3)
    with pytest.raises(ValueError, match=">= 32"):
        world_lib.PromptLooks(size=16)


def test_prompt_grammar_is_what_sample_prompt_writes():
    grammar = world_lib.prompt_grammar()
    assert len(grammar) == 295_920 and len(set(grammar)) == len(grammar)
    assert len(world_lib.prompt_grammar(patterns=False)) == 32_880
    known = set(grammar)
    rng = np.random.default_rng(0)
    for k in range(300):
        assert market.sample_prompt(rng, list(market.CATEGORIES)[k % 10] if k % 3 else None) in known


def _sample_products(per_category=6, categories=("t_shirt", "smartphone", "coffee_mug")):
    """Same-category products with distinct colours (the first `per_category` colours drawn)."""
    out = []
    for k, c in enumerate(categories):
        seen, i = set(), 1000 * k  # distinct indices: product ids are "item<index>"
        while len(seen) < per_category:
            p = market.make_product(i, c, 0)
            if p.attributes["colour"] not in seen:
                seen.add(p.attributes["colour"])
                out.append(p)
            i += 1
    return out


@pytest.fixture(scope="module")
def sample_search():
    """The world report's oracle-prompt search for a small sample of products (its 32,880 painted looks are
    cached in the process: the market built by the `world` fixture reuses them)."""
    products = _sample_products()
    return products, world_lib.oracle_prompts(products)


def test_sibling_separability_on_a_small_sample(sample_search):
    products, search = sample_search
    best_looks = {p.id: search["candidate_looks"][search["best"][p.id]] for p in products}
    best_prompts = {p.id: search["candidates"][search["best"][p.id]] for p in products}
    sep = world_lib.sibling_separability(products, best_looks, best_prompts)
    assert sep["pairs"] == 3 * 6 * 5 and sep["rate"] >= 0.8 and sep["median_ctr_ratio"] > 1.05
    # Strict wins only: a sibling that shares the product's best prompt is not separated from it.
    twin = dataclasses.replace(products[0], id="twin")
    sep2 = world_lib.sibling_separability([products[0], twin], {"twin": best_looks[products[0].id], **best_looks},
                                          {"twin": best_prompts[products[0].id], **best_prompts})
    assert sep2["rate"] == 0.0 and sep2["shared_best_prompt"] == 1.0
    # Nothing in the searched set beats a product's best for it.
    for p in products:
        assert search["ctr"][p.id] == world_lib.prompt_looks().ctr(search["candidates"], p).max()


def test_match_rates_on_a_hand_made_example(sample_search):
    products, search = sample_search
    oracle = {p.id: search["candidates"][search["best"][p.id]] for p in products}
    same = {p.id: "grey studio backdrop, soft lighting" for p in products}  # ignores the product
    for fn in (world_lib.match_rate_sibling, world_lib.match_rate_cross):
        r = fn(products, same)
        assert r["rate"] == 0.5 and r["tie_share"] == 1.0 and set(r["per_product"]) == {p.id for p in products}
    r = world_lib.match_rate_sibling(products, oracle)
    assert r["rate"] >= 0.9 and r["comparisons"] == 3 * 6 * 5
    assert world_lib.match_rate_cross(products, oracle)["rate"] >= 0.95
    # A writer that ignores the product but samples: 0.5 in expectation (ties are rare, not certain).
    rng = np.random.default_rng(0)
    random_writer = {p.id: [market.sample_prompt(rng) for _ in range(8)] for p in products}
    assert abs(world_lib.match_rate_sibling(products, random_writer)["rate"] - 0.5) < 0.12
    # Several prompts per product, keyed by Product or by id; products without prompts or siblings are left out.
    mixed = {products[0]: [oracle[products[0].id], same[products[0].id]], products[1].id: oracle[products[1].id]}
    r = world_lib.match_rate_sibling(products, mixed)
    assert set(r["per_product"]) == {products[0].id, products[1].id} and r["comparisons"] == 4
    assert world_lib.match_rate_sibling(products[:1], oracle)["per_product"] == {}


def test_one_comparison_rule_ties_go_left():
    """`prefers_left` (left >= right) decides every oracle / true order; a tie goes left everywhere."""
    tied = np.array([[0.02, 0.02], [0.03, 0.02], [0.02, 0.03]])
    np.testing.assert_array_equal(world_lib.oracle_agreement(tied, [0, 0, 0]), [True, True, False])
    np.testing.assert_array_equal(world_lib.oracle_agreement(tied, [1, 1, 1]), [False, False, True])
    assert bool(prefers_left(0.5, 0.5)) and not bool(prefers_left(0.4, 0.5))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("market") / "w")
    report = simulation.make_market(out, seed=3, verbose=False, **SMALL)
    return out, report


def test_world_layout_on_disk(world):
    out, report = world
    products = json.load(open(os.path.join(out, "products", "products.json")))
    assert len(products) == 20 and report["products"] == 20
    assert {"id", "image", "new_caption", "category", "attributes", "split"} <= set(products[0])
    for p in products:
        rgba = product_lib.load_product_image(os.path.join(out, "products", p["image"]))
        assert rgba.shape == (48, 48, 4)
    by_split = logs_lib.read_creative_ranking(os.path.join(out, "logs"))
    assert set(by_split) == {"train", "val", "test"}
    split_of = {p["id"]: p["split"] for p in products}
    for split, creatives in by_split.items():
        assert all(split_of[c.item_id] == split for c in creatives)  # splits by item, as products.json says
    assert sum(len(v) for v in by_split.values()) == report["creatives"]
    assert Image.open(os.path.join(out, "contact_sheet.png")).size == (6 * 128, 4 * 128)
    for name in report["paths"].values():
        assert os.path.exists(os.path.join(out, name))


def test_truth_is_the_click_model_of_the_logged_pixels_and_oracle_recomputes(world):
    out, report = world
    products = {p["id"]: p for p in json.load(open(os.path.join(out, "products", "products.json")))}
    truth = logs_lib.read_truth_file(os.path.join(out, "logs", "truth.tsv"))
    work = {f[:-5]: json.load(open(os.path.join(out, "_work", f))) for f in os.listdir(os.path.join(out, "_work"))}
    by_split = logs_lib.read_creative_ranking(os.path.join(out, "logs"))
    for creatives in by_split.values():
        for c in creatives[:12]:
            image = np.asarray(Image.open(c.image).convert("RGB"))
            item = work[c.item_id]
            product = market.make_product(item["index"], item["category"], 3)
            assert product.title == products[c.item_id]["new_caption"]
            assert market.true_ctr(image, product, item["item_offset"]) == pytest.approx(truth[c.name], abs=2e-6)
    for split, creatives in by_split.items():
        records = [c.record() for c in creatives]
        pairs, _ = pair_indices(records, PairRule(), seed=3)
        agree = [prefers_left(truth[creatives[p.left].name], truth[creatives[p.right].name]) == (p.label == 0)
                 for p in pairs]
        assert report["oracle"]["splits"][split]["pairs"] == len(pairs)
        if pairs:
            assert report["oracle"]["splits"][split]["oracle_accuracy"] == pytest.approx(np.mean(agree))


def test_world_report_is_written_with_every_figure(world):
    out, report = world
    w = json.load(open(os.path.join(out, "world_report.json")))
    assert tuple(w) == world_lib.REPORT_KEYS
    assert w["version"] == market.MARKET_VERSION == 3
    assert w["oracle_accuracy"] == report["oracle"]["splits"]["test"]["oracle_accuracy"]  # one rule, one number
    assert w["test_pairs"] == report["oracle"]["splits"]["test"]["pairs"]
    for key in ("near_tie_share", "flat_stretch_share"):
        assert 0.0 <= w[key] <= 1.0
    assert set(w["exact_feature_ceiling"]) >= {"accuracy", "true_order_agreement", "true_order_agreement_true_ratio_pairs",
                                               "train_pairs", "test_pairs"}
    c = w["prompt_ceiling"]
    assert c["search"]["stage1_prompts"] == 32_880 and set(c["per_product"]) == {f"item{i:05d}" for i in range(20)}
    m = c["mean_true_ctr"]
    assert m["oracle_prompt"] > m["random_on_brief"] > m["random"]  # the ceiling, on-brief, the floor
    for v in c["per_product"].values():
        assert v["oracle_ctr"] >= max(v["random_ctr"], v["random_on_brief_ctr"]) - 1e-12
    assert 0.0 <= w["sibling_separability"]["rate"] <= 1.0 and w["sibling_separability"]["pairs"] == 10 * 2 * 1
    assert set(w["targets"]) == set(world_lib.TARGETS)
    md = open(os.path.join(out, "world_report.md")).read()
    assert md.startswith("## World report") and "sibling separability" in md and "exact-feature ceiling" in md
    assert report["world"]["targets"] == w["targets"] and report["paths"]["world_report"] == "world_report.json"


def test_conversations_are_valid_llava_json(world):
    out, report = world
    for split, files in report["conversation_files"].items():
        assert {os.path.basename(f).rsplit("_", 1)[0] for f in files} == {
            "describe_product", "describe_background", "background_prompt"}
        for f in files:
            entries = json.load(open(os.path.join(out, f)))
            assert entries
            for e in entries:
                assert check_conversation(e, f) is None
                assert os.path.exists(os.path.join(out, e["image"]))


def test_interrupted_market_resumes_to_identical_files(world, tmp_path, monkeypatch):
    reference, _ = world
    out = str(tmp_path / "w")
    real = simulation._simulate_item
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args)

    monkeypatch.setattr(simulation, "_simulate_item", flaky)
    with pytest.raises(KeyboardInterrupt):
        simulation.make_market(out, seed=3, verbose=False, **SMALL)
    assert not os.path.exists(os.path.join(out, "COMPLETE"))
    monkeypatch.setattr(simulation, "_simulate_item", real)
    # Lose some finished outputs too: they are remade identically.
    os.remove(os.path.join(out, "_work", "item00002.json"))
    os.remove(os.path.join(out, "logs", "images", "item00002_00.png"))
    simulation.make_market(out, seed=3, verbose=False, **SMALL)
    cmp = filecmp.dircmp(reference, out)

    def same(c):
        assert not c.left_only and not c.right_only and not c.diff_files, (c.left, c.left_only, c.right_only, c.diff_files)
        for sub in c.subdirs.values():
            same(sub)

    filecmp.clear_cache()
    same(cmp)
    with pytest.raises(DataError, match="another config or seed"):
        simulation.make_market(out, seed=4, verbose=False, **SMALL)
    assert simulation.make_market(out, seed=4, verbose=False, overwrite=True, **SMALL)["seed"] == 4


def test_market_config_rejects_unknown_options():
    with pytest.raises(ValueError, match="unknown market option"):
        simulation.MarketConfig.make(num_prodcts=3)
    with pytest.raises(ValueError, match="unknown categories"):
        simulation.MarketConfig.make(categories=("spaceship",))


def _job_config(**market_overrides):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
    try:
        import market as market_config  # configs/market.py
    finally:
        sys.path.pop(0)
    config = market_config.get_config("tiny")
    config.unlock()
    for k, v in market_overrides.items():
        config.market[k] = v
    config.pairs.image_size = 16
    config.lock()
    return config


def test_market_job_writes_world_datasets_and_report(tmp_path, capsys):
    config = _job_config(num_products=20, min_creatives=3, max_creatives=5, image_size=32, product_size=48,
                         contact_sheet_products=3)
    workdir = str(tmp_path / "job")
    report = market_job.run(config, workdir)
    printed = capsys.readouterr().out
    assert "oracle accuracy" in printed and "pairs" in printed
    assert os.path.exists(os.path.join(workdir, "market_report.md"))
    assert json.load(open(os.path.join(workdir, "market_report.json")))["market"]["products"] == 20
    ds = report["datasets"]
    assert set(ds) == {"ctr_logs", "ctr_logs_wide", "llava_conversations", "products"}
    for split in ("train", "val", "test"):
        src = loader.reward_pair_source(workdir, split)  # a market workdir is enough to find the pairs
        assert len(src) == ds["ctr_logs"]["report"]["splits"][split]["pairs_written"]
        if len(src):
            ex = src[0]
            assert ex["image"].shape == (16, 32, 3) and not np.isnan(ex["true_ctr"]).any()
            assert ex["category"].decode() in market.CATEGORIES and ex["caption"]
    wide = loader.reward_pair_source(workdir, "train", "market_wide")
    assert len(wide) >= len(loader.reward_pair_source(workdir, "train"))
    assert len(loader.conversation_source(workdir, "train")) > 0 and len(loader.product_source(workdir, "test")) > 0
    # A second run on the same workdir reuses everything.
    assert market_job.run(config, workdir)["market"] == report["market"]


@pytest.mark.slow
def test_tiny_preset_command_line(tmp_path):
    """The documented command, on fewer products to stay quick; the oracle lands in the documented range."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = str(tmp_path / "tiny")
    cmd = [sys.executable, "-m", "caig_jax.main", "--config=configs/market.py:tiny", f"--workdir={workdir}",
           "--config.market.num_products=150"]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.load(open(os.path.join(workdir, "market_report.json")))
    assert 0.6 <= report["market"]["oracle"]["oracle_accuracy"] <= 0.9
    ctr = report["market"]["true_ctr_percentiles"]
    assert 0.005 <= ctr["p5"] and ctr["p95"] <= 0.1 and 0.01 <= ctr["p50"] <= 0.05

    # Changed inputs: an edited CTR-log row stops the re-run (naming the file and the option), and
    # --config.build.overwrite=True rebuilds from the edited file; unchanged files are reused.
    dataset_info = os.path.join(workdir, "tfds", "ctr_logs", "market", "1.0.0", "dataset_info.json")
    built = os.path.getmtime(dataset_info)
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and os.path.getmtime(dataset_info) == built, out.stderr[-3000:]
    logs = os.path.join(workdir, "market", "logs", "list", "train_data_list.txt")
    lines = open(logs).read().splitlines()
    lines[3] = lines[3].rsplit("\t", 1)[0] + "\t0"  # the clicks of one daily row
    with open(logs, "w") as f:
        f.write("\n".join(lines) + "\n")
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.splitlines() == [
        f"error: {os.path.dirname(dataset_info)} was built from input files that have changed since: {logs} "
        f"({out.stderr.split(logs + ' (', 1)[1].split(')', 1)[0]})",
        "  fix: rebuild it from the current files with --config.build.overwrite=True, or restore the files",
    ]
    assert os.path.getmtime(dataset_info) == built
    out = subprocess.run(cmd + ["--config.build.overwrite=True"], cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and os.path.getmtime(dataset_info) != built, out.stderr[-3000:]
    shutil.rmtree(workdir)
