"""`reward` job: train CAIG's pairwise CTR reward model, evaluate it on held-out products, write a report.

    python -m caig_jax.main --config=configs/reward.py:tiny --workdir=runs/reward_tiny

Sections: data (marketplace built on the fly when absent) -> inputs (`caig_jax.data.reward_inputs`) -> model
and loss (`caig_jax.trainers.reward`) -> the engine's default loop -> held-out evaluation
(`caig_jax.eval.pairwise`: accuracy with CIs, per category, CTR head, oracle, margin vs true CTR) -> ablation
runs with other point weights from the same job -> report (`caig_jax.eval.reward_accuracy`: markdown + JSON +
plots).
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import ml_collections

from caig_jax import parallel
from caig_jax.config_checks import Checks, common_checks, market_checks, train_checks
from caig_jax.errors import MissingPathError
from caig_jax.data.loader import reward_batches
from caig_jax.data.market_datasets import build_world
from caig_jax.data.reward_inputs import RewardInputBatches, build_inputs, pair_batches, train_source
from caig_jax.eval import reward_accuracy
from caig_jax.eval.pairwise import evaluate
from caig_jax.eval.report import write_report
from caig_jax.files import write_json_atomic
from caig_jax.models.reward import predict_batch
from caig_jax.trainers.reward import build_model, make_loss_fn
from caig_jax.trainers.trainer import Trainer

log = logging.getLogger(__name__)


def validate(config: ml_collections.ConfigDict) -> None:
    """Types and ranges of every key the job reads (`caig_jax.config_checks`), the nested marketplace config
    (`data.market`) included when it is used; raises `ConfigError` before anything is built."""
    checks = Checks(config)
    common_checks(checks)
    shape = checks.mesh(devices=jax.device_count())
    train_checks(checks, batch_shards=shape[0] * shape[1] if shape else None, processes=jax.process_count())
    checks.string("data.dir")
    image_size = checks.integer("data.image_size", min=8)
    checks.boolean("data.random_flip")
    checks.boolean("data.cache_train_examples")
    for key in ("train_split", "val_split", "test_split", "train_config"):
        checks.string(f"data.{key}")
    checks.choice("model.dtype", ("float32", "bfloat16"))
    checks.integer("model.max_text_len", min=1)
    checks.integer("model.lora_rank", min=0)
    checks.number("model.lora_alpha", min=0, min_open=True)
    pretrained = checks.string("model.pretrained")
    if not pretrained:  # the tiny random model is built from model.tiny
        t = "model.tiny."
        sizes = {k: checks.integer(t + k, min=1) for k in (
            "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vision_hidden_size",
            "vision_layers", "vision_heads", "vision_patch_size")}
        checks.number(t + "rope_theta", min=0, min_open=True)
        if sizes["hidden_size"] and sizes["num_heads"] and sizes["hidden_size"] % sizes["num_heads"]:
            checks.problem(t + "hidden_size", f"a multiple of model.tiny.num_heads={sizes['num_heads']}")
        if sizes["num_heads"] and sizes["num_kv_heads"] and sizes["num_heads"] % sizes["num_kv_heads"]:
            checks.problem(t + "num_heads", f"a multiple of model.tiny.num_kv_heads={sizes['num_kv_heads']}")
        if sizes["vision_hidden_size"] and sizes["vision_heads"] and sizes["vision_hidden_size"] % sizes["vision_heads"]:
            checks.problem(t + "vision_hidden_size", f"a multiple of model.tiny.vision_heads={sizes['vision_heads']}")
        patch = sizes["vision_patch_size"]
        if image_size and patch and image_size % patch:
            checks.problem("data.image_size", f"a multiple of model.tiny.vision_patch_size={patch}")
    checks.number("loss.point_weight", min=0)
    weights = checks.get("ablation_point_weights")
    if not isinstance(weights, (list, tuple)) or any(
            isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in weights):
        checks.problem("ablation_point_weights", "a tuple of numbers >= 0 (one extra run each; () for none)")
    checks.integer("eval.batch_size", min=1)
    if not config.data.dir:
        market_checks(checks, prefix="data.market.")
    checks.done()


def ensure_data(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The TFDS data dir of reward pairs: `config.data.dir`, or the marketplace (`config.data.market`, a
    `configs/market.py` config) built into `<workdir>/market` (checked against its inputs on every run)."""
    if config.data.dir:
        if not os.path.isdir(config.data.dir):
            raise MissingPathError(f"config.data.dir={config.data.dir!r} does not exist")
        return config.data.dir
    world = os.path.join(workdir, "market")
    market_config = ml_collections.ConfigDict(config.data.market.to_dict())
    market_config.seed = config.seed
    # Only the CTR-log datasets this job reads (the market job builds the others from the same folder).
    market_config.build.datasets = ("ctr_logs",)
    if not os.path.isdir(os.path.join(world, "tfds", "ctr_logs")):
        log.info("no data in %s: building the synthetic marketplace (config.data.market)", world)
    if jax.process_index() == 0:
        # Every run: an existing marketplace is reused when its config and files are unchanged, and a dataset
        # whose input files changed stops naming the file (or is rebuilt with data.market.build.overwrite).
        build_world(market_config, world, verbose=False, overwrite_hint="--config.data.market.build.overwrite=True")
    return os.path.join(world, "tfds")


def train_one(config, workdir: str, data_dir: str, mesh, point_weight: float, source=None):
    """Trains one reward model in `workdir` (resuming if it has checkpoints); returns (model, run config).
    `source`: the training pairs (default `train_source(config, data_dir)`); runs on the same data share one."""
    if source is None:  # first: a wrong dataset name fails before any model is built
        source = train_source(config, data_dir)
    os.makedirs(workdir, exist_ok=True)
    run_config = ml_collections.ConfigDict(config.to_dict())
    run_config.loss.point_weight = point_weight
    run_config.data.dir = data_dir
    run_config.workdir = workdir
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, "config.json"), run_config.to_dict(), default=list)
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
    """Pairwise metrics (`caig_jax.eval.pairwise.evaluate`) of `model` on one split of `ctr_logs`."""
    batches = pair_batches(run_config, data_dir, split, run_config.eval.batch_size, dataset_config)
    try:
        return evaluate(predict_batch, model, batches, mesh, predictions_path=predictions_path)
    finally:
        batches.close()


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    validate(config)
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
        write_report(main, workdir, title="Reward model on held-out products", extra_sections=sections,
                                     metrics_jsonl=os.path.join(workdir, "metrics.jsonl"))
        write_json_atomic(os.path.join(workdir, "report_ablation.json"), results, default=float)
        summary = {k: main.get(k) for k in ("accuracy", "accuracy_ci", "oracle_accuracy", "target_met", "n")}
        print(json.dumps(summary, indent=2, default=float))
    return results
