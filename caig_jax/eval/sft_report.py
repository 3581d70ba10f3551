"""The Prompt Model's evaluation report: `report.md` + `report.json` + `prompt_grid.png` (+ training curves).

    write_sft_report(result, out_dir, title=..., split="test", truth=truth, notes=[...], metrics_jsonl=...)

`result` is `caig_jax.eval.sft.evaluate_prompt_model`'s dict. The grid has one row per held-out product (up to
`rows`): the cut-out with its title, then the ads of the PM's greedy prompt, its first T=1.0 sample, a random
on-brief prompt and the oracle prompt, each painted by the marketplace painter (`market.compose_ad`, `size` px,
the evaluation's seed) and captioned with its prompt and its true CTR as the evaluation scores it (the render
size of `result`, 32 px by default: the click model's resolution).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from caig_jax.data import market as market_lib
from caig_jax.data import world as world_lib
from caig_jax.eval import plots as plot_lib
from caig_jax.eval.grids import captioned
from caig_jax.eval.reward_accuracy import to_jsonable
from caig_jax.eval.sft import MarketTruth
from caig_jax.files import write_atomic, write_json_atomic


def _pct(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}%"


def _ci_pct(b: Mapping[str, Any] | None) -> str:
    if not b:
        return "-"
    return f"{_pct(b['mean'])} [{_pct(b['ci_low'])}, {_pct(b['ci_high'])}]"


def _ctr(b: Mapping[str, Any] | None, digits: int = 4) -> str:
    if not b:
        return "-"
    return f"{b['mean']:.{digits}f} [{b['ci_low']:.{digits}f}, {b['ci_high']:.{digits}f}]"


def report_markdown(result: Mapping[str, Any], *, title: str, split: str, notes: Sequence[str] = (),
                    files: Mapping[str, str] | None = None) -> str:
    lines = [f"# {title}", "", f"Held-out split: `{split}` ({result['products']} products, {result['examples']} "
             "conversations never seen in training). Intervals: 95% product bootstrap (products resampled).", ""]
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    lines += ["## Answer tokens per task family (teacher forced)", "",
              "| family | conversations | answer tokens | loss | token accuracy |", "|---|---|---|---|---|"]
    for family, m in result["families"].items():
        lines.append(f"| {family} | {m['examples']} | {m['tokens']} | {m['loss']:.3f} "
                     f"[{m['loss_ci'][0]:.3f}, {m['loss_ci'][1]:.3f}] | {_pct(m['token_accuracy'])} "
                     f"[{_pct(m['token_accuracy_ci'][0])}, {_pct(m['token_accuracy_ci'][1])}] |")
    d = result.get("describe")
    if d:
        lines += ["", "## Category and colour (describe the product, greedy; the question names neither)", "",
                  f"- category exact match: **{_ci_pct(d['category_exact_match'])}**",
                  f"- colour exact match: **{_ci_pct(d['colour_exact_match'])}**", "",
                  "| product | reference | generated |", "|---|---|---|"]
        for r in d["replies"][:5]:
            lines.append(f"| {r['product']} | {r['reference']} | {r['generated']} |")
    p = result.get("prompts")
    if p:
        lines += ["", f"## Background prompts ({p['products']} products; greedy and {p['samples_per_product']} "
                  f"samples at T={p['temperature']} each)", "",
                  "- prompts that parse fully into the world's vocabulary: greedy "
                  f"**{_ci_pct(p['greedy_parse_rate'])}**, sampled {_ci_pct(p['sampled_parse_rate'])}"]
        ctr = p.get("true_ctr")
        if ctr:
            r = ctr["render"]
            lines += ["", f"True CTR of the ads the marketplace painter renders from each prompt ({r['size']} px, seed "
                      f"{r['seed']}, as the world report scores prompts); per product, then the mean over "
                      "products:", "",
                      "| prompts | mean true CTR [95% CI] |", "|---|---|",
                      f"| random on-brief ({r['on_brief_prompts_per_product']} per product) | "
                      f"{_ctr(ctr['random_on_brief'])} |",
                      f"| PM, T={p['temperature']} samples | {_ctr(ctr['sampled'])} |",
                      f"| PM, greedy | {_ctr(ctr['greedy'])} |"]
            if "oracle" in ctr:
                lines.append(f"| per-product oracle prompt (world report) | {_ctr(ctr['oracle'])} |")
            lines += ["", "- PM samples minus random on-brief (paired per product): "
                      f"{_ctr(ctr['sampled_minus_on_brief'], 5)} (ratio of means {ctr['sampled_over_on_brief']:.3f})",
                      f"- PM greedy minus random on-brief: {_ctr(ctr['greedy_minus_on_brief'], 5)}"]
            if "sampled_gap_closed" in ctr:
                lines.append("- share of the on-brief -> oracle gap the samples close: "
                             f"{ctr['sampled_gap_closed']:.2f}")
        lines += ["", "| product | greedy prompt | a T=1.0 sample | parses (greedy) |", "|---|---|---|---|"]
        for e in p["per_product"][:8]:
            lines.append(f"| {e['product']} | {e['greedy']} | {e['samples'][0] if e['samples'] else ''} | "
                         f"{'yes' if e['greedy_parses'] else 'no'} |")
    t = result.get("targets")
    if t:
        lines += ["", "## Targets (fixed before tuning)", "", "| target | value | bound | met |", "|---|---|---|---|"]
        for name, v in t.items():
            value = v["value"]
            shown = f"{value:.5f}" if name.endswith("true_ctr") else _pct(value)
            lines.append(f"| {name} | {shown} | {v['target']} | {'yes' if v['met'] else 'NO'} |")
    for name, rel in (files or {}).items():
        if rel.endswith(".png"):
            lines += ["", f"![{name}]({rel})"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ grid


def prompt_grid(result: Mapping[str, Any], truth: MarketTruth, path: str, *, rows: int = 8, size: int = 128) -> str:
    """PNG grid (see the module docstring) of the first `rows` products with known truth; returns `path`."""
    entries = [e for e in result.get("prompts", {}).get("per_product", []) if "greedy_ctr" in e][:rows]
    render = result["prompts"]["true_ctr"]["render"]
    if not entries:
        raise ValueError("no evaluated product with a known true CTR to draw")
    grid_rows = []
    chars = max(12, size // 6)
    for e in entries:
        rgba = truth.cutout(e["product"])
        placed = np.asarray(Image.fromarray(rgba).resize((size, size), Image.Resampling.LANCZOS))
        alpha = placed[..., 3:].astype(np.float32) / 255.0
        cut = (placed[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
        title = truth.products[e["product"]].title
        tiles = [captioned(cut, f"{e['product']}: {title}", chars)]
        columns = [("PM greedy", e["greedy"], e["greedy_ctr"]),
                   ("PM T=1", e["samples"][0], e["sample_ctrs"][0]),
                   ("on-brief", e["on_brief_example"], None),
                   ("oracle", e.get("oracle_prompt"), e.get("oracle_ctr"))]
        for name, prompt, ctr in columns:
            if prompt is None:
                tiles.append(captioned(np.full((size, size, 3), 255, np.uint8), f"{name}: -", chars))
                continue
            ad = market_lib.compose_ad(rgba, prompt, size, seed=render["seed"])
            if ctr is None:  # scored as the evaluation scores every prompt (its render size and seed)
                ctr = world_lib.prompt_ctr(prompt, truth.products[e["product"]], render["size"], render["seed"])
            tiles.append(captioned(ad, f"{name} ({100 * ctr:.2f}%): {prompt}", chars))
        row = np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], axis=1)
        grid_rows.append(row)
    grid = np.concatenate(grid_rows, axis=0)
    buffer = Image.fromarray(grid)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.png"
    buffer.save(tmp)
    os.replace(tmp, path)
    return path


def write_sft_report(result: Mapping[str, Any], out_dir: str, *, title: str, split: str,
                     truth: MarketTruth | None = None, notes: Sequence[str] = (), metrics_jsonl: str | None = None,
                     extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Writes `report.json`, `report.md`, `prompt_grid.png` (with a marketplace truth) and
    `plots/training_curves.png` (with a metrics file) into `out_dir`; returns `{name: path}`."""
    os.makedirs(out_dir, exist_ok=True)
    files: dict[str, str] = {}
    if truth is not None and result.get("prompts", {}).get("true_ctr"):
        prompt_grid(result, truth, os.path.join(out_dir, "prompt_grid.png"))
        files["prompt_grid"] = "prompt_grid.png"
    if metrics_jsonl and os.path.exists(metrics_jsonl):
        try:
            plot_lib.training_curves(metrics_jsonl, os.path.join(out_dir, "plots", "training_curves.png"))
            files["training_curves"] = os.path.join("plots", "training_curves.png")
        except ValueError:
            pass  # no loss series yet (a run evaluated before any step was logged)
    payload = {"title": title, "split": split, **dict(result), **dict(extra or {}), "files": files}
    write_json_atomic(os.path.join(out_dir, "report.json"), to_jsonable(payload))
    write_atomic(os.path.join(out_dir, "report.md"), report_markdown(result, title=title, split=split, notes=notes,
                                                                     files=files))
    return {"report_json": os.path.join(out_dir, "report.json"), "report_md": os.path.join(out_dir, "report.md"),
            **{k: os.path.join(out_dir, v) for k, v in files.items()}}
