"""Inputs of the single-creative baselines (VAM, CG4CTR): per-product creative lists for training, and the
evaluation pairs split into their two creatives.

    lists = creative_lists(train_source, image_size=32)            # every creative of the split's pairs
    batches = ListBatches(lists, lists_per_batch=8, seed=0)         # checkpointable, like loader.reward_batches
    batch = next(batches)   # image uint8[L, K, S, S, 3], clicks / impressions float32[L, K], mask bool[L, K]
    pairs = split_pair_batches(reward_pair_source(data_dir, "test"), 32, 64)   # left_image / right_image ...

The lists come from the same `ctr_logs` pairs the reward model trains on (the same split and pair set, so
the same products and creatives; the images as the pairs store them): a product's list is every creative
that appears in one of its pairs, with its logged clicks and impressions (`clicks = rint(ctr * impressions)`,
exact for the counts a log holds). The pair rule already dropped creatives with <= 1000 impressions or no click.

Text (CG4CTR): each product's title (`caption` in the dataset) and a caption of the creative. The datasets
hold no per-creative caption, so the product's attributes text (`attribute_text`: category and attributes,
as the reward model's prompt shows them) stands in: both models see the same text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from caig_jax.data.loader import reward_batches
from caig_jax.data.reward_inputs import product_attributes

# text -> (ids int32[N, T], mask int32[N, T])
TextEncoder = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]


def attribute_text(category: str, attributes: str) -> str:
    """`category: mug; colour: teal; ...` from a pair's category and attributes (JSON object text, or free text):
    the reward model's `product_attributes` as one line."""
    return "; ".join(f"{k}: {v}" for k, v in product_attributes(category, attributes).items())


@dataclasses.dataclass
class CreativeLists:
    """Unique creatives of a split. images uint8[C, S, S, 3]; clicks, impressions float64[C]; `lists[i]` the
    creative indices of product `items[i]`; `titles[i]`, `captions[i]` its texts."""

    images: np.ndarray
    clicks: np.ndarray
    impressions: np.ndarray
    ids: list[str]
    items: list[str]
    lists: list[np.ndarray]
    titles: list[str]
    captions: list[str]

    @property
    def max_creatives(self) -> int:
        return max(len(x) for x in self.lists)


def creative_lists(source, image_size: int, *, read_batch: int = 256) -> CreativeLists:
    """Every creative of a `ctr_logs` pair source, grouped by product (sorted ids: the same lists every run)."""
    found: dict[str, dict[str, Any]] = {}
    texts: dict[str, tuple[str, str]] = {}
    batches = reward_batches(source, read_batch, image_size=image_size, shuffle=False, num_epochs=1,
                             drop_remainder=False, shard_index=0, shard_count=1)
    for batch in batches:
        half = batch["image"].shape[2] // 2
        for r, item in enumerate(batch["item_id"]):
            texts.setdefault(item, (batch["caption"][r], attribute_text(batch["category"][r], batch["attributes"][r])))
            for side, cid in enumerate((batch["left_id"][r], batch["right_id"][r])):
                if cid not in found:
                    imp = int(batch["impressions"][r, side])
                    found[cid] = {"item": item, "image": batch["image"][r, :, side * half:(side + 1) * half],
                                  "impressions": imp, "clicks": int(np.rint(float(batch["ctr"][r, side]) * imp))}
    if not found:
        raise ValueError("the training split holds no pairs: no creative lists to train on")
    ids = sorted(found)
    index = {cid: i for i, cid in enumerate(ids)}
    by_item: dict[str, list[int]] = {}
    for cid in ids:
        by_item.setdefault(found[cid]["item"], []).append(index[cid])
    items = sorted(by_item)
    return CreativeLists(
        images=np.stack([found[c]["image"] for c in ids]).astype(np.uint8),
        clicks=np.asarray([found[c]["clicks"] for c in ids], np.float64),
        impressions=np.asarray([found[c]["impressions"] for c in ids], np.float64),
        ids=ids, items=items, lists=[np.asarray(by_item[i], np.int64) for i in items],
        titles=[texts[i][0] for i in items], captions=[texts[i][1] for i in items],
    )


