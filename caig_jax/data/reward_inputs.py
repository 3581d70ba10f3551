"""The reward model's inputs: RM conversation text, tokenizer + image processor, and the input pipeline.

    inputs, llava_config = build_inputs(config, workdir, data_dir)      # tokenizer + processor (+ tiny config)
    batches = pair_batches(config, data_dir, "test", 64)               # model-input batches of one split
    batch = next(batches)   # input_ids, attention_mask, pixel_values, image_layout, label, ctr (+ metadata)

`config` is a reward run's config (`configs/reward.py`); a pair (left|right image, caption, category,
attributes) becomes CAIG's RM conversation (`rm_conversation`) and then LLaVA-NeXT model inputs.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from queue import Full, Queue
from typing import Any

import ml_collections
import numpy as np
from transformers import AutoTokenizer

from caig_jax.data.ctr_logs import DataError
from caig_jax.data.loader import InMemoryPairSource, reward_batches, reward_pair_source
from caig_jax.models.image_processing import ImageProcessor, ImageProcessorConfig
from caig_jax.models.llava import LlavaConfig, layout_for, read_llava_config
from caig_jax.models.processing import LlavaInputs, build_word_tokenizer, render_conversation
from caig_jax.models.reward import reward_prompt, tiny_llava_config


# ================================================================================================
# Conversation text.
# ================================================================================================
def product_attributes(category: str, attributes: str) -> dict:
    """The product attributes shown to the RM: the side file's JSON object (or free text), plus the category."""
    try:
        parsed = json.loads(attributes) if attributes else {}
    except json.JSONDecodeError:
        parsed = {"attributes": attributes}
    if not isinstance(parsed, dict):
        parsed = {"attributes": str(parsed)}
    return {"category": category.replace("_", " "), **parsed}


def rm_conversation(caption: str, category: str, attributes: str) -> list[dict]:
    return [{"role": "user", "content": reward_prompt(caption, product_attributes(category, attributes))}]



TOKENIZER_SPLITS = ("train", "val")  # never the test split: it is read once, by the final evaluation


def _text_corpus(data_dir: str) -> list[str]:
    """Every RM conversation of the dataset's train and val splits, rendered (builds the tiny presets' tokenizer;
    a word only the test split holds is split into known pieces, as a pretrained tokenizer would split it)."""
    texts = []
    for split in TOKENIZER_SPLITS:
        try:
            source = reward_pair_source(data_dir, split)
        except KeyError:
            continue
        for i in range(len(source)):
            ex = source[i]
            turns = rm_conversation(*(_str(ex.get(k, "")) for k in ("caption", "category", "attributes")))
            texts.append(render_conversation(turns, add_generation_prompt=True))
    return texts


def _str(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


# ================================================================================================
# Tokenizer, processor and the pipeline.
# ================================================================================================
def build_inputs(config: ml_collections.ConfigDict, workdir: str, data_dir: str) -> tuple[LlavaInputs, LlavaConfig]:
    """(tokenizer + image processor, model config) of a run: the tiny presets build and keep their tokenizer
    in `<workdir>/tokenizer`; a pretrained run reads everything from its checkpoint folder."""
    if config.model.pretrained:
        llava_config = read_llava_config(config.model.pretrained)[0]
        return LlavaInputs.from_pretrained(config.model.pretrained, config=llava_config), llava_config
    tok_dir = os.path.join(workdir, "tokenizer")
    if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    else:
        tokenizer = build_word_tokenizer(_text_corpus(data_dir), tok_dir)
    llava_config = tiny_llava_config(config.model.tiny, config.data.image_size, len(tokenizer),
                                     tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id)
    s = config.data.image_size
    processor = ImageProcessor(ImageProcessorConfig(
        kind="llava_next", size={"shortest_edge": s}, crop_size={"height": s, "width": s},
        image_grid_pinpoints=((s, 2 * s),),
    ))
    return LlavaInputs(tokenizer, processor, llava_config), llava_config


def pair_patches(config: LlavaConfig, pair_size: tuple[int, int]) -> int:
    """Tower images (tiles + base) of one left|right pair image of (height, width) `pair_size`: every pair of a
    dataset has one size, so batches carry exactly these tiles, not the config's worst case (`max_patches`)."""
    if not config.anyres:
        return 1
    return int(layout_for(config, [tuple(pair_size)])[0, 0])


def pair_model_inputs(pair_images, captions, categories, attributes, inputs: LlavaInputs, llava_config: LlavaConfig,
                      max_len: int) -> dict[str, np.ndarray]:
    """The RM's model inputs for left|right pair images uint8[B, S, 2S, 3] of products with these captions,
    categories and attributes (JSON text): input_ids / attention_mask int32[B, max_len] (right padded),
    pixel_values float32[B, P, 3, S', S'], image_layout int32[B, 7]."""
    conversations = [rm_conversation(*fields) for fields in zip(captions, categories, attributes)]
    batch = inputs(list(pair_images), conversations, add_generation_prompt=True, padding_side="right",
                   max_len=max_len, pad_patches_to=pair_patches(llava_config, np.asarray(pair_images[0]).shape[:2]))
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "pixel_values": batch["pixel_values"].astype(np.float32),
        "image_layout": layout_for(llava_config, batch["image_sizes"]).astype(np.int32),
    }


