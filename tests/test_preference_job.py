"""The preference job (DPO + PCPO rounds) end to end on a small marketplace: a tiny SFT PM and a tiny reward
model are trained first (few steps: the point is the wiring, not their quality), then one round runs through
`caig_jax.jobs.preference.run`, is checked against the RM's own verdicts, and a SIGTERM inside the round resumes
to the uninterrupted run's parameters without sampling the round again."""

import json
import os
import signal

import numpy as np
import pytest

from caig_jax.config_files import load_config
from caig_jax.data import market_datasets
from caig_jax.eval import prompt_models
from caig_jax.jobs import preference, reward, sft
from caig_jax.objectives.reward import prefers_left
from caig_jax.trainers.trainer import Preempted, Session

from ._smoke_utils import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(tfds dir, SFT workdir, reward workdir) on one 80-product marketplace."""
    root = str(tmp_path_factory.mktemp("po"))
    market = load_config(os.path.join(REPO, "configs", "market.py:tiny"))
    market.market.num_products = 80
    market.market.contact_sheet_products = 4
    market.pairs.image_size = 32
    market_datasets.build_world(market, os.path.join(root, "world"), verbose=False)
    data_dir = os.path.join(root, "world", "tfds")

    s = load_config(os.path.join(REPO, "configs", "sft.py:tiny"))
    s.data.dir = data_dir
    s.train.steps, s.train.checkpoint_every, s.train.warmup_steps = 30, 30, 5
    s.eval.samples, s.eval.on_brief = 1, 2
    s.export.enabled = False
    sft.run(s, os.path.join(root, "sft"))

    r = load_config(os.path.join(REPO, "configs", "reward.py:tiny"))
    r.data.dir = data_dir
    r.train.steps, r.train.checkpoint_every, r.train.batch_size = 30, 30, 16
    r.ablation_point_weights = ()
    reward.run(r, os.path.join(root, "reward"))
    return data_dir, os.path.join(root, "sft"), os.path.join(root, "reward")


def _config(trained, **overrides):
    _, sft_dir, reward_dir = trained
    c = load_config(os.path.join(REPO, "configs", "preference.py:tiny"))
    c.sft_workdir, c.reward_workdir = sft_dir, reward_dir
    c.rounds, c.products_per_round, c.steps_per_round = 1, 8, 3
    c.train.batch_size, c.train.checkpoint_every = 8, 100
    c.eval.products, c.eval.samples = 6, 1
    for key, value in overrides.items():
        setattr(c, key, value)
    return c


def _params(workdir):
    """The latest checkpoint's per-leaf fingerprints of the trained parameters (equal digests: equal bits)."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                    item_names=("state", "data", "meta", "fingerprint"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step()
    record = manager.restore(step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore())).fingerprint
    manager.close()
    return {k: v for k, v in record["leaves"].items() if k.startswith("params/")}


@pytest.fixture(scope="module")
def uninterrupted(trained, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("po_run"))
    return workdir, preference.run(_config(trained), workdir)


