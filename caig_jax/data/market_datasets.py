"""The marketplace's datasets: simulate the world and build its TFDS datasets (what the `market` job runs).

`build_world(config, workdir)` writes `workdir/market/` (`caig_jax.data.simulation.make_market`), `workdir/tfds/`
(`ctr_logs/market`, `ctr_logs/market_wide`, `llava_conversations/market`, `products/market`, array_record) and
`workdir/market_report.{json,md}`; `config` is a `configs/market.py` config (the reward job nests one).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import ml_collections
from absl import logging as absl_logging

from caig_jax.data.builders import ctr_logs, llava_conversations, products
from caig_jax.data.simulation import make_market

log = logging.getLogger(__name__)

CONFIG_NAME = "market"  # the TFDS config name of every dataset the job builds
WIDE_CONFIG_NAME = "market_wide"  # ctr_logs with no upper ratio bound (config.train_pairs)


def _market_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    options = config.market.to_dict()
    options["split_fractions"] = tuple(options["split_fractions"].items())
    options.update(min_impressions=config.pairs.min_impressions, min_ratio=config.pairs.min_ratio,
                   max_ratio=config.pairs.max_ratio)
    return options


def build_world(config: ml_collections.ConfigDict, workdir: str, *, verbose: bool = True,
                overwrite_hint: str = "--config.build.overwrite=True") -> dict[str, Any]:
    """Simulates the market and builds the datasets under `workdir`; returns the report dict.

    Re-running reuses what exists when its config and input files are unchanged. A dataset whose input files
    (the market's logs, images, product and conversation files) changed since it was built stops with a
    `DataError` naming the first changed file, unless `config.build.overwrite` (then it is rebuilt from the
    current files); `overwrite_hint` says how the user sets that (the reward job nests this config).
    """
    # TFDS logs every shard it writes at INFO; the job prints its own summary instead.
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        return _build_world(config, workdir, verbose, overwrite_hint)
    finally:
        absl_logging.set_verbosity(verbosity)


def _build_world(config, workdir, verbose, overwrite_hint) -> dict[str, Any]:
    t0 = time.time()
    market_dir = os.path.join(workdir, "market")
    data_dir = os.path.join(workdir, "tfds")
    market = make_market(market_dir, _market_options(config), seed=config.seed,
                                    overwrite=config.build.overwrite, verbose=False)
    t_market = time.time() - t0
    built: dict[str, Any] = {}
    if "ctr_logs" in config.build.datasets:
        path, report = ctr_logs.build(
            data_dir, name=CONFIG_NAME, overwrite=config.build.overwrite, overwrite_hint=overwrite_hint,
            layout="creative_ranking",
            source=os.path.join(market_dir, "logs"), side_file=os.path.join(market_dir, "products", "products.json"),
            truth_file=os.path.join(market_dir, "logs", "truth.tsv"), min_impressions=config.pairs.min_impressions,
            min_ratio=config.pairs.min_ratio, max_ratio=config.pairs.max_ratio, seed=config.pairs.seed,
            image_size=config.pairs.image_size, image_format=config.pairs.image_format, on_bad=config.build.on_bad)
        built["ctr_logs"] = {"path": path, "report": report}
        if config.train_pairs.enabled:
            path, report = ctr_logs.build(
                data_dir, name=WIDE_CONFIG_NAME, overwrite=config.build.overwrite, overwrite_hint=overwrite_hint,
            layout="creative_ranking",
                source=os.path.join(market_dir, "logs"),
                side_file=os.path.join(market_dir, "products", "products.json"),
                truth_file=os.path.join(market_dir, "logs", "truth.tsv"), min_impressions=config.pairs.min_impressions,
                min_ratio=config.train_pairs.min_ratio, max_ratio=config.train_pairs.max_ratio,
                seed=config.pairs.seed, image_size=config.pairs.image_size, image_format=config.pairs.image_format,
                on_bad=config.build.on_bad, splits=tuple(config.train_pairs.splits))
            built["ctr_logs_wide"] = {"path": path, "report": report}
    if "llava_conversations" in config.build.datasets:
        files = {s: [os.path.join(market_dir, f) for f in fs] for s, fs in market["conversation_files"].items()}
        path, report = llava_conversations.build(data_dir, files=files, image_root=market_dir, name=CONFIG_NAME,
                                                 on_bad=config.build.on_bad, overwrite=config.build.overwrite,
                                                 overwrite_hint=overwrite_hint)
        built["llava_conversations"] = {"path": path, "report": report}
    if "products" in config.build.datasets:
        path, report = products.build(data_dir, source=os.path.join(market_dir, "products", "products.json"),
                                      name=CONFIG_NAME, on_bad=config.build.on_bad, overwrite=config.build.overwrite,
                                      overwrite_hint=overwrite_hint)
        built["products"] = {"path": path, "report": report}
    report = {
        "workdir": os.path.abspath(workdir),
        "market_dir": os.path.abspath(market_dir),
        "tfds_dir": os.path.abspath(data_dir),
        "seconds": {"market": round(t_market, 1), "total": round(time.time() - t0, 1)},
        "market": market,
        "datasets": built,
    }
    with open(os.path.join(workdir, "market_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(workdir, "market_report.md"), "w") as f:
        f.write(markdown_report(report))
    if verbose:
        print(summary(report))
    return report


def summary(report: dict[str, Any]) -> str:
    """A few lines for the console."""
    m = report["market"]
    lines = [
        f"market: {m['products']} products ({', '.join(f'{s} {n}' for s, n in m['products_per_split'].items())}), "
        f"{m['creatives']} creatives, true CTR p5-p95 {100 * m['true_ctr_percentiles']['p5']:.1f}%-"
        f"{100 * m['true_ctr_percentiles']['p95']:.1f}%, median impressions {m['impressions_median']:.0f}",
    ]
    pairs = report["datasets"].get("ctr_logs", {}).get("report", {})
    for split, r in sorted(pairs.get("splits", {}).items()):
        o = m["oracle"]["splits"].get(split, {})
        lines.append(
            f"  {split:5s}: {r.get('pairs_written', r['pairs_kept'])} pairs from {r['items_with_pairs']} items | dropped: "
            f"{r['creatives_low_impressions']} creatives <= {m['oracle']['rule']['min_impressions']} impressions, "
            f"{r['creatives_zero_ctr']} zero-CTR, {r['pairs_ratio_below_min']} pairs ratio < min, "
            f"{r['pairs_ratio_above_max']} > max | oracle accuracy {o.get('oracle_accuracy', float('nan')):.3f} "
            f"(+-{o.get('oracle_ci95', float('nan')):.3f})"
        )
    wide = report["datasets"].get("ctr_logs_wide", {}).get("report", {})
    for split, r in sorted(wide.get("splits", {}).items()):
        lines.append(f"  {split:5s} (ctr_logs/{WIDE_CONFIG_NAME}, no upper ratio bound, for training): "
                     f"{r.get('pairs_written', r['pairs_kept'])} pairs")
    bad = pairs.get("bad_data", {}).get("skipped", {})
    if bad:
        lines.append(f"  skipped bad data: {bad}")
    for name in ("llava_conversations", "products"):
        if name in report["datasets"]:
            lines.append(f"  {name}: {report['datasets'][name]['report'].get('examples')}")
    lines.append(f"  oracle accuracy (all splits): {m['oracle']['oracle_accuracy']:.3f}; "
                 f"{report['seconds']['total']} s; data in {report['tfds_dir']}")
    return "\n".join(lines)


def markdown_report(report: dict[str, Any]) -> str:
    m = report["market"]
    out = ["# Synthetic marketplace", "", f"- workdir: `{report['workdir']}`", f"- products: {m['products']} "
           f"({m['products_per_split']}), creatives: {m['creatives']}",
           f"- true CTR percentiles: {m['true_ctr_percentiles']}",
           f"- median impressions: {m['impressions_median']:.0f}; share of creatives over the impressions threshold: "
           f"{m['creatives_over_min_impressions']:.3f}",
           f"- oracle accuracy (logged label vs true CTR order on kept pairs): **{m['oracle']['oracle_accuracy']:.3f}**",
           "", "## Reward pairs per split", "",
           "| split | pairs | items with pairs | low-impression creatives | zero-CTR creatives | ratio < min | ratio > max "
           "| tied | oracle accuracy |", "|---|---|---|---|---|---|---|---|---|"]
    pairs = report["datasets"].get("ctr_logs", {}).get("report", {})
    for split, r in sorted(pairs.get("splits", {}).items()):
        o = m["oracle"]["splits"].get(split, {})
        out.append(f"| {split} | {r.get('pairs_written', r['pairs_kept'])} | {r['items_with_pairs']} | "
                   f"{r['creatives_low_impressions']} | {r['creatives_zero_ctr']} | {r['pairs_ratio_below_min']} | "
                   f"{r['pairs_ratio_above_max']} | {r['pairs_tied']} | {o.get('oracle_accuracy', float('nan')):.3f} "
                   f"+- {o.get('oracle_ci95', float('nan')):.3f} |")
    world_md = os.path.join(report["market_dir"], "world_report.md")
    if os.path.exists(world_md):  # the world's figures (caig_jax.data.world), written by make_market
        with open(world_md) as f:
            out += ["", f.read().strip().replace("\n# ", "\n## ")]
    out += ["", "## Datasets", ""]
    for name, d in report["datasets"].items():
        out.append(f"- `{name}`: `{d['path']}`; bad data: {d['report'].get('bad_data', {}).get('skipped', {})}")
    out += ["", f"Contact sheet: `{os.path.join(report['market_dir'], 'contact_sheet.png')}`", ""]
    return "\n".join(out)


