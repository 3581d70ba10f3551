"""`reward` job: train CAIG's pairwise CTR reward model, evaluate it on held-out products, write a report.

    python -m caig_jax.main --config=configs/reward.py:tiny --workdir=runs/reward_tiny

Sections: data (marketplace built on the fly when absent) -> tokenizer + inputs -> model (tiny random LLaVA-NeXT
or a pretrained folder; frozen tower / LoRA by config) -> loss (CE + point_weight * MSE) -> trainer -> held-out
evaluation (accuracy with CIs, per category, CTR head, oracle, margin vs true CTR) -> ablation runs with other
point weights from the same job -> report (markdown + JSON + plots).

The functions `load_trained`, `pair_batches` and `predict_batch` are also the model-specific interface of the
evaluation sweep (`caig_jax.eval.sweep`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from queue import Full, Queue
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from caig_jax import parallel
from caig_jax.config_files import load_config
from caig_jax.models import reward as reward_model
from caig_jax.models.clip import CLIPVisionConfig
from caig_jax.models.image_processing import ImageProcessor, ImageProcessorConfig
from caig_jax.models.llama import LlamaConfig
from caig_jax.models.llava import LlavaConfig, layout_for
from caig_jax.models.lora import apply_lora
from caig_jax.models.processing import LlavaInputs, build_word_tokenizer
from caig_jax.objectives.reward import reward_loss
from caig_jax.trainers.trainer import Trainer

log = logging.getLogger(__name__)

# ================================================================================================
# Data: the marketplace (or the user's TFDS ctr_logs) as reward pairs.
# ================================================================================================
def ensure_data(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The TFDS data dir of reward pairs: `config.data.dir`, or the marketplace built into `<workdir>/market`."""
    if config.data.dir:
        if not os.path.isdir(config.data.dir):
            raise FileNotFoundError(f"config.data.dir={config.data.dir!r} does not exist")
        return config.data.dir
    world = os.path.join(workdir, "market")
    if not os.path.isdir(os.path.join(world, "tfds", "ctr_logs")):
        from caig_jax.data import market_job
        market_config = load_config(f"configs/market.py:{config.data.market_preset}")
        market_config.seed = config.seed
        # Only the CTR-log datasets this job reads (the SFT ones took 14 s of the 10-minute budget; the market
        # job builds them from the same market/ folder).
        market_config.build.datasets = ("ctr_logs",)
        log.info("no data in %s: building the synthetic marketplace (%s preset)", world, config.data.market_preset)
        if jax.process_index() == 0:
            market_job.build_world(market_config, world, verbose=False)
    return os.path.join(world, "tfds")


def _text_corpus(data_dir: str) -> list[str]:
    """Every RM conversation of the dataset, rendered (builds the tiny presets' tokenizer)."""
    from caig_jax.data.loader import reward_pair_source

    from caig_jax.models.processing import render_conversation

    texts = []
    for split in ("train", "val", "test"):
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
# Model and inputs.
# ================================================================================================
def tiny_llava_config(config: ml_collections.ConfigDict, vocab_size: int, image_token_id: int, pad_id: int) -> LlavaConfig:
    m, s = config.model.tiny, config.data.image_size
    return LlavaConfig(
        text_config=LlamaConfig(
            vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
            max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=m.rope_theta, bos_token_id=1, eos_token_id=2,
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=m.vision_hidden_size, intermediate_size=2 * m.vision_hidden_size,
            num_hidden_layers=m.vision_layers, num_attention_heads=m.vision_heads, image_size=s,
            patch_size=m.vision_patch_size,
        ),
        anyres=True,
        image_token_id=image_token_id,
        image_grid_pinpoints=((s, 2 * s),),  # the left|right pair is exactly two tiles
        eos_token_ids=(2,),
        pad_token_id=pad_id,
    )


