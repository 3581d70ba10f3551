"""`reward` job: train CAIG's pairwise CTR reward model, choose on `val`, evaluate on `test` once, report.

    python -m caig_jax.main --config=configs/reward.py:tiny --workdir=runs/reward_tiny

Sections: data (marketplace built on the fly when absent) -> inputs (`caig_jax.data.reward_inputs`) -> model
and loss (`caig_jax.trainers.reward`) -> the engine's default loop, evaluating on `val` every `eval_every` steps
and at the end (the only split hyper-parameters may be chosen on) -> ablation runs with other point weights
from the same job -> the final evaluation: every run on `test`, once -> report (`caig_jax.eval.reward_accuracy`:
markdown + JSON + plots).

Evaluation protocol (issue 13, DESIGN.md section 5):
- `test` is read once per run, by `final_evaluation`, after every run of the job has trained. Each opening of
  the split is appended to `<workdir>/test_reads.jsonl`; the metrics (and the config they were made with) go
  to `<workdir>/final_evaluation.json`, written after each run's evaluation. Re-running a finished workdir
  reuses that file and reads nothing; a re-run with another config is refused (use a new workdir: the test
  split of this one has been read); a run interrupted during the final evaluation re-evaluates only the runs
  that the file lacks. `evaluate_split` refuses the test split unless called by the final evaluation.
- The tokenizer of the tiny presets is built from the train and val texts only (`reward_inputs.build_inputs`).
- Intervals resample products (`caig_jax.eval.intervals`); the headline metrics are in
  `caig_jax.eval.reward_accuracy.headline_metrics`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil

import jax
import ml_collections

from caig_jax import files, parallel
from caig_jax.config_checks import Checks, common_checks, layer_checks, market_checks, train_checks
from caig_jax.config_files import check_saved_config, config_json
from caig_jax.errors import MissingPathError
from caig_jax.data.loader import reward_batches
from caig_jax.data.market_datasets import build_world
from caig_jax.data.reward_inputs import RewardInputBatches, build_inputs, pair_batches, train_source
from caig_jax.eval import reward_accuracy
from caig_jax.eval.pairwise import evaluate
from caig_jax.eval.report import write_report
from caig_jax.files import write_json_atomic
from caig_jax.models import attention
from caig_jax.models.reward import predict_batch
from caig_jax.trainers.reward import build_model, make_loss_fn
from caig_jax.trainers.trainer import Trainer

log = logging.getLogger(__name__)


def validate(config: ml_collections.ConfigDict) -> None:
    """Types and ranges of every key the job reads (`caig_jax.config_checks`), the nested marketplace config
    (`data.market`) included when it is used; raises `ConfigError` before anything is built."""
    checks = Checks(config)
    common_checks(checks)
    layer_checks(checks)
    shape = checks.mesh(devices=jax.device_count())
    train_checks(checks, batch_shards=shape[0] * shape[1] if shape else None, processes=jax.process_count())
    checks.string("data.dir")
    image_size = checks.integer("data.image_size", min=8)
    checks.boolean("data.random_flip")
    checks.boolean("data.cache_train_examples")
    for key in ("train_split", "val_split", "test_split", "train_config"):
        checks.string(f"data.{key}")
    checks.choice("model.dtype", ("float32", "bfloat16"))
    checks.choice("model.attention", attention.CHOICES)
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


TEST_READS = "test_reads.jsonl"  # one line per opening of the test split: {run, split, by, time}
FINAL_EVALUATION = "final_evaluation.json"  # the final (test) metrics of every run and the config behind them
FINAL = "final evaluation"
HEADLINE_KEYS = ("accuracy", "accuracy_product_ci", "oracle_accuracy", "true_ratio_agreement",
                 "true_ratio_agreement_ci", "margin_true_spearman", "top1_regret", "n", "products")


def ensure_data(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The TFDS data dir of reward pairs: `config.data.dir`, or the marketplace (`config.data.market`, a
    `configs/market.py` config; its `seed` is the world seed) built into `<workdir>/market` (checked against its
    inputs on every run)."""
    if config.data.dir:
        if not os.path.isdir(config.data.dir):
            raise MissingPathError(f"config.data.dir={config.data.dir!r} does not exist")
        return config.data.dir
    world = os.path.join(workdir, "market")
    market_config = ml_collections.ConfigDict(config.data.market.to_dict())
    # Only the CTR-log datasets this job reads (the market job builds the others from the same folder).
    market_config.build.datasets = ("ctr_logs",)
    if not os.path.isdir(os.path.join(world, "tfds", "ctr_logs")):
        log.info("no data in %s: building the synthetic marketplace (config.data.market)", world)
    if jax.process_index() == 0:
        # Every run: an existing marketplace is reused when its config and files are unchanged, and a dataset
        # whose input files changed stops naming the file (or is rebuilt with data.market.build.overwrite).
        build_world(market_config, world, verbose=False, overwrite_hint="--config.data.market.build.overwrite=True")
    return os.path.join(world, "tfds")


