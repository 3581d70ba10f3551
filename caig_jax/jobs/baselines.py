"""`baselines` job: the paper's reward-model baselines under the reward model's protocol.

    python -m caig_jax.main --config=configs/baselines.py:vam_tiny --workdir=runs/vam_tiny
    python -m caig_jax.main --config=configs/baselines.py:cg4ctr_tiny --workdir=runs/cg4ctr_tiny
    python -m caig_jax.main --config=configs/baselines.py:zero_shot_tiny --workdir=runs/zero_shot_tiny

Sections: data (the reward job's `ensure_data`: the same marketplace, or `data.dir`) -> for VAM / CG4CTR the
training split's pairs (`data.train_config`, as the reward model) regrouped into per-product creative lists
(`caig_jax.data.creative_lists`) -> model and list-wise loss (`caig_jax.trainers.baselines`) -> the engine's
default loop, evaluating on `val` every `eval_every` steps and at the end -> the final evaluation: `test`,
once (`jobs.reward.final_evaluation`: logged in `test_reads.jsonl`, metrics in `final_evaluation.json`, a
re-run reads nothing and a changed config is refused) -> `report.md` with the reward model's headline metrics.
The zero-shot MLLM (`model.kind='zero_shot'`) trains nothing: it is read on `val`, then on `test` once.

Every judge is scored on the same CAIG pairs by the same evaluation core (`caig_jax.eval.pairwise.evaluate`):
a pair's `cls_logits` are the two creatives' scores (baselines) or the log-probabilities of "left" and
"right" (zero-shot), decided by `objectives.reward.prefers_left`.
"""

from __future__ import annotations

import logging
import os

import jax
import ml_collections

from caig_jax import files, parallel
from caig_jax.config_checks import Checks, common_checks, market_checks, train_checks
from caig_jax.data import reward_inputs
from caig_jax.data.creative_lists import ListBatches, creative_lists
from caig_jax.eval import reward_accuracy
from caig_jax.eval.pairwise import evaluate
from caig_jax.eval.report import write_report
from caig_jax.files import write_json_atomic
from caig_jax.jobs import reward
from caig_jax.trainers import baselines
from caig_jax.trainers.trainer import Trainer

log = logging.getLogger(__name__)


def validate(config: ml_collections.ConfigDict) -> None:
    """Types and ranges of every key the job reads for its `model.kind`; raises `ConfigError` before anything
    is built."""
    checks = Checks(config)
    common_checks(checks)
    shape = checks.mesh(devices=jax.device_count())
    kind = checks.choice("model.kind", baselines.KINDS)
    checks.string("data.dir")
    image_size = checks.integer("data.image_size", min=8)
    checks.boolean("data.cache_train_examples")
    for key in ("train_split", "val_split", "test_split", "train_config"):
        checks.string(f"data.{key}")
    checks.choice("model.dtype", ("float32", "bfloat16"))
    if kind in baselines.TRAINED_KINDS:
        train_checks(checks, batch_shards=shape[0] * shape[1] if shape else None, processes=jax.process_count())
    if kind == "vam":
        widths, blocks = checks.get("model.vam.widths"), checks.get("model.vam.blocks")
        for key, value in (("widths", widths), ("blocks", blocks)):
            if not isinstance(value, (list, tuple)) or not value or any(
                    isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
                checks.problem(f"model.vam.{key}", "a non-empty tuple of integers >= 1")
        if isinstance(widths, (list, tuple)) and isinstance(blocks, (list, tuple)) and len(widths) != len(blocks):
            checks.problem("model.vam.blocks", f"as many stages as model.vam.widths ({len(widths)})")
        for key in ("stem_kernel", "stem_stride", "norm_groups"):
            checks.integer(f"model.vam.{key}", min=1)
        checks.boolean("model.vam.stem_pool")
        checks.number("loss.prior_clicks", min=0)
        checks.number("loss.prior_non_clicks", min=0)
        checks.number("loss.label_temperature", min=0, min_open=True)
        checks.number("loss.point_weight", min=0)
    elif kind == "cg4ctr":
        c = "model.cg4ctr."
        sizes = {k: checks.integer(c + k, min=1) for k in (
            "vision_hidden_size", "vision_layers", "vision_heads", "patch_size", "text_hidden_size", "text_layers",
            "text_heads", "max_text_len", "fusion_layers", "fusion_heads", "head_hidden")}
        for width, heads in (("vision_hidden_size", "vision_heads"), ("text_hidden_size", "text_heads"),
                             ("vision_hidden_size", "fusion_heads")):
            if sizes[width] and sizes[heads] and sizes[width] % sizes[heads]:
                checks.problem(c + width, f"a multiple of {c}{heads}={sizes[heads]}")
        if image_size and sizes["patch_size"] and image_size % sizes["patch_size"]:
            checks.problem("data.image_size", f"a multiple of {c}patch_size={sizes['patch_size']}")
        checks.number("loss.list_weight", min=0)
        checks.number("loss.point_weight", min=0)
    elif kind == "zero_shot":
        checks.string("model.pretrained")
        checks.integer("model.max_text_len", min=1)
        if not checks.get("model.pretrained"):
            for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                        "vision_hidden_size", "vision_layers", "vision_heads", "vision_patch_size"):
                checks.integer(f"model.tiny.{key}", min=1)
            checks.number("model.tiny.rope_theta", min=0, min_open=True)
    checks.integer("eval.batch_size", min=1)
    checks.integer("eval.bootstrap_resamples", min=0)
    checks.boolean("eval.final_test")
    if not config.data.dir:
        market_checks(checks, prefix="data.market.")
    checks.done()