def build_inputs(config: ml_collections.ConfigDict, workdir: str, data_dir: str) -> tuple[LlavaInputs, LlavaConfig]:
    """(tokenizer + image processor, model config) of a run: the tiny presets build and keep their tokenizer
    in `<workdir>/tokenizer`; a pretrained run reads everything from its checkpoint folder."""
    if config.model.pretrained:
        from caig_jax.convert.llava import read_llava_config

        llava_config = read_llava_config(config.model.pretrained)[0]
        return LlavaInputs.from_pretrained(config.model.pretrained, config=llava_config), llava_config
    tok_dir = os.path.join(workdir, "tokenizer")
    if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    else:
        tokenizer = build_word_tokenizer(_text_corpus(data_dir), tok_dir)
    llava_config = tiny_llava_config(config, len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"),
                                     tokenizer.pad_token_id)
    s = config.data.image_size
    processor = ImageProcessor(ImageProcessorConfig(
        kind="llava_next", size={"shortest_edge": s}, crop_size={"height": s, "width": s},
        image_grid_pinpoints=((s, 2 * s),),
    ))
    return LlavaInputs(tokenizer, processor, llava_config), llava_config


def build_model(config: ml_collections.ConfigDict, llava_config: LlavaConfig, mesh) -> reward_model.RewardModel:
    """The reward model on `mesh`: pretrained (heads loaded, or initialised when the folder has none) or a
    randomly initialised tiny model born sharded; LoRA adapters on the LLM when `model.lora_rank` > 0."""
    dtype = jnp.dtype(config.model.dtype)
    if config.model.pretrained:
        model = reward_model.from_pretrained(config.model.pretrained, dtype=dtype, mesh=mesh,
                                             init_missing_heads=True, seed=config.seed)
    else:
        model = parallel.sharded_init(
            lambda: reward_model.RewardModel(llava_config, rngs=nnx.Rngs(config.seed), dtype=dtype), mesh
        )
    if config.model.lora_rank:
        apply_lora(model.backbone.language_model, rank=config.model.lora_rank, alpha=config.model.lora_alpha,
                   target=config.model.lora_target, seed=config.seed)
    return model


class RewardInputBatches:
    """Pair batches (caig_jax.data.loader) -> model inputs, converted in a background thread.

    Each batch: input_ids / attention_mask int32[B, T] (T = max_len, right padded), pixel_values
    float32[B, P, 3, S, S], image_layout int32[B, 7], label int32[B], ctr float32[B, 2]; with `keep_meta`, also
    true_ctr float32[B, 2] and category / item_id arrays (for evaluation only: text never goes to devices).
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
        conversations = [rm_conversation(*fields) for fields in zip(raw["caption"], raw["category"], raw["attributes"])]
        config = self.llava_config
        batch = self.inputs(
            list(raw["image"]), conversations, add_generation_prompt=True, padding_side="right",
            max_len=self.max_len, pad_patches_to=config.max_patches,
        )
        out = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "pixel_values": batch["pixel_values"].astype(np.float32),
            "image_layout": layout_for(config, batch["image_sizes"]).astype(np.int32),
            "label": np.asarray(raw["label"], np.int32),
            "ctr": np.asarray(raw["ctr"], np.float32),
        }
        if self.keep_meta:
            out.update(true_ctr=np.asarray(raw["true_ctr"], np.float32), category=np.asarray(raw["category"]),
                       item_id=np.asarray(raw["item_id"]), index=np.asarray(raw["index"]))
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


def _attributes(category: str, attributes: str) -> dict:
    """The product attributes shown to the RM: the side file's JSON object (or free text), plus the category."""
    try:
        parsed = json.loads(attributes) if attributes else {}
    except json.JSONDecodeError:
        parsed = {"attributes": attributes}
    if not isinstance(parsed, dict):
        parsed = {"attributes": str(parsed)}
    return {"category": category.replace("_", " "), **parsed}


def rm_conversation(caption: str, category: str, attributes: str) -> list[dict]:
    return [{"role": "user", "content": reward_model.reward_prompt(caption, _attributes(category, attributes))}]


