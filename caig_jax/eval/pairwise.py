"""The evaluation core of pairwise (left|right) models: sharded prediction over batches, then the metrics.

`evaluate(predict_fn, model, batches, mesh)` is what the reward job's held-out evaluation and the evaluation
sweep both run; it knows nothing about the model beyond `predict_fn`.

Multi-host: every process passes its own shard of a split, pads its batch to the size all processes agree on
for that step (hosts whose shard is exhausted feed a padding batch until every host is done), predicts, keeps
its real rows and (optionally) writes `predictions.process{K}.npz`. Metrics are computed from the rows of all
processes (gathered), so every process returns the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from caig_jax import parallel
from caig_jax.eval import reward_accuracy
from caig_jax.files import save_npz_atomic

META_KEYS = ("label", "ctr", "true_ctr", "category", "index", "item_id", "left_id", "right_id")


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


def _as_numpy(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in batch.items()}


def _gather_rows(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenates every process's rows (ragged counts, strings included), process 0's first."""
    if jax.process_count() == 1:
        return arrays
    n = len(arrays["label"])
    counts = parallel.process_allgather_int(n)
    width = int(max(counts.max(), 1))
    out = {}
    for key in sorted(arrays):
        a = arrays[key]
        is_text = a.dtype.kind in "USO"
        if is_text:  # strings travel as fixed-width utf-8 bytes
            encoded = [str(s).encode("utf-8") for s in a.tolist()]
            w = int(parallel.process_allgather_int(max([len(e) for e in encoded], default=0)).max()) or 1
            a = np.frombuffer(b"".join(e.ljust(w, b"\0") for e in encoded), np.uint8).reshape(n, w)
        wide = a.dtype.kind in "fiu" and a.dtype.itemsize == 8
        if wide:  # jax without x64 would narrow 64-bit values: they travel as pairs of uint32, bit for bit
            dtype = a.dtype
            a = np.ascontiguousarray(a).view(np.uint32).reshape(a.shape + (2,))
        padded = np.zeros((width, *a.shape[1:]), a.dtype)
        padded[:n] = a
        everything = np.asarray(multihost_utils.process_allgather(padded, tiled=False))  # [P, width, ...]
        rows = np.concatenate([everything[p, : counts[p]] for p in range(len(counts))], axis=0)
        if is_text:
            rows = np.asarray([bytes(r).rstrip(b"\0").decode("utf-8") for r in rows])
        elif wide:
            rows = np.ascontiguousarray(rows).view(dtype).reshape(rows.shape[:-1])
        out[key] = rows
    return out


def evaluate(
    predict_fn: Callable[[Any, dict, Any], Mapping[str, np.ndarray]],
    model,
    batches: Iterable[Mapping[str, Any]],
    mesh,
    *,
    predictions_path: str | None = None,
    num_resamples: int = reward_accuracy.DEFAULT_RESAMPLES,
) -> reward_accuracy.PairMetrics:
    """Runs `model` over one pass of `batches` and returns `reward_accuracy.pairwise_metrics` of all rows.

    Args:
      predict_fn: `(model, batch, mesh) -> {'cls_logits', 'ctr_pred'}`, each float32[b, 2], for this
        process's rows of the batch, in order (`caig_jax.models.reward.predict_batch`, or a baseline's).
      model: whatever `predict_fn` takes.
      batches: this process's numpy batches (keys 'label', 'ctr', model inputs, optional 'true_ctr',
        'category', 'index', 'item_id', 'left_id', 'right_id'); any sizes, and processes may hold different
        numbers of batches.
      mesh: the device mesh; batches are padded to a multiple of this process's batch shards (and to the
        size every process agrees on for the step) and pad rows are dropped from the results.
      predictions_path: when given, this process writes its own rows' predictions (and labels, CTRs,
        categories, indices) there; `{process}` in the path is replaced by the process index.
      num_resamples: product-clustered bootstrap resamples of the headline intervals (0: no intervals).

    Returns:
      PairMetrics over every row of every process (the same on every process).
    """
    multiple = local_batch_multiple(mesh)
    kept: dict[str, list[np.ndarray]] = {"cls_logits": [], "ctr_pred": []}
    iterator, last = iter(batches), None
    while True:
        batch = next(iterator, None)
        batch = None if batch is None else _as_numpy(batch)
        n = 0 if batch is None else int(batch["label"].shape[0])
        target = int(parallel.process_allgather_int(n).max())
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
                    f"predict_fn returned {key} of shape {value.shape} for a local batch of {target} rows; "
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
        save_npz_atomic(predictions_path.format(process=jax.process_index()), local)
    rows = _gather_rows(local)
    if "index" in rows and jax.process_count() > 1:
        # Process-major order -> the split's order, which one process has: float sums (Pearson, ECE) then agree
        # with a one-process run to the last bit, not only to rounding.
        order = np.argsort(rows["index"], kind="stable")
        rows = {k: v[order] for k, v in rows.items()}
    return reward_accuracy.pairwise_metrics(
        rows["cls_logits"], rows["ctr_pred"], rows["label"], rows["ctr"],
        categories=rows.get("category"), true_ctrs=rows.get("true_ctr"), items=rows.get("item_id"),
        left_ids=rows.get("left_id"), right_ids=rows.get("right_id"), num_resamples=num_resamples,
    )
