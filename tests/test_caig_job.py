"""The CAIG demo (`configs/caig.py`, `caig_jax.jobs.caig`): the comparison arithmetic by hand, then the whole
pipeline through `python -m caig_jax.main` on the `test` preset (every stage, the report's keys and plots), a
second run that recomputes nothing, a lost report made again without re-running a stage, and a changed config
refused."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from caig_jax.eval import caig_report
from caig_jax.eval.prompt_models import gap_closed, paired_difference, relative_lift

from ._smoke_utils import REPO


# ------------------------------------------------------------------------------------------------ by hand
def test_lift_gap_and_difference_by_hand():
    base = {"a": 0.02, "b": 0.04}
    method = {"a": 0.03, "b": 0.045}
    oracle = {"a": 0.05, "b": 0.05}
    lift = relative_lift(method, base, resamples=500)
    assert lift["mean"] == pytest.approx((0.03 + 0.045) / (0.02 + 0.04) - 1)  # +25%, ratio of means
    assert lift["n_products"] == 2
    assert lift["ci_low"] <= lift["mean"] <= lift["ci_high"]
    # Resampling 2 products: the interval's ends are the single-product lifts (+12.5%, +50%) at most.
    assert 0.125 - 1e-9 <= lift["ci_low"] and lift["ci_high"] <= 0.5 + 1e-9
    gap = gap_closed(method, base, oracle, resamples=500)
    assert gap["mean"] == pytest.approx((0.0375 - 0.03) / (0.05 - 0.03))  # 0.375 of the SFT -> oracle gap
    diff = paired_difference(method, base, resamples=500)
    assert diff["mean"] == pytest.approx(0.0075)
    # Only the products both sides have are compared.
    assert paired_difference({"a": 0.5, "c": 0.1}, {"a": 0.25, "b": 0.9})["mean"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="different products"):
        relative_lift({"a": 0.1}, {"b": 0.1})


def _evaluation(sft, dpo, pcpo, sib, oracle=0.05, brief=0.02):
    products = sorted(sft)

    def policy(ctr, sibling):
        return {"true_ctr_per_product": ctr, "true_ctr_greedy_per_product": ctr,
                "match_rate_sibling": {"per_product": sibling}, "match_rate_cross": {"per_product": sibling},
                "rm_win_rate_vs_sft": {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n_products": len(products)}}

    return {"split": "test", "products": products, "render": {"kind": "market", "size": 64, "seed": 0},
            "policies": {"sft": policy(sft, sib[0]), "dpo": policy(dpo, sib[1]), "dpo_pcpo": policy(pcpo, sib[2])},
            "random_on_brief": {p: {"true_ctr": [brief, brief]} for p in products},
            "oracle": {p: {"true_ctr": oracle} for p in products}}


def test_report_figures_and_targets_by_hand(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"item{k}" for k in range(40)]
    sft = {p: float(rng.uniform(0.02, 0.03)) for p in ids}
    dpo = {p: v * 1.05 for p, v in sft.items()}
    pcpo = {p: v * 1.2 for p, v in sft.items()}  # +20% on every product: the lift target is met
    sib = ({p: 0.5 for p in ids}, {p: 0.55 for p in ids}, {p: 0.7 for p in ids})  # +15 points over DPO
    monkeypatch.setattr(caig_report, "reward_model_metrics", lambda _: {})
    monkeypatch.setattr(caig_report, "round_curves", lambda _: {})
    config = ml_collections.ConfigDict({"seed": 0, "eval": {"samples": 2, "temperature": 1.0, "on_brief": 2,
                                                            "bootstrap_resamples": 300},
                                        "targets": {"lift_vs_sft": 0.10, "match_rate_gain": 0.10, "minutes": 15.0}})
    report = caig_report.build(config, str(tmp_path), _evaluation(sft, dpo, pcpo, sib), {"market": 600.0}, True)
    assert report["lift_vs_sft"]["dpo_pcpo"]["mean"] == pytest.approx(0.2)
    assert report["lift_vs_sft"]["dpo"]["mean"] == pytest.approx(0.05)
    assert report["match_rate_diff"]["dpo_pcpo_minus_dpo"]["mean"] == pytest.approx(0.15)
    assert report["true_ctr"]["oracle"]["mean"] == pytest.approx(0.05)
    assert report["true_ctr"]["random_on_brief"]["mean"] == pytest.approx(0.02)
    assert set(report["true_ctr"]) == {"random_on_brief", "sft", "dpo", "dpo_pcpo", "oracle"}
    assert report["targets"] == {"dpo_pcpo_lift_vs_sft": True, "dpo_pcpo_sibling_match_gain_vs_dpo": True,
                                 "dpo_pcpo_true_ctr_not_below_dpo": True, "wall_time_from_empty": True}
    # DPO + PCPO below DPO everywhere, a match gain of 5 points, 20 minutes: the three targets fail.
    worse = {p: v * 1.01 for p, v in sft.items()}
    sib_small = (sib[0], sib[1], {p: 0.6 for p in ids})
    report = caig_report.build(config, str(tmp_path), _evaluation(sft, dpo, worse, sib_small), {"sft": 1200.0}, True)
    assert report["targets"] == {"dpo_pcpo_lift_vs_sft": False, "dpo_pcpo_sibling_match_gain_vs_dpo": False,
                                 "dpo_pcpo_true_ctr_not_below_dpo": False, "wall_time_from_empty": False}


# ------------------------------------------------------------------------------------------------ end to end
def _main(workdir, *overrides):
    return subprocess.run([sys.executable, "-m", "caig_jax.main", "--config=configs/caig.py:test",
                           f"--workdir={workdir}", *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=1500, env={**os.environ, "PYTHONPATH": REPO})


def _mtimes(workdir):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(workdir) for f in files}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("caig"))
    out = _main(workdir)
    assert out.returncode == 0, out.stderr[-4000:]
    return workdir


@pytest.mark.slow
def test_every_stage_runs_and_the_report_has_its_figures(finished):
    with open(os.path.join(finished, "stages.json")) as f:
        stages = json.load(f)
    assert list(stages) == ["market", "sft", "reward", "dpo", "dpo_pcpo", "evaluation", "report"]
    assert len({entry["run"] for entry in stages.values()}) == 1  # one invocation ran them all
    with open(os.path.join(finished, "report.json")) as f:
        report = json.load(f)
    interval = {"mean", "ci_low", "ci_high", "n_products"}
    assert set(report["true_ctr"]) == {"random_on_brief", "sft", "dpo", "dpo_pcpo", "oracle"}
    assert all(set(v) == interval for v in report["true_ctr"].values())
    assert set(report["match_rate_sibling"]) == {"sft", "dpo", "dpo_pcpo"}
    assert all(np.isfinite(v["mean"]) for v in report["match_rate_sibling"].values())
    assert set(report["lift_vs_sft"]) >= {"dpo", "dpo_pcpo"} and set(report["lift_vs_sft"]["dpo"]) == interval
    assert set(report["match_rate_diff"]["dpo_pcpo_minus_dpo"]) == interval
    assert set(report["stage_seconds"]) == {"market", "sft", "reward", "dpo", "dpo_pcpo", "evaluation"}
    assert set(report["targets"]) >= {"dpo_pcpo_lift_vs_sft", "dpo_pcpo_sibling_match_gain_vs_dpo"}
    assert report["reward_model"]["true_ratio_agreement"] is not None
    assert len(report["rounds"]["dpo_pcpo"]["heldout"]["true_ctr"]) == 3  # the SFT PM + 2 rounds
    for name in ("report.md", "rounds.png", "ads_grid.png", "final_evaluation.json", "sft/report.md",
                 "reward/report.md", "dpo/report.md", "dpo_pcpo/report.md"):
        assert os.path.getsize(os.path.join(finished, name)) > 0, name
    with open(os.path.join(finished, "dpo", "config.json")) as f:
        assert json.load(f)["pcpo"]["weight"] == 0.0  # the DPO run is the PCPO ablation of the same config
    with open(os.path.join(finished, "test_reads.jsonl")) as f:
        assert len(f.readlines()) == 1  # the final evaluation read the held-out products once


@pytest.mark.slow
def test_a_finished_workdir_recomputes_nothing(finished):
    before = _mtimes(finished)
    out = _main(finished)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "nothing to do" in out.stderr
    assert _mtimes(finished) == before


@pytest.mark.slow
def test_a_lost_report_is_made_again_from_the_saved_evaluation(finished):
    evaluation = os.path.join(finished, "final_evaluation.json")
    stamp = os.stat(evaluation).st_mtime_ns
    with open(os.path.join(finished, "report.json")) as f:
        report = json.load(f)
    os.remove(os.path.join(finished, "report.json"))
    out = _main(finished)
    assert out.returncode == 0, out.stderr[-4000:]
    assert os.stat(evaluation).st_mtime_ns == stamp  # the evaluation stage did not run again
    with open(os.path.join(finished, "report.json")) as f:
        again = json.load(f)
    assert again["true_ctr"] == report["true_ctr"] and again["targets"] == report["targets"]


@pytest.mark.slow
def test_another_config_on_the_same_workdir_is_refused(finished):
    out = _main(finished, "--config.preference.rounds=3")
    assert out.returncode == 2
    assert "error:" in out.stderr and "preference.rounds" in out.stderr and "new --workdir" in out.stderr


@pytest.mark.slow
def test_a_workdir_made_before_a_config_key_existed_is_continued(finished):
    path = os.path.join(finished, "config.json")
    with open(path) as f:
        config = json.load(f)
    older = json.loads(json.dumps(config))
    del older["preference"]["model"]["attention"]
    with open(path, "w") as f:
        json.dump(older, f)
    out = _main(finished)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "before these config keys existed" in out.stderr and "preference.model.attention=" in out.stderr
    with open(path) as f:
        assert json.load(f) == config  # written back whole: later runs are held to the added key too


# ------------------------------------------------------------------------------------------------ generate
def _generate(workdir, *overrides):
    return subprocess.run([sys.executable, "-m", "caig_jax.main", "--config=configs/generate.py:tiny",
                           f"--workdir={workdir}", *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": REPO})


@pytest.mark.slow
def test_generate_ranks_a_trained_pms_ads_with_the_reward_model(finished, tmp_path):
    out = _generate(tmp_path, f"--config.products={finished}/market/market/products/products.json",
                    f"--config.prompt_model={finished}/dpo_pcpo", f"--config.reward_workdir={finished}/reward",
                    "--config.limit=3", "--config.samples=3")
    assert out.returncode == 0, out.stderr[-4000:]
    with open(tmp_path / "prompts.json") as f:
        result = json.load(f)
    assert len(result["products"]) == 3
    with open(os.path.join(finished, "market", "market", "products", "products.json")) as f:
        splits = {e["id"]: e["split"] for e in json.load(f)}
    for product in result["products"]:
        assert splits[product["id"]] == "test"
        wins = [a["rm_wins"] for a in product["ads"]]
        assert sum(wins) == 3 and wins == sorted(wins, reverse=True)  # 3 pairs, best first
        for pair in product["pairs"]:  # every verdict is the RM's own decision rule on its logits
            left_better = pair["rm_logits"][0] >= pair["rm_logits"][1]
            assert pair["winner"] == (pair["left"] if left_better else pair["right"])
        for ad in product["ads"]:
            assert (tmp_path / ad["ad"]).exists() and isinstance(ad["prompt"], str)
    assert (tmp_path / "contact_sheet.png").stat().st_size > 0


@pytest.mark.slow
def test_generate_reads_a_transformers_llava_next_folder(finished, tmp_path):
    out = _generate(tmp_path, f"--config.products={finished}/market/market/products/products.json",
                    f"--config.prompt_model={finished}/sft/export", "--config.reward_workdir=",
                    "--config.limit=2", "--config.samples=2")
    assert out.returncode == 0, out.stderr[-4000:]
    with open(tmp_path / "prompts.json") as f:
        result = json.load(f)
    assert [len(p["ads"]) for p in result["products"]] == [2, 2]
    assert not result["products"][0]["ranked_by_rm"]


@pytest.mark.parametrize("problem", ["missing image", "no alpha", "empty caption"])
def test_generate_stops_on_a_bad_product_before_loading_a_model(tmp_path, problem):
    from PIL import Image

    from caig_jax.errors import UserError
    from caig_jax.jobs import generate

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[8:24, 8:24] = 200
    Image.fromarray(rgba).save(tmp_path / "good.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "rgb.png")
    bad = {"missing image": {"id": "b", "image": "nope.png", "new_caption": "a lamp"},
           "no alpha": {"id": "b", "image": "rgb.png", "new_caption": "a lamp"},
           "empty caption": {"id": "b", "image": "good.png", "new_caption": " "}}[problem]
    (tmp_path / "products.json").write_text(json.dumps([{"id": "a", "image": "good.png", "title": "a vase"}, bad]))
    model_dir = tmp_path / "pm"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")  # loading this would fail differently: it is never reached
    c = _load_generate_config()
    c.products, c.prompt_model, c.reward_workdir, c.split = str(tmp_path / "products.json"), str(model_dir), "", ""
    with pytest.raises(UserError) as e:
        generate.run(c, str(tmp_path / "out"))
    assert "entry 1" in str(e.value) or "nope.png" in str(e.value) or "rgb.png" in str(e.value)
    assert not (tmp_path / "out").exists()


def _load_generate_config():
    from caig_jax.config_files import load_config

    return load_config(os.path.join(REPO, "configs", "generate.py:tiny"))


def test_generate_rejects_bf16_parameters_under_float32_compute():
    from caig_jax.config_checks import ConfigError
    from caig_jax.jobs import generate

    c = _load_generate_config()
    c.param_dtype = "bfloat16"
    with pytest.raises(ConfigError, match="param_dtype"):
        generate.validate(c)
    c.dtype, c.render.dtype = "bfloat16", "float16"
    with pytest.raises(ConfigError, match="render.dtype"):
        generate.validate(c)
