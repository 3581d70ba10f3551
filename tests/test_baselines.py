"""The paper's reward-model baselines: losses by hand, decision rule, creative lists, the job through main, the
eval sweep on a baseline checkpoint."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from caig_jax import parallel
from caig_jax.data import market_datasets
from caig_jax.data.creative_lists import ListBatches, attribute_text, creative_lists
from caig_jax.data.loader import reward_pair_source
from caig_jax.main import load_config
from caig_jax.metrics import read_jsonl
from caig_jax.models.cg4ctr import CG4CTR, CG4CTRConfig
from caig_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from caig_jax.models.vam import VAM, VAMConfig
from caig_jax.objectives.baselines import cg4ctr_loss, smoothed_ctr, vam_loss
from caig_jax.trainers import baselines

from ._smoke_utils import REPO

# A list of 3 creatives and a padded slot, plus a list of 2 (and 2 padded slots).
CLICKS = [[30.0, 20.0, 12.0, 0.0], [5.0, 9.0, 0.0, 0.0]]
IMPRESSIONS = [[1000.0, 1000.0, 600.0, 0.0], [400.0, 300.0, 0.0, 0.0]]
MASK = [[True, True, True, False], [True, True, False, False]]
SCORES = [[0.3, -0.2, 0.5, 7.0], [-1.0, 1.0, 3.0, 3.0]]
POINTS = [[2.0, 1.0, 3.0, 9.0], [1.5, 2.5, 9.0, 9.0]]


def _softmax(x):
    e = [math.exp(v - max(x)) for v in x]
    return [v / sum(e) for v in e]


def test_vam_loss_by_hand():
    a, b = 1.0, 39.0
    listwise, squares = [], []
    for clicks, imps, scores, points, mask in zip(CLICKS, IMPRESSIONS, SCORES, POINTS, MASK):
        n = sum(mask)
        s = [(c + a) / (i + a + b) for c, i in zip(clicks[:n], imps[:n])]
        label = _softmax([1000 * v for v in s])
        p = _softmax(scores[:n])
        listwise.append(-sum(y * math.log(q) for y, q in zip(label, p)))
        squares += [(pt - 100 * v) ** 2 for pt, v in zip(points[:n], s)]
    expected = sum(listwise) / 2 + 0.5 * sum(squares) / len(squares)
    loss, metrics = vam_loss(jnp.asarray(SCORES), jnp.asarray(POINTS), jnp.asarray(CLICKS), jnp.asarray(IMPRESSIONS),
                             jnp.asarray(MASK), prior_clicks=a, prior_non_clicks=b)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["listwise"]), sum(listwise) / 2, rtol=1e-5)
    # list 1: the best smoothed CTR is creative 0 (31/1040), the top score creative 2; list 2: creative 1 (10/340) both
    assert float(metrics["top1_accuracy"]) == 0.5
    np.testing.assert_allclose(float(smoothed_ctr(30.0, 1000.0, a, b)), 31 / 1040, rtol=1e-6)


def test_cg4ctr_loss_by_hand():
    listwise, point_terms = [], []
    for clicks, imps, scores, mask in zip(CLICKS, IMPRESSIONS, SCORES, MASK):
        n = sum(mask)
        ctr = [c / i for c, i in zip(clicks[:n], imps[:n])]
        q = [c / sum(ctr) for c in ctr]
        w = [i / (sum(imps[:n]) / n) for i in imps[:n]]
        p = _softmax(scores[:n])
        listwise.append(-sum(wi * qi * math.log(pi) for wi, qi, pi in zip(w, q, p)))
        point_terms += [wi * (1 / (1 + math.exp(-s)) - c) ** 2 for wi, s, c in zip(w, scores[:n], ctr)]
    expected = 0.9 * sum(listwise) / 2 + 0.1 * sum(point_terms) / len(point_terms)
    loss, metrics = cg4ctr_loss(jnp.asarray(SCORES), jnp.asarray(CLICKS), jnp.asarray(IMPRESSIONS), jnp.asarray(MASK))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["point"]), sum(point_terms) / len(point_terms), rtol=1e-5)


def test_padded_slots_and_a_shift_of_scores_do_not_change_the_listwise_terms():
    args = (jnp.asarray(CLICKS), jnp.asarray(IMPRESSIONS), jnp.asarray(MASK))
    padded = jnp.asarray(SCORES).at[:, 3].set(-50.0)
    base = cg4ctr_loss(jnp.asarray(SCORES), *args)[1]["listwise"]
    assert float(cg4ctr_loss(padded, *args)[1]["listwise"]) == pytest.approx(float(base), rel=1e-6)
    assert float(cg4ctr_loss(jnp.asarray(SCORES) + 2.0, *args)[1]["listwise"]) == pytest.approx(float(base), rel=1e-5)


def _tiny_vam():
    return VAM(VAMConfig(widths=(8, 16), blocks=(1, 1), stem_kernel=3, stem_stride=1, stem_pool=False, norm_groups=4),
               rngs=nnx.Rngs(0))


def _tiny_cg4ctr():
    return CG4CTR(CG4CTRConfig(
        vision=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=8),
        text=CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=6, eos_token_id=2, pad_token_id=0),
        fusion_layers=1, fusion_heads=2, head_hidden=8), rngs=nnx.Rngs(0))


def _pair_batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 50, (n, 6)).astype(np.int32)
    return {"left_image": rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
            "right_image": rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
            "title_ids": ids, "title_mask": np.ones((n, 6), np.int32), "caption_ids": ids[:, ::-1].copy(),
            "caption_mask": np.ones((n, 6), np.int32)}


@pytest.mark.parametrize("make", [_tiny_vam, _tiny_cg4ctr], ids=["vam", "cg4ctr"])
def test_pair_decision_is_the_higher_creative_score(make):
    """cls_logits = [score(left), score(right)]: swapping the creatives swaps the logits, a pair of one creative
    with itself ties (left wins ties), and each score is the model's score of that creative alone."""
    model, mesh = make(), parallel.make_mesh({"data": 8})
    batch = _pair_batch()
    out = baselines.predict_batch(model, batch, mesh)
    swapped = dict(batch, left_image=batch["right_image"], right_image=batch["left_image"])
    np.testing.assert_allclose(baselines.predict_batch(model, swapped, mesh)["cls_logits"], out["cls_logits"][:, ::-1],
                               rtol=1e-5, atol=1e-6)
    text = {k: batch[k] for k in baselines.TEXT_KEYS}
    alone, ctr = baselines._creative_scores(model, jnp.asarray(batch["left_image"]), text)
    np.testing.assert_allclose(out["cls_logits"][:, 0], np.asarray(alone), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["ctr_pred"][:, 0], np.asarray(ctr), rtol=1e-5, atol=1e-7)
    same = baselines.predict_batch(model, dict(batch, right_image=batch["left_image"]), mesh)["cls_logits"]
    assert np.all(same[:, 0] == same[:, 1])


