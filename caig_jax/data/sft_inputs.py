"""Knowledge pre-training (SFT) inputs: LLaVA conversations -> tokenised, length-bucketed model batches.

    records = read_conversations(data_dir, "train")                 # the TFDS `llava_conversations` split
    inputs, llava_config = build_inputs(config, workdir, data_dir)  # tokenizer + image processor (+ tiny config)
    data = ConversationData(records, inputs, llava_config)          # tokenised once, images decoded lazily
    buckets = data.bucket_lengths(num_buckets=3, multiple=16)       # a few padded lengths
    batches = SFTBatches(data, buckets, batch_size=32, seed=0)      # the engine's DataIterator
    batch = next(batches)   # input_ids, attention_mask, loss_mask int32[B, T]; pixel_values, image_layout

`config` is an SFT run's config (`configs/sft.py`).

Masks: the conversation is rendered with the Vicuna-v1 template (`caig_jax.models.processing.VICUNA_V1`) and
tokenised by `tokenize_conversation`: `loss_mask[t] = 1` on the tokens of *every* assistant reply and its `</s>`;
the BOS, system prompt, role names, user turns and image tokens are 0 (the loss reads label t = input_ids[t]
at position t - 1, see `caig_jax.trainers.sft`).

Length bucketing: every example's length (image tokens included) is known before any image is decoded (the
anyres token count depends only on the image's size, read from the PNG header). `bucket_lengths` picks at most
`num_buckets` padded lengths at quantiles of the training lengths (rounded up to `multiple`); a batch holds
examples of one bucket, padded to its length, so padding stays small while the number of compiled step shapes
stays at most `num_buckets`. A bucket with fewer examples than a batch is merged into the next longer one.

Order and resume: batch `p` of the stream is a pure function of (the examples, buckets, batch size, seed, p):
epoch `e = p // batches_per_epoch` shuffles each bucket with `rng(seed, e)`, cuts it into full batches (the
remainder, at most batch_size - 1 examples per bucket, waits for a later epoch's shuffle) and shuffles the
batch order. `get_state()` is `{"position": p, ...}`; `set_state` resumes exactly there (the engine checkpoints
it). Every process computes the same global batch and keeps its own rows (`batch_size / process_count`).

Images are held as their encoded bytes (one copy per distinct image: a product's cut-out serves all its
conversations) and decoded + preprocessed on first use, then cached (`image_cache` entries): for data that fit
in host memory as encoded images. Training rows may be augmented (`Augment`: flips, shrink, shift; colours never).

The training mixture: `select_by_logged_ctr` keeps each product's best background prompts by the logs' clicks /
impressions; `weight_families` repeats a family's conversations.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from transformers import AutoTokenizer

from caig_jax.data.builders import _common
from caig_jax.data.ctr_logs import DataError
from caig_jax.models.image_processing import ImageProcessor, ImageProcessorConfig
from caig_jax.models.llava import LlavaConfig, layout_for, read_llava_config
from caig_jax.models.processing import (
    LLAVA_V1,
    VICUNA_V1,
    ConversationTemplate,
    LlavaInputs,
    build_word_tokenizer,
    num_image_tokens,
    pad_token_id,
    render_conversation,
    tokenize_conversation,
)
from caig_jax.models.reward import tiny_llava_config

TEMPLATES: dict[str, ConversationTemplate] = {"vicuna_v1": VICUNA_V1, "llava_v1": LLAVA_V1}


# ================================================================================================
# Records.
# ================================================================================================
@dataclasses.dataclass(frozen=True)
class Conversation:
    """One example of `llava_conversations`.

    turns: ((role, text), ...) with role 'user' | 'assistant', alternating from the user (whose first turn holds
      `<image>`); `messages` gives them as {'role', 'content'} dicts.
    family: the task family, the source file's name without `_<split>.json` (`describe_product`, ...).
    product: the id before the first `_` (the marketplace's `item00012_03_prompt` -> `item00012`).
    image: the encoded image (PNG bytes) or None; image_key: a digest of those bytes (shared images share it).
    """

    id: str
    family: str
    product: str
    turns: tuple[tuple[str, str], ...]
    image: bytes | None
    image_key: str

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.turns]

    def prompt_turns(self, upto: int = 0) -> list[dict[str, str]]:
        """The conversation up to and including user turn `upto` (for generating the reply that follows)."""
        return self.messages[: 2 * upto + 1]

    def answer(self, index: int = 0) -> str:
        """The `index`-th assistant reply."""
        return self.turns[2 * index + 1][1]


def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def family_of(source: str, split: str) -> str:
    """`background_prompt_train.json` -> `background_prompt`."""
    stem = os.path.splitext(os.path.basename(source))[0]
    suffix = f"_{split}"
    return stem[: -len(suffix)] if stem.endswith(suffix) and len(stem) > len(suffix) else stem


def read_conversations(data_dir: str, split: str, config_name: str | None = None) -> list[Conversation]:
    """Every conversation of one split of the TFDS `llava_conversations` dataset (images left encoded)."""
    builder = _common.load_builder(data_dir, "llava_conversations", config_name)
    if split not in builder.info.splits:
        raise DataError(f"{builder.data_dir}: no split {split!r}; available: {sorted(builder.info.splits)}")
    # The image stays PNG bytes: decoded once per distinct image, later, by whoever needs its pixels.
    raw = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    out = []
    for i in range(len(raw)):
        ex = raw[i]
        roles = [_text(r) for r in ex["conversations"]["from"]]
        values = [_text(v) for v in ex["conversations"]["value"]]
        turns = tuple(("user" if r == "human" else "assistant", v) for r, v in zip(roles, values))
        has_image = bool(ex["has_image"])
        image = bytes(ex["image"]) if has_image else None
        key = hashlib.blake2b(image, digest_size=12).hexdigest() if image is not None else ""
        cid = _text(ex["id"])
        out.append(Conversation(cid, family_of(_text(ex["source"]), split), cid.split("_")[0], turns, image, key))
    return out


def select_by_logged_ctr(records: Sequence[Conversation], creatives: Sequence[Any], *, family: str,
                         fraction: float) -> tuple[list[Conversation], dict[str, int]]:
    """Keeps, of `family`'s conversations, each product's top `ceil(fraction * n)` by the logged CTR (clicks /
    impressions, summed over days) of the creative they describe; other families pass unchanged.

    `creatives`: `caig_jax.data.ctr_logs.Creative`s of the logs (`read_creative_ranking`); a conversation
    `<image stem>_<kind>` describes the creative whose image is `<image stem>.<ext>` (the marketplace's naming).
    Conversations without a logged creative are kept. Ties: more impressions first, then the id. Returns
    (kept records in their original order, counts)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    logged = {os.path.splitext(c.name)[0]: (c.clicks / c.impressions if c.impressions else 0.0, c.impressions)
              for c in creatives}
    by_product: dict[str, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(records):
        if r.family == family and r.id.rsplit("_", 1)[0] in logged:
            by_product[r.product].append(i)
    dropped: set[int] = set()
    for members in by_product.values():
        ranked = sorted(members, key=lambda i: (-logged[records[i].id.rsplit("_", 1)[0]][0],
                                                -logged[records[i].id.rsplit("_", 1)[0]][1], records[i].id))
        dropped.update(ranked[max(1, math.ceil(fraction * len(ranked))):])
    kept = [r for i, r in enumerate(records) if i not in dropped]
    return kept, {"family_examples": sum(len(m) for m in by_product.values()), "kept": sum(len(m) for m in
                  by_product.values()) - len(dropped), "dropped": len(dropped), "products": len(by_product)}


def weight_families(records: Sequence[Conversation], weights: Mapping[str, int]) -> list[Conversation]:
    """The training mixture: each conversation of a family listed in `weights` repeated that many times (0 drops
    the family); other families once. Repeats are separate examples of an epoch (shuffled apart)."""
    bad = {f: w for f, w in weights.items() if int(w) != w or w < 0}
    if bad:
        raise ValueError(f"family weights must be whole numbers >= 0, got {bad}")
    return [r for r in records for _ in range(int(weights.get(r.family, 1)))]


# ================================================================================================
# Tokenizer, processor, model config.
# ================================================================================================
def text_corpus(records: Sequence[Conversation], template: ConversationTemplate) -> list[str]:
    return [render_conversation(r.messages, add_generation_prompt=False, template=template) for r in records]


def build_inputs(config: ml_collections.ConfigDict, workdir: str, data_dir: str,
                 train_records: Sequence[Conversation] | None = None) -> tuple[LlavaInputs, LlavaConfig]:
    """(tokenizer + image processor + template, model config) of a run. Tiny presets build a word tokenizer from
    the *training* conversations into `<workdir>/tokenizer` (reused when present) and a tiny LLaVA-NeXT whose one
    anyres pinpoint is a square tile; a pretrained run reads everything from its folder."""
    template = TEMPLATES[config.data.template]
    if config.model.pretrained:
        llava_config = read_llava_config(config.model.pretrained)[0]
        inputs = LlavaInputs.from_pretrained(config.model.pretrained, config=llava_config, template=template)
        return inputs, llava_config
    tok_dir = os.path.join(workdir, "tokenizer")
    if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    else:
        if train_records is None:
            train_records = read_conversations(data_dir, config.data.train_split, config.data.config_name or None)
        tokenizer = build_word_tokenizer(text_corpus(train_records, template), tok_dir)
    s = config.data.image_size
    llava_config = dataclasses.replace(
        tiny_llava_config(config.model.tiny, s, len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"),
                          tokenizer.pad_token_id),
        image_grid_pinpoints=((s, s),), vision_feature_layer=int(config.model.tiny.get("vision_feature_layer", -2)))
    processor = ImageProcessor(ImageProcessorConfig(
        kind="llava_next", size={"shortest_edge": s}, crop_size={"height": s, "width": s},
        image_grid_pinpoints=((s, s),)))
    return LlavaInputs(tokenizer, processor, llava_config, template=template), llava_config


# ================================================================================================
# Tokenised examples and batches.
# ================================================================================================
def decode_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the encoded image's header (nothing decoded)."""
    with Image.open(io.BytesIO(data)) as im:
        return im.size[1], im.size[0]


@dataclasses.dataclass(frozen=True)
class Augment:
    """A label-preserving transform of a training image: mirror left-right (`flip`), shrink by `scale` (<= 1)
    about the centre and shift by (`dx`, `dy`) of the width / height; the uncovered border repeats the edge
    pixels (the white around a cut-out, the background of an ad). Colours are never changed."""

    flip: bool = False
    scale: float = 1.0
    dx: float = 0.0
    dy: float = 0.0

    @property
    def is_identity(self) -> bool:
        return not self.flip and self.scale == 1.0 and self.dx == 0.0 and self.dy == 0.0

    @classmethod
    def draw(cls, rng: np.random.Generator, *, flip: bool, max_shrink: float, max_shift: float) -> Augment:
        return cls(flip=bool(flip and rng.random() < 0.5), scale=float(1.0 - max_shrink * rng.random()),
                   dx=float(max_shift * (2 * rng.random() - 1)), dy=float(max_shift * (2 * rng.random() - 1)))

    def apply(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        fx = -1.0 if self.flip else 1.0
        cx, cy = (w - 1) / 2, (h - 1) / 2  # OpenCV's pixel centres are at integer coordinates
        m = np.array([[self.scale * fx, 0.0, cx * (1 - self.scale * fx) + self.dx * w],
                      [0.0, self.scale, cy * (1 - self.scale) + self.dy * h]], np.float32)
        return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)


class ConversationData:
    """Conversations tokenised once (unpadded int32 arrays), with lazily decoded, cached images.

    `tokens[i]` / `loss_masks[i]`: int32[L_i]; `lengths`: int64[N]; `batch(indices, length)` builds padded model
    inputs (prompts for generation come from `Conversation.prompt_turns` and `LlavaInputs.prompts` instead).
    """

    def __init__(self, records: Sequence[Conversation], inputs: LlavaInputs, llava_config: LlavaConfig, *,
                 image_cache: int = 1 << 16):
        self.records = list(records)
        if not self.records:
            raise DataError("no conversations to train or evaluate on")
        self.inputs, self.llava_config = inputs, llava_config
        self.pad_id = pad_token_id(inputs.tokenizer)
        self._cache: collections.OrderedDict[tuple[str, bool], tuple[np.ndarray, np.ndarray]]
        self._cache = collections.OrderedDict()
        self._decoded: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.image_cache = image_cache
        self.max_patches = llava_config.max_patches
        side = llava_config.vision_config.image_size
        self._blank = None if not llava_config.anyres else (side, side)
        sizes: dict[str, tuple[int, int]] = {}
        self.tokens, self.loss_masks = [], []
        for r in self.records:
            counts = []
            if r.image is not None:
                if r.image_key not in sizes:
                    sizes[r.image_key] = image_size(r.image)
                counts = [num_image_tokens(*sizes[r.image_key], inputs.spec)]
            ex = tokenize_conversation(inputs.tokenizer, r.messages, counts,
                                       image_token_index=inputs.spec.image_token_index, template=inputs.template,
                                       image_token=inputs.image_token)
            self.tokens.append(ex["input_ids"])
            self.loss_masks.append(ex["loss_mask"])
        self.lengths = np.asarray([len(t) for t in self.tokens], np.int64)
        self.families = sorted({r.family for r in self.records})

    def __len__(self) -> int:
        return len(self.records)

    def decoded(self, i: int) -> np.ndarray | None:
        """Example i's image, uint8[H, W, 3] (cached), or None for a text-only example."""
        r = self.records[i]
        if r.image is None:
            return None
        if r.image_key not in self._decoded:
            self._decoded[r.image_key] = decode_image(r.image)
            if len(self._decoded) > self.image_cache:
                self._decoded.popitem(last=False)
        return self._decoded[r.image_key]

    def pixels(self, i: int, augment: Augment | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(pixel_values float32[P, 3, S, S], image_layout int32[7]) of example i (zeros for a text-only one),
        of its image transformed by `augment` first (before tiling, so an anyres grid moves as a whole). The
        plain and the mirrored image are cached; shrunk / shifted ones are computed every time."""
        r = self.records[i]
        side = self.llava_config.vision_config.image_size
        if r.image is None:
            pv = np.zeros((self.max_patches, 3, side, side), np.float32)
            return pv, layout_for(self.llava_config, [(side, side)])[0].astype(np.int32)
        flip_only = augment is None or dataclasses.replace(augment, flip=False).is_identity
        key = (r.image_key, augment is not None and augment.flip)
        if flip_only and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        image = self.decoded(i)
        if flip_only:
            image = np.ascontiguousarray(image[:, ::-1]) if key[1] else image  # == Augment(flip=True).apply
        else:
            image = augment.apply(image)
        out = self.inputs.image_processor([image], pad_patches_to=self.max_patches)
        value = (out["pixel_values"][0].astype(np.float32),
                 layout_for(self.llava_config, out["image_sizes"])[0].astype(np.int32))
        if flip_only:
            for v in value:
                v.flags.writeable = False
            self._cache[key] = value
            if len(self._cache) > self.image_cache:
                self._cache.popitem(last=False)
        return value

    def batch(self, indices: Sequence[int], length: int,
              augments: Sequence[Augment | None] | None = None) -> dict[str, np.ndarray]:
        """Model inputs of the examples `indices`, right padded to `length` (an example longer than `length`
        raises: buckets are chosen so that none is); `augments[row]` transforms that row's image."""
        n = len(indices)
        ids = np.full((n, length), self.pad_id, np.int32)
        attention = np.zeros((n, length), np.int32)
        loss = np.zeros((n, length), np.int32)
        pixels, layouts = [], []
        for row, i in enumerate(indices):
            t = self.tokens[i]
            if len(t) > length:
                raise ValueError(f"conversation {self.records[i].id} is {len(t)} tokens, longer than its bucket "
                                 f"{length}")
            ids[row, : len(t)] = t
            attention[row, : len(t)] = 1
            loss[row, : len(t)] = self.loss_masks[i]
            pv, layout = self.pixels(i, augments[row] if augments is not None else None)
            pixels.append(pv)
            layouts.append(layout)
        return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss,
                "pixel_values": np.stack(pixels), "image_layout": np.stack(layouts)}

    def bucket_lengths(self, num_buckets: int, multiple: int, batch_size: int = 1) -> tuple[int, ...]:
        """At most `num_buckets` padded lengths (multiples of `multiple`) at quantiles of the lengths; a bucket
        that would hold fewer than `batch_size` examples is merged into the next longer one."""
        return bucket_lengths(self.lengths, num_buckets, multiple, batch_size)

    def bucket_of(self, buckets: Sequence[int]) -> np.ndarray:
        """int64[N]: each example's bucket index (the smallest bucket it fits); raises if one fits none."""
        b = np.searchsorted(np.asarray(buckets), self.lengths, side="left")
        if (b >= len(buckets)).any():
            i = int(np.argmax(b >= len(buckets)))
            raise ValueError(f"conversation {self.records[i].id} is {self.lengths[i]} tokens, longer than the longest "
                             f"bucket {buckets[-1]}")
        return b


def bucket_lengths(lengths: np.ndarray, num_buckets: int, multiple: int, batch_size: int = 1) -> tuple[int, ...]:
    """See `ConversationData.bucket_lengths`."""
    lengths = np.asarray(lengths)
    if num_buckets < 1 or multiple < 1:
        raise ValueError(f"num_buckets={num_buckets} and multiple={multiple} must be >= 1")
    up = lambda x: int(-(-int(x) // multiple) * multiple)  # noqa: E731
    qs = [np.quantile(lengths, k / num_buckets, method="lower") for k in range(1, num_buckets + 1)]
    bounds = sorted({up(q) for q in qs} | {up(lengths.max())})
    while len(bounds) > 1:
        counts = np.bincount(np.searchsorted(bounds, lengths, side="left"), minlength=len(bounds))
        small = [k for k in range(len(bounds) - 1) if counts[k] < batch_size]
        if not small:
            break
        del bounds[small[0]]  # its examples move up to the next longer bucket
    return tuple(bounds)


class SFTBatches:
    """The training stream: bucketed, shuffled batches of `data` (see the module docstring for the order).

    Each batch (this process's rows): input_ids, attention_mask, loss_mask int32[b, T] (T = the bucket's length),
    pixel_values float32[b, P, 3, S, S], image_layout int32[b, 7], and `loss_weight` float32[b] when
    `token_weights` (each row's weight in an exact token mean under gradient accumulation: see
    `caig_jax.trainers.sft.make_loss_fn`). Augmentation (`Augment`, drawn per row from (seed, position), so a
    resumed stream transforms the same rows the same way): `random_flip` mirrors with probability 1/2,
    `max_shrink` / `max_shift` shrink by up to that fraction and shift by up to that fraction of the side.
    """

    def __init__(self, data: ConversationData, buckets: Sequence[int], batch_size: int, seed: int, *,
                 token_weights: bool = False, grad_accum_steps: int = 1, random_flip: bool = False,
                 max_shrink: float = 0.0, max_shift: float = 0.0):
        self.data, self.buckets, self.batch_size, self.seed = data, tuple(buckets), int(batch_size), int(seed)
        self.random_flip, self.max_shrink, self.max_shift = random_flip, float(max_shrink), float(max_shift)
        self.token_weights, self.grad_accum_steps = token_weights, int(grad_accum_steps)
        processes = jax.process_count()
        if self.batch_size % processes:
            raise ValueError(f"batch_size={batch_size} must divide by {processes} processes")
        self.local = self.batch_size // processes
        which = data.bucket_of(self.buckets)
        self.members = [np.nonzero(which == k)[0] for k in range(len(self.buckets))]
        self.batches_per_epoch = sum(len(m) // self.batch_size for m in self.members)
        if self.batches_per_epoch == 0:
            raise DataError(f"{len(data)} examples make no full batch of {batch_size}")
        self.position = 0
        self._epoch_cache: tuple[int, list[tuple[int, np.ndarray]]] | None = None

    def _epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """[(bucket, example indices[batch_size])] of one epoch, in order."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            batches = []
            for k, members in enumerate(self.members):
                order = members[rng.permutation(len(members))]
                batches += [(k, order[j * self.batch_size:(j + 1) * self.batch_size])
                            for j in range(len(members) // self.batch_size)]
            self._epoch_cache = (epoch, [batches[j] for j in rng.permutation(len(batches))])
        return self._epoch_cache[1]

    def global_batch_indices(self, position: int) -> tuple[int, np.ndarray]:
        epoch, index = divmod(int(position), self.batches_per_epoch)
        return self._epoch(epoch)[index]

    def __next__(self) -> dict[str, np.ndarray]:
        bucket, indices = self.global_batch_indices(self.position)
        self.position += 1
        p = jax.process_index()
        rows = slice(p * self.local, (p + 1) * self.local)
        augments = None
        if self.random_flip or self.max_shrink or self.max_shift:
            rng = np.random.default_rng([self.seed, 1, self.position - 1])
            augments = [Augment.draw(rng, flip=self.random_flip, max_shrink=self.max_shrink, max_shift=self.max_shift)
                        for _ in range(self.batch_size)][rows]
        batch = self.data.batch(indices[rows], self.buckets[bucket], augments)
        if self.token_weights:
            # One weight for every row of the global batch: accum / (masked tokens of the whole global batch);
            # computed from all rows' masks, which every process has (tokenised data are on every process).
            tokens = sum(int(self.data.loss_masks[i][1:].sum()) for i in indices)
            batch["loss_weight"] = np.full((self.local,), self.grad_accum_steps / max(tokens, 1), np.float32)
        return batch

    def __iter__(self):
        return self

    @property
    def epoch(self) -> float:
        return self.position / self.batches_per_epoch

    def get_state(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "num_examples": len(self.data)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        mine = self.get_state()
        for key in ("seed", "batch_size", "num_examples"):
            if key in state and int(state[key]) != mine[key]:
                raise DataError(f"the checkpointed data position has {key}={state[key]} but this run has {mine[key]}: "
                                "the checkpoint belongs to another data configuration (use a fresh workdir)")
        self.position = int(state["position"])


def eval_batches(data: ConversationData, buckets: Sequence[int], batch_size: int,
                 multiple: int = 16) -> list[tuple[np.ndarray, int, int]]:
    """One ordered pass over `data` as (example indices int64[batch_size], padded length, valid rows): examples
    grouped by bucket, every batch exactly `batch_size` rows (fixed shapes: one compiled program per bucket), the
    last of a bucket filled by repeating its last example (only the first `valid` rows count). Examples longer
    than the longest bucket get one more bucket (their length rounded up to `multiple`)."""
    bounds = list(buckets)
    longest = int(data.lengths.max())
    if longest > bounds[-1]:
        bounds.append(int(-(-longest // multiple) * multiple))
    which = data.bucket_of(bounds)
    out = []
    for k, length in enumerate(bounds):
        members = np.nonzero(which == k)[0]
        for j in range(0, len(members), batch_size):
            chunk = members[j:j + batch_size]
            out.append((np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk))]), length, len(chunk)))
    return out
