"""Knowledge pre-training (SFT) of the Prompt Model: the assistant-only loss mask, buckets and the resumable batch
stream, the exact token mean under gradient accumulation, prompt selection by logged CTR, reply parsing, and the
tiny job end to end through `caig_jax.main` (SIGTERM, resume, report, export, held-out accuracy above chance)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from caig_jax.data import sft_inputs
from caig_jax.data.ctr_logs import Creative
from caig_jax.data.sft_inputs import Conversation, SFTBatches, bucket_lengths, select_by_logged_ctr
from caig_jax.eval.intervals import product_bootstrap
from caig_jax.eval.sft import parse_description, parses_fully
from caig_jax.models.processing import VICUNA_V1, build_word_tokenizer, tokenize_conversation
from caig_jax.objectives.sft import sft_loss
from caig_jax.trainers.sft import make_loss_fn

from ._smoke_utils import REPO

IMAGE_TOKENS = 5
TURNS = [
    {"role": "user", "content": "<image>\nWhat product is this?"},
    {"role": "assistant", "content": "A red coffee mug."},
    {"role": "user", "content": "Write a background prompt for it."},
    {"role": "assistant", "content": "wooden kitchen counter, warm lighting"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from caig_jax.models.processing import render_conversation

    return build_word_tokenizer([render_conversation(TURNS, add_generation_prompt=False, template=VICUNA_V1)],
                                str(tmp_path_factory.mktemp("tok")))


# ------------------------------------------------------------------------------------------------ the loss mask


def test_loss_mask_covers_every_assistant_turn_and_nothing_else(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ex = tokenize_conversation(tokenizer, TURNS, [IMAGE_TOKENS], template=VICUNA_V1)
    ids, mask = ex["input_ids"], ex["loss_mask"]
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    # Expected positions, found on the tokens themselves: after each `ASSISTANT` `:` up to and including `</s>`.
    expected = np.zeros_like(mask)
    for t in range(1, len(tokens)):
        if tokens[t] == ":" and tokens[t - 1] == "▁ASSISTANT":
            end = tokens.index("</s>", t)
            expected[t + 1:end + 1] = 1
    assert expected.sum() > 0
    np.testing.assert_array_equal(mask, expected)
    replies = [tok for tok, m in zip(tokens, mask) if m]
    assert replies == ["▁A", "▁red", "▁coffee", "▁mug", ".", "</s>",
                       "▁wooden", "▁kitchen", "▁counter", ",", "▁warm", "▁lighting", "</s>"]
    # The BOS, the system prompt, the roles, both user turns and the image tokens are masked out.
    assert ids[0] == tokenizer.bos_token_id and mask[0] == 0
    assert (ids == image_id).sum() == IMAGE_TOKENS and not mask[ids == image_id].any()
    assert tokens.count("</s>") == 2 and all(mask[i] for i, tok in enumerate(tokens) if tok == "</s>")


class _Unigram(nnx.Module):
    """A stand-in model with the LLaVA call signature: logits from the current token only."""

    def __init__(self, vocab: int):
        self.table = nnx.Param(jax.random.normal(jax.random.key(0), (vocab, vocab)))

    def __call__(self, input_ids, pixel_values, attention_mask=None, image_layout=None):
        return self.table[input_ids]


def test_loss_is_the_token_mean_over_the_global_batch_even_with_accumulation():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 11, (4, 9)).astype(np.int32)
    mask = np.zeros((4, 9), np.int32)
    mask[0, 2:9] = 1  # rows with very different answer lengths: a mean of micro-batch means would be wrong
    mask[1, 7:9] = 1
    mask[2, 5:7] = 1
    mask[3, 8] = 1
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": mask,
             "pixel_values": np.zeros((4, 1)), "image_layout": np.zeros((4, 7), np.int32)}
    model = _Unigram(11)
    expected, _ = sft_loss(model.table[ids[:, :-1]], ids[:, 1:], mask[:, 1:])
    one, metrics = make_loss_fn(1)(model, batch, jax.random.key(0))
    np.testing.assert_allclose(one, expected, rtol=1e-6)
    assert metrics["tokens"] == mask[:, 1:].sum()
    # Two micro-batches (the engine takes every other row), each weighted by accum / global tokens, averaged.
    weight = np.full((4,), 2 / mask[:, 1:].sum(), np.float32)
    fn = make_loss_fn(2)
    micro = [{k: (v[j::2] if k != "loss_weight" else weight[j::2]) for k, v in {**batch, "loss_weight": weight}.items()}
             for j in range(2)]
    averaged = np.mean([float(fn(model, mb, jax.random.key(0))[0]) for mb in micro])
    np.testing.assert_allclose(averaged, expected, rtol=1e-6)
    unweighted = np.mean([float(make_loss_fn(1)(model, mb, jax.random.key(0))[0]) for mb in micro])
    assert abs(unweighted - float(expected)) > 1e-3  # what plain per-micro-batch means would have given


# ------------------------------------------------------------------------------------------------ buckets, stream


def test_buckets_bound_the_shapes_and_merge_small_ones():
    lengths = np.array([30] * 30 + [60] * 30 + [90] * 30)
    assert bucket_lengths(lengths, 3, 16) == (32, 64, 96)  # at the quantiles, rounded up to the multiple
    assert bucket_lengths(lengths, 1, 8) == (96,)
    assert bucket_lengths(lengths, 9, 16) == (32, 64, 96)  # never more buckets than distinct rounded lengths
    lengths = np.array([30] * 5 + [60] * 15)
    assert bucket_lengths(lengths, 5, 16, batch_size=1) == (32, 64)
    # The 5 short examples make no batch of 8: they move up to the next bucket.
    assert bucket_lengths(lengths, 5, 16, batch_size=8) == (64,)


class _FakeData:
    """What SFTBatches reads of ConversationData, without images."""

    def __init__(self, lengths):
        self.lengths = np.asarray(lengths)
        self.loss_masks = [np.ones(n, np.int32) for n in lengths]
        self.records = [None] * len(lengths)

    def __len__(self):
        return len(self.lengths)

    bucket_of = sft_inputs.ConversationData.bucket_of

    def batch(self, indices, length, augments=None):
        assert all(self.lengths[i] <= length for i in indices)
        return {"index": np.asarray(indices), "length": np.full(len(indices), length)}


def test_batch_stream_is_bucketed_deterministic_and_resumes_exactly():
    rng = np.random.default_rng(1)
    data = _FakeData(rng.integers(20, 100, 203))
    buckets = bucket_lengths(data.lengths, 3, 8, batch_size=8)
    stream = SFTBatches(data, buckets, 8, seed=3)
    first = [next(stream) for _ in range(3 * stream.batches_per_epoch)]
    for b in first:  # one bucket per batch, the shortest that fits all its rows
        assert len(set(b["length"])) == 1 and b["length"][0] in buckets
    epoch = np.concatenate([b["index"] for b in first[:stream.batches_per_epoch]])
    assert len(set(epoch)) == len(epoch) >= len(data) - 3 * 7  # each bucket leaves < one batch for later
    again = SFTBatches(data, buckets, 8, seed=3)
    again.set_state(stream.get_state() | {"position": 5})
    np.testing.assert_array_equal(next(again)["index"], first[5]["index"])
    assert not np.array_equal(next(SFTBatches(data, buckets, 8, seed=4))["index"], first[0]["index"])
    with pytest.raises(Exception, match="another data configuration"):
        SFTBatches(data, buckets, 16, seed=3).set_state(stream.get_state())


def test_augment_moves_pixels_but_keeps_colours():
    from caig_jax.data.sft_inputs import Augment

    image = np.full((40, 40, 3), 255, np.uint8)
    image[10:30, 5:20] = (200, 30, 40)  # a red box left of centre on white
    assert Augment().is_identity
    flipped = Augment(flip=True).apply(image)
    np.testing.assert_array_equal(flipped, image[:, ::-1])
    moved = Augment(scale=0.8, dx=0.1, dy=-0.05).apply(image)
    colours = {tuple(c) for c in moved.reshape(-1, 3)}
    assert (200, 30, 40) in colours and (255, 255, 255) in colours and not np.array_equal(moved, image)
    rng = np.random.default_rng(0)
    draws = [Augment.draw(rng, flip=True, max_shrink=0.2, max_shift=0.1) for _ in range(200)]
    assert all(0.8 <= a.scale <= 1.0 and abs(a.dx) <= 0.1 and abs(a.dy) <= 0.1 for a in draws)
    assert 60 < sum(a.flip for a in draws) < 140


# ------------------------------------------------------------------------------------------------ data selection


def _conversation(cid, family="background_prompt"):
    return Conversation(cid, family, cid.split("_")[0], (("user", "<image>\nq"), ("assistant", "a")), None, "")


def test_prompt_selection_keeps_each_products_best_logged_creatives():
    records = [_conversation(f"item00001_0{k}_prompt") for k in range(6)] + [
        _conversation("item00002_00_prompt"), _conversation("item00001_product", "describe_product")]
    clicks = {0: 30, 1: 90, 2: 60, 3: 10, 4: 90, 5: 20}
    creatives = [Creative("item00001", f"item00001_0{k}.png", "", 3000 if k != 4 else 2000, c, "")
                 for k, c in clicks.items()] + [Creative("item00002", "item00002_00.png", "", 1000, 5, "")]
    kept, counts = select_by_logged_ctr(records, creatives, family="background_prompt", fraction=0.34)
    ids = [r.id for r in kept]
    # item00001: ceil(0.34 * 6) = 3 best logged CTRs (04: 4.5%, 01: 3%, 02: 2%); item00002 keeps its only one.
    assert ids == ["item00001_01_prompt", "item00001_02_prompt", "item00001_04_prompt", "item00002_00_prompt",
                   "item00001_product"]
    assert counts == {"family_examples": 7, "kept": 4, "dropped": 3, "products": 2}


# ------------------------------------------------------------------------------------------------ parsing, intervals


def test_reply_parsing():
    assert parses_fully("wooden kitchen counter, warm lighting")
    assert parses_fully("Pastel Pink studio backdrop, soft lighting, bokeh")
    assert not parses_fully("wooden kitchen counter, lovely lighting")
    assert not parses_fully(" , ")
    assert parse_description("A pastel pink lipstick made of satin by Orbit. Title: x.") == ("pastel pink", "lipstick")
    assert parse_description("A red t-shirt made of cotton") == ("red", "t_shirt")
    assert parse_description("A teal water bottle") == ("teal", "water_bottle")
    assert parse_description("wooden kitchen counter") == (None, None)


def test_product_bootstrap_by_hand():
    b = product_bootstrap([1.0, 0.0, 1.0, 1.0], resamples=4000, seed=0)
    assert b["mean"] == 0.75 and b["n_products"] == 4 and 0.25 <= b["ci_low"] < 0.75 < b["ci_high"] <= 1.0
    r = product_bootstrap([3.0, 1.0], [4.0, 1.0])  # a ratio of sums, not a mean of ratios
    assert r["mean"] == 0.8
    assert np.isnan(product_bootstrap([])["mean"])


# ------------------------------------------------------------------------------------------------ the job


@pytest.fixture(scope="module")
def small_market(tmp_path_factory):
    from caig_jax.data import market_datasets
    from caig_jax.main import load_config

    root = str(tmp_path_factory.mktemp("sft_market"))
    config = load_config(os.path.join(REPO, "configs", "market.py:tiny"))
    config.market.num_products = 60
    config.market.contact_sheet_products = 2
    config.build.datasets = ("llava_conversations", "products")
    market_datasets.build_world(config, root, verbose=False)
    return root


def _launch(workdir, data_dir, steps):
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # the job's cpu_devices splits the CPU itself
    cmd = [sys.executable, "-m", "caig_jax.main", "--config=configs/sft.py:tiny", f"--workdir={workdir}",
           f"--config.data.dir={data_dir}", f"--config.train.steps={steps}", "--config.train.checkpoint_every=10",
           "--config.train.log_every=5", "--config.train.warmup_steps=10", "--config.eval.split=val",
           "--config.eval.samples=1", "--config.eval.on_brief=4", "--config.eval.max_new_tokens=24",
           "--config.data.num_buckets=2"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc, needle, timeout=300):
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"never saw {needle!r}; output:\n{''.join(seen)[-3000:]}")


def _answer_chance(workdir, data_dir, split):
    """Token accuracy of always answering the most frequent training answer token, on `split`'s answers."""
    from transformers import AutoTokenizer

    from caig_jax.data.sft_inputs import read_conversations
    from caig_jax.models.processing import VICUNA_V1, tokenize_conversation

    tok = AutoTokenizer.from_pretrained(os.path.join(workdir, "tokenizer"))

    def answer_tokens(records):
        out = []
        for r in records:
            ex = tokenize_conversation(tok, r.messages, [1] if r.image is not None else [], template=VICUNA_V1)
            out.append(ex["input_ids"][ex["loss_mask"] == 1])
        return np.concatenate(out)

    train = answer_tokens(read_conversations(data_dir, "train"))
    majority = np.bincount(train).argmax()
    return float(np.mean(answer_tokens(read_conversations(data_dir, split)) == majority))


