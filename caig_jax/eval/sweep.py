"""`eval_sweep` job: evaluate reward-model checkpoints on evaluation sets, one resumable results table.

    python -m caig_jax.main --config=configs/eval_sweep.py:tiny --workdir=runs/sweep \
        --config.checkpoints='runs/reward_*' --config.eval_sets='test=self:test,val=self:val'

Sections: plan (checkpoint globs x steps x evaluation sets -> rows; rows already in `<workdir>/rows/` are
skipped) -> per checkpoint: load the model once, evaluate every pending set (`evaluate`: batches sharded over
the mesh's batch axes, padded to the mesh, pad rows dropped; each host keeps and writes only its own shard of
per-pair predictions) -> one row JSON per (checkpoint, step, set) written as soon as it is done -> the table
(`results.csv`, `results.json`, `results.md`) rebuilt from the row files by process 0.

Model-specific code comes through three functions of `caig_jax.trainers.reward` (imported lazily):
  load_trained(workdir, mesh, step=None) -> (model, config)
  pair_batches(config, data_dir, split, batch_size) -> iterator of numpy batches (this process's share;
      keys 'label' int32[B], 'ctr' float32[B, 2], 'category', optional 'true_ctr' float32[B, 2], model inputs)
  predict_batch(model, batch, mesh) -> {'cls_logits': float32[B, 2], 'ctr_pred': float32[B, 2]}
      for this process's rows of the batch, in order (see `local_rows`).
`evaluate(model, config, batches, mesh)` is also the reward trainer's held-out evaluation.

Multi-host: every process reads its own shard of each split (the data loader shards by process), pads its
batch to the size all processes agree on for that step (hosts whose shard is exhausted feed a padding batch
until every host is done), predicts, keeps its real rows and writes `predictions.process{K}.npz`. Metrics are
computed from the rows of all processes (gathered), so every process returns the same numbers; only
process 0 writes row files, reports and the table. The workdir and checkpoints must be on a filesystem
every host sees.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import importlib
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

from caig_jax import parallel
from caig_jax.eval import reward_accuracy

log = logging.getLogger(__name__)

MODEL_INTERFACE = "caig_jax.trainers.reward"
OWN_DATA = "self"  # eval set data_dir meaning "the checkpoint's own training data"
META_KEYS = ("label", "ctr", "true_ctr", "category", "index", "item_id")


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
                raise ValueError(f"config.eval_sets entry {d} lacks {sorted(missing)} (needs name, data_dir[, split])")
            out.append(EvalSet(str(d["name"]), str(d["data_dir"]), str(d.get("split", "test"))))
            continue
        name, sep, rest = str(item).partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"config.eval_sets entry {item!r} is not NAME=DATA_DIR[:SPLIT] (e.g. test=self:test)")
        data_dir, split = rest, "test"
        head, colon, tail = rest.rpartition(":")
        if colon and head and tail and "/" not in tail:
            data_dir, split = head, tail
        out.append(EvalSet(name.strip(), data_dir.strip(), split.strip()))
    if not out:
        raise ValueError("config.eval_sets is empty: give at least one NAME=DATA_DIR:SPLIT")
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        raise ValueError(f"config.eval_sets names must be unique, got {names}")
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
                raise FileNotFoundError(f"config.checkpoints entry {pattern!r} is not a directory")
            entries = [(pattern, True)]
        for path, explicit in entries:
            key = os.path.abspath(path)
            if key not in seen:
                seen.add(key)
                out.append((path.rstrip("/") or path, explicit))
    if not out:
        raise FileNotFoundError(f"config.checkpoints={spec!r} names no directory: give training workdirs or globs, "
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
        raise ValueError(f"config.steps asks for {missing}, available checkpoints: {list(available)}")
    return wanted


def plan_rows(checkpoints: str | Sequence[str], steps: str, eval_sets: Sequence[EvalSet]) -> list[RowSpec]:
    rows = []
    for path, explicit in expand_checkpoints(checkpoints):
        chosen = select_steps(checkpoint_steps(path), steps)
        if not chosen:
            if explicit:
                raise FileNotFoundError(f"{path}/checkpoints holds no complete checkpoint")
            log.warning("skipping %s: no complete checkpoint in %s/checkpoints", path, path)
            continue
        rows += [RowSpec(path, step, e) for step in chosen for e in eval_sets]
    return rows


# ================================================================================================
# Sharded evaluation.
# ================================================================================================
def local_batch_multiple(mesh) -> int:
    """How many distinct batch shards this process's devices hold: its local batch must divide by it.

    Raises when batch shards are replicated across processes (a batch-splitting axis spanning hosts the
    wrong way), since every host then feeds its own different rows and they would clash.
    """
    total = parallel.num_batch_shards(mesh)
    index_map = parallel.batch_sharding(mesh, 1).addressable_devices_indices_map((total,))
    local = len({idx[0].start or 0 for idx in index_map.values()})
    if local * jax.process_count() != total:
        raise ValueError(
            f"mesh {dict(mesh.shape)}: process {jax.process_index()} holds {local} of {total} batch shards; "
            f"evaluation needs every process to hold a distinct 1/{jax.process_count()} of the batch"
        )
    return local


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global `jax.Array`, in the order of its local input data.

    The inverse of `parallel.global_batch` for outputs: what `predict_batch` should return (replicas across
    the tensor axis are read once; no cross-host communication).
    """
    parts, seen = [], set()
    for shard in sorted(x.addressable_shards, key=lambda s: (s.index[0].start or 0) if s.index else 0):
        start = (shard.index[0].start or 0) if shard.index else 0
        if start not in seen:
            seen.add(start)
            parts.append(np.asarray(shard.data))
    return np.concatenate(parts, axis=0)