class RewardInputBatches:
    """Pair batches (caig_jax.data.loader) -> model inputs, converted in a background thread.

    Why a thread of our own and not grain's `map` + prefetch: grain runs a map on its read threads, so several
    batches would be tokenised at once through the one tokenizer instance, which transformers' fast
    tokenizers do not support (the Rust tokenizer is borrowed mutably per call); one producer keeps the
    tokenizer single-threaded and the order fixed, while grain below still reads and decodes in parallel.

    Each batch: input_ids / attention_mask int32[B, T] (T = max_len, right padded), pixel_values
    float32[B, P, 3, S, S], image_layout int32[B, 7], label int32[B], ctr float32[B, 2]; with `keep_meta`, also
    true_ctr float32[B, 2] and category / item_id / left_id / right_id arrays (for evaluation only: text never goes
    to devices).
    Image processing and tokenisation run on the host while the devices compute the previous step
    (`prefetch` batches ahead); `get_state()` is the wrapped stream's position *after the last batch handed
    out*, so a checkpoint never skips or repeats a batch.
    """

    def __init__(self, pairs, inputs: LlavaInputs, llava_config: LlavaConfig, max_len: int, *,
                 keep_meta: bool = False, prefetch: int = 2):
        self.pairs, self.inputs, self.llava_config, self.max_len = pairs, inputs, llava_config, max_len
        self.keep_meta, self.prefetch = keep_meta, prefetch
        self._queue = None
        self._state = pairs.get_state() if hasattr(pairs, "get_state") else {}

    def convert(self, raw: dict) -> dict:
        out = pair_model_inputs(raw["image"], raw["caption"], raw["category"], raw["attributes"], self.inputs,
                                self.llava_config, self.max_len)
        out.update(label=np.asarray(raw["label"], np.int32), ctr=np.asarray(raw["ctr"], np.float32))
        if self.keep_meta:
            out.update(true_ctr=np.asarray(raw["true_ctr"], np.float32), category=np.asarray(raw["category"]),
                       item_id=np.asarray(raw["item_id"]), index=np.asarray(raw["index"]),
                       left_id=np.asarray(raw["left_id"]), right_id=np.asarray(raw["right_id"]))
        return out

    def _produce(self, queue: "Queue", stop: threading.Event) -> None:
        try:
            for raw in self.pairs:
                item = (self.convert(raw), self.pairs.get_state() if hasattr(self.pairs, "get_state") else {})
                while not stop.is_set():
                    try:
                        queue.put(item, timeout=0.1)
                        break
                    except Full:
                        continue
                if stop.is_set():
                    return
            queue.put(StopIteration())
        except BaseException as e:  # noqa: BLE001  (re-raised in the consumer, with its traceback)
            queue.put(e)

    def _start(self) -> None:
        self._queue, self._stop = Queue(maxsize=self.prefetch), threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop), daemon=True)
        self._thread.start()

    def __next__(self) -> dict:
        if self._queue is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._queue = None
            raise item
        batch, self._state = item
        return batch

    def __iter__(self):
        return self

    def get_state(self) -> dict:
        return dict(self._state)

    def set_state(self, state: dict) -> None:
        self.close()
        self.pairs.set_state(state)
        self._state = dict(state)

    def close(self) -> None:
        """Stops the producer thread (it finishes the batch it is converting)."""
        if self._queue is not None:
            self._stop.set()
            self._thread.join()
            self._queue = None


def pair_batches(config: ml_collections.ConfigDict, data_dir: str, split: str, batch_size: int,
                 dataset_config: str | None = None) -> Iterator[dict]:
    """One ordered pass over a split (this process's shard) as model-input batches with labels, logged and
    true CTRs, categories and item ids. `config` is a run's config as `trainers.reward.load_trained` returns it;
    `dataset_config` picks a `ctr_logs` config (default: the dataset's default, CAIG's pair rule)."""
    inputs, llava_config = build_inputs(config, config.workdir, data_dir)
    pairs = reward_batches(reward_pair_source(data_dir, split, dataset_config), batch_size, seed=config.seed,
                           image_size=config.data.image_size, shuffle=False, num_epochs=1, drop_remainder=False)
    return RewardInputBatches(pairs, inputs, llava_config, config.model.max_text_len, keep_meta=True)


def train_source(config, data_dir: str):
    """The training pairs (`config.data.train_split` of `config.data.train_config`), kept in memory after their
    first read when `config.data.cache_train_examples`."""
    try:
        source = reward_pair_source(data_dir, config.data.train_split, config.data.train_config or None)
    except DataError as e:
        if not config.data.train_config:
            raise
        raise DataError(f"{e}; config.data.train_config={config.data.train_config!r} names a ctr_logs config that "
                        "this data dir lacks: pass --config.data.train_config='' to train on its default config"
                        ) from None
    return InMemoryPairSource(source, config.data.image_size) if config.data.cache_train_examples else source
