"""A toy stand-in for the reward trainer's sweep interface, with toy data and checkpoint folders.

`install(monkeypatch)` registers a toy `ModelInterface` as the eval sweep's `reward` kind, whose
`load_trained` / `pair_batches` / `predict_batch` behave like the real ones where the sweep cares:
- checkpoints live in `<workdir>/checkpoints/<step>/` (here a weight vector `w.npy`), the run config in
  `<workdir>/config.json`;
- `pair_batches` reads only this process's strided shard of a split, `batch_size` pairs per batch, in order
  (like `caig_jax.data.loader.reward_batches(..., shuffle=False, drop_remainder=False)`);
- `predict_batch` shards the batch over the mesh with `parallel.global_batch`, runs a jitted linear scorer
  and returns this process's rows (`parallel.local_rows`). Calls are counted in `CALLS`.

Run as a script it is the entry point (`caig_jax.main`) with the toy interface installed: the two-process
sweep test launches it.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np

D = 4  # toy feature size per image
CATEGORIES = ("bags", "shoes", "toys")
CALLS: collections.Counter = collections.Counter()


# ------------------------------------------------------------------------------------------------
# Toy data and checkpoints.
# ------------------------------------------------------------------------------------------------
def make_eval_data(data_dir: str, split: str, n: int, seed: int) -> dict:
    """Writes `<data_dir>/pairs_<split>.npz`: x float32[n, 2, D], logged/true CTRs, labels, categories."""
    rng = np.random.default_rng(seed)
    true = rng.uniform(0.01, 0.05, size=(n, 2))
    x = np.concatenate([true[..., None] * 40.0, rng.normal(size=(n, 2, D - 1))], axis=-1).astype(np.float32)
    logged = true * (1.0 + 0.25 * rng.normal(size=(n, 2)))
    logged = np.clip(logged, 1e-4, None)
    data = {
        "x": x,
        "ctr": logged.astype(np.float32),
        "true_ctr": true.astype(np.float32),
        "label": np.where(logged[:, 0] >= logged[:, 1], 0, 1).astype(np.int32),
        "category": np.asarray([CATEGORIES[i % len(CATEGORIES)] for i in range(n)]),
        "index": np.arange(n, dtype=np.int64),
    }
    os.makedirs(data_dir, exist_ok=True)
    np.savez(os.path.join(data_dir, f"pairs_{split}.npz"), **data)
    return data


def load_eval_data(data_dir: str, split: str) -> dict:
    with np.load(os.path.join(data_dir, f"pairs_{split}.npz")) as f:
        return {k: f[k] for k in f.files}


def weights_for(seed: int, step: int) -> np.ndarray:
    rng = np.random.default_rng([seed, step])
    w = rng.normal(size=D).astype(np.float32)
    w[0] = 1.0 + 0.1 * step / 100  # mostly follows the true CTR: accuracy well above chance
    return w


def make_checkpoint(workdir: str, steps, *, data_dir: str, seed: int = 0) -> None:
    """A toy training workdir: `config.json` and `checkpoints/<step>/w.npy` for every step."""
    for step in steps:
        folder = os.path.join(workdir, "checkpoints", str(step))
        os.makedirs(folder, exist_ok=True)
        np.save(os.path.join(folder, "w.npy"), weights_for(seed, step))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"seed": seed, "data": {"dir": data_dir}}, f)


def scores(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float32[N, 2] linear scores, the same arithmetic as the jitted toy model (numpy reference)."""
    return np.einsum("npd,d->np", x.astype(np.float32), w.astype(np.float32))


def toy_ctr(s):
    return 0.03 + 0.01 * s / (1.0 + abs(s))  # a bounded CTR-like head (works on numpy and jax arrays)


# ------------------------------------------------------------------------------------------------
# The interface.
# ------------------------------------------------------------------------------------------------
class ToyModel:
    def __init__(self, w: np.ndarray, step: int):
        self.w, self.step = w, step


def load_trained(workdir: str, mesh, step: int | None = None):
    import ml_collections

    from caig_jax.jobs import eval_sweep as sweep

    CALLS["load"] += 1
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    steps = sweep.checkpoint_steps(workdir)
    step = steps[-1] if step is None else step
    w = np.load(os.path.join(workdir, "checkpoints", str(step), "w.npy"))
    return ToyModel(w, step), config


def pair_batches(config, data_dir: str, split: str, batch_size: int):
    import jax

    data = load_eval_data(data_dir, split)
    rows = np.arange(len(data["label"]))[jax.process_index():: jax.process_count()]
    for start in range(0, len(rows), batch_size):
        take = rows[start: start + batch_size]
        yield {k: v[take] for k, v in data.items()}


_APPLY = None


def _apply_fn():
    global _APPLY
    if _APPLY is None:
        import jax
        import jax.numpy as jnp

        @jax.jit
        def apply(w, x):
            s = jnp.einsum("npd,d->np", x, w)
            return s, toy_ctr(s)

        _APPLY = apply
    return _APPLY


def predict_batch(model: ToyModel, batch: dict, mesh) -> dict:
    import jax

    from caig_jax import parallel

    CALLS["predict"] += 1
    x = parallel.global_batch(mesh, {"x": np.asarray(batch["x"], np.float32)})["x"]
    with jax.set_mesh(mesh):
        s, c = _apply_fn()(model.w, x)
    return {"cls_logits": parallel.local_rows(s), "ctr_pred": parallel.local_rows(c)}


def install(monkeypatch=None):
    """Registers this toy interface as the eval sweep's `reward` model kind (via monkeypatch when given)."""
    from caig_jax.jobs import eval_sweep

    interface = eval_sweep.ModelInterface(load_trained, pair_batches, predict_batch)
    if monkeypatch is not None:
        monkeypatch.setitem(eval_sweep.INTERFACES, "reward", interface)
    else:
        eval_sweep.INTERFACES["reward"] = interface
    return interface


def expected_metrics(data_dir: str, split: str, w: np.ndarray):
    """The metrics a correct sweep must report: the toy model applied to every pair, in numpy."""
    from caig_jax.eval import reward_accuracy

    data = load_eval_data(data_dir, split)
    s = scores(data["x"], w)
    return reward_accuracy.pairwise_metrics(s, toy_ctr(s), data["label"], data["ctr"], data["category"],
                                            data["true_ctr"])


if __name__ == "__main__":
    install()
    from caig_jax import main

    main.run()
