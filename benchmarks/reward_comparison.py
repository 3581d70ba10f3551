"""The paper's reward-model comparison on the synthetic world: one table, every row under the same protocol.

Command (from the repository root; not CI: 5 jobs per model seed, about 15-25 CPU-minutes per seed on 2 cores):
    .venv/bin/python benchmarks/reward_comparison.py --out runs/comparison [--world-seeds 0] [--model-seeds 0,1,2]
        [--runs 0:0,0:1,1:0] [--methods vam,cg4ctr,zero_shot,caig_rm,caig_rm_no_point] [--data-dir DIR]
        [-- --config.KEY=VALUE ...]

Rows (the paper's, on CreativeRanking: GPT-4o 50.2, VAM 52.2, LLaVA 52.8, CG4CTR 53.1, CAIG 56.2 %):
- `random`: a coin flip per pair (seeded by the model seed) on the same test pairs;
- `zero_shot`: `configs/baselines.py:zero_shot_tiny`, an untrained MLLM deciding by log p("left") vs log p("right");
- `vam`, `cg4ctr`: `configs/baselines.py:vam_tiny` / `:cg4ctr_tiny`;
- `caig_rm`, `caig_rm_no_point`: `configs/reward.py:tiny` with point_weight 0.5 (CAIG) and 0;
- `exact_feature_ceiling`: the world report's probe on the exact hidden features (caig_jax/data/README.md);
- `oracle`: the true CTR order (a judge that knew the click model).

What it does (DESIGN.md section 5):
- builds each world once (`configs/reward.py`'s marketplace, `seed` = the world seed) into `<out>/world<W>/`
  (`benchmarks/reward_seeds.py:build_world`), or uses `--data-dir` (a `ctr_logs` TFDS dir such as a
  CreativeRanking build: rows that need true CTRs then show `—`);
- runs each job through `caig_jax.main` in `<out>/w<W>_m<M>/<method>/`, one at a time, each in its own process,
  model seed M. Every job chooses on val only and reads test once, in its final evaluation (its
  `test_reads.jsonl`); a finished job is not run again (its `final_evaluation.json` is read);
- scores `random` and `oracle` on the test pairs those runs saved (`test_predictions.process0.npz`, the same
  pairs for every method of a world: checked), with the same metrics (`eval.reward_accuracy.pairwise_metrics`);
- writes `<out>/comparison.md` and `.json`: per method the mean over runs (model seeds x world seeds), the sample
  sd and a 95% t-interval over runs of accuracy vs logged labels, true-ratio agreement and margin-true
  Spearman; every run with its product-bootstrap intervals; and CAIG RM minus each baseline, paired on the same
  test pairs, with a product-clustered bootstrap interval of the difference, per run and pooled over a world's
  model seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
from scipy import stats as scipy_stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.reward_seeds import build_world  # noqa: E402

PAPER = {"random": None, "zero_shot": 52.8, "vam": 52.2, "cg4ctr": 53.1, "caig_rm": 56.2, "caig_rm_no_point": None,
         "exact_feature_ceiling": None, "oracle": None}  # CreativeRanking, % (GPT-4o: 50.2)
LABELS = {"random": "random (coin flip)", "zero_shot": "zero-shot MLLM (untrained tiny LLaVA-NeXT)",
          "vam": "VAM (ResNet, list-wise)", "cg4ctr": "CG4CTR (ViT + text, cross-attention)",
          "caig_rm": "CAIG RM (CE + 0.5 point)", "caig_rm_no_point": "CAIG RM without point loss",
          "exact_feature_ceiling": "exact-feature ceiling", "oracle": "oracle (true order)"}
JOBS = {
    "vam": ["--config=configs/baselines.py:vam_tiny"],
    "cg4ctr": ["--config=configs/baselines.py:cg4ctr_tiny"],
    "zero_shot": ["--config=configs/baselines.py:zero_shot_tiny"],
    "caig_rm": ["--config=configs/reward.py:tiny", "--config.ablation_point_weights=()"],
    "caig_rm_no_point": ["--config=configs/reward.py:tiny", "--config.loss.point_weight=0.0",
                         "--config.ablation_point_weights=()"],
}
METRICS = (("accuracy", "acc. vs logged labels", "pct"), ("true_ratio_agreement", "true-ratio agreement", "pct"),
           ("margin_true_spearman", "margin–true Spearman", "num"))
CI_KEYS = {"accuracy": "accuracy_product_ci", "true_ratio_agreement": "true_ratio_agreement_ci",
           "margin_true_spearman": "margin_true_spearman_ci"}
PREDICTIONS = "test_predictions.process0.npz"
COMPARED = ("vam", "cg4ctr", "zero_shot", "caig_rm_no_point")  # CAIG RM minus each of these, paired
DIFF_KEYS = ("accuracy", "true_ratio_agreement")


def _load_avg() -> str:
    return "%.1f %.1f %.1f" % os.getloadavg()


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_job(method: str, workdir: str, data_dir: str, world_seed: int | None, model_seed: int,
            extra: list[str]) -> dict:
    """Runs (or reads back) one job; returns {'metrics', 'seconds', 'load_before', 'load_after', 'reused'}."""
    final = os.path.join(workdir, "final_evaluation.json")
    timing_path = os.path.join(workdir, "comparison_timing.json")

    def saved():
        if not os.path.exists(final):
            return None
        record = json.load(open(final))
        return record["runs"][next(iter(record["runs"]))] if record.get("complete") else None

    metrics = saved()
    if metrics is not None:
        timing = json.load(open(timing_path)) if os.path.exists(timing_path) else {}
        return {"metrics": metrics, **timing, "reused": True}
    command = [sys.executable, "-m", "caig_jax.main", *JOBS[method], f"--workdir={workdir}",
               f"--config.seed={model_seed}", f"--config.data.dir={data_dir}"]
    if world_seed is not None:
        command.append(f"--config.data.market.seed={world_seed}")
    command += extra
    print(f"[{time.strftime('%H:%M:%S')}] {method}: {' '.join(command[2:])}", flush=True)
    os.makedirs(workdir, exist_ok=True)
    t0, load, cpu0 = time.time(), _load_avg(), _child_cpu()
    with open(os.path.join(workdir, "comparison.log"), "a") as log:
        subprocess.run(command, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
    # CPU seconds (user + system) next to the wall time: on a shared machine the wall time follows the load
    timing = {"seconds": time.time() - t0, "cpu_seconds": _child_cpu() - cpu0, "load_before": load,
              "load_after": _load_avg()}
    with open(timing_path, "w") as f:
        json.dump(timing, f)
    metrics = saved()
    if metrics is None:
        raise RuntimeError(f"{workdir}: the job finished without a complete final evaluation")
    return {"metrics": metrics, **timing, "reused": False}


def world_data(seed: int, folder: str) -> dict:
    """{'tfds', 'report'} of world `seed` in `folder`: used as it is when it holds its datasets and world report
    (e.g. a link to `benchmarks/reward_seeds.py`'s world), else built (`reward_seeds.build_world`)."""
    folder = os.path.realpath(folder)
    report = os.path.join(folder, "market", "world_report.json")
    if os.path.isdir(os.path.join(folder, "tfds", "ctr_logs", "market")) and os.path.exists(report):
        print(f"[{time.strftime('%H:%M:%S')}] world {seed}: using {folder}", flush=True)
        with open(report) as f:
            return {"tfds": os.path.join(folder, "tfds"), "report": json.load(f)}
    print(f"[{time.strftime('%H:%M:%S')}] world {seed}: building {folder}", flush=True)
    return build_world(seed, folder)


def _pairs(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _metrics(cls_logits, pairs: dict, seed: int = 0) -> dict:
    from caig_jax.eval.reward_accuracy import pairwise_metrics, to_jsonable

    return to_jsonable(dict(pairwise_metrics(
        cls_logits, cls_logits, pairs["label"], pairs["ctr"], pairs["category"], pairs["true_ctr"],
        items=pairs["item_id"], left_ids=pairs["left_id"], right_ids=pairs["right_id"], seed=seed)))


def paired_difference(caig: list[dict], other: list[dict], key: str, num_resamples: int = 1000) -> dict | None:
    """CAIG minus another judge on the same test pairs: `key` in ('accuracy', 'true_ratio_agreement'), with a
    product-clustered bootstrap interval of the difference (`caig_jax.eval.intervals`). `caig` and `other` are the
    test predictions of one or more runs each (model seeds of one world: the per-pair difference is averaged over
    them, so the interval resamples products with every seed's judgement of them)."""
    from caig_jax.data.world import TRUE_RATIO_BAND, true_ratio
    from caig_jax.eval.intervals import clustered_bootstrap
    from caig_jax.objectives.reward import prefers_left

    a = caig[0]
    if any(not np.array_equal(a["index"], p["index"]) for p in caig + other):
        raise ValueError("the runs' test predictions hold different pairs: not comparable")
    rows, target = np.ones(len(a["label"]), bool), a["label"]
    if key == "true_ratio_agreement":  # pairs whose true CTRs are known and in the band (none in real logs)
        known = np.isfinite(a["true_ctr"]).all(1)
        ratio = true_ratio(np.where(known[:, None], a["true_ctr"], 1.0))
        rows = known & (ratio >= TRUE_RATIO_BAND[0]) & (ratio <= TRUE_RATIO_BAND[1])
        target = np.where(prefers_left(a["true_ctr"][:, 0], a["true_ctr"][:, 1]), 0, 1)
    if not rows.any():
        return None

    def right(runs):  # float[N]: share of the runs whose decision matches the target, per pair
        return np.mean([np.where(prefers_left(p["cls_logits"][:, 0], p["cls_logits"][:, 1]), 0, 1) == target
                        for p in runs], axis=0)

    diff = (right(caig) - right(other))[rows]
    lo, hi = clustered_bootstrap(lambda r: float(diff[r].mean()), a["item_id"][rows], num_resamples=num_resamples)
    return {"difference": float(diff.mean()), "ci": [lo, hi], "pairs": int(rows.sum()), "runs": len(caig)}


def summarise(values: list[float]) -> dict:
    xs = [v for v in values if v is not None]
    out = {"n": len(xs), "mean": statistics.fmean(xs) if xs else None,
           "sd": statistics.stdev(xs) if len(xs) > 1 else None, "ci": None}
    if len(xs) > 1:
        half = scipy_stats.t.ppf(0.975, len(xs) - 1) * out["sd"] / len(xs) ** 0.5
        out["ci"] = [out["mean"] - half, out["mean"] + half]
    return out


def _fmt(x, kind: str) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}" if kind == "pct" else f"{x:.3f}"


def _fmt_ci(ci, kind: str) -> str:
    return "" if not ci or ci[0] is None else f" [{_fmt(ci[0], kind)}, {_fmt(ci[1], kind)}]"


def markdown(result: dict) -> str:
    lines = ["# Reward-model comparison (synthetic world)" if not result["data_dir"] else
             f"# Reward-model comparison ({result['data_dir']})", "",
             "Every row is scored on the same CAIG test pairs (logged CTR ratio 1.05-1.20, products never trained on) "
             "by the same evaluation core; each job chose on val and read test once. Mean over runs (model seeds x "
             "world seeds) with the 95% t-interval over runs in brackets; percentages. The paper's column is "
             "CreativeRanking (real logs): **different data**, shown for the ordering only.", ""]
    header = ["method", "paper (CreativeRanking)", "runs"] + [c for _, c, _ in METRICS]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for method, s in result["summary"].items():
        cells = [LABELS[method], "—" if PAPER[method] is None else f"{PAPER[method]:.1f}", str(s["runs"])]
        for key, _, kind in METRICS:
            m = s[key]
            cells.append(_fmt(m["mean"], kind) + _fmt_ci(m["ci"], kind))
        lines.append("| " + " | ".join(cells) + " |")
    if result["differences"]:
        lines += ["", "## CAIG RM minus each baseline, paired on the same test pairs", "",
                  "Per run: the difference with its 95% product-clustered bootstrap interval (1000 resamples); "
                  "'all (pooled)': the per-pair difference averaged over the world's model seeds, products resampled.",
                  "",
                  "| world | model seed | baseline | Δ acc. vs logged [CI] | Δ true-ratio agreement [CI] |",
                  "| --- | --- | --- | --- | --- |"]
        for d in result["differences"]:
            cells = [str(d["world"]), str(d["model_seed"]), LABELS[d["baseline"]]]
            for key in ("accuracy", "true_ratio_agreement"):
                x = d[key]
                cells.append("—" if x is None else f"{100 * x['difference']:+.1f}{_fmt_ci(x['ci'], 'pct')}")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Every run", "", "| world | model seed | method | " + " | ".join(c for _, c, _ in METRICS)
              + " | wall time (CPU time) | load avg at start (1/5/15 min) |", "|" + " --- |" * (5 + len(METRICS))]
    for r in result["rows"]:
        cells = [str(r["world"]), str(r["model_seed"]), LABELS[r["method"]]]
        cells += [_fmt(r["metrics"].get(k), kind) + _fmt_ci(r["metrics"].get(CI_KEYS[k]), kind) for k, _, kind in METRICS]
        secs, cpu = r.get("seconds"), r.get("cpu_seconds")
        cells += ["—" if secs is None else f"{secs / 60:.1f} min" + ("" if cpu is None else f" ({cpu / 60:.1f} CPU-min)"),
                  r.get("load_before") or "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--world-seeds", default="0")
    parser.add_argument("--model-seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(JOBS))
    parser.add_argument("--runs", default="", help="WORLD:MODEL seed pairs, e.g. 0:0,0:1,1:0 (instead of every "
                        "world seed x model seed)")
    parser.add_argument("--data-dir", default="", help="a ctr_logs TFDS dir (CreativeRanking) instead of worlds")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(JOBS))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {sorted(JOBS)}")
    worlds = [None] if args.data_dir else [int(x) for x in args.world_seeds.split(",")]
    model_seeds = {ws: [int(x) for x in args.model_seeds.split(",")] for ws in worlds}
    if args.runs and not args.data_dir:
        pairs_wm = [tuple(int(x) for x in run.split(":")) for run in args.runs.split(",")]
        worlds = sorted({w for w, _ in pairs_wm})
        model_seeds = {ws: [m for w, m in pairs_wm if w == ws] for ws in worlds}
    rows, differences, ceilings, world_pairs = [], [], {}, {}
    for ws in worlds:
        if ws is None:
            data_dir, report, tag = os.path.abspath(args.data_dir), None, "data"
        else:
            world = world_data(ws, os.path.join(out, f"world{ws}"))
            data_dir, report, tag = world["tfds"], world["report"], f"w{ws}"
        for ms in model_seeds[ws]:
            runs, pairs = {}, {}
            for method in methods:
                workdir = os.path.join(out, f"{tag}_m{ms}", method)
                job = run_job(method, workdir, data_dir, ws, ms, extra)
                runs[method] = job
                pairs[method] = _pairs(os.path.join(workdir, PREDICTIONS))
                rows.append({"world": ws, "model_seed": ms, "method": method, **job})
                print(f"  {method}: " + json.dumps({k: job["metrics"].get(k) for k, _, _ in METRICS}), flush=True)
            first = pairs[methods[0]]
            for method, p in pairs.items():
                if not np.array_equal(p["index"], first["index"]):
                    raise ValueError(f"{method}'s test predictions hold other pairs than {methods[0]}'s")
            coin = np.random.default_rng(ms).normal(size=(len(first["label"]), 2))
            rows.append({"world": ws, "model_seed": ms, "method": "random", "metrics": _metrics(coin, first)})
            if ws is not None and not any(r["method"] == "oracle" and r["world"] == ws for r in rows):
                rows.append({"world": ws, "model_seed": "—", "method": "oracle",
                             "metrics": _metrics(first["true_ctr"].astype(np.float64), first)})
                ceiling = report["exact_feature_ceiling"]
                ceilings[ws] = {"accuracy": ceiling["accuracy"],
                                "true_ratio_agreement": ceiling["true_order_agreement_true_ratio_pairs"],
                                "margin_true_spearman": None}
                rows.append({"world": ws, "model_seed": "—", "method": "exact_feature_ceiling",
                             "metrics": ceilings[ws]})
            for method, p in pairs.items():
                world_pairs.setdefault((ws, method), []).append(p)
            if "caig_rm" in pairs:
                for baseline in [m for m in COMPARED if m in pairs]:
                    differences.append({"world": ws, "model_seed": ms, "baseline": baseline, **{
                        key: paired_difference([pairs["caig_rm"]], [pairs[baseline]], key) for key in DIFF_KEYS}})
        if len(model_seeds[ws]) > 1 and (ws, "caig_rm") in world_pairs:
            for baseline in [m for m in COMPARED if (ws, m) in world_pairs]:
                differences.append({"world": ws, "model_seed": "all (pooled)", "baseline": baseline, **{
                    key: paired_difference(world_pairs[(ws, "caig_rm")], world_pairs[(ws, baseline)], key)
                    for key in DIFF_KEYS}})
    order = ["random", "zero_shot", "vam", "cg4ctr", "caig_rm_no_point", "caig_rm", "exact_feature_ceiling", "oracle"]
    summary = {}
    for method in order:
        mine = [r for r in rows if r["method"] == method]
        if mine:
            summary[method] = {"runs": len(mine), **{key: summarise([r["metrics"].get(key) for r in mine])
                                                    for key, _, _ in METRICS}}
    result = {"data_dir": args.data_dir, "runs": {str(w): m for w, m in model_seeds.items()}, "overrides": extra,
              "summary": summary, "differences": differences, "rows": rows}
    with open(os.path.join(out, "comparison.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    md = markdown(result)
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