def make_loss_fn(point_weight: float):
    def loss_fn(model, batch, rng):
        del rng
        cls_logits, ctr_pred = model(
            batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
            image_layout=batch["image_layout"],
        )
        return reward_loss(cls_logits, ctr_pred, batch["label"], batch["ctr"], point_weight)

    return loss_fn


# ================================================================================================
# The evaluation-sweep interface.
# ================================================================================================
MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_layout")


@functools.partial(jax.jit, static_argnums=0)
def _predict(graphdef, state, batch):
    model = nnx.merge(graphdef, state)
    return model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                 image_layout=batch["image_layout"])


def predict_batch(model, batch: dict, mesh) -> dict[str, np.ndarray]:
    """`{'cls_logits': float32[b, 2], 'ctr_pred': float32[b, 2]}` for this process's rows of a batch.

    `batch` is this process's numpy batch; b must divide by the batch shards this process holds (the sweep's
    `evaluate` pads it). Outputs are this process's rows, in input order (no cross-host gather).
    """
    from caig_jax.eval.sweep import local_rows

    inputs = {k: batch[k] for k in MODEL_KEYS}
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        cls_logits, ctr_pred = _predict(graphdef, state, parallel.global_batch(mesh, inputs))
    return {"cls_logits": local_rows(cls_logits), "ctr_pred": local_rows(ctr_pred)}


def pair_batches(config: ml_collections.ConfigDict, data_dir: str, split: str, batch_size: int,
                 dataset_config: str | None = None) -> Iterator[dict]:
    """One ordered pass over a split (this process's shard) as model-input batches with labels, logged and
    true CTRs, categories and item ids. `config` is a run's config as `load_trained` returns it;
    `dataset_config` picks a `ctr_logs` config (default: the dataset's default, CAIG's pair rule)."""
    from caig_jax.data.loader import reward_batches, reward_pair_source

    inputs, llava_config = build_inputs(config, config.workdir, data_dir)
    pairs = reward_batches(reward_pair_source(data_dir, split, dataset_config), batch_size, seed=config.seed,
                           image_size=config.data.image_size, shuffle=False, num_epochs=1, drop_remainder=False)
    return RewardInputBatches(pairs, inputs, llava_config, config.model.max_text_len, keep_meta=True)