def evaluate_split(run_config, data_dir, split, model, mesh, predictions_path: str | None = None,
                   dataset_config: str | None = None, *, num_resamples: int | None = None,
                   final: bool = False) -> dict:
    """`jobs.reward.evaluate_split` for a baseline: the same evaluation core, metrics and test-split guard."""
    if split == run_config.data.test_split and not final:
        raise ValueError(f"split {split!r} is the test split: it is read once, by the final evaluation "
                         f"(jobs.reward.final_evaluation); choose on {run_config.data.val_split!r}")
    if num_resamples is None:
        num_resamples = run_config.eval.bootstrap_resamples
    if run_config.model.kind == "zero_shot":
        batches = reward_inputs.pair_batches(run_config, data_dir, split, run_config.eval.batch_size, dataset_config)
        predict = baselines.zero_shot_predict_batch
    else:
        batches = baselines.pair_batches(run_config, data_dir, split, run_config.eval.batch_size, dataset_config)
        predict = baselines.predict_batch
    try:
        return evaluate(predict, model, batches, mesh, predictions_path=predictions_path,
                        num_resamples=num_resamples)
    finally:
        if hasattr(batches, "close"):
            batches.close()


def _numbers(metrics) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def train_one(config, workdir: str, data_dir: str, mesh):
    """Trains (VAM, CG4CTR; resuming from checkpoints) or builds (zero-shot) the judge in `workdir`, with val
    evaluations. Returns (model, run config, the last val metrics)."""
    run_config = ml_collections.ConfigDict(config.to_dict())
    run_config.data.dir = data_dir
    run_config.workdir = workdir
    files.makedirs(workdir)  # local or gs://
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, "config.json"), run_config.to_dict(), default=list)

    def evaluate_val(model, step):  # point values, no intervals: what choices are made on
        return _numbers(evaluate_split(run_config, data_dir, config.data.val_split, model, mesh, num_resamples=0))

    if config.model.kind == "zero_shot":
        judge = baselines.build_zero_shot(run_config, workdir, data_dir, mesh)
        return judge, run_config, evaluate_val(judge, 0)
    lists = creative_lists(reward_inputs.train_source(config, data_dir), config.data.image_size)
    log.info("%d training products, %d creatives (at most %d per product)", len(lists.lists), len(lists.ids),
             lists.max_creatives)
    tokenizer = baselines.tokenizer_for(run_config, workdir, lists)
    encode = None if tokenizer is None else baselines.text_encoder(tokenizer, config.model.cg4ctr.max_text_len)
    model = baselines.build_model(run_config, mesh, tokenizer)
    data = ListBatches(lists, config.train.batch_size // jax.process_count(), seed=config.seed, encode_text=encode)
    trainer = Trainer(run_config, workdir, mesh, model, baselines.make_loss_fn(run_config))
    try:
        result = trainer.train(data, eval_fn=evaluate_val if config.train.eval_every else None)
    finally:
        trainer.close()
    val = {k[len("eval/"):]: v for k, v in result.metrics.items() if k.startswith("eval/")}
    return result.model, run_config, val


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    validate(config)
    name = config.model.kind
    saved = reward.saved_final_evaluation(config, workdir)
    if saved is not None and saved.get("complete"):
        log.info("%s holds this config's final evaluation: reusing it (the test split is not read again)", workdir)
        if jax.process_index() == 0:
            _summary(saved["runs"][name])
        return saved["runs"]
    mesh = parallel.make_mesh(config.mesh.to_dict())
    log.info("mesh: %s", dict(mesh.shape))
    data_dir = reward.ensure_data(config, workdir)
    model, run_config, val = train_one(config, workdir, data_dir, mesh)
    trained = [(name, workdir, model, run_config, val)]
    if not config.eval.final_test:
        results = {name: evaluate_split(run_config, data_dir, config.data.val_split, model, mesh)}
        if jax.process_index() == 0:
            write_report(results[name], os.path.join(workdir, "validation"),
                         title=f"{name} on the {config.data.val_split!r} split (tuning run: test not read)")
            _summary(results[name])
        return results
    results = reward.final_evaluation(config, workdir, trained, data_dir, mesh, saved, evaluate_fn=evaluate_split)
    if jax.process_index() == 0:
        record = reward.saved_final_evaluation(config, workdir)
        write_report(results[name], workdir, title=f"{name} on held-out products (test split, final evaluation)",
                     extra_sections={"Evaluation protocol": reward.protocol_markdown(config, record)},
                     metrics_jsonl=os.path.join(workdir, "metrics.jsonl"))
        _summary(results[name])
    return results


def _summary(metrics) -> None:
    print(reward_accuracy.to_jsonable({k: metrics.get(k) for k in reward.HEADLINE_KEYS}))