def _numbers(metrics) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def train_one(config, workdir: str, data_dir: str, mesh, point_weight: float, source=None):
    """Trains one reward model in `workdir` (resuming if it has checkpoints), evaluating on the val split every
    `config.train.eval_every` steps and at the end (when `eval_every` > 0).

    Returns (model, run config, the last val metrics: numbers only, {} without evaluation). `source`: the
    training pairs (default `train_source(config, data_dir)`); runs on the same data share one."""
    if source is None:  # first: a wrong dataset name fails before any model is built
        source = train_source(config, data_dir)
    files.makedirs(workdir)  # local or gs://
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

    def evaluate_val(model, step):  # no bootstrap intervals: point values to follow and to choose on
        return _numbers(evaluate_split(run_config, data_dir, config.data.val_split, model, mesh, num_resamples=0))

    try:
        result = trainer.train(data, eval_fn=evaluate_val if config.train.eval_every else None)
    finally:
        data.close()
        trainer.close()
    val = {k[len("eval/"):]: v for k, v in result.metrics.items() if k.startswith("eval/")}
    return result.model, run_config, val


def evaluate_split(run_config, data_dir, split, model, mesh, predictions_path: str | None = None,
                   dataset_config: str | None = None, *, num_resamples: int | None = None,
                   final: bool = False) -> dict:
    """Pairwise metrics (`caig_jax.eval.pairwise.evaluate`) of `model` on one split of `ctr_logs`.

    The run's test split (`data.test_split`) is refused unless `final` (only `final_evaluation` passes it).
    `num_resamples`: product-bootstrap resamples (default `eval.bootstrap_resamples`; 0: no intervals)."""
    if split == run_config.data.test_split and not final:
        raise ValueError(f"split {split!r} is the test split: it is read once, by the final evaluation "
                         f"(jobs.reward.final_evaluation); choose on {run_config.data.val_split!r}")
    if num_resamples is None:
        num_resamples = run_config.eval.bootstrap_resamples
    batches = pair_batches(run_config, data_dir, split, run_config.eval.batch_size, dataset_config)
    try:
        return evaluate(predict_batch, model, batches, mesh, predictions_path=predictions_path,
                        num_resamples=num_resamples)
    finally:
        batches.close()


