"""The reward job end to end on a small synthetic marketplace: train, evaluate, report, ablation, resume."""

import json
import logging
import os
import sys

import numpy as np
import pytest

from caig_jax import config_files
from caig_jax.data import market_datasets, reward_inputs
from caig_jax.errors import UserError
from caig_jax.jobs import reward
from caig_jax.main import load_config
from caig_jax.metrics import read_jsonl
from caig_jax.models.reward import predict_batch
from caig_jax.trainers.reward import load_trained

from ._smoke_utils import REPO

STEPS = 60


@pytest.fixture(scope="module")
def small_market(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("market"))
    config = load_config(os.path.join(REPO, "configs", "market.py:tiny"))
    config.market.num_products = 60
    config.market.contact_sheet_products = 4
    config.pairs.image_size = 32
    market_datasets.build_world(config, root, verbose=False)
    return os.path.join(root, "tfds")


def _config(data_dir, **train):
    c = load_config(os.path.join(REPO, "configs", "reward.py:tiny"))
    c.data.dir = data_dir
    c.train.steps = STEPS
    c.train.batch_size = 16
    c.train.warmup_steps = 10
    c.train.log_every = 5
    c.train.checkpoint_every = 30
    c.eval.batch_size = 32
    c.ablation_point_weights = (0.0,)
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