@pytest.mark.slow
def test_tiny_job_end_to_end_resumes_after_sigterm(small_market, tmp_path):
    data_dir = os.path.join(small_market, "tfds")
    workdir = str(tmp_path / "sft")
    steps = 60
    proc = _launch(workdir, data_dir, steps)
    _wait_for(proc, "checkpoint save started: step 20")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]
    assert "saved after SIGTERM" in out and not os.path.exists(os.path.join(workdir, "report.json"))
    proc = _launch(workdir, data_dir, steps)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out

    report = json.load(open(os.path.join(workdir, "report.json")))
    assert report["step"] == steps and report["split"] == "val"
    assert set(report["families"]) == {"describe_product", "describe_background", "background_prompt"}
    prompts = report["prompts"]
    for key in ("sampled", "greedy", "random_on_brief", "oracle", "sampled_minus_on_brief"):
        assert {"mean", "ci_low", "ci_high", "n_products"} <= set(prompts["true_ctr"][key]), key
    assert set(report["targets"]) == {"greedy_parse_rate", "category_exact_match", "colour_exact_match",
                                      "sampled_minus_on_brief_true_ctr"}
    for name in ("report.md", "prompt_grid.png", os.path.join("plots", "training_curves.png")):
        assert os.path.exists(os.path.join(workdir, name)), name
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steps_logged = [r["step"] for r in rows if "train/loss" in r]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == steps  # one row per step after resume
    assert any("val/describe_product/loss" in r for r in rows)

    # Held-out answers are better than chance after 60 steps: teacher-forced token accuracy of every family
    # beats always answering the most frequent training answer token.
    chance = _answer_chance(workdir, data_dir, "val")
    for family, m in report["families"].items():
        assert m["token_accuracy_ci"][0] > chance, (family, m, chance)

    # The export is the trained model: our loader reads back exactly the checkpoint's parameters.
    from caig_jax import parallel
    from caig_jax.models import llava
    from caig_jax.trainers.sft import load_trained

    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    model, _, inputs = load_trained(workdir, mesh)
    exported = llava.from_pretrained(os.path.join(workdir, "export"), mesh=mesh)
    ours = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    theirs = dict(nnx.to_flat_state(nnx.state(exported, nnx.Param)))
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(np.asarray(ours[key].get_value()), np.asarray(theirs[key].get_value()))
    # ... and transformers computes its logits on a held-out conversation (the job's own tokenizer and images).
    import torch
    from transformers import LlavaNextForConditionalGeneration

    from caig_jax.data.sft_inputs import ConversationData, read_conversations

    from ._llava_fixtures import TOL, rel_err

    data = ConversationData(read_conversations(data_dir, "val")[:2], inputs, model.config)
    batch = data.batch([0, 1], int(data.lengths.max()))
    logits = np.asarray(model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                              image_layout=batch["image_layout"]))
    ref = LlavaNextForConditionalGeneration.from_pretrained(os.path.join(workdir, "export"), dtype=torch.float32)
    side = model.config.vision_config.image_size
    with torch.no_grad():
        theirs = ref.eval()(input_ids=torch.tensor(batch["input_ids"]),
                            attention_mask=torch.tensor(batch["attention_mask"]),
                            pixel_values=torch.tensor(batch["pixel_values"]),
                            image_sizes=torch.tensor([list(data.decoded(i).shape[:2]) for i in (0, 1)])).logits.numpy()
    assert side == 32 and rel_err(logits, theirs, batch["attention_mask"]) < TOL

    # A rerun on the finished workdir (here in-process, on this process's 8-device mesh) changes nothing.
    from caig_jax.jobs import sft as sft_job
    from caig_jax.trainers.sft import read_run_config

    before = {name: os.path.getmtime(os.path.join(workdir, name)) for name in ("report.json", "metrics.jsonl")}
    config = read_run_config(workdir)
    del config.workdir
    config.mesh.data = -1
    again = sft_job.run(config, workdir)
    assert again["step"] == steps and again["split"] == "val"
    assert before == {name: os.path.getmtime(os.path.join(workdir, name)) for name in before}


