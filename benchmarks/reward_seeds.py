"""The tiny reward preset over model seeds x world seeds: one table of the headline metrics, mean and spread.

Command (from the repository root; not CI: 6 reward jobs, about 30-60 CPU-minutes on 2 cores):
    .venv/bin/python benchmarks/reward_seeds.py --out runs/reward_seeds [--split val|test]
        [--model-seeds 0,1,2] [--world-seeds 0,1] [--ablation] [-- --config.train.steps=1500 ...]

What it does (DESIGN.md section 5: a claim about a method is a mean over model seeds x world seeds):
- builds each world once (`configs/reward.py`'s `data.market`, `seed` = the world seed; CTR-log datasets only)
  into `<out>/world<W>/`, and copies its world report's figures into the table;
- runs the reward job (`python -m caig_jax.main --config=configs/reward.py:tiny`, model seed `seed` = M, the
  world's data dir, extra `--config.*` overrides after `--`) in `<out>/w<W>_m<M>/`, one job at a time, each in
  its own process. The `point_weight=0` ablation is left out unless `--ablation`.
- `--split val` (tuning): the jobs run with `eval.final_test=False` and report on val (test is not read);
  `--split test` (default): the jobs end with their final evaluation, which reads test once per run. A finished
  job is not run again (its saved report is read: `final_evaluation.json` / `validation/report.json`); the same
  run folder can serve a val pass and then the test pass (training resumes at its last step).
- writes `<out>/seeds_<split>.md` and `.json`: one row per run (paper's metric and oracle, agreement with the
  true order on true-ratio pairs with its product-bootstrap interval, margin-true Spearman, top-1 regret,
  the wall time of the pass (a test pass over trained runs only evaluates) and the load average) and mean,
  sample standard deviation, min and max of each metric, then issue 13's targets checked on them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# (key in the metrics, column, format: "pct" | "num")
METRICS = (
    ("accuracy", "paper's metric (acc. vs logged)", "pct"),
    ("oracle_accuracy", "oracle", "pct"),
    ("true_ratio_agreement", "true-ratio agreement", "pct"),
    ("true_ratio_agreement_lower", "its lower bound", "pct"),
    ("margin_true_spearman", "margin–true Spearman", "num"),
    ("top1_regret", "top-1 regret", "pct"),
    ("top1_hit_rate", "top-1 hit rate", "pct"),
)
WORLD_FIGURES = (
    ("oracle_accuracy", "oracle (CAIG test pairs)"),
    ("near_tie_share", "true ratio < 1.02 share"),
    ("true_ratio_pairs", "true-ratio test pairs"),
    ("flat_stretch_share", "flat-stretch share"),
    ("exact_feature_ceiling.true_order_agreement_true_ratio_pairs", "exact-feature ceiling (true-ratio pairs)"),
    ("sibling_separability.rate", "sibling separability"),
)


def _load_avg() -> str:
    return "%.1f %.1f %.1f" % os.getloadavg()


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def build_world(seed: int, out: str) -> dict:
    """Builds (or reuses) world `seed` into `out`; returns {'tfds', 'report', 'seconds', 'load'}."""
    from caig_jax.config_files import load_config
    from caig_jax.data.market_datasets import build_world as build

    config = load_config(os.path.join(REPO, "configs", "reward.py:tiny"))
    market = config.data.market
    market.seed = seed
    market.build.datasets = ("ctr_logs",)
    timing_path = os.path.join(out, "seeds_build_timing.json")
    t0, load = time.time(), _load_avg()
    build(market, out, verbose=False)
    if not os.path.exists(timing_path):  # the first build's time (a reused world takes none)
        with open(timing_path, "w") as f:
            json.dump({"seconds": time.time() - t0, "load": load}, f)
    with open(os.path.join(out, "market", "world_report.json")) as f:
        report = json.load(f)
    return {"tfds": os.path.join(out, "tfds"), "report": report, **json.load(open(timing_path))}


def _saved(workdir: str, split: str) -> dict | None:
    """(main run's metrics, val metrics) of a finished job, or None."""
    if split == "test":
        path = os.path.join(workdir, "final_evaluation.json")
        if not os.path.exists(path):
            return None
        saved = json.load(open(path))
        if not saved.get("complete"):
            return None
        name = next(iter(saved["runs"]))
        return {"metrics": saved["runs"][name], "runs": saved["runs"]}
    path = os.path.join(workdir, "validation", "report_ablation.json")
    if not os.path.exists(path):
        return None
    runs = json.load(open(path))
    return {"metrics": runs[next(iter(runs))], "runs": runs}


def run_job(workdir: str, data_dir: str, world_seed: int, model_seed: int, split: str, ablation: bool,
            extra: list[str]) -> dict:
    """Runs (or reads back) one reward job; returns {'metrics', 'runs', 'seconds', 'load_before', 'load_after'}."""
    timing_path = os.path.join(workdir, f"seeds_timing_{split}.json")
    saved = _saved(workdir, split)
    if saved is not None:
        timing = json.load(open(timing_path)) if os.path.exists(timing_path) else {}
        return {**saved, **timing, "reused": True}
    command = [
        sys.executable, "-m", "caig_jax.main", "--config=configs/reward.py:tiny", f"--workdir={workdir}",
        f"--config.seed={model_seed}", f"--config.data.market.seed={world_seed}", f"--config.data.dir={data_dir}",
        f"--config.eval.final_test={split == 'test'}",
    ]
    if not ablation:
        command.append("--config.ablation_point_weights=()")
    command += extra
    print(f"[{time.strftime('%H:%M:%S')}] world {world_seed} model {model_seed}: {' '.join(command[2:])}",
          flush=True)
    t0, load = time.time(), _load_avg()
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, f"seeds_{split}.log"), "a") as log:
        subprocess.run(command, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
    timing = {"seconds": time.time() - t0, "load_before": load, "load_after": _load_avg()}
    with open(timing_path, "w") as f:
        json.dump(timing, f)
    saved = _saved(workdir, split)
    if saved is None:
        raise RuntimeError(f"{workdir}: the job finished without its {split} report")
    return {**saved, **timing, "reused": False}


def _row_values(metrics: dict) -> dict:
    ci = metrics.get("true_ratio_agreement_ci") or [None, None]
    values = {key: metrics.get(key) for key, _, _ in METRICS}
    values["true_ratio_agreement_lower"] = ci[0]
    return values


def _fmt(x, kind: str) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}%" if kind == "pct" else f"{x:.3f}"


