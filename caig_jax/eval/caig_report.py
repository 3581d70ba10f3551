"""The CAIG demo's report: every figure of the final evaluation, the reward model's held-out metrics and the
preference rounds' curves, as `report.json` (machine-readable), `report.md` (tables, plots and the ad grid
inline), `rounds.png` and TensorBoard scalars.

    report = build(config, workdir, evaluation, stage_seconds)   # evaluation: the job's final_evaluation.json
    write(report, config, workdir)

Conventions: rates, CTRs and lifts are fractions (0.10 = 10 points or +10%); every interval is a product-bootstrap
percentile 95% interval (`caig_jax.eval.intervals`), `{"mean", "ci_low", "ci_high", "n_products"}`.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from caig_jax.eval.intervals import product_bootstrap  # noqa: E402
from caig_jax.eval.prompt_models import gap_closed, paired_difference, relative_lift  # noqa: E402
from caig_jax.files import write_atomic, write_json_atomic  # noqa: E402
from caig_jax.metrics import MetricWriter, read_jsonl  # noqa: E402

METHODS = ("random_on_brief", "sft", "dpo", "dpo_pcpo", "oracle")
PMS = ("sft", "dpo", "dpo_pcpo")
LABELS = {"random_on_brief": "random on-brief prompts", "sft": "SFT PM", "dpo": "DPO PM",
          "dpo_pcpo": "DPO + PCPO PM", "oracle": "per-product oracle prompt"}
ROUND_KEYS = ("true_ctr", "match_rate_sibling", "match_rate_cross", "rm_win_rate_vs_sft")
STEP_KEYS = ("train/loss", "train/dpo/loss", "train/pcpo/loss", "train/rewards/margins", "train/rewards/accuracies",
             "train/pcpo/margin")
REWARD_KEYS = ("accuracy", "accuracy_product_ci", "oracle_accuracy", "true_ratio_agreement", "true_ratio_agreement_ci",
               "margin_true_spearman", "top1_regret", "n", "products")


def per_product_ctr(evaluation: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """method -> {product: mean true CTR of its T=1 prompts (on-brief: of its random prompts; oracle: its one)}.
    Only products every method has are kept (the oracle needs the world report's search)."""
    out = {name: dict(evaluation["policies"][name]["true_ctr_per_product"]) for name in PMS}
    out["random_on_brief"] = {p: float(np.mean(v["true_ctr"])) for p, v in evaluation["random_on_brief"].items()}
    out["oracle"] = {p: float(v["true_ctr"]) for p, v in evaluation["oracle"].items()}
    common = set.intersection(*(set(v) for v in out.values()))
    return {m: {p: v for p, v in out[m].items() if p in common} for m in METHODS}


def targets(report: Mapping[str, Any], config) -> dict[str, bool]:
    """The issue's targets (fixed in `config.targets` before tuning): name -> met."""
    t = config.targets
    lift = report["lift_vs_sft"]["dpo_pcpo"]
    gain = report["match_rate_diff"]["dpo_pcpo_minus_dpo"]
    ctr_diff = report["true_ctr_diff"]["dpo_pcpo_minus_dpo"]
    out = {
        "dpo_pcpo_lift_vs_sft": bool(lift["mean"] >= t.lift_vs_sft and lift["ci_low"] > 0),
        "dpo_pcpo_sibling_match_gain_vs_dpo": bool(gain["mean"] >= t.match_rate_gain and gain["ci_low"] > 0),
        # "not lower than DPO's by more than its interval": the difference's interval reaches 0 or above.
        "dpo_pcpo_true_ctr_not_below_dpo": bool(ctr_diff["ci_high"] >= 0),
    }
    if report["from_empty_workdir"]:
        out["wall_time_from_empty"] = bool(report["total_seconds"] <= 60 * t.minutes)
    return out


def build(config, workdir: str, evaluation: Mapping[str, Any], stage_seconds: Mapping[str, float],
          from_empty_workdir: bool, stage_cpu_seconds: Mapping[str, float] | None = None) -> dict[str, Any]:
    """report.json's content (module docstring); `evaluation` is the job's `final_evaluation.json`; stage wall
    (and CPU) seconds from the job's `stages.json`."""
    seed, resamples = config.seed, config.eval.bootstrap_resamples
    ctr = per_product_ctr(evaluation)
    pol = evaluation["policies"]

    def interval(values: Mapping[str, float]) -> dict[str, float | int]:
        return product_bootstrap(list(values.values()), seed=seed, resamples=resamples)

    sibling = {m: dict(pol[m]["match_rate_sibling"]["per_product"]) for m in PMS}
    cross = {m: dict(pol[m]["match_rate_cross"]["per_product"]) for m in PMS}
    greedy = {m: {p: float(pol[m]["true_ctr_greedy_per_product"][p]) for p in ctr["sft"]} for m in PMS}
    report: dict[str, Any] = {
        "held_out": {"split": evaluation["split"], "products": len(ctr["sft"]), "samples": config.eval.samples,
                     "temperature": config.eval.temperature, "on_brief_prompts": config.eval.on_brief,
                     "render": evaluation["render"]},
        "true_ctr": {m: interval(ctr[m]) for m in METHODS},
        "true_ctr_greedy": {m: interval(greedy[m]) for m in PMS},
        "lift_vs_sft": {m: relative_lift(ctr[m], ctr["sft"], seed=seed, resamples=resamples)
                        for m in ("random_on_brief", "dpo", "dpo_pcpo", "oracle")},
        "gap_closed": {m: gap_closed(ctr[m], ctr["sft"], ctr["oracle"], seed=seed, resamples=resamples)
                       for m in ("dpo", "dpo_pcpo")},
        "true_ctr_diff": {"dpo_pcpo_minus_dpo": paired_difference(ctr["dpo_pcpo"], ctr["dpo"], seed=seed,
                                                                  resamples=resamples)},
        "match_rate_sibling": {m: interval(sibling[m]) for m in PMS},
        "match_rate_cross": {m: interval(cross[m]) for m in PMS},
        "match_rate_diff": {
            "dpo_pcpo_minus_dpo": paired_difference(sibling["dpo_pcpo"], sibling["dpo"], seed=seed,
                                                    resamples=resamples),
            "dpo_minus_sft": paired_difference(sibling["dpo"], sibling["sft"], seed=seed, resamples=resamples),
            "dpo_pcpo_minus_sft": paired_difference(sibling["dpo_pcpo"], sibling["sft"], seed=seed,
                                                    resamples=resamples),
            "cross_dpo_pcpo_minus_dpo": paired_difference(cross["dpo_pcpo"], cross["dpo"], seed=seed,
                                                          resamples=resamples),
        },
        "rm_win_rate_vs_sft": {m: pol[m]["rm_win_rate_vs_sft"] for m in ("dpo", "dpo_pcpo")},
        "reward_model": reward_model_metrics(os.path.join(workdir, "reward")),
        "rounds": {m: round_curves(os.path.join(workdir, m)) for m in ("dpo", "dpo_pcpo")},
        "stage_seconds": dict(stage_seconds),
        "total_seconds": round(float(sum(stage_seconds.values())), 1),
        "stage_cpu_seconds": dict(stage_cpu_seconds or {}),
        "from_empty_workdir": bool(from_empty_workdir),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "load_average": list(os.getloadavg())},
    }
    report["targets"] = targets(report, config)
    return report