def test_baseline_parameters_carry_logical_axes():
    for model in (_tiny_vam(), _tiny_cg4ctr()):
        params = nnx.state(model, nnx.Param)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
            assert getattr(leaf, "out_sharding", None) is not None, path


def test_calibration_plot_takes_a_bin_whose_pairs_all_went_one_way(tmp_path):
    """Three pairs in one bin, all won by the right side: Wilson's lower bound is 5.6e-17, not 0 (a CG4CTR run's
    report crashed on it)."""
    from caig_jax.eval.plots import calibration_plot

    logits = np.asarray([[3.0, 0.0]] * 3 + [[0.0, 0.1]] * 5)
    path = calibration_plot(logits, np.asarray([1, 1, 1, 1, 0, 1, 1, 0]), str(tmp_path / "calibration.png"))
    assert os.path.getsize(path) > 0


def test_paper_sized_vam_is_resnet18():
    """`configs/baselines.py:vam` builds (abstractly) ResNet-18: torchvision's 11,689,512 parameters without its
    1000-way classifier (513,000; GroupNorm has BatchNorm's scale and bias) plus the score and point heads (2 x 513);
    a 224 px creative gives one score and one point prediction."""
    config = load_config(os.path.join(REPO, "configs", "baselines.py:vam"))
    model = nnx.eval_shape(lambda: VAM(baselines.vam_config(config), rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == 11_689_512 - 513_000 + 2 * 513
    score, point = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.uint8))
    assert score.shape == point.shape == (2,)


def test_attribute_text():
    assert attribute_text("water_bottle", '{"colour": "teal", "brand": "Aurora"}') == (
        "category: water bottle; colour: teal; brand: Aurora")
    assert attribute_text("mug", "plain words") == "category: mug; attributes: plain words"