def summarise(rows: list[dict]) -> dict:
    """{metric: {mean, sd, min, max, n}} over the runs (sd: sample standard deviation)."""
    out = {}
    for key, _, _ in METRICS:
        xs = [r["values"][key] for r in rows if r["values"][key] is not None]
        out[key] = {
            "mean": statistics.fmean(xs) if xs else None,
            "sd": statistics.stdev(xs) if len(xs) > 1 else None,
            "min": min(xs) if xs else None,
            "max": max(xs) if xs else None,
            "n": len(xs),
        }
    return out


def check_targets(summary: dict) -> dict:
    from caig_jax.eval.reward_accuracy import HEADLINE_TARGETS as T

    agree, lower, rho = (summary[k] for k in ("true_ratio_agreement", "true_ratio_agreement_lower",
                                              "margin_true_spearman"))
    return {
        "mean true-ratio agreement >= %.2f" % T["true_ratio_agreement"]:
            {"value": agree["mean"], "met": agree["mean"] is not None and agree["mean"] >= T["true_ratio_agreement"]},
        "every run's lower bound >= %.2f" % T["true_ratio_agreement_lower"]:
            {"value": lower["min"],
             "met": lower["min"] is not None and lower["min"] >= T["true_ratio_agreement_lower"]},
        "mean margin-true Spearman >= %.2f" % T["margin_true_spearman"]:
            {"value": rho["mean"], "met": rho["mean"] is not None and rho["mean"] >= T["margin_true_spearman"]},
    }