def test_round_chooses_what_the_reward_model_prefers(uninterrupted, trained):
    workdir, report = uninterrupted
    with open(os.path.join(workdir, "rounds", "0", "samples.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 8
    config = _config(trained)
    from caig_jax import parallel

    mesh = parallel.make_mesh(config.mesh.to_dict())
    judge = prompt_models.Judge(config.reward_workdir, mesh)
    market = prompt_models.World(config.render, preference.build_policy(config, mesh)[1].data.market_dir, mesh)
    for rec in records:
        (pair,) = rec["pairs"]  # N = 2: one pair per product
        lg = judge.logits(market, [rec["product"]], [rec["prompts"][pair["left"]]], [rec["prompts"][pair["right"]]])[0]
        np.testing.assert_allclose(lg, pair["rm_logits"], rtol=1e-4, atol=1e-5)
        winner = pair["left"] if prefers_left(lg[0], lg[1]) else pair["right"]
        assert rec["chosen"] == winner and rec["rejected"] == 1 - winner
        assert len(rec["true_ctr"]) == 2 and all(0 < c < 1 for c in rec["true_ctr"])
    assert os.path.exists(os.path.join(workdir, "rounds", "0", "grid.png"))
    for key in ("sft", "rounds", "final"):
        assert key in report
    assert {"true_ctr", "match_rate_sibling", "rm_win_rate_vs_sft"} <= set(report["rounds"][0])
    metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert any("train/rewards/accuracies" in m and "train/pcpo/loss" in m for m in metrics)


def test_sigterm_mid_round_resumes_to_the_same_parameters(uninterrupted, trained, tmp_path, monkeypatch):
    reference_dir, _ = uninterrupted
    workdir = str(tmp_path / "preempted")
    real = Session.run_step

    def interrupted(self, batch):
        if self.trainer.current_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batch)

    monkeypatch.setattr(Session, "run_step", interrupted)
    with pytest.raises(Preempted):
        preference.run(_config(trained), workdir)
    monkeypatch.setattr(Session, "run_step", real)
    samples = open(os.path.join(workdir, "rounds", "0", "samples.jsonl")).read()
    preference.run(_config(trained), workdir)
    assert open(os.path.join(workdir, "rounds", "0", "samples.jsonl")).read() == samples  # not sampled again
    assert samples == open(os.path.join(reference_dir, "rounds", "0", "samples.jsonl")).read()
    ours, ref = _params(workdir), _params(reference_dir)
    assert ours.keys() == ref.keys()
    assert ours == ref


def test_world_gives_the_prompt_model_the_image_it_saw_in_sft(trained):
    """The rounds, the demo's evaluation and the generate job ask the PM about the product image exactly as the SFT
    conversations showed it: the cut-out over white (converted plainly to RGB, it had been on black). The generate
    job reads product images with the same `ctr_logs.load_rgb`."""
    from caig_jax import parallel
    from caig_jax.data.sft_inputs import decode_image, read_conversations
    from caig_jax.eval.sft import PROMPT_FAMILY

    data_dir, _, _ = trained
    mesh = parallel.make_mesh({"data": 1}, devices=jax_devices()[:1])
    market = prompt_models.World(_config(trained).render, os.path.join(os.path.dirname(data_dir), "market"), mesh)
    seen = {}
    for record in read_conversations(data_dir, "test", None):
        if record.family == PROMPT_FAMILY and record.product not in seen:  # (other families show ads)
            seen[record.product] = decode_image(record.image)
    assert len(seen) >= 8
    for pid, image in seen.items():
        np.testing.assert_array_equal(market.pm_image(pid), image)
    assert (market.pm_image(pid)[0, 0] == 255).all()  # the corner is background: white


def test_sd_renderer_world_inpaints_around_the_product(trained, tmp_path):
    """render.kind='sd': ads from the JAX SD + ControlNet renderer (tiny random weights), scored by the truth."""
    from caig_jax import parallel
    from caig_jax.jobs import render as render_job

    data_dir, _, _ = trained
    sd_path, controlnet_path = render_job.write_tiny_sd(str(tmp_path / "sd"))
    config = _config(trained)
    config.render.kind, config.render.sd_path, config.render.controlnet_path = "sd", sd_path, controlnet_path
    config.render.steps = 2
    mesh = parallel.make_mesh({"data": 1}, devices=jax_devices()[:1])
    market = prompt_models.World(config.render, os.path.join(os.path.dirname(data_dir), "market"), mesh)
    pid = market.products("train")[0]
    ad = market.ad(pid, "wooden kitchen counter, warm lighting")
    assert ad.dtype == np.uint8 and ad.shape[-1] == 3 and ad.shape[0] == ad.shape[1]
    assert market.ad(pid, "wooden kitchen counter, warm lighting") is ad  # cached: rendered once
    assert 0 < market.true_ctr(pid, "wooden kitchen counter, warm lighting") < 1


def jax_devices():
    import jax

    return jax.devices()


def test_an_answer_that_does_not_fit_is_cut_and_flagged(trained):
    """A sampled prompt can be longer as text than it was as tokens (a lone byte token decodes to U+FFFD, which
    tokenizes back as three bytes): `sequence_batch` cuts such an answer at the sequence length and flags it, leaves
    the others as they are, and refuses a length that leaves no room for any answer."""
    from caig_jax.data.preference_inputs import sequence_batch
    from caig_jax.data.sft_inputs import build_inputs
    from caig_jax.trainers.sft import read_run_config

    data_dir, sft_dir, _ = trained
    config = read_run_config(sft_dir)
    inputs, llava_config = build_inputs(config, sft_dir, data_dir)
    image = np.full((64, 64, 3), 200, np.uint8)
    titles, templates = ["Aurora red cotton tote bag"] * 2, [0, 0]
    answers = ["sunset beach, warm light", "sunset beach, " + "\ufffd" * 12]
    whole, cut = sequence_batch(inputs, llava_config, [image] * 2, titles, answers, templates, 256)
    assert not cut.any()
    empty, cut = sequence_batch(inputs, llava_config, [image], titles[:1], [""], templates[:1], 256)
    assert not cut.any() and empty["loss_mask"].sum() == 0  # an empty answer (LLaVA: a bare ASSISTANT:) is no cut
    lengths = whole["attention_mask"].sum(axis=1)
    length = int(lengths[0]) + 4  # the short answer fits, the long one does not
    assert lengths[1] > length
    out, cut = sequence_batch(inputs, llava_config, [image] * 2, titles, answers, templates, length)
    assert cut.tolist() == [False, True]
    for key in ("input_ids", "attention_mask", "loss_mask"):
        np.testing.assert_array_equal(out[key], whole[key][:, :length])  # the same tokens, up to the cut
    eos = inputs.tokenizer.eos_token_id
    assert out["input_ids"][0, lengths[0] - 1] == eos and out["input_ids"][1, -1] != eos
    instruction_tokens = int(lengths[1] - whole["loss_mask"][1].sum())
    with pytest.raises(ValueError, match=f"fills length={instruction_tokens}: no answer token fits"):
        sequence_batch(inputs, llava_config, [image] * 2, titles, answers, templates, instruction_tokens)