# ------------------------------------------------------------------------------------------------ on a world
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 240-product marketplace; its test split also gets wide pairs (clearly ordered) to measure learning on."""
    root = str(tmp_path_factory.mktemp("baselines_market"))
    config = load_config(os.path.join(REPO, "configs", "market.py:tiny"))
    config.market.num_products = 240
    config.market.contact_sheet_products = 4
    config.pairs.image_size = 32
    config.train_pairs.splits = ("train", "test")
    market_datasets.build_world(config, root, verbose=False)
    return os.path.join(root, "tfds")


@pytest.mark.slow
def test_creative_lists_regroup_the_training_pairs(world):
    source = reward_pair_source(world, "train", "market_wide")
    lists = creative_lists(source, 16)
    ex = source[0]
    item = ex["item_id"].decode() if isinstance(ex["item_id"], bytes) else ex["item_id"]
    left = ex["left_id"].decode() if isinstance(ex["left_id"], bytes) else ex["left_id"]
    i = lists.ids.index(left)
    assert lists.clicks[i] / lists.impressions[i] == pytest.approx(float(ex["ctr"][0]), rel=1e-6)
    assert lists.impressions[i] == int(ex["impressions"][0])
    assert i in lists.lists[lists.items.index(item)]
    assert lists.images.shape[1:] == (16, 16, 3)
    assert sorted(np.concatenate(lists.lists).tolist()) == list(range(len(lists.ids)))  # every creative once
    batches = ListBatches(lists, 4, seed=3)
    first = [next(batches) for _ in range(3)]
    batches.set_state({"position": 1, "seed": 3, "batch_size": 4})
    np.testing.assert_array_equal(next(batches)["clicks"], first[1]["clicks"])  # resumes exactly there
    assert first[0]["mask"].sum(1).min() >= 2


def _main(args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "caig_jax.main", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**env, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module", params=["vam_tiny", "cg4ctr_tiny"])
def trained(request, world, tmp_path_factory):
    """Each baseline trained through `caig_jax.main` for 300 steps (its final evaluation reads test once)."""
    workdir = str(tmp_path_factory.mktemp(request.param))
    _main([f"--config=configs/baselines.py:{request.param}", f"--workdir={workdir}", f"--config.data.dir={world}",
           "--config.train.steps=300", "--config.train.eval_every=300", "--config.train.checkpoint_every=300",
           "--config.eval.bootstrap_resamples=50"])
    return workdir


@pytest.mark.slow
def test_short_run_through_main_beats_chance_on_held_out_products(world, trained):
    """The baseline orders the clearly-ordered pairs of products it never saw better than chance (the product-
    bootstrap lower bound is above 0.5); the job read test once and wrote its report."""
    reads = [json.loads(line) for line in open(os.path.join(trained, "test_reads.jsonl"))]
    assert len(reads) == 1 and reads[0]["split"] == "test"
    assert os.path.exists(os.path.join(trained, "report.md"))
    mesh = parallel.make_mesh({"data": 8})
    model, config = baselines.load_trained(trained, mesh)
    from caig_jax.jobs.baselines import evaluate_split

    metrics = evaluate_split(config, world, "test", model, mesh, dataset_config="market_wide", final=True,
                             num_resamples=200)
    assert metrics["n"] > 500
    assert metrics["accuracy_ci"][0] > 0.5, (metrics["accuracy"], metrics["accuracy_ci"])


@pytest.mark.slow
def test_eval_sweep_accepts_a_baseline_checkpoint(trained, tmp_path):
    """`model_kind=baseline`: the sweep restores the checkpoint and reproduces the job's own val evaluation."""
    sweep = str(tmp_path / "sweep")
    _main(["--config=configs/eval_sweep.py:tiny", f"--workdir={sweep}", f"--config.checkpoints={trained}",
           "--config.model_kind=baseline", "--config.eval_sets=val=self:val", "--config.write_reports=False"])
    row = json.load(open(os.path.join(sweep, "results.json")))[0]
    val = [r for r in read_jsonl(os.path.join(trained, "metrics.jsonl")) if "eval/accuracy" in r][-1]
    assert row["step"] == 300 and row["n"] == val["eval/n"]
    assert row["accuracy"] == pytest.approx(val["eval/accuracy"], abs=1e-9)
    assert row["margin_true_spearman"] == pytest.approx(val["eval/margin_true_spearman"], abs=1e-5)