def markdown(result: dict) -> str:
    split = result["split"]
    lines = [f"# Tiny reward preset over seeds ({split} split)", ""]
    lines += [("Final evaluation: each run's test split read once, by its job's final evaluation; hyper-parameters "
               "were chosen on val." if split == "test" else
               "Tuning pass on val (`eval.final_test=False`): the test split was not read."), ""]
    lines += [f"Overrides: `{' '.join(result['overrides']) or '(none)'}`; ablation runs: {result['ablation']}. "
              "Intervals: 95% product-clustered bootstrap (1000 resamples). Top-1 regret: (best - chosen) / best true "
              "CTR per product, the chosen creative ranked first by Copeland score of the model's decisions.", ""]
    header = ["world seed", "model seed"] + [c for _, c, _ in METRICS]
    header += ["wall time of this pass", "load avg at its start (1/5/15 min)"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in result["rows"]:
        cells = [str(r["world_seed"]), str(r["model_seed"])]
        cells += [_fmt(r["values"][k], kind) for k, _, kind in METRICS]
        secs = r.get("seconds")
        cells += ["—" if secs is None else f"{secs / 60:.1f} min", r.get("load_before", "—")]
        lines.append("| " + " | ".join(cells) + " |")
    s = result["summary"]
    for stat in ("mean", "sd", "min", "max"):
        cells = [f"**{stat}**", ""] + [_fmt(s[k][stat], kind) for k, _, kind in METRICS] + ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| issue 13 target | value | met |", "| --- | --- | --- |"]
    for name, t in result["targets"].items():
        lines.append(f"| {name} | {_fmt(t['value'], 'num')} | {'yes' if t['met'] else '**no**'} |")
    lines += ["", "World report (per world seed):", "",
              "| world seed | " + " | ".join(c for _, c in WORLD_FIGURES) + " | build time |",
              "|" + " --- |" * (len(WORLD_FIGURES) + 2)]
    for seed, w in result["worlds"].items():
        cells = [seed] + [str(w["report"][k]) if isinstance(w["report"][k], int) else _fmt(w["report"][k], "num")
                          for k, _ in WORLD_FIGURES]
        cells.append(f"{w['seconds']:.0f} s (load {w['load']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument("--model-seeds", default="0,1,2")
    parser.add_argument("--world-seeds", default="0,1")
    parser.add_argument("--ablation", action="store_true")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    worlds, rows = {}, []
    for ws in [int(x) for x in args.world_seeds.split(",")]:
        print(f"[{time.strftime('%H:%M:%S')}] world {ws}: building or reusing {out}/world{ws}", flush=True)
        world = build_world(ws, os.path.join(out, f"world{ws}"))
        worlds[str(ws)] = {k: world[k] for k in ("report", "seconds", "load")}
        for ms in [int(x) for x in args.model_seeds.split(",")]:
            job = run_job(os.path.join(out, f"w{ws}_m{ms}"), world["tfds"], ws, ms, args.split, args.ablation, extra)
            rows.append({"world_seed": ws, "model_seed": ms, "values": _row_values(job["metrics"]),
                         **{k: job.get(k) for k in ("seconds", "load_before", "load_after", "reused")},
                         "runs": {name: _row_values(m) for name, m in job["runs"].items()}})
            print(f"  {json.dumps(rows[-1]['values'])}", flush=True)
    summary = summarise(rows)
    result = {"split": args.split, "overrides": extra, "ablation": args.ablation, "rows": rows,
              "summary": summary, "targets": check_targets(summary),
              "worlds": {k: {"report": {key: _get(v["report"], key) for key, _ in WORLD_FIGURES},
                             "seconds": v["seconds"], "load": v["load"]} for k, v in worlds.items()}}
    with open(os.path.join(out, f"seeds_{args.split}.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = markdown(result)
    with open(os.path.join(out, f"seeds_{args.split}.md"), "w") as f:
        f.write(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
