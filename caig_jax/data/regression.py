"""Deterministic synthetic regression batches: the smoke job's data (resumable by batch index)."""

from __future__ import annotations

import jax
import numpy as np


class RegressionData:
    """Batches `{'x': float32[b, d_in], 'y': float32[b, d_out]}` with y = tanh(x @ W1) @ W2 + noise.

    Batch `i` depends only on (seed, i); `b` is this host's share of the global batch.
    """

    def __init__(self, d_in: int, d_out: int, global_batch: int, seed: int, noise: float = 0.01):
        rng = np.random.default_rng(10_000 + seed)
        self.w1 = rng.normal(size=(d_in, 32)).astype(np.float32) / np.sqrt(d_in)
        self.w2 = rng.normal(size=(32, d_out)).astype(np.float32) / np.sqrt(8.0)
        self.d_in, self.global_batch, self.seed, self.noise = d_in, global_batch, seed, noise
        self.index = 0
        self.local = global_batch // jax.process_count()

    def batch(self, index: int, size: int | None = None) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, index + 1])  # index -1 is the held-out set
        x = rng.normal(size=(size or self.global_batch, self.d_in)).astype(np.float32)
        y = np.tanh(x @ self.w1) @ self.w2 + self.noise * rng.normal(size=(x.shape[0], self.w2.shape[1]))
        return {"x": x, "y": y.astype(np.float32)}

    def __next__(self) -> dict[str, np.ndarray]:
        full = self.batch(self.index)
        self.index += 1
        start = jax.process_index() * self.local
        return {k: v[start : start + self.local] for k, v in full.items()}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])
