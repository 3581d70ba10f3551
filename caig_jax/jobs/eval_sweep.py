"""`eval_sweep` job: evaluate trained pairwise models on evaluation sets, one resumable results table.

    python -m caig_jax.main --config=configs/eval_sweep.py:tiny --workdir=runs/sweep \
        --config.checkpoints='runs/reward_*' --config.eval_sets='test=self:test,val=self:val'

Sections: plan (checkpoint globs x steps x evaluation sets -> rows; rows already in `<workdir>/rows/` are
skipped) -> per checkpoint: load the model once, evaluate every pending set (`caig_jax.eval.pairwise.evaluate`:
batches sharded over the mesh's batch axes, padded to the mesh, pad rows dropped; each host keeps and writes
only its own shard of per-pair predictions) -> one row JSON per (checkpoint, step, set) written as soon as it
is done -> the table (`results.csv`, `results.json`, `results.md`) rebuilt from the row files by process 0.

The model kind (`config.model_kind`, default `reward`) picks a `ModelInterface` from `INTERFACES`:
  load_trained(workdir, mesh, step=None) -> (model, run config)
  pair_batches(config, data_dir, split, batch_size) -> iterator of numpy batches (this process's share;
      keys 'label' int32[B], 'ctr' float32[B, 2], 'category', optional 'true_ctr' float32[B, 2], model inputs)
  predict_batch(model, batch, mesh) -> {'cls_logits': float32[B, 2], 'ctr_pred': float32[B, 2]}
      for this process's rows of the batch, in order (`caig_jax.parallel.local_rows`).

Multi-host: every process evaluates its own shard of each split; only process 0 writes row files, reports
and the table. The workdir and checkpoints must be on a filesystem every host sees.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import io
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from caig_jax import parallel
from caig_jax.config_checks import Checks, ConfigError, common_checks
from caig_jax.data.reward_inputs import pair_batches as reward_pair_batches
from caig_jax.errors import MissingPathError
from caig_jax.eval import reward_accuracy
from caig_jax.eval.pairwise import evaluate
from caig_jax.eval.report import write_report
from caig_jax.files import write_atomic, write_json_atomic
from caig_jax.models.reward import predict_batch as reward_predict_batch
from caig_jax.trainers import baselines
from caig_jax.trainers.reward import load_trained as reward_load_trained

log = logging.getLogger(__name__)

OWN_DATA = "self"  # eval set data_dir meaning "the checkpoint's own training data"


@dataclasses.dataclass(frozen=True)
class ModelInterface:
    """What the sweep needs of a kind of pairwise model (see the module docstring)."""

    load_trained: Callable[..., tuple[Any, ml_collections.ConfigDict]]
    pair_batches: Callable[..., Iterable[Mapping[str, Any]]]
    predict_batch: Callable[[Any, dict, Any], Mapping[str, np.ndarray]]


INTERFACES: dict[str, ModelInterface] = {
    "reward": ModelInterface(reward_load_trained, reward_pair_batches, reward_predict_batch),
    # VAM and CG4CTR workdirs of the baselines job (the kind is read from each workdir's config.json)
    "baseline": ModelInterface(baselines.load_trained, baselines.pair_batches, baselines.predict_batch),
}


# ================================================================================================
# Plan: checkpoints x steps x evaluation sets.
# ================================================================================================
@dataclasses.dataclass(frozen=True)
class EvalSet:
    """A named evaluation set: a TFDS data dir (or `self`: the checkpoint's own data) and a split."""

    name: str
    data_dir: str
    split: str


@dataclasses.dataclass(frozen=True)
class RowSpec:
    checkpoint: str  # the training workdir as matched (relative paths stay relative in the table)
    step: int
    eval_set: EvalSet

    @property
    def row_id(self) -> str:
        key = json.dumps([os.path.abspath(self.checkpoint), self.step, dataclasses.astuple(self.eval_set)])
        digest = hashlib.sha1(key.encode()).hexdigest()[:10]
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", self.checkpoint.strip("/"))[-60:]
        return f"{name}-step{self.step}-{re.sub(r'[^A-Za-z0-9._-]+', '_', self.eval_set.name)}-{digest}"


def _items(spec: str | Sequence[Any]) -> list[Any]:
    if isinstance(spec, str):
        return [s.strip() for s in spec.split(",") if s.strip()]
    return list(spec)


def parse_eval_sets(spec: str | Sequence[Any]) -> list[EvalSet]:
    """`"NAME=DATA_DIR:SPLIT,..."` (or a list of such strings, or of dicts name/data_dir/split) -> EvalSets.

    DATA_DIR `self` is the checkpoint's own training data; SPLIT defaults to `test` (the part after the last
    ':' is the split only when it holds no '/', so `gs://bucket/tfds` alone is a data dir).
    """
    out = []
    for item in _items(spec):
        if isinstance(item, Mapping) or hasattr(item, "to_dict"):
            d = dict(item.to_dict() if hasattr(item, "to_dict") else item)
            missing = {"name", "data_dir"} - set(d)
            if missing:
                raise ConfigError(f"config.eval_sets entry {d} lacks {sorted(missing)} (needs name, data_dir[, split])")
            out.append(EvalSet(str(d["name"]), str(d["data_dir"]), str(d.get("split", "test"))))
            continue
        name, sep, rest = str(item).partition("=")
        if not sep or not name or not rest:
            raise ConfigError(f"config.eval_sets entry {item!r} is not NAME=DATA_DIR[:SPLIT] (e.g. test=self:test)")
        data_dir, split = rest, "test"
        head, colon, tail = rest.rpartition(":")
        if colon and head and tail and "/" not in tail:
            data_dir, split = head, tail
        out.append(EvalSet(name.strip(), data_dir.strip(), split.strip()))
    if not out:
        raise ConfigError("config.eval_sets is empty: give at least one NAME=DATA_DIR:SPLIT")
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"config.eval_sets names must be unique, got {names}")
    return out


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints in `<workdir>/checkpoints` (Orbax step folders), ascending."""
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit() and os.path.isdir(os.path.join(folder, d)))


def expand_checkpoints(spec: str | Sequence[str]) -> list[tuple[str, bool]]:
    """Paths and globs of training workdirs -> [(workdir, explicit)], in order, without duplicates.

    An explicit path must exist; a glob that matches nothing is a warning; nothing at all is an error.
    """
    out, seen = [], set()
    for pattern in _items(spec):
        pattern = os.path.expanduser(str(pattern))
        if glob.has_magic(pattern):
            matches = [p for p in sorted(glob.glob(pattern)) if os.path.isdir(p)]
            if not matches:
                log.warning("config.checkpoints glob %r matches no directory", pattern)
            entries = [(p, False) for p in matches]
        else:
            if not os.path.isdir(pattern):
                raise MissingPathError(f"config.checkpoints entry {pattern!r} is not a directory")
            entries = [(pattern, True)]
        for path, explicit in entries:
            key = os.path.abspath(path)
            if key not in seen:
                seen.add(key)
                out.append((path.rstrip("/") or path, explicit))
    if not out:
        raise MissingPathError(f"config.checkpoints={spec!r} names no directory: give training workdirs or globs, "
                               "e.g. runs/reward_*")
    return out


def select_steps(available: Sequence[int], spec: str | int) -> list[int]:
    """`latest`, `all`, or comma-separated steps (each must exist) -> the steps to evaluate."""
    spec = str(spec).strip()
    if not available:
        return []
    if spec == "latest":
        return [available[-1]]
    if spec == "all":
        return list(available)
    wanted = [int(s) for s in spec.split(",") if s.strip()]
    missing = [s for s in wanted if s not in available]
    if missing:
        raise ConfigError(f"config.steps asks for {missing}, available checkpoints: {list(available)}")
    return wanted


def plan_rows(checkpoints: str | Sequence[str], steps: str, eval_sets: Sequence[EvalSet]) -> list[RowSpec]:
    rows = []
    for path, explicit in expand_checkpoints(checkpoints):
        chosen = select_steps(checkpoint_steps(path), steps)
        if not chosen:
            if explicit:
                raise MissingPathError(f"{path}/checkpoints holds no complete checkpoint")
            log.warning("skipping %s: no complete checkpoint in %s/checkpoints", path, path)
            continue
        rows += [RowSpec(path, step, e) for step in chosen for e in eval_sets]
    return rows


# ================================================================================================
# Rows and the table.
# ================================================================================================
COLUMNS = (
    "checkpoint", "step", "eval_set", "data_dir", "split", "n",
    "accuracy", "accuracy_ci_low", "accuracy_ci_high",
    "ctr_accuracy", "ctr_accuracy_ci_low", "ctr_accuracy_ci_high", "ctr_pearson", "ctr_spearman",
    "calibration_ece", "oracle_accuracy", "accuracy_vs_true", "margin_true_pearson", "margin_true_spearman",
    "target_met", "seconds", "row_id",
)


def make_row(spec: RowSpec, data_dir: str, metrics: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    m = reward_accuracy.to_jsonable(dict(metrics))
    row = {
        "checkpoint": spec.checkpoint, "step": spec.step, "eval_set": spec.eval_set.name, "data_dir": data_dir,
        "split": spec.eval_set.split, "n": m["n"],
        "accuracy": m["accuracy"], "accuracy_ci_low": m["accuracy_ci"][0], "accuracy_ci_high": m["accuracy_ci"][1],
        "ctr_accuracy": m["ctr_accuracy"], "ctr_accuracy_ci_low": m["ctr_accuracy_ci"][0],
        "ctr_accuracy_ci_high": m["ctr_accuracy_ci"][1],
        "seconds": round(seconds, 2), "row_id": spec.row_id,
    }
    for key in COLUMNS:
        row.setdefault(key, m.get(key))
    return {key: row[key] for key in COLUMNS}


def _fmt_pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def table_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    header = ["checkpoint", "step", "eval set", "pairs", "accuracy", "95% CI", "CTR-head acc", "CTR Pearson",
              "CTR Spearman", "oracle", "acc vs true", "margin–true Spearman", "target met"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lo, hi = r["accuracy_ci_low"], r["accuracy_ci_high"]
        ci = "—" if lo is None else f"[{100 * lo:.1f}, {100 * hi:.1f}]"
        target = "—" if r["target_met"] is None else ("yes" if r["target_met"] else "no")
        cells = [r["checkpoint"], r["step"], f"{r['eval_set']} ({r['split']})", r["n"], _fmt_pct(r["accuracy"]), ci,
                 _fmt_pct(r["ctr_accuracy"]), _fmt(r["ctr_pearson"]), _fmt(r["ctr_spearman"]),
                 _fmt_pct(r["oracle_accuracy"]), _fmt_pct(r["accuracy_vs_true"]), _fmt(r["margin_true_spearman"]),
                 target]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[Mapping[str, Any]], workdir: str) -> dict[str, str]:
    """`results.csv`, `results.json` (list of rows) and `results.md` in `workdir`. Returns their paths."""
    paths = {ext: os.path.join(workdir, f"results.{ext}") for ext in ("csv", "json", "md")}
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in COLUMNS})
    write_atomic(paths["csv"], table.getvalue())
    write_json_atomic(paths["json"], list(rows))
    write_atomic(paths["md"], "# Reward-model evaluation sweep\n\n" + table_markdown(rows))
    return paths


def _row_path(workdir: str, spec: RowSpec) -> str:
    return os.path.join(workdir, "rows", f"{spec.row_id}.json")


def _agree_with_process_0(plan: Sequence[RowSpec], done: list[bool]) -> list[bool]:
    """Every process must run the same rows (they are collective): check the plans match, take process 0's done."""
    if jax.process_count() == 1:
        return done
    digest = int(hashlib.sha1("|".join(r.row_id for r in plan).encode()).hexdigest()[:7], 16)
    digests = parallel.process_allgather_int(digest)
    if len(set(digests.tolist())) != 1:
        raise RuntimeError(
            "processes planned different sweeps (different checkpoint globs?): the workdir and checkpoints must "
            "be on a filesystem every host sees"
        )
    flags = multihost_utils.broadcast_one_to_all(np.asarray(done, np.int32))
    return [bool(x) for x in np.asarray(flags)]


