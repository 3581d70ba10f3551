"""The reward job end to end on a small synthetic marketplace: train, evaluate, report, ablation, resume."""

import json
import os

import numpy as np
import pytest

from caig_jax.data import market_datasets, reward_inputs
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
    metrics = reward.evaluate_split(run_config, data_dir, "test", model, mesh, dataset_config="market_wide")
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
