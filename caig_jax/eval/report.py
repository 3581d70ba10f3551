"""The reward model's evaluation report: `report.md` + `report.json` + PNG plots in one folder."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from caig_jax import files
from caig_jax.eval import plots as plot_lib
from caig_jax.eval.reward_accuracy import report_markdown, to_jsonable
from caig_jax.files import write_atomic, write_json_atomic


def write_report(
    metrics: Mapping[str, Any],
    out_dir: str,
    *,
    title: str,
    extra_sections: Mapping[str, str] | None = None,
    predictions: Mapping[str, np.ndarray] | None = None,
    metrics_jsonl: str | None = None,
) -> dict[str, str]:
    """Writes `<out_dir>/report.json`, `<out_dir>/report.md` and PNG plots under `<out_dir>/plots/`.

    Args:
      metrics: `pairwise_metrics(...)` output (its `.predictions` feed the plots).
      out_dir: the folder to write into (created).
      title: the report's heading.
      extra_sections: `{heading: markdown}` appended (e.g. `{"Ablation": compare_runs(...)}`).
      predictions: per-pair arrays for the plots when `metrics` does not carry them (keys as in
        `PairMetrics.predictions`); without either, only the per-category plot is drawn.
      metrics_jsonl: a trainer's `metrics.jsonl`; when it exists, training curves are plotted too.

    Returns:
      `{name: path}` of every file written.
    """
    files.makedirs(os.path.join(out_dir, "plots"))
    preds = predictions if predictions is not None else getattr(metrics, "predictions", None)
    plots: dict[str, str] = {}

    def plot(name, fn, *args):
        rel = os.path.join("plots", f"{name}.png")
        fn(*args, os.path.join(out_dir, rel))
        plots[name] = rel

    if preds is not None:
        plot("calibration", plot_lib.calibration_plot, preds["cls_logits"], preds["labels"])
        plot("ctr_scatter", plot_lib.ctr_scatter, preds["ctr_pred"], preds["logged_ctrs"])
        true_ctrs = preds.get("true_ctrs")
        if true_ctrs is not None:
            known = np.all(np.isfinite(true_ctrs), axis=1)
            logits = np.asarray(preds["cls_logits"])[known]
            plot("margin_vs_true", plot_lib.margin_vs_true_plot, logits[:, 0] - logits[:, 1],
                 true_ctrs[known, 0] - true_ctrs[known, 1])
    if metrics.get("per_category"):
        plot("per_category", plot_lib.per_category_bar, metrics)
    if metrics_jsonl and os.path.exists(metrics_jsonl):
        plot("training_curves", plot_lib.training_curves, metrics_jsonl)

    paths = {name: os.path.join(out_dir, rel) for name, rel in plots.items()}
    md = report_markdown(metrics, title=title, plots=plots, extra_sections=extra_sections)
    paths["report.md"] = os.path.join(out_dir, "report.md")
    write_atomic(paths["report.md"], md)
    paths["report.json"] = os.path.join(out_dir, "report.json")
    write_json_atomic(paths["report.json"], {"title": title, "metrics": to_jsonable(dict(metrics)), "plots": plots})
    return paths