def saved_final_evaluation(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
    """`<workdir>/final_evaluation.json` when it exists (None otherwise); refuses one made with another config."""
    path = os.path.join(workdir, FINAL_EVALUATION)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    check_saved_config(
        saved.get("config") or {}, config_json(config), source=path,
        what=f"{path}: this workdir's test split was already read by a final evaluation made with another config",
        fix="choose hyper-parameters on val, then run the final configuration in a new --workdir")
    return saved


def log_test_read(workdir: str, **record) -> None:
    """Appends one opening of the test split (`record` + the UTC time) to `<workdir>/test_reads.jsonl`, before it
    happens (process 0)."""
    if jax.process_index() == 0:
        record["time"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
        with open(os.path.join(workdir, TEST_READS), "a") as f:
            f.write(json.dumps(record) + "\n")


def final_evaluation(config, workdir: str, trained, data_dir: str, mesh, saved: dict | None = None,
                     evaluate_fn=None) -> dict:
    """The test split, once per run: `trained` is [(name, run_dir, model, run_config, val_metrics)].

    `evaluate_fn`: `evaluate_split`'s signature (default: it); the baselines job passes its own, so every kind of
    judge is read under this one protocol.

    Runs already in `saved` (an interrupted final evaluation) are not evaluated again. Each opening of the test
    split is logged to `<workdir>/test_reads.jsonl` before it happens, and `<workdir>/final_evaluation.json`
    (metrics, val metrics, config) is written after each run. Returns {name: test metrics}."""
    record = saved or {"by": FINAL, "split": config.data.test_split, "config": config_json(config),
                       "runs": {}, "val": {}, "complete": False}
    results = {}
    for name, run_dir, model, run_config, val in trained:
        if name in record["runs"]:
            log.info("%s: test already evaluated (%s); not read again", name, FINAL_EVALUATION)
            results[name] = record["runs"][name]
            continue
        log_test_read(workdir, run=name, split=config.data.test_split, by=FINAL)
        log.info("final evaluation of %s on %r (read once)", name, config.data.test_split)
        predictions = os.path.join(run_dir, "test_predictions.process{process}.npz")
        results[name] = (evaluate_fn or evaluate_split)(run_config, data_dir, config.data.test_split, model, mesh,
                                                        predictions_path=predictions, final=True)
        record["runs"][name] = reward_accuracy.to_jsonable(dict(results[name]))
        record["val"][name] = reward_accuracy.to_jsonable(val)
        if jax.process_index() == 0:
            write_json_atomic(os.path.join(workdir, FINAL_EVALUATION), record)
    record["complete"] = True
    record["time"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, FINAL_EVALUATION), record)
    return results


def protocol_markdown(config, record: dict) -> str:
    """The report's protocol section: what was chosen on val, and that test was read once."""
    val = record.get("val", {})
    lines = [
        f"Hyper-parameters are chosen on `{config.data.val_split}` only; `{config.data.test_split}` is read once, "
        f"by this final evaluation ({len(record['runs'])} run(s), logged in `{TEST_READS}`, metrics in "
        f"`{FINAL_EVALUATION}`), after every run had trained. Intervals resample products (clustered bootstrap).",
        "",
        "| run | val: paper's metric | val: true-ratio agreement | val: margin–true Spearman | val: top-1 regret |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, v in val.items():
        lines.append(f"| {name} | {reward_accuracy._pct(v.get('accuracy'))} | "
                     f"{reward_accuracy._pct(v.get('true_ratio_agreement'))} | "
                     f"{reward_accuracy.fmt_number(v.get('margin_true_spearman'))} | "
                     f"{reward_accuracy._pct(v.get('top1_regret'))} |")
    return "\n".join(lines)


def validation_report(config, workdir: str, trained, data_dir: str, mesh) -> dict:
    """A tuning run (`eval.final_test` False): every run on the val split with intervals, reported in
    `<workdir>/validation/`; the test split is not read. Returns {name: val metrics}."""
    results = {name: evaluate_split(run_config, data_dir, config.data.val_split, model, mesh)
               for name, _, model, run_config, _ in trained}
    main = results[trained[0][0]]
    if jax.process_index() == 0:
        out = os.path.join(workdir, "validation")
        sections = {"Ablation: point_weight (same data, same seed)": reward_accuracy.compare_runs(results)}
        title = f"Reward model on the {config.data.val_split!r} split (tuning run: test not read)"
        write_report(main, out, title=title, extra_sections=sections,
                     metrics_jsonl=os.path.join(workdir, "metrics.jsonl"))
        write_json_atomic(os.path.join(out, "report_ablation.json"),
                          reward_accuracy.to_jsonable({k: dict(v) for k, v in results.items()}))
        _summary(main)
    return results


def _summary(main) -> None:
    print(json.dumps({k: main.get(k) for k in HEADLINE_KEYS}, indent=2, default=float))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    validate(config)
    saved = saved_final_evaluation(config, workdir)
    runs = [(f"point_weight={config.loss.point_weight}", workdir, config.loss.point_weight)]
    runs += [(f"point_weight={w}", os.path.join(workdir, f"ablation_point_weight_{w}"), w)
             for w in config.ablation_point_weights if w != config.loss.point_weight]
    if saved is not None and saved.get("complete"):
        log.info("%s holds this config's final evaluation: reusing it (the test split is not read again)", workdir)
        if jax.process_index() == 0:
            _summary(saved["runs"][runs[0][0]])
        return saved["runs"]
    mesh = parallel.make_mesh(config.mesh.to_dict())
    log.info("mesh: %s", dict(mesh.shape))
    data_dir = ensure_data(config, workdir)
    source = train_source(config, data_dir)
    trained = []
    for name, run_dir, weight in runs:
        tokenizer_dir, first_tokenizer = os.path.join(run_dir, "tokenizer"), os.path.join(workdir, "tokenizer")
        if run_dir != workdir and os.path.isdir(first_tokenizer) and not os.path.exists(tokenizer_dir):
            shutil.copytree(first_tokenizer, tokenizer_dir, dirs_exist_ok=True)  # same data, same tokenizer: reuse
        log.info("training %s in %s", name, run_dir)
        model, run_config, val = train_one(config, run_dir, data_dir, mesh, weight, source)
        trained.append((name, run_dir, model, run_config, val))
    if not config.eval.final_test:
        return validation_report(config, workdir, trained, data_dir, mesh)
    results = final_evaluation(config, workdir, trained, data_dir, mesh, saved)
    main = results[runs[0][0]]
    if jax.process_index() == 0:
        with open(os.path.join(workdir, FINAL_EVALUATION)) as f:
            record = json.load(f)
        sections = {
            "Evaluation protocol": protocol_markdown(config, record),
            "Ablation: point_weight (same data, same seed)": reward_accuracy.compare_runs(results),
        }
        write_report(main, workdir, title="Reward model on held-out products (test split, final evaluation)",
                     extra_sections=sections, metrics_jsonl=os.path.join(workdir, "metrics.jsonl"))
        write_json_atomic(os.path.join(workdir, "report_ablation.json"),
                          reward_accuracy.to_jsonable({k: dict(v) for k, v in results.items()}))
        _summary(main)
    return results
