"""Batches of reward pairs for training and evaluation (grain over the TFDS array_record files).

    source = reward_pair_source(data_dir, "train")                # grain RandomAccessDataSource
    batches = reward_batches(source, batch_size=32, seed=0, image_size=64)
    batch = next(batches)
    state = batches.get_state()                                    # {"position": int, ...}: checkpoint it
    batches.set_state(state)                                       # resume exactly there

Each batch is a dict of numpy arrays / lists (this host's share of the global batch):

    image      uint8[B, S, 2S, 3]  left|right, each half resized to S x S (`image_size`; None = as stored)
    label      int32[B]            0 = left has the higher logged CTR, 1 = right
    ctr        float32[B, 2]       logged CTRs [left, right]
    true_ctr   float32[B, 2]       the simulator's truth (NaN for real logs)
    impressions int64[B, 2]
    index      int64[B]            the example's index in the split (its identity across runs)
    item_id, caption, category, attributes, left_id, right_id: list[str] of length B

The text fields are Python lists: tokenise (or drop) them before turning a batch into global arrays.

Determinism and checkpoints: batch `p` of the stream is a pure function of (source, seed, shard, batch
size, p): the order is grain's index shuffle, reshuffled every epoch; the optional left/right flip is seeded
by (seed, position in the stream). `get_state()` returns `{"position": p, "seed", "batch_size",
"shard_index", "shard_count"}` (small ints); `set_state` restarts the stream at `p` and refuses a state
made with another seed or batch size.

Multi-host: each process reads only its shard of the split (`shard_index = jax.process_index()`,
`shard_count = jax.process_count()` by default) and `batch_size` is the per-process batch, so the global
batch is `batch_size * process_count`. With `drop_remainder=True` (training) the shards are made equal
(the split is truncated to a multiple of the process count) so every host runs the same number of
steps; with `drop_remainder=False` (evaluation) the shards are strided and cover every example once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import cv2
import grain
import jax
import numpy as np

from caig_jax.data.builders import _common

TEXT_KEYS = ("item_id", "caption", "category", "attributes", "left_id", "right_id")


def load_source(data_dir: str, builder_name: str, split: str, config_name: str | None = None):
    """The TFDS data source (random access, TF-free) of a prepared dataset's split."""
    builder = _common.load_builder(data_dir, builder_name, config_name)
    if split not in builder.info.splits:
        raise KeyError(f"{builder.data_dir}: no split {split!r}; available: {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)


def reward_pair_source(data_dir: str, split: str, config_name: str | None = None):
    """Reward pairs of one split: a grain-compatible RandomAccessDataSource (`len`, `__getitem__`).

    `data_dir` is the TFDS data_dir (holding `ctr_logs/<config>/<version>`), that dataset folder itself,
    or a market workdir (holding `tfds/`).
    """
    return load_source(data_dir, "ctr_logs", split, config_name)


def conversation_source(data_dir: str, split: str, config_name: str | None = None):
    """LLaVA conversations of one split (see `caig_jax.data.builders.llava_conversations`)."""
    return load_source(data_dir, "llava_conversations", split, config_name)


def product_source(data_dir: str, split: str, config_name: str | None = None):
    """Products of one split (see `caig_jax.data.builders.products`)."""
    return load_source(data_dir, "products", split, config_name)


def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def resize_pair(image: np.ndarray, size: int | None) -> np.ndarray:
    """A left|right pair image uint8[H, 2W, 3] with each half resized to `size` x `size` (None: as it is)."""
    h, w = image.shape[:2]
    if size is None or (h == size and w == 2 * size):
        return image
    half = w // 2
    interp = cv2.INTER_AREA if size < h else cv2.INTER_CUBIC
    left = cv2.resize(image[:, :half], (size, size), interpolation=interp)
    right = cv2.resize(image[:, half:], (size, size), interpolation=interp)
    return np.concatenate([left, right], axis=1)


class InMemoryPairSource:
    """A ctr_logs source whose examples are read once, images resized to `image_size`, then kept in memory.

    For splits that fit in RAM (the tiny marketplace's training pairs: ~24k examples of 32x64 images, ~170 MB):
    later epochs, and later runs handed the same object (the reward job's ablation), skip the record read and
    PNG decode, ~1.5 ms an example on one core, which a 2-core host otherwise takes from the training step.
    Cached arrays are read-only; concurrent reads of one index just read it twice.
    """

    def __init__(self, source, image_size: int | None = None):
        self.source, self.image_size = source, image_size
        self._examples: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        example = self._examples.get(index)
        if example is None:
            example = dict(self.source[index])
            example["image"] = resize_pair(np.asarray(example["image"]), self.image_size)
            for value in example.values():
                if isinstance(value, np.ndarray):
                    value.flags.writeable = False
            self._examples[index] = example
        return example


class RewardBatches(Iterator[dict[str, Any]]):
    """The iterator returned by `reward_batches` (see the module docstring)."""

    def __init__(
        self,
        source,
        batch_size: int,
        *,
        seed: int = 0,
        image_size: int | None = None,
        shuffle: bool = True,
        num_epochs: int | None = None,
        drop_remainder: bool = True,
        random_flip: bool = False,
        start_index: int = 0,
        shard_index: int | None = None,
        shard_count: int | None = None,
        num_threads: int = 2,
        prefetch: int = 4,
    ):
        if shard_index is None or shard_count is None:
            shard_index, shard_count = jax.process_index(), jax.process_count()
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size, self.seed, self.image_size = int(batch_size), int(seed), image_size
        self.shard_index, self.shard_count = int(shard_index), int(shard_count)
        self.random_flip = random_flip
        self._num_threads, self._prefetch = num_threads, prefetch

        # Shuffle *indices* into the split (so every example keeps its identity), then read the source.
        n = len(source)
        ds = grain.MapDataset.range(n)
        if drop_remainder:  # equal shards: every host runs the same number of steps
            per = n // self.shard_count
            ds = ds[self.shard_index * per : (self.shard_index + 1) * per]
        else:
            ds = ds[self.shard_index :: self.shard_count]
        self.shard_size = len(ds)
        if self.shard_size == 0:
            raise ValueError(f"shard {self.shard_index}/{self.shard_count} of a split of {n} examples is empty")
        if shuffle:
            ds = ds.shuffle(seed=self.seed)  # a new permutation every epoch (grain reseeds per epoch)
        ds = ds.repeat(num_epochs)
        # The position in the stream seeds the optional left/right flip: the same on every re-run.
        ds = ds.map_with_index(lambda pos, index: (pos, int(index), source[int(index)]))
        self._batches = ds.batch(self.batch_size, drop_remainder=drop_remainder, batch_fn=self._collate)
        self.num_batches = len(self._batches)  # sys.maxsize-ish when infinite
        self.position = int(start_index)
        self._restart()

    def _collate(self, examples) -> dict[str, Any]:
        images, labels, ctrs, true_ctrs, impressions, indices = [], [], [], [], [], []
        texts: dict[str, list[str]] = {k: [] for k in TEXT_KEYS}
        for pos, index, ex in examples:
            image = resize_pair(np.asarray(ex["image"]), self.image_size)
            label, ctr, true_ctr, imp = int(ex["label"]), np.asarray(ex["ctr"]), np.asarray(ex["true_ctr"]), np.asarray(ex["impressions"])
            left_id, right_id = _text(ex["left_id"]), _text(ex["right_id"])
            if self.random_flip and np.random.default_rng([self.seed, pos]).random() < 0.5:
                half = image.shape[1] // 2
                image = np.concatenate([image[:, half:], image[:, :half]], axis=1)
                label, ctr, true_ctr, imp = 1 - label, ctr[::-1], true_ctr[::-1], imp[::-1]
                left_id, right_id = right_id, left_id
            images.append(image)
            labels.append(label)
            ctrs.append(ctr)
            true_ctrs.append(true_ctr)
            impressions.append(imp)
            indices.append(index)
            for k in ("item_id", "caption", "category", "attributes"):
                texts[k].append(_text(ex[k]))
            texts["left_id"].append(left_id)
            texts["right_id"].append(right_id)
        return {
            "image": np.stack(images).astype(np.uint8),
            "label": np.asarray(labels, np.int32),
            "ctr": np.stack(ctrs).astype(np.float32),
            "true_ctr": np.stack(true_ctrs).astype(np.float32),
            "impressions": np.stack(impressions).astype(np.int64),
            "index": np.asarray(indices, np.int64),
            **texts,
        }

    def _restart(self) -> None:
        self._it = None

    def _iterator(self):
        if self._it is None:
            read = grain.ReadOptions(num_threads=self._num_threads, prefetch_buffer_size=self._prefetch)
            self._it = iter(self._batches[self.position :].to_iter_dataset(read))
        return self._it

    def __next__(self) -> dict[str, Any]:
        if self.position >= self.num_batches:
            raise StopIteration
        batch = next(self._iterator())
        self.position += 1
        return batch

    def __iter__(self):
        return self

    def get_state(self) -> dict[str, int]:
        return {
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shard_index": self.shard_index,
            "shard_count": self.shard_count,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        for key in ("seed", "batch_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"data state was saved with {key}={int(state[key])}, this iterator has {key}={getattr(self, key)}"
                )
        self.position = int(state["position"])
        self._restart()


def reward_batches(
    source,
    batch_size: int,
    seed: int = 0,
    image_size: int | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    start_index: int = 0,
    *,
    drop_remainder: bool = True,
    random_flip: bool = False,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_threads: int = 2,
    prefetch: int = 4,
) -> RewardBatches:
    """Deterministic, checkpointable batches of reward pairs (see the module docstring).

    Args:
      source: `reward_pair_source(...)` (any random-access source of ctr_logs examples).
      batch_size: examples per batch on this process.
      seed: shuffling (and flip) seed.
      image_size: side S of each half in the output (None: as stored in the dataset).
      shuffle: shuffle (reshuffled every epoch); False keeps the split's order (evaluation).
      num_epochs: None = repeat forever (training); 1 = one pass (evaluation).
      start_index: the batch position to start at (same as `set_state({"position": start_index})`).
      drop_remainder: drop a final partial batch (and make shards equal across processes).
      random_flip: swap left/right (and label, CTRs) with probability 1/2, seeded by stream position.
      shard_index, shard_count: this process's shard; default `jax.process_index()/process_count()`.
      num_threads, prefetch: grain read threads and batches prefetched.
    """
    return RewardBatches(
        source,
        batch_size,
        seed=seed,
        image_size=image_size,
        shuffle=shuffle,
        num_epochs=num_epochs,
        drop_remainder=drop_remainder,
        random_flip=random_flip,
        start_index=start_index,
        shard_index=shard_index,
        shard_count=shard_count,
        num_threads=num_threads,
        prefetch=prefetch,
    )