def load_trained(workdir: str, mesh, step: int | None = None):
    """(reward model with the checkpointed parameters of `step` (default: latest), run config) of a reward
    training workdir, on `mesh`. The returned config has `workdir` set (pair_batches needs it)."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{workdir} is not a reward training workdir (no config.json)")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    config.workdir = workdir
    _, llava_config = build_inputs(config, workdir, config.data.dir)
    trainer = Trainer(config, workdir, mesh, build_model(config, llava_config, mesh),
                      make_loss_fn(config.loss.point_weight))
    available = trainer.checkpointer.manager.all_steps()
    if not available or (step is not None and step not in available):
        raise FileNotFoundError(f"{workdir}/checkpoints has no checkpoint for step {step}; it has {sorted(available)}")
    step = max(available) if step is None else step
    state, _, _ = trainer.checkpointer.restore(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), trainer.state), step
    )
    trainer.state = state
    model = trainer.model()
    trainer.close()
    return model, config


# ================================================================================================
# The job.
# ================================================================================================
def train_source(config, data_dir: str):
    """The training pairs (`config.data.train_split` of `config.data.train_config`), kept in memory after their
    first read when `config.data.cache_train_examples`."""
    from caig_jax.data.ctr_logs import DataError
    from caig_jax.data.loader import InMemoryPairSource, reward_pair_source

    try:
        source = reward_pair_source(data_dir, config.data.train_split, config.data.train_config or None)
    except DataError as e:
        if not config.data.train_config:
            raise
        raise DataError(f"{e}; config.data.train_config={config.data.train_config!r} names a ctr_logs config that "
                        "this data dir lacks: pass --config.data.train_config='' to train on its default config") from None
    return InMemoryPairSource(source, config.data.image_size) if config.data.cache_train_examples else source


def train_one(config, workdir: str, data_dir: str, mesh, point_weight: float, source=None):
    """Trains one reward model in `workdir` (resuming if it has checkpoints); returns (model, run config).
    `source`: the training pairs (default `train_source(config, data_dir)`); runs on the same data share one."""
    from caig_jax.data.loader import reward_batches

    if source is None:  # first: a wrong dataset name fails before any model is built
        source = train_source(config, data_dir)
    os.makedirs(workdir, exist_ok=True)
    run_config = ml_collections.ConfigDict(config.to_dict())
    run_config.loss.point_weight = point_weight
    run_config.data.dir = data_dir
    run_config.workdir = workdir
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(run_config.to_dict(), f, indent=2, default=list)
    inputs, llava_config = build_inputs(run_config, workdir, data_dir)
    model = build_model(run_config, llava_config, mesh)
    local_batch = config.train.batch_size // jax.process_count()
    pairs = reward_batches(source, local_batch, seed=config.seed,
                           image_size=config.data.image_size, shuffle=True, random_flip=config.data.random_flip)
    data = RewardInputBatches(pairs, inputs, llava_config, config.model.max_text_len)
    trainer = Trainer(run_config, workdir, mesh, model, make_loss_fn(point_weight))

    def evaluate(model, step):
        metrics = evaluate_split(run_config, data_dir, config.data.val_split, model, mesh)
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    try:
        result = trainer.train(data, eval_fn=evaluate if config.train.eval_every else None)
    finally:
        data.close()
        trainer.close()
    return result.model, run_config


def evaluate_split(run_config, data_dir, split, model, mesh, predictions_path: str | None = None,
                   dataset_config: str | None = None) -> dict:
    """Pairwise metrics (`caig_jax.eval.sweep.evaluate`) of `model` on one split of `ctr_logs`."""
    from caig_jax.eval import sweep

    batches = pair_batches(run_config, data_dir, split, run_config.eval.batch_size, dataset_config)
    try:
        return sweep.evaluate(model, run_config, batches, mesh, predictions_path=predictions_path)
    finally:
        batches.close()


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    from caig_jax.eval import reward_accuracy

    mesh = parallel.make_mesh(config.mesh.to_dict())
    log.info("mesh: %s", dict(mesh.shape))
    data_dir = ensure_data(config, workdir)
    results = {}
    runs = [(f"point_weight={config.loss.point_weight}", workdir, config.loss.point_weight)]
    runs += [(f"point_weight={w}", os.path.join(workdir, f"ablation_point_weight_{w}"), w)
             for w in config.ablation_point_weights if w != config.loss.point_weight]
    source = train_source(config, data_dir)
    for name, run_dir, weight in runs:
        tokenizer_dir, first_tokenizer = os.path.join(run_dir, "tokenizer"), os.path.join(workdir, "tokenizer")
        if run_dir != workdir and os.path.isdir(first_tokenizer) and not os.path.exists(tokenizer_dir):
            shutil.copytree(first_tokenizer, tokenizer_dir, dirs_exist_ok=True)  # same data, same tokenizer: reuse
        log.info("training %s in %s", name, run_dir)
        model, run_config = train_one(config, run_dir, data_dir, mesh, weight, source)
        results[name] = evaluate_split(run_config, data_dir, config.data.test_split, model, mesh)
    main = results[runs[0][0]]
    if jax.process_index() == 0:
        sections = {"Ablation: point_weight (same data, same seed)": reward_accuracy.compare_runs(results)}
        reward_accuracy.write_report(main, workdir, title="Reward model on held-out products", extra_sections=sections,
                                     metrics_jsonl=os.path.join(workdir, "metrics.jsonl"))
        with open(os.path.join(workdir, "report_ablation.json"), "w") as f:
            json.dump(results, f, indent=2, default=float)
        summary = {k: main.get(k) for k in ("accuracy", "accuracy_ci", "oracle_accuracy", "target_met", "n")}
        print(json.dumps(summary, indent=2, default=float))
    return results