def reward_model_metrics(reward_workdir: str) -> dict[str, Any]:
    """The reward job's headline metrics of its main run from its final evaluation (its `test` split)."""
    with open(os.path.join(reward_workdir, "final_evaluation.json")) as f:
        record = json.load(f)
    name = next(iter(record["runs"]))  # the main run is evaluated first
    return {"run": name, **{k: record["runs"][name].get(k) for k in REWARD_KEYS}}


def round_curves(po_workdir: str) -> dict[str, Any]:
    """Per-round held-out scalars (round 0 = the SFT PM) and the training series of a preference workdir."""
    with open(os.path.join(po_workdir, "report.json")) as f:
        po = json.load(f)
    per_round = [po["sft"]] + list(po["rounds"])
    rows = read_jsonl(os.path.join(po_workdir, "metrics.jsonl"))
    steps = {k: [[r["step"], float(r[k])] for r in rows if k in r] for k in STEP_KEYS}
    return {"heldout": {k: [m.get(k) for m in per_round] for k in ROUND_KEYS},
            "steps": {k: v for k, v in steps.items() if v}}


# ------------------------------------------------------------------------------------------------ outputs
def rounds_plot(report: Mapping[str, Any], path: str) -> str:
    """Held-out curves per round (top) and training series per step (bottom) of the DPO and DPO + PCPO runs."""
    top = [("true_ctr", "true CTR (T=1)"), ("match_rate_sibling", "sibling match rate"),
           ("rm_win_rate_vs_sft", "RM win rate vs SFT")]
    bottom = [("train/dpo/loss", "DPO loss"), ("train/pcpo/loss", "PCPO loss"),
              ("train/rewards/margins", "DPO reward margin")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for m, colour in (("dpo", "#1f77b4"), ("dpo_pcpo", "#d62728")):
        curves = report["rounds"][m]
        for ax, (key, title) in zip(axes[0], top):
            values = [np.nan if v is None else v for v in curves["heldout"][key]]
            ax.plot(range(len(values)), values, marker="o", color=colour, label=LABELS[m])
            ax.set_title(title)
            ax.set_xlabel("round (0 = SFT PM)")
            ax.set_xticks(range(len(values)))
        for ax, (key, title) in zip(axes[1], bottom):
            series = np.asarray(curves["steps"].get(key, []), np.float64).reshape(-1, 2)
            ax.plot(series[:, 0], series[:, 1], color=colour, label=LABELS[m], marker="o" if len(series) < 20 else None,
                    markersize=3)
            ax.set_title(title)
            ax.set_xlabel("step")
    for ax in axes.ravel():
        ax.grid(True, alpha=0.3, linestyle="--")
        ax.legend(fontsize=8)
    fig.suptitle("Preference rounds: held-out (val) figures per round, training series per step", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.2f}%"


def _ci(d: Mapping[str, Any], signed: bool = False) -> str:
    f = (lambda x: f"{100 * x:+.2f}") if signed else (lambda x: f"{100 * x:.2f}")
    return f"{f(d['mean'])}% [{f(d['ci_low'])}, {f(d['ci_high'])}]"


def markdown(report: Mapping[str, Any], config) -> str:
    h = report["held_out"]
    lines = ["# CAIG on the synthetic marketplace", "",
             f"Held-out products: {h['products']} `{h['split']}` products, never seen by the SFT, the reward model or "
             f"the rounds. Each Prompt Model writes {h['samples']} prompts at T={h['temperature']} (and a greedy one) "
             f"per product; ads rendered by `{h['render']['kind']}` at {h['render']['size']} px; true CTR from the "
             "marketplace's hidden click model. Intervals: product-bootstrap 95%.", "",
             "## True CTR of held-out ads", "",
             "| prompts from | mean true CTR [95% CI] | lift vs SFT PM [95% CI] | share of SFT -> oracle gap closed |",
             "| --- | --- | --- | --- |"]
    for m in METHODS:
        lift = report["lift_vs_sft"].get(m)
        gap = report["gap_closed"].get(m)
        lines.append(f"| {LABELS[m]} | {_ci(report['true_ctr'][m])} | {_ci(lift, True) if lift else '-'} | "
                     f"{_ci(gap, True) if gap else '-'} |")
    d = report["true_ctr_diff"]["dpo_pcpo_minus_dpo"]
    lines += ["", f"Greedy prompts: SFT {_pct(report['true_ctr_greedy']['sft']['mean'])}, DPO "
                  f"{_pct(report['true_ctr_greedy']['dpo']['mean'])}, DPO + PCPO "
                  f"{_pct(report['true_ctr_greedy']['dpo_pcpo']['mean'])}. DPO + PCPO minus DPO (true CTR, paired): "
                  f"{_ci(d, True)} points.", "",
              "## Product-background match (truth-based)", "",
              "| Prompt Model | sibling match rate [95% CI] | cross-category match rate [95% CI] | RM win rate vs SFT |",
              "| --- | --- | --- | --- |"]
    for m in PMS:
        win = report["rm_win_rate_vs_sft"].get(m)
        lines.append(f"| {LABELS[m]} | {_ci(report['match_rate_sibling'][m])} | {_ci(report['match_rate_cross'][m])} "
                     f"| {_ci(win) if win else '-'} |")
    diff = report["match_rate_diff"]
    lines += ["", f"Sibling match rate, DPO + PCPO minus DPO: {_ci(diff['dpo_pcpo_minus_dpo'], True)} points; DPO "
                  f"minus SFT {_ci(diff['dpo_minus_sft'], True)}; DPO + PCPO minus SFT "
                  f"{_ci(diff['dpo_pcpo_minus_sft'], True)} (the paper: 59.7% -> 79.8%, DPO -> DPO + PCPO).", "",
              "## Reward model (its own final evaluation, `test` pairs)", ""]
    rm = report["reward_model"]
    ci = rm.get("true_ratio_agreement_ci") or [None, None]
    lines += [f"Accuracy vs logged labels {_pct(rm.get('accuracy'))} (oracle {_pct(rm.get('oracle_accuracy'))}); "
              f"true-ratio agreement {_pct(rm.get('true_ratio_agreement'))} [{_pct(ci[0])}, {_pct(ci[1])}]; "
              f"margin-true Spearman {rm.get('margin_true_spearman', float('nan')):.3f}; top-1 regret "
              f"{_pct(rm.get('top1_regret'))}. Details: `reward/report.md`.", "",
              "## Rounds", "", "![rounds](rounds.png)", "",
              "Per round (round 0 = the SFT PM), on `val` products: true CTR (T=1), sibling match rate, RM win rate.",
              "", "| run | " + " | ".join(f"round {r}" for r in range(len(report['rounds']['dpo']['heldout']['true_ctr'])))
              + " |", "|---|" + "---|" * len(report['rounds']['dpo']['heldout']['true_ctr'])]
    for m in ("dpo", "dpo_pcpo"):
        c = report["rounds"][m]["heldout"]
        lines.append(f"| {LABELS[m]} | " + " | ".join(
            f"{_pct(a)} / {_pct(b)} / {_pct(w)}" for a, b, w in
            zip(c["true_ctr"], c["match_rate_sibling"], c["rm_win_rate_vs_sft"])) + " |")
    lines += ["", "## Ads", "", "Rows: held-out products; columns: SFT / DPO / DPO + PCPO (first T=1 sample) / oracle "
              "prompt, each captioned with its true CTR.", "", "![ads](ads_grid.png)", "",
              "## Targets (fixed before tuning, `config.targets`)", "", "| target | met |", "| --- | --- |"]
    for name, met in report["targets"].items():
        lines.append(f"| {name} | {'yes' if met else 'NO'} |")
    t = config.targets
    lines += ["", f"Lift target: DPO + PCPO >= +{100 * t.lift_vs_sft:.0f}% over SFT with lower bound > 0; match "
              f"target: DPO + PCPO >= DPO + {100 * t.match_rate_gain:.0f} points with lower bound > 0; wall time <= "
              f"{t.minutes:g} min from an empty workdir.", "", "## Wall time", "",
              "| stage | wall seconds | CPU seconds (this process, all threads) |", "| --- | --- | --- |"]
    cpu = report.get("stage_cpu_seconds", {})
    lines += [f"| {k} | {v:.0f} | {cpu.get(k, float('nan')):.0f} |" for k, v in report["stage_seconds"].items()]
    mach = report["machine"]
    lines += [f"| total | {report['total_seconds']:.0f} | {sum(cpu.values()):.0f} |", "",
              f"Machine: {mach['platform']}, {mach['cpus']} CPUs, load average at report time "
              f"{', '.join(f'{x:.1f}' for x in mach['load_average'])}"
              + ("" if report["from_empty_workdir"] else " (stages ran in more than one process: not a from-empty "
                                                           "timing)") + ".", ""]
    return "\n".join(lines)


def write(report: Mapping[str, Any], config, workdir: str) -> None:
    """report.json, rounds.png, report.md and the headline scalars to TensorBoard (`<workdir>` event files)."""
    write_json_atomic(os.path.join(workdir, "report.json"), report)
    rounds_plot(report, os.path.join(workdir, "rounds.png"))
    write_atomic(os.path.join(workdir, "report.md"), markdown(report, config))
    writer = MetricWriter(workdir)
    scalars = {f"true_ctr/{m}": report["true_ctr"][m]["mean"] for m in METHODS}
    scalars.update({f"match_rate_sibling/{m}": report["match_rate_sibling"][m]["mean"] for m in PMS})
    scalars.update({f"lift_vs_sft/{m}": report["lift_vs_sft"][m]["mean"] for m in ("dpo", "dpo_pcpo")})
    writer.write(0, scalars, prefix="final/")
    writer.close()


def print_summary(report: Mapping[str, Any]) -> None:
    print(json.dumps({
        "true_ctr": {m: round(report["true_ctr"][m]["mean"], 5) for m in METHODS},
        "lift_vs_sft": {m: round(report["lift_vs_sft"][m]["mean"], 4) for m in ("dpo", "dpo_pcpo")},
        "match_rate_sibling": {m: round(report["match_rate_sibling"][m]["mean"], 4) for m in PMS},
        "targets": report["targets"], "stage_seconds": report["stage_seconds"]}, indent=2))