@pytest.fixture(scope="module")
def trained(small_market, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reward_run"))
    results = reward.run(_config(small_market), workdir)
    return workdir, results


@pytest.mark.slow
def test_job_writes_report_with_ablation_and_plots(trained):
    workdir, results = trained
    assert set(results) == {"point_weight=0.5", "point_weight=0.0"}
    report = json.load(open(os.path.join(workdir, "report.json")))
    for key in ("accuracy", "accuracy_ci", "per_category", "ctr_accuracy", "oracle_accuracy", "target_met"):
        assert key in report["metrics"], key
    ablation = json.load(open(os.path.join(workdir, "report_ablation.json")))
    assert set(ablation) == {"point_weight=0.5", "point_weight=0.0"}
    markdown = open(os.path.join(workdir, "report.md")).read()
    assert "point_weight=0.0" in markdown and "point_weight=0.5" in markdown
    plots = os.listdir(os.path.join(workdir, "plots"))
    assert any(p.startswith("calibration") for p in plots)
    assert os.path.exists(os.path.join(workdir, "ablation_point_weight_0.0", "checkpoints", str(STEPS)))


@pytest.mark.slow
def test_training_loss_falls_and_fits_the_training_pairs(trained, small_market):
    workdir, _ = trained
    losses = [r["train/loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


@pytest.mark.slow
def test_rerun_resumes_and_sweep_interface_restores_the_model(trained, small_market):
    workdir, results = trained
    from caig_jax import parallel

    mesh = parallel.make_mesh({"data": 8})
    model, config = load_trained(workdir, mesh)
    # the tiny decoder's RoPE base comes from the run's config (not Llama's default 10000)
    assert model.backbone.config.text_config.rope_theta == config.model.tiny.rope_theta == 30.0
    batches = reward_inputs.pair_batches(config, small_market, "test", 32)
    batch = next(iter(batches))
    out = predict_batch(model, batch, mesh)
    assert out["cls_logits"].shape == (batch["label"].shape[0], 2)


@pytest.mark.slow
def test_short_run_beats_chance_on_held_out_products(tmp_path):
    """Trained through the job's entry point for 400 steps (about 2 CPU-minutes), the model orders the
    clearly-ordered pairs of products it never saw better than chance. (CAIG's 1.05-1.20 test pairs need
    much longer training to separate from chance; the held-out wide pairs measure what was learnt.)"""
    root = str(tmp_path)
    market = load_config(os.path.join(REPO, "configs", "market.py:tiny"))
    market.market.num_products = 240
    market.market.contact_sheet_products = 4
    market.pairs.image_size = 32
    market.train_pairs.splits = ("train", "test")  # held-out wide pairs to measure on
    market_datasets.build_world(market, root, verbose=False)
    data_dir = os.path.join(root, "tfds")

    config = load_config(os.path.join(REPO, "configs", "reward.py:tiny"))
    config.data.dir = data_dir
    config.train.steps = 400
    config.train.checkpoint_every = 400
    config.ablation_point_weights = ()
    reward.run(config, os.path.join(root, "run"))

    from caig_jax import parallel

    mesh = parallel.make_mesh({"data": 8})
    model, run_config = load_trained(os.path.join(root, "run"), mesh)
    metrics = reward.evaluate_split(run_config, data_dir, "test", model, mesh, dataset_config="market_wide",
                                    final=True)
    assert metrics["n"] > 500
    assert metrics["accuracy_ci"][0] > 0.5, (metrics["accuracy"], metrics["accuracy_ci"])


def test_missing_train_config_names_the_option(small_market, tmp_path):
    config = _config(small_market)
    config.data.train_config = "no_such_config"
    with pytest.raises(Exception, match="config.data.train_config='no_such_config'"):
        reward.run(config, str(tmp_path))


def test_ablation_run_uses_the_first_runs_tokenizer(trained):
    workdir, _ = trained
    first = os.path.join(workdir, "tokenizer", "tokenizer.json")
    ablation = os.path.join(workdir, "ablation_point_weight_0.0", "tokenizer", "tokenizer.json")
    with open(first) as a, open(ablation) as b:
        assert a.read() == b.read()


@pytest.mark.slow
def test_own_marketplace_is_checked_against_its_files_on_every_run(tmp_path):
    """With data.dir empty the job builds the marketplace into its workdir; a later run reuses it only while the
    files it was built from are unchanged, and names the nested option that rebuilds it."""
    from caig_jax.data.ctr_logs import DataError

    config = load_config(os.path.join(REPO, "configs", "reward.py:tiny"))
    market = config.data.market
    market.market.num_products, market.market.num_workers, market.market.contact_sheet_products = 20, 0, 3
    market.market.image_size, market.market.product_size, market.pairs.image_size = 32, 48, 16
    workdir = str(tmp_path)
    data_dir = reward.ensure_data(config, workdir)
    info = os.path.join(data_dir, "ctr_logs", "market", "1.0.0", "dataset_info.json")
    built = os.path.getmtime(info)
    assert reward.ensure_data(config, workdir) == data_dir and os.path.getmtime(info) == built
    logs = os.path.join(workdir, "market", "market", "logs", "list", "val_data_list.txt")  # <workdir>/market: the world
    with open(logs, "a") as f:
        f.write("item99999\titem00001_00.png\t20240601\t5000\t50\n")
    with pytest.raises(DataError, match=r"val_data_list\.txt \(size") as e:
        reward.ensure_data(config, workdir)
    assert "--config.data.market.build.overwrite=True" in e.value.fix


def _in_final_evaluation() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "final_evaluation" and frame.f_globals.get("__name__") == reward.__name__:
            return True
        frame = frame.f_back
    return False


def test_test_split_is_read_once_by_the_final_evaluation(small_market, tmp_path, monkeypatch, caplog):
    """Every read of a split goes through `reward_inputs.reward_pair_source` (tokenizer corpus, training pairs,
    val and test batches). The test split is opened once per run, by the final evaluation, after all training
    and validation; a re-run of the finished workdir reads nothing and returns the saved report; a re-run with
    another config is refused."""
    reads = []
    original = reward_inputs.reward_pair_source

    def recording(data_dir, split, config_name=None):
        reads.append((split, _in_final_evaluation()))
        return original(data_dir, split, config_name)

    monkeypatch.setattr(reward_inputs, "reward_pair_source", recording)
    config = _config(small_market, steps=6, eval_every=3, checkpoint_every=6)
    config.eval.bootstrap_resamples = 50
    workdir = str(tmp_path / "run")
    results = reward.run(config, workdir)

    test_reads = [i for i, (split, _) in enumerate(reads) if split == "test"]
    assert len(test_reads) == 2, reads  # main run + the point_weight=0 ablation
    assert all(reads[i][1] for i in test_reads), reads  # ... both inside final_evaluation
    assert min(test_reads) > max(i for i, (split, _) in enumerate(reads) if split != "test"), reads
    assert {"train", "val"} <= {split for split, _ in reads}
    with open(os.path.join(workdir, reward.TEST_READS)) as f:
        logged = [json.loads(line) for line in f]
    assert [(r["run"], r["split"], r["by"]) for r in logged] == [
        ("point_weight=0.5", "test", "final evaluation"), ("point_weight=0.0", "test", "final evaluation")]
    saved = json.load(open(os.path.join(workdir, reward.FINAL_EVALUATION)))
    assert saved["complete"] and set(saved["runs"]) == set(results) and set(saved["val"]) == set(results)
    main = saved["runs"]["point_weight=0.5"]
    for key in ("accuracy", "accuracy_product_ci", "oracle_accuracy", "true_ratio_agreement",
                "true_ratio_agreement_ci", "margin_true_spearman", "margin_true_spearman_ci", "top1_regret"):
        assert key in main, key
    assert saved["val"]["point_weight=0.5"]["n"] > 0  # the val metrics of the end of training
    report = open(os.path.join(workdir, "report.md")).read()
    assert "read once" in report and "## Headline metrics" in report and "## Evaluation protocol" in report

    # A finished workdir: nothing is read, the saved report comes back.
    del reads[:]
    again = reward.run(config, workdir)
    assert reads == [] and json.dumps(again, sort_keys=True) == json.dumps(saved["runs"], sort_keys=True)
    assert len(open(os.path.join(workdir, reward.TEST_READS)).readlines()) == 2
    # Another config on the same workdir would read test again: refused, nothing read.
    config.train.learning_rate = 5e-4
    with pytest.raises(UserError, match="train.learning_rate"):
        reward.run(config, workdir)
    assert reads == []
    # A workdir evaluated before a config key existed is reused with the key at this run's value (logged).
    config.train.learning_rate = saved["config"]["train"]["learning_rate"]
    del saved["config"]["model"]["attention"]
    with open(os.path.join(workdir, reward.FINAL_EVALUATION), "w") as f:
        json.dump(saved, f)
    with caplog.at_level(logging.WARNING, logger=config_files.__name__):
        again = reward.run(config, workdir)
    assert reads == [] and json.dumps(again, sort_keys=True) == json.dumps(saved["runs"], sort_keys=True)
    assert "before these config keys existed; going on with them at: model.attention=" in caplog.text


def test_evaluate_split_refuses_the_test_split_outside_the_final_evaluation():
    config = load_config(os.path.join(REPO, "configs", "reward.py:tiny"))
    with pytest.raises(ValueError, match="read once, by the final evaluation"):
        reward.evaluate_split(config, "/nonexistent", config.data.test_split, None, None)