def _resolve_data_dir(eval_set: EvalSet, checkpoint: str, config: ml_collections.ConfigDict) -> str:
    if eval_set.data_dir != OWN_DATA:
        path = eval_set.data_dir
    else:
        data = config.get("data") if hasattr(config, "get") else None
        own = data.get("dir") if data is not None and hasattr(data, "get") else None
        # A reward run without `data.dir` built the marketplace into its workdir (jobs.reward.ensure_data).
        path = own or os.path.join(checkpoint, "market", "tfds")
    if "://" not in path and not os.path.isdir(path):
        raise MissingPathError(f"eval set {eval_set.name!r}: data dir {path!r} does not exist")
    return path


def validate(config: ml_collections.ConfigDict) -> None:
    """Types and ranges of every key the job reads (`caig_jax.config_checks`), and the form of `steps` and
    `eval_sets`; raises `ConfigError` before any checkpoint is read."""
    checks = Checks(config)
    common_checks(checks)
    checks.mesh(devices=jax.device_count())
    checks.integer("batch_size", min=1)
    checks.boolean("write_predictions")
    checks.boolean("write_reports")
    checks.choice("model_kind", tuple(INTERFACES))
    steps = checks.get("steps")
    if isinstance(steps, str):
        words = [w.strip() for w in steps.split(",") if w.strip()]
        if not (steps.strip() in ("latest", "all") or (words and all(w.isdigit() for w in words))):
            checks.problem("steps", "'latest', 'all' or comma-separated steps >= 0 such as '400,800'")
    try:
        if not parse_eval_sets(config.eval_sets):
            checks.problem("eval_sets", "at least one NAME=DATA_DIR[:SPLIT]")
    except ValueError as e:
        checks.problems.append(("eval_sets", str(e)))
    checks.done()


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """The sweep (see the module docstring). Returns the table's rows (on every process)."""
    validate(config)
    kind = config.get("model_kind", "reward")
    if kind not in INTERFACES:
        raise ConfigError(f"config.model_kind={kind!r}: known kinds {sorted(INTERFACES)}")
    interface = INTERFACES[kind]
    is_main = jax.process_index() == 0
    mesh = parallel.make_mesh(config.mesh.to_dict())
    local_batch = max(1, int(config.batch_size) // jax.process_count())
    eval_sets = parse_eval_sets(config.eval_sets)
    plan = plan_rows(config.checkpoints, config.steps, eval_sets)
    done = _agree_with_process_0(plan, [os.path.exists(_row_path(workdir, r)) for r in plan])
    pending = [r for r, d in zip(plan, done) if not d]
    log.info("eval sweep: %d rows planned, %d already done, mesh %s", len(plan), len(plan) - len(pending),
             dict(mesh.shape))
    if is_main:
        os.makedirs(os.path.join(workdir, "rows"), exist_ok=True)

    groups: dict[tuple[str, int], list[RowSpec]] = {}
    for spec in pending:
        groups.setdefault((spec.checkpoint, spec.step), []).append(spec)
    finished = 0
    for (checkpoint, step), specs in groups.items():
        model, model_config = interface.load_trained(checkpoint, mesh, step=step)
        for spec in specs:
            data_dir = _resolve_data_dir(spec.eval_set, checkpoint, model_config)
            batches = interface.pair_batches(model_config, data_dir, spec.eval_set.split, local_batch)
            predictions = None
            if config.write_predictions:
                predictions = os.path.join(workdir, "predictions", spec.row_id, "predictions.process{process}.npz")
            start = time.time()
            metrics = evaluate(interface.predict_batch, model, batches, mesh, predictions_path=predictions)
            row = make_row(spec, data_dir, metrics, time.time() - start)
            finished += 1
            log.info("[%d/%d] %s step %d on %s: accuracy %s %s, n=%d", finished, len(pending), checkpoint, step,
                     spec.eval_set.name, _fmt_pct(row["accuracy"]),
                     f"[{_fmt_pct(row['accuracy_ci_low'])}, {_fmt_pct(row['accuracy_ci_high'])}]", row["n"])
            if is_main:
                if config.write_reports:
                    write_report(
                        metrics, os.path.join(workdir, "reports", spec.row_id),
                        title=f"{checkpoint} (step {step}) on {spec.eval_set.name} ({spec.eval_set.split})",
                    )
                full = {"row": row, "metrics": reward_accuracy.to_jsonable(dict(metrics))}
                write_json_atomic(_row_path(workdir, spec), full)  # complete or absent: resuming relies on it
        del model

    rows = []
    for spec in plan:
        path = _row_path(workdir, spec)
        if os.path.exists(path):
            with open(path) as f:
                rows.append(json.load(f)["row"])
    if is_main:
        paths = write_table(rows, workdir)
        print(table_markdown(rows))
        print(f"table: {paths['md']} (also .csv, .json); per-row reports under {os.path.join(workdir, 'reports')}")
    if jax.process_count() > 1:
            multihost_utils.sync_global_devices("eval_sweep_done")
    return rows