def _as_numpy(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in batch.items()}


def _gather_sizes(n: int) -> np.ndarray:
    """int[P]: `n` of every process (no communication on one process)."""
    if jax.process_count() == 1:
        return np.asarray([n])
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray([n], np.int32), tiled=True)).reshape(-1)


def _gather_rows(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenates every process's rows (ragged counts, strings included), process 0's first."""
    if jax.process_count() == 1:
        return arrays
    from jax.experimental import multihost_utils

    n = len(arrays["label"])
    counts = _gather_sizes(n)
    width = int(max(counts.max(), 1))
    out = {}
    for key in sorted(arrays):
        a = arrays[key]
        is_text = a.dtype.kind in "USO"
        if is_text:  # strings travel as fixed-width utf-8 bytes
            encoded = [str(s).encode("utf-8") for s in a.tolist()]
            w = int(_gather_sizes(max([len(e) for e in encoded], default=0)).max()) or 1
            a = np.frombuffer(b"".join(e.ljust(w, b"\0") for e in encoded), np.uint8).reshape(n, w)
        elif a.dtype == np.float64:
            a = a.astype(np.float32)
        elif a.dtype == np.int64:
            a = a.astype(np.int32)
        padded = np.zeros((width, *a.shape[1:]), a.dtype)
        padded[:n] = a
        everything = np.asarray(multihost_utils.process_allgather(padded, tiled=False))  # [P, width, ...]
        rows = np.concatenate([everything[p, : counts[p]] for p in range(len(counts))], axis=0)
        if is_text:
            rows = np.asarray([bytes(r).rstrip(b"\0").decode("utf-8") for r in rows])
        out[key] = rows
    return out


def _save_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def evaluate(
    model,
    config: ml_collections.ConfigDict,
    batches: Iterable[Mapping[str, Any]],
    mesh,
    *,
    predict_fn: Callable[[Any, dict, Any], Mapping[str, np.ndarray]] | None = None,
    predictions_path: str | None = None,
) -> reward_accuracy.PairMetrics:
    """Runs `model` over one pass of `batches` and returns `reward_accuracy.pairwise_metrics` of all rows.

    Args:
      model: whatever `predict_fn` takes (the reward model).
      config: the model's run config (kept in the signature so trainers and the sweep share one call; the
        metrics do not depend on it).
      batches: this process's numpy batches (keys 'label', 'ctr', model inputs, optional 'true_ctr',
        'category', 'index', 'item_id'); any sizes, and processes may hold different numbers of batches.
      mesh: the device mesh; batches are padded to a multiple of this process's batch shards (and to the
        size every process agrees on for the step) and pad rows are dropped from the results.
      predict_fn: `(model, batch, mesh) -> {'cls_logits', 'ctr_pred'}` for this process's rows; default
        `caig_jax.trainers.reward.predict_batch`.
      predictions_path: when given, this process writes its own rows' predictions (and labels, CTRs,
        categories, indices) there; `{process}` in the path is replaced by the process index.

    Returns:
      PairMetrics over every row of every process (the same on every process).
    """
    del config
    if predict_fn is None:
        predict_fn = importlib.import_module(MODEL_INTERFACE).predict_batch
    multiple = local_batch_multiple(mesh)
    kept: dict[str, list[np.ndarray]] = {"cls_logits": [], "ctr_pred": []}
    iterator, last = iter(batches), None
    while True:
        batch = next(iterator, None)
        batch = None if batch is None else _as_numpy(batch)
        n = 0 if batch is None else int(batch["label"].shape[0])
        target = int(_gather_sizes(n).max())
        if target == 0:
            break
        if batch is None or n == 0:
            if last is None:
                raise RuntimeError(
                    f"process {jax.process_index()} has no evaluation batch while others do: its data shard is "
                    f"empty (fewer examples than processes?)"
                )
            batch = {k: v[-1:] for k, v in last.items()}  # a padding batch: every row dropped below
        last = batch
        target = -(-target // multiple) * multiple
        padded, _ = parallel.pad_to_multiple(batch, target)
        out = predict_fn(model, padded, mesh)
        for key in ("cls_logits", "ctr_pred"):
            value = np.asarray(out[key])
            if value.shape != (target, 2):
                raise ValueError(
                    f"predict_batch returned {key} of shape {value.shape} for a local batch of {target} rows; "
                    f"expected ({target}, 2): this process's rows only, in input order"
                )
            kept[key].append(value[:n].astype(np.float32))
        for key in META_KEYS:
            if key in batch:
                kept.setdefault(key, []).append(batch[key][:n])
    if last is None:
        raise ValueError("the evaluation batches are empty: nothing to evaluate")
    local = {k: np.concatenate(v, axis=0) for k, v in kept.items()}
    for key in ("label", "ctr"):
        if key not in local:
            raise KeyError(f"evaluation batches need a {key!r} entry; got keys {sorted(last)}")
    if predictions_path:
        _save_npz(predictions_path.format(process=jax.process_index()), local)
    rows = _gather_rows(local)
    return reward_accuracy.pairwise_metrics(
        rows["cls_logits"], rows["ctr_pred"], rows["label"], rows["ctr"],
        categories=rows.get("category"), true_ctrs=rows.get("true_ctr"),
    )


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
    with open(paths["csv"] + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in COLUMNS})
    with open(paths["json"] + ".tmp", "w") as f:
        json.dump(list(rows), f, indent=2)
    with open(paths["md"] + ".tmp", "w") as f:
        f.write("# Reward-model evaluation sweep\n\n" + table_markdown(rows))
    for p in paths.values():
        os.replace(p + ".tmp", p)
    return paths


def _row_path(workdir: str, spec: RowSpec) -> str:
    return os.path.join(workdir, "rows", f"{spec.row_id}.json")


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)  # a row file is complete or absent: what resuming relies on


def _agree_with_process_0(plan: Sequence[RowSpec], done: list[bool]) -> list[bool]:
    """Every process must run the same rows (they are collective): check the plans match, take process 0's done."""
    if jax.process_count() == 1:
        return done
    from jax.experimental import multihost_utils

    digest = int(hashlib.sha1("|".join(r.row_id for r in plan).encode()).hexdigest()[:7], 16)
    digests = _gather_sizes(digest)
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
        # A reward run without `data.dir` built the marketplace into its workdir (trainers.reward.ensure_data).
        path = own or os.path.join(checkpoint, "market", "tfds")
    if "://" not in path and not os.path.isdir(path):
        raise FileNotFoundError(f"eval set {eval_set.name!r}: data dir {path!r} does not exist")
    return path


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """The sweep (see the module docstring). Returns the table's rows (on every process)."""
    interface = importlib.import_module(MODEL_INTERFACE)
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
            metrics = evaluate(model, model_config, batches, mesh, predict_fn=interface.predict_batch,
                               predictions_path=predictions)
            row = make_row(spec, data_dir, metrics, time.time() - start)
            finished += 1
            log.info("[%d/%d] %s step %d on %s: accuracy %s %s, n=%d", finished, len(pending), checkpoint, step,
                     spec.eval_set.name, _fmt_pct(row["accuracy"]),
                     f"[{_fmt_pct(row['accuracy_ci_low'])}, {_fmt_pct(row['accuracy_ci_high'])}]", row["n"])
            if is_main:
                if config.write_reports:
                    reward_accuracy.write_report(
                        metrics, os.path.join(workdir, "reports", spec.row_id),
                        title=f"{checkpoint} (step {step}) on {spec.eval_set.name} ({spec.eval_set.split})",
                    )
                full = {"row": row, "metrics": reward_accuracy.to_jsonable(dict(metrics))}
                _write_json(_row_path(workdir, spec), full)
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
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("eval_sweep_done")
    return rows
