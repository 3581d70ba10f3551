"""`sft` job: knowledge pre-training of the Prompt Model (PM) on e-commerce conversations, held-out evaluation,
report, and an export that transformers loads.

    python -m caig_jax.main --config=configs/sft.py:tiny --workdir=runs/sft_tiny

Sections: data (the marketplace built on the fly when `data.dir` is empty; `llava_conversations` read by
`caig_jax.data.sft_inputs`, background prompts optionally selected by logged CTR) -> tokenizer, buckets, batches
-> model and loss (`caig_jax.trainers.sft`) -> the engine's default loop (checkpoints, resume, metrics, progress)
-> held-out evaluation (`caig_jax.eval.sft`, the split `eval.split`, read once) -> report
(`caig_jax.eval.sft_report`) -> LoRA merged, export (`caig_jax.convert.export`) to `<workdir>/export`.

Re-running on a finished workdir resumes at the last step, finds the report of that step and split and stops.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections

from caig_jax import files, parallel
from caig_jax.config_checks import Checks, common_checks, layer_checks, market_checks, train_checks
from caig_jax.convert.export import save_pretrained
from caig_jax.data.ctr_logs import DataError, read_creative_ranking
from caig_jax.data.market_datasets import build_world
from caig_jax.data.sft_inputs import (
    ConversationData,
    SFTBatches,
    build_inputs,
    read_conversations,
    select_by_logged_ctr,
    weight_families,
)
from caig_jax.eval.sft import (
    PROMPT_FAMILY,
    MarketTruth,
    answer_stats,
    evaluate_prompt_model,
    family_metrics,
    scalar_metrics,
)
from caig_jax.eval.sft_report import write_sft_report
from caig_jax.files import write_json_atomic
from caig_jax.metrics import MetricWriter
from caig_jax.models import attention
from caig_jax.models.lora import merge_lora
from caig_jax.trainers.sft import build_model, make_loss_fn
from caig_jax.trainers.trainer import Trainer

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ data


def ensure_data(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, str]:
    """(TFDS data dir holding `llava_conversations`, marketplace folder or ""): `config.data.dir`, or the
    marketplace (`config.data.market`) built into `<workdir>/market` with the datasets this job reads."""
    if config.data.dir:
        if not os.path.isdir(config.data.dir):
            raise DataError(f"config.data.dir={config.data.dir!r} does not exist")
        data_dir = config.data.dir
    else:
        world = os.path.join(workdir, "market")
        data_dir = os.path.join(world, "tfds")
        if not os.path.isdir(os.path.join(data_dir, "llava_conversations")) or not os.path.isdir(
                os.path.join(data_dir, "products")):
            market_config = ml_collections.ConfigDict(config.data.market.to_dict())
            market_config.seed = config.seed
            market_config.build.datasets = ("llava_conversations", "products")
            log.info("no data in %s: building the synthetic marketplace (config.data.market)", world)
            if jax.process_index() == 0:
                build_world(market_config, world, verbose=False)
    market_dir = config.data.market_dir
    if not market_dir:  # build_world's layout: <root>/tfds next to <root>/market
        guess = os.path.join(os.path.dirname(os.path.abspath(data_dir)), "market")
        market_dir = guess if os.path.exists(os.path.join(guess, "products", "products.json")) else ""
    return data_dir, market_dir


def training_records(config, data_dir: str, market_dir: str) -> tuple[list, dict]:
    """The training conversations, with the background prompts selected by logged CTR when configured."""
    records = read_conversations(data_dir, config.data.train_split, config.data.config_name or None)
    info: dict = {"conversations": len(records), "prompt_selection": config.data.prompt_selection}
    if config.data.prompt_selection == "top_logged_ctr":
        if not market_dir:
            raise DataError("config.data.prompt_selection='top_logged_ctr' needs the marketplace's logs (set "
                            "config.data.market_dir) or use --config.data.prompt_selection=all")
        creatives = read_creative_ranking(os.path.join(market_dir, "logs"), splits=(config.data.train_split,))
        records, counts = select_by_logged_ctr(records, creatives[config.data.train_split], family=PROMPT_FAMILY,
                                               fraction=config.data.prompt_top_fraction)
        info.update(counts, conversations=len(records))
    elif config.data.prompt_selection != "all":
        raise ValueError(f"config.data.prompt_selection={config.data.prompt_selection!r}: expected 'all' or "
                         "'top_logged_ctr'")
    weights = dict(config.data.family_weights)
    if weights:
        records = weight_families(records, weights)
        info.update(family_weights=weights, examples_per_epoch=len(records))
    return records, info


# ------------------------------------------------------------------------------------------------ run


def validate(config: ml_collections.ConfigDict) -> None:
    """Types and ranges of every key the job reads (`caig_jax.config_checks`); raises `ConfigError` before
    anything is built."""
    checks = Checks(config)
    common_checks(checks)
    layer_checks(checks)
    shape = checks.mesh(devices=jax.device_count())
    train_checks(checks, batch_shards=shape[0] * shape[1] if shape else None, processes=jax.process_count())
    checks.string("data.dir")
    checks.choice("data.template", ("vicuna_v1", "llava_v1"))
    checks.integer("data.image_size", min=8)
    checks.integer("data.num_buckets", min=1)
    checks.integer("data.bucket_multiple", min=1)
    checks.choice("data.prompt_selection", ("all", "top_logged_ctr"))
    checks.number("data.prompt_top_fraction", min=0, max=1, min_open=True)
    checks.choice("model.dtype", ("float32", "bfloat16"))
    checks.choice("model.attention", attention.CHOICES)
    checks.integer("model.lora_rank", min=0)
    checks.number("model.lora_alpha", min=0, min_open=True)
    checks.number("model.lora_dropout", min=0, max=1)
    for key in ("batch_size", "samples", "on_brief", "max_new_tokens"):
        checks.integer(f"eval.{key}", min=1)
    checks.number("eval.temperature", min=0)
    checks.choice("export.dtype", ("", "float32", "bfloat16"))
    if not config.data.dir:
        market_checks(checks, prefix="data.market.")
    checks.done()


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    validate(config)
    start = time.time()
    seconds: dict[str, float] = {}
    mesh = parallel.make_mesh(config.mesh.to_dict())
    log.info("mesh: %s", dict(mesh.shape))
    data_dir, market_dir = ensure_data(config, workdir)
    seconds["data"] = time.time() - start
    files.makedirs(workdir)  # local or gs://
    run_config = ml_collections.ConfigDict(config.to_dict())
    run_config.data.dir, run_config.data.market_dir = data_dir, market_dir
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, "config.json"), run_config.to_dict(), default=list)

    t = time.time()
    records, data_info = training_records(config, data_dir, market_dir)
    inputs, llava_config = build_inputs(run_config, workdir, data_dir, records)
    train_data = ConversationData(records, inputs, llava_config)
    buckets = train_data.bucket_lengths(config.data.num_buckets, config.data.bucket_multiple, config.train.batch_size)
    accum = config.train.grad_accum_steps
    batches = SFTBatches(train_data, buckets, config.train.batch_size, config.seed, token_weights=accum > 1,
                         grad_accum_steps=accum, random_flip=config.data.random_flip,
                         max_shrink=config.data.augment_shrink, max_shift=config.data.augment_shift)
    data_info.update(buckets=list(buckets), batches_per_epoch=batches.batches_per_epoch,
                     padding=float(1 - train_data.lengths.sum() / sum(
                         buckets[b] for b in train_data.bucket_of(buckets))))
    log.info("training data: %s", data_info)
    model = build_model(run_config, llava_config, mesh)
    trainer = Trainer(run_config, workdir, mesh, model, make_loss_fn(accum))
    seconds["setup"] = time.time() - t

    val_data = None

    def evaluate_val(model, step):  # teacher-forced loss / accuracy on the validation split, per family
        nonlocal val_data
        if val_data is None:
            val_data = ConversationData(read_conversations(data_dir, config.data.val_split, config.data.config_name
                                                           or None), inputs, llava_config)
        metrics = family_metrics(val_data, answer_stats(model, val_data, buckets, mesh, config.eval.batch_size))
        return {f"{family}/{k}": m[k] for family, m in metrics.items() for k in ("loss", "token_accuracy")}

    t = time.time()
    try:
        result = trainer.train(batches, eval_fn=evaluate_val if config.train.eval_every else None)
    finally:
        trainer.close()
    seconds["train"] = time.time() - t
    model, step = result.model, result.step

    report_path = os.path.join(workdir, "report.json")
    if os.path.exists(report_path):
        with open(report_path) as f:
            previous = json.load(f)
        if previous.get("step") == step and previous.get("split") == config.eval.split:
            log.info("%s already holds the step-%d evaluation on %r: nothing to do", report_path, step,
                     config.eval.split)
            return previous

    # -- held-out evaluation (config.eval.split: `val` while tuning, `test` once at the end) ------------------
    t = time.time()
    eval_data = ConversationData(read_conversations(data_dir, config.eval.split, config.data.config_name or None),
                                 inputs, llava_config)
    truth = MarketTruth.load(market_dir) if market_dir else None
    e = config.eval
    evaluation = evaluate_prompt_model(model, inputs, eval_data, buckets, mesh, truth=truth, samples=e.samples,
                                       on_brief=e.on_brief, max_new_tokens=e.max_new_tokens,
                                       temperature=e.temperature, seed=config.seed, batch_size=e.batch_size)
    seconds["evaluate"] = time.time() - t

    # -- export: LoRA merged, transformers layout ------------------------------------------------------------
    t = time.time()
    export_dir = ""
    if config.export.enabled:
        merged = merge_lora(model)
        export_dir = os.path.join(workdir, "export")
        save_pretrained(model, export_dir, tokenizer=inputs.tokenizer, image_processor=inputs.image_processor.config,
                        dtype=config.export.dtype or None)
        log.info("exported the PM (%d LoRA layers merged) to %s", len(merged), export_dir)
    seconds["export"] = time.time() - t
    seconds["total"] = time.time() - start

    if jax.process_index() == 0:
        writer = MetricWriter(workdir)
        writer.write(step, scalar_metrics(evaluation), prefix=f"{config.eval.split}/")
        writer.close()
        notes = [
            f"checkpoint step {step}; {data_info['conversations']} training conversations "
            f"(background prompts: {config.data.prompt_selection}"
            + (f", each product's top {config.data.prompt_top_fraction:.0%} by logged CTR: {data_info['kept']} of "
               f"{data_info['family_examples']}" if config.data.prompt_selection == "top_logged_ctr" else "")
            + f"); buckets {list(buckets)}, padding {data_info['padding']:.1%}",
            f"`{config.eval.split}` is read by this evaluation only" + (
                " (hyper-parameters were chosen on `val`)" if config.eval.split == "test" else ""),
            "wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()),
        ]
        if export_dir:
            notes.append(f"export (LoRA merged, transformers LLaVA-NeXT layout): `{export_dir}`")
        write_sft_report(evaluation, workdir, title="Prompt Model after knowledge pre-training (SFT)",
                         split=config.eval.split, truth=truth, notes=notes,
                         metrics_jsonl=os.path.join(workdir, "metrics.jsonl"),
                         extra={"step": step, "seconds": seconds, "data": data_info, "export": export_dir,
                                "train_metrics": result.metrics})
        summary = {"step": step, "split": config.eval.split, "seconds": {k: round(v, 1) for k, v in seconds.items()},
                   "targets": {k: {"value": v["value"], "met": v["met"]} for k, v in evaluation["targets"].items()}}
        print(json.dumps(summary, indent=2, default=float))
    return {**evaluation, "step": step, "seconds": seconds, "export": export_dir}
