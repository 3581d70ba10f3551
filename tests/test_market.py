"""The synthetic marketplace: painter vocabulary, composition, hidden click model, world on disk, market job."""

import filecmp
import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from caig_jax.data import ctr_logs as logs_lib
from caig_jax.data import loader, market
from caig_jax.jobs import market as market_job
from caig_jax.data.builders.llava_conversations import check_conversation
from caig_jax.data.ctr_logs import DataError
from caig_jax.data.pairs import PairRule, pair_indices
from caig_jax.data import product as product_lib

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
    """The best background depends on the product: each category's ideal prompt beats the others' for it."""
    rgba = market.product_image(market.make_product(0, "smartphone", 0), 64)
    ads = {c: market.compose_ad(rgba, market.CATEGORIES[c].ideal, 96, 0) for c in market.CATEGORIES}
    for c in market.CATEGORIES:
        own = market.true_ctr(ads[c], c)
        others = [market.true_ctr(ads[o], c) for o in market.CATEGORIES if o != c]
        assert own >= np.median(others), c
    dark, bright = ads["smartphone"], ads["t_shirt"]
    assert market.true_ctr(dark, "smartphone") > 1.3 * market.true_ctr(bright, "smartphone")
    assert market.true_ctr(bright, "t_shirt") > 1.3 * market.true_ctr(dark, "t_shirt")
    with pytest.raises(ValueError, match="unknown category"):
        market.true_ctr(dark, "spaceship")


def test_true_ctr_levels_and_low_resolution_visibility():
    rng = np.random.default_rng(0)
    rgba = market.product_image(market.make_product(1, "handbag", 0), 64)
    ctrs, small = [], []
    for k in range(40):
        ad = market.compose_ad(rgba, market.sample_prompt(rng), 128, k)
        ctrs.append(market.true_ctr(ad, "handbag"))
        # What a reward model sees at 32 px carries the whole signal: same CTR from the downsized ad.
        small.append(market.true_ctr(np.asarray(Image.fromarray(ad).resize((32, 32), Image.BOX)), "handbag"))
        assert market.true_ctr(ad, "handbag") == ctrs[-1]  # deterministic
    ctrs = np.array(ctrs)
    assert market.CTR_RANGE[0] <= ctrs.min() and ctrs.max() <= market.CTR_RANGE[1]
    assert 0.01 <= np.median(ctrs) <= 0.05 and ctrs.max() / ctrs.min() > 2
    np.testing.assert_allclose(np.log(small), np.log(ctrs), atol=0.03)


def test_background_match_scores_on_brief_descriptors():
    assert market.background_match("wooden kitchen counter, warm lighting", "coffee_mug") == 1.0
    assert market.background_match("neon glow, night sky", "coffee_mug") == 0.0
    assert market.background_match("nothing known here", "coffee_mug") == 0.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("market") / "w")
    report = market.make_market(out, seed=3, verbose=False, **SMALL)
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
            offset = work[c.item_id]["item_offset"]
            assert market.true_ctr(image, products[c.item_id]["category"], offset) == pytest.approx(truth[c.name], abs=2e-6)
    for split, creatives in by_split.items():
        records = [c.record() for c in creatives]
        pairs, _ = pair_indices(records, PairRule(), seed=3)
        agree = [(truth[creatives[p.left].name] > truth[creatives[p.right].name]) == (p.label == 0) for p in pairs]
        assert report["oracle"]["splits"][split]["pairs"] == len(pairs)
        if pairs:
            assert report["oracle"]["splits"][split]["oracle_accuracy"] == pytest.approx(np.mean(agree))


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
    real = market._simulate_item
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args)

    monkeypatch.setattr(market, "_simulate_item", flaky)
    with pytest.raises(KeyboardInterrupt):
        market.make_market(out, seed=3, verbose=False, **SMALL)
    assert not os.path.exists(os.path.join(out, "COMPLETE"))
    monkeypatch.setattr(market, "_simulate_item", real)
    # Lose some finished outputs too: they are remade identically.
    os.remove(os.path.join(out, "_work", "item00002.json"))
    os.remove(os.path.join(out, "logs", "images", "item00002_00.png"))
    market.make_market(out, seed=3, verbose=False, **SMALL)
    cmp = filecmp.dircmp(reference, out)

    def same(c):
        assert not c.left_only and not c.right_only and not c.diff_files, (c.left, c.left_only, c.right_only, c.diff_files)
        for sub in c.subdirs.values():
            same(sub)

    filecmp.clear_cache()
    same(cmp)
    with pytest.raises(DataError, match="another config or seed"):
        market.make_market(out, seed=4, verbose=False, **SMALL)
    assert market.make_market(out, seed=4, verbose=False, overwrite=True, **SMALL)["seed"] == 4


def test_market_config_rejects_unknown_options():
    with pytest.raises(ValueError, match="unknown market option"):
        market.MarketConfig.make(num_prodcts=3)
    with pytest.raises(ValueError, match="unknown categories"):
        market.MarketConfig.make(categories=("spaceship",))


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
    shutil.rmtree(workdir)