def test_7b_preset_is_caigs_lora_setup_on_llava_next_vicuna_7b():
    """The `7b` preset builds (abstractly: no weights): LoRA r128 a256 dropout 0.05 on the 224 linears of the
    Vicuna-7B decoder, and only those adapters train (the tower, the projector and the base weights are frozen)."""
    import jax.numpy as jnp

    from caig_jax import parallel
    from caig_jax.main import load_config
    from caig_jax.models.llava import LlavaModel, llava_next_vicuna_7b
    from caig_jax.models.lora import apply_lora
    from caig_jax.trainers.trainer import trainable_filter

    config = load_config(os.path.join(REPO, "configs", "sft.py:7b"))
    m = config.model
    assert (m.lora_rank, m.lora_alpha, m.lora_dropout, m.dtype) == (128, 256.0, 0.05, "bfloat16")
    assert dict(config.mesh) == {"data": 1, "fsdp": 16, "tensor": 4}
    adapted = []

    def make():
        model = LlavaModel(llava_next_vicuna_7b(), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
        adapted.extend(apply_lora(model.language_model, rank=m.lora_rank, alpha=m.lora_alpha, target=m.lora_target,
                                  dropout=m.lora_dropout))
        return model

    abstract = parallel.abstract_module(make)
    assert len(adapted) == 32 * 7
    t = config.train
    _, trained, _ = nnx.split(abstract, trainable_filter(t.trainable, tuple(t.freeze), tuple(t.extra_trainable)), ...)
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(trained)]
    assert all(p.startswith("language_model/layers/") and "/lora_" in p for p in paths)
    d, ff, r = 4096, 11008, 128
    per_layer = r * (4 * (d + d) + 2 * (d + ff) + (ff + d))  # q k v o, gate up, down
    assert sum(v.get_value().size for _, v in nnx.to_flat_state(trained)) == 32 * per_layer == 319_815_680