class ListBatches(Iterator[dict[str, np.ndarray]]):
    """Batches of `lists_per_batch` product lists (this process's share), padded to `max_creatives`.

    Batch `p` is a pure function of (lists, seed, shard, p): the stream visits this shard's lists in a new
    permutation every epoch (`np.random.default_rng([seed, epoch])`). `get_state` / `set_state` save and restore
    the position (the trainer checkpoints them). Keys: image uint8[L, K, S, S, 3], clicks, impressions
    float32[L, K], mask bool[L, K]; with `encode_text`, title_ids / title_mask / caption_ids / caption_mask
    int32[L, T] (one per product).
    """

    def __init__(self, lists: CreativeLists, lists_per_batch: int, *, seed: int = 0, max_creatives: int | None = None,
                 encode_text: TextEncoder | None = None, shard_index: int | None = None,
                 shard_count: int | None = None):
        if shard_index is None or shard_count is None:
            shard_index, shard_count = jax.process_index(), jax.process_count()
        self.lists, self.batch_size, self.seed = lists, int(lists_per_batch), int(seed)
        self.max_creatives = int(max_creatives or lists.max_creatives)
        self.shard = np.arange(shard_index, len(lists.lists), shard_count)
        if len(self.shard) == 0:
            raise ValueError(f"shard {shard_index}/{shard_count} of {len(lists.lists)} product lists is empty")
        self.text = None
        if encode_text is not None:
            title_ids, title_mask = encode_text(lists.titles)
            caption_ids, caption_mask = encode_text(lists.captions)
            self.text = {"title_ids": title_ids, "title_mask": title_mask, "caption_ids": caption_ids,
                         "caption_mask": caption_mask}
        self.position = 0
        self._epoch, self._perm = -1, None

    def _list_at(self, j: int) -> int:
        n = len(self.shard)
        epoch = j // n
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(n)
        return int(self.shard[self._perm[j % n]])

    def __next__(self) -> dict[str, np.ndarray]:
        lists, k, s = self.lists, self.max_creatives, self.lists.images.shape[1]
        chosen = [self._list_at(self.position * self.batch_size + i) for i in range(self.batch_size)]
        self.position += 1
        out = {"image": np.zeros((self.batch_size, k, s, s, 3), np.uint8),
               "clicks": np.zeros((self.batch_size, k), np.float32),
               "impressions": np.zeros((self.batch_size, k), np.float32),
               "mask": np.zeros((self.batch_size, k), bool)}
        for row, li in enumerate(chosen):
            members = lists.lists[li][:k]
            out["image"][row, :len(members)] = lists.images[members]
            out["clicks"][row, :len(members)] = lists.clicks[members]
            out["impressions"][row, :len(members)] = lists.impressions[members]
            out["mask"][row, :len(members)] = True
        if self.text is not None:
            out.update({key: value[chosen] for key, value in self.text.items()})
        return out

    def __iter__(self):
        return self

    def get_state(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "batch_size": self.batch_size}

    def set_state(self, state: Mapping[str, Any]) -> None:
        for key in ("seed", "batch_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"data state was saved with {key}={int(state[key])}, this iterator has "
                                 f"{key}={getattr(self, key)}")
        self.position = int(state["position"])


def split_pair_batches(source, image_size: int, batch_size: int, *,
                       encode_text: TextEncoder | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over a pair split (this process's shard), each pair split into its creatives:
    left_image / right_image uint8[B, S, S, 3], label, ctr, true_ctr and the metadata of
    `caig_jax.eval.pairwise.META_KEYS`; with `encode_text`, the product's title_ids / title_mask / caption_ids /
    caption_mask int32[B, T]."""
    for batch in reward_batches(source, batch_size, image_size=image_size, shuffle=False, num_epochs=1,
                                drop_remainder=False):
        half = batch["image"].shape[2] // 2
        out = {"left_image": batch["image"][:, :, :half], "right_image": batch["image"][:, :, half:]}
        out.update({k: np.asarray(batch[k]) for k in ("label", "ctr", "true_ctr", "index", "category", "item_id",
                                                      "left_id", "right_id")})
        if encode_text is not None:
            out["title_ids"], out["title_mask"] = encode_text(list(batch["caption"]))
            out["caption_ids"], out["caption_mask"] = encode_text(
                [attribute_text(c, a) for c, a in zip(batch["category"], batch["attributes"])])
        yield out
