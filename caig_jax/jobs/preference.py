"""`preference` job: CAIG's CTR-driven preference optimisation of the Prompt Model (DPO + PCPO, online rounds).

    python -m caig_jax.main --config=configs/preference.py:tiny --workdir=runs/po \
        --config.sft_workdir=runs/sft_tiny --config.reward_workdir=runs/reward_tiny

Per round (`rounds`): take `products_per_round` training products; the current policy samples `samples` prompts
each (T = `temperature`, the KV-cache sampler, one of CAIG's instruction templates); each prompt is rendered
around the product (`render.kind='market'`: the marketplace painter); the reward model judges the left|right
pairs (which side an ad goes is random; N > 2: best vs worst by pairwise wins); chosen and rejected, with the
corrupted product x^ for PCPO and the reference's log-probs, become the round's data; then `steps_per_round`
steps of `L = mean L_DPO + pcpo.weight * mean L_PCPO` (`caig_jax.trainers.preference`). The next round samples
from the updated policy. After every round (and once before the first, for the SFT PM) the held-out products
(`eval.split`) get the policy's greedy and T=1.0 prompts: their true CTR, the truth-based sibling / cross-category
match rates and the RM's win rate against the SFT PM's prompts.

Workdir: `rounds/<r>/` holds the round's data (`data.npz`: tensors and reference log-probs, written once: a
round is never sampled twice), `samples.jsonl` (product, prompts, RM logits, chosen side, true CTRs) and
`grid.png` (chosen vs rejected ads); `eval/<r>.json` the held-out figures (`eval/sft.json` before round 0);
`report.md` / `report.json` at the end; metrics in `metrics.jsonl` and TensorBoard. A SIGTERM anywhere resumes
at the same round and step (the engine's checkpoint holds the round in `job_state`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

import caig_jax.render as render
from caig_jax import parallel
from caig_jax.config_checks import Checks, common_checks, layer_checks, train_checks
from caig_jax.data import market as market_lib
from caig_jax.data import world
from caig_jax.data.preference_inputs import corrupt, instruction, sequence_batch
from caig_jax.data.reward_inputs import build_inputs as build_rm_inputs
from caig_jax.data.sft_inputs import decode_image
from caig_jax.errors import UserError
from caig_jax.eval.intervals import product_bootstrap
from caig_jax.eval.grids import write_grid
from caig_jax.eval.sft import MarketTruth
from caig_jax.files import save_npz_atomic, write_atomic, write_json_atomic
from caig_jax.metrics import MetricWriter
from caig_jax.models.prompt_model import generate_replies
from caig_jax.objectives.reward import prefers_left
from caig_jax.trainers.preference import build_policy, make_loss_fn, reference_params, sequence_logps_of
from caig_jax.trainers.reward import judge_pairs
from caig_jax.trainers.reward import load_trained as load_reward_model
from caig_jax.trainers.trainer import Trainer

log = logging.getLogger(__name__)


# ================================================================================================
# Sampling, rendering, judging.
# ================================================================================================
class World:
    """The marketplace the rounds run in: products, their PM input images and cut-outs, and the renderer.

    `render.kind`: 'market' paints backgrounds with the marketplace's painter (`market.compose_ad`); 'sd' inpaints
    them with the JAX SD-1.5 + ControlNet renderer (`caig_jax.render.from_pretrained(render.sd_path,
    controlnet_path=render.controlnet_path)`, CAIG's settings: Euler-ancestral, `render.steps`, CFG
    `render.guidance_scale`, control scale 1.0, product pasted back). True CTRs are the click model's on the ad
    actually rendered (`market.true_ctr`).
    """

    def __init__(self, config: ml_collections.ConfigDict, market_dir: str, mesh):
        r = config.render
        if r.kind not in ("market", "sd"):
            raise UserError(f"config.render.kind={r.kind!r}: expected 'market' or 'sd'")
        self.truth = MarketTruth.load(market_dir)
        self.kind, self.size, self.seed = r.kind, r.size, r.seed
        self.renderer = None
        if r.kind == "sd":
            if not r.sd_path:
                raise UserError("config.render.kind='sd' needs config.render.sd_path (a diffusers SD-1.5 folder)",
                                fix="pass --config.render.sd_path=DIR [--config.render.controlnet_path=DIR]")
            self.renderer = render.from_pretrained(r.sd_path, controlnet_path=r.controlnet_path or None, mesh=mesh)
            self.steps, self.guidance = r.steps, r.guidance_scale
        self._images: dict[str, np.ndarray] = {}
        self._cutouts: dict[str, np.ndarray] = {}
        self._ads: dict[tuple[str, str], np.ndarray] = {}

    def products(self, split: str) -> list[str]:
        ids = sorted(p for p, s in self.truth.splits.items() if s == split)
        if not ids:
            raise UserError(f"the marketplace in {self.truth.market_dir} has no {split!r} products")
        return ids

    def pm_image(self, pid: str) -> np.ndarray:
        """The product image as the PM saw it in SFT (the cut-out PNG decoded to RGB)."""
        if pid not in self._images:
            with open(self.truth.image_paths[pid], "rb") as f:
                self._images[pid] = decode_image(f.read())
        return self._images[pid]

    def cutout(self, pid: str) -> np.ndarray:
        if pid not in self._cutouts:
            self._cutouts[pid] = self.truth.cutout(pid)
        return self._cutouts[pid]

    def ad(self, pid: str, prompt: str) -> np.ndarray:
        if self.kind == "market":
            return market_lib.compose_ad(self.cutout(pid), prompt, self.size, seed=self.seed)
        key = (pid, prompt)
        if key not in self._ads:  # one product at a time: one compiled program, cached by (product, prompt)
            self._ads[key] = self.renderer.inpaint_product([self.cutout(pid)], [prompt], steps=self.steps,
                                                           guidance_scale=self.guidance, seed=self.seed)[0]
        return self._ads[key]

    def true_ctr(self, pid: str, prompt: str) -> float:
        if self.kind == "market":  # exact and cheap: from the painted background's look
            return world.prompt_ctr(prompt, self.truth.products[pid], size=self.size, seed=self.seed)
        return market_lib.true_ctr(self.ad(pid, prompt), self.truth.products[pid])

    def product(self, pid: str) -> market_lib.Product:
        return self.truth.products[pid]


class Judge:
    """The reward model of `reward_workdir` judging ad pairs of one product (its decision rule)."""

    def __init__(self, reward_workdir: str, mesh):
        self.model, self.config = load_reward_model(reward_workdir, mesh)
        self.inputs, self.llava_config = build_rm_inputs(self.config, reward_workdir, self.config.data.dir)
        self.mesh = mesh

    def logits(self, market: World, pids: list[str], left: list[str], right: list[str]) -> np.ndarray:
        """float32[N, 2]: the RM's cls logits for (ad from `left[i]`, ad from `right[i]`) of product `pids[i]`."""
        products = [market.product(p) for p in pids]
        attributes = [json.dumps(p.attributes) for p in products]
        return judge_pairs(self.model, self.config, self.inputs, self.llava_config,
                           [market.ad(p, a) for p, a in zip(pids, left)],
                           [market.ad(p, b) for p, b in zip(pids, right)],
                           [p.title for p in products], [p.category for p in products], attributes, self.mesh)


def sample_prompts(model, inputs, market: World, pids: list[str], templates: list[int], *, samples: int,
                   temperature: float, seed: int, config) -> list[list[str]]:
    """`samples` prompts per product from `model` (one instruction template per product)."""
    images = [market.pm_image(p) for p in pids for _ in range(samples)]
    conversations = [instruction(market.product(p).title, k) for p, k in zip(pids, templates) for _ in range(samples)]
    replies = generate_replies(model, inputs, images, conversations, max_new_tokens=config.max_new_tokens,
                               temperature=temperature, seed=seed, batch_size=config.batch_size,
                               prompt_length=config.prompt_length or None)
    return [replies[i * samples:(i + 1) * samples] for i in range(len(pids))]


def choose(judge: Judge, market: World, pids: list[str], prompts: list[list[str]], rng: np.random.Generator
           ) -> list[dict[str, Any]]:
    """Chosen / rejected per product by the RM: N = 2 one pair (sides at random); N > 2 every pair, best vs worst
    by pairwise wins (ties: the earlier sample)."""
    pairs = []  # (product row, i, j, i goes left)
    for row, options in enumerate(prompts):
        n = len(options)
        for i in range(n):
            for j in range(i + 1, n):
                pairs.append((row, i, j, bool(rng.random() < 0.5)))
    left = [prompts[r][i] if flip else prompts[r][j] for r, i, j, flip in pairs]
    right = [prompts[r][j] if flip else prompts[r][i] for r, i, j, flip in pairs]
    logits = judge.logits(market, [pids[r] for r, *_ in pairs], left, right)
    wins = [np.zeros(len(p)) for p in prompts]
    records = [{"product": pid, "prompts": list(options), "pairs": []} for pid, options in zip(pids, prompts)]
    for (row, i, j, flip), lg in zip(pairs, logits):
        left_wins = bool(prefers_left(lg[0], lg[1]))
        winner = (i if flip else j) if left_wins else (j if flip else i)
        wins[row][winner] += 1
        records[row]["pairs"].append({"left": i if flip else j, "right": j if flip else i,
                                      "rm_logits": [float(lg[0]), float(lg[1])], "winner": winner})
    for row, record in enumerate(records):
        order = np.argsort(-wins[row], kind="stable")
        record["chosen"], record["rejected"] = int(order[0]), int(order[-1])
    return records


# ================================================================================================
# A round's data.
# ================================================================================================
def sample_round(r: int, trainer: Trainer, inputs, judge: Judge, market: World, config, mesh, out_dir: str
                 ) -> dict[str, np.ndarray]:
    """Samples, renders, judges and tensorises round `r` with the current policy; writes `out_dir` (data.npz
    last: its presence means the round is complete)."""
    rng = np.random.default_rng([config.seed, 1000 + r])
    train = market.products("train")
    pids = [train[i] for i in rng.choice(len(train), size=min(config.products_per_round, len(train)), replace=False)]
    templates = [int(k) for k in rng.integers(0, 1 << 16, size=len(pids))]
    prompts = sample_prompts(trainer.model(), inputs, market, pids, templates, samples=config.samples,
                             temperature=config.temperature, seed=config.seed * 1000 + r, config=config.generation)
    records = choose(judge, market, pids, prompts, rng)
    images = [market.pm_image(p) for p in pids]
    titles = [market.product(p).title for p in pids]
    chosen = [rec["prompts"][rec["chosen"]] for rec in records]
    rejected = [rec["prompts"][rec["rejected"]] for rec in records]
    c_images, c_titles, c_answers, c_templates, kinds = corrupt(
        images, titles, chosen, templates, seed=config.seed * 1000 + r, swap=config.pcpo.swap,
        mask_ratio=config.pcpo.mask_ratio, patch_size=config.pcpo.patch_size)
    llava_config = trainer.model().config
    length = config.generation.sequence_length
    data: dict[str, np.ndarray] = {}
    for prefix, parts in (("chosen", (images, titles, chosen, templates)),
                          ("rejected", (images, titles, rejected, templates)),
                          ("corrupt", (c_images, c_titles, c_answers, c_templates))):
        try:
            tensors = sequence_batch(inputs, llava_config, *parts, length)
        except ValueError as e:
            raise UserError(f"round {r}: {e}", fix="raise config.generation.sequence_length") from None
        for key, value in tensors.items():
            data[f"{prefix}_{key}"] = value
    n = len(pids)
    padded, _ = parallel.pad_to_multiple(data, parallel.num_batch_shards(mesh))
    ref = sequence_logps_of(trainer, reference_params(trainer), parallel.global_batch(mesh, padded))
    for prefix, value in ref.items():
        data[f"ref_{prefix}"] = np.asarray(jax.device_get(value))[:n].astype(np.float32)
    for rec, kind, c_title in zip(records, kinds, c_titles):
        rec["corruption"] = kind if kind == "mask" else f"swap: {c_title}"
        rec["true_ctr"] = [market.true_ctr(rec["product"], p) for p in rec["prompts"]]
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        write_atomic(os.path.join(out_dir, "samples.jsonl"), "".join(json.dumps(rec) + "\n" for rec in records))
        grid = [[(market.ad(rec["product"], rec["prompts"][rec["chosen"]]),
                  f"chosen ({100 * rec['true_ctr'][rec['chosen']]:.2f}%): {rec['prompts'][rec['chosen']]}"),
                 (market.ad(rec["product"], rec["prompts"][rec["rejected"]]),
                  f"rejected ({100 * rec['true_ctr'][rec['rejected']]:.2f}%): {rec['prompts'][rec['rejected']]}")]
                for rec in records[:8]]
        write_grid(grid, os.path.join(out_dir, "grid.png"))
        save_npz_atomic(os.path.join(out_dir, "data.npz"), data)
    return data


def load_round(out_dir: str) -> dict[str, np.ndarray] | None:
    path = os.path.join(out_dir, "data.npz")
    if not os.path.exists(path):
        return None
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


# ================================================================================================
# Held-out evaluation.
# ================================================================================================
def evaluate_policy(model, inputs, judge: Judge, market: World, config, baseline: dict | None) -> dict[str, Any]:
    """The held-out figures of one policy (the module docstring); `baseline` is the SFT PM's result (its prompts
    are the RM win rate's opponents)."""
    e = config.eval
    pids = market.products(e.split)[: e.products]
    templates = [i % 2 for i in range(len(pids))]
    greedy = [s[0] for s in sample_prompts(model, inputs, market, pids, templates, samples=1, temperature=0.0,
                                           seed=config.seed, config=config.generation)]
    sampled = sample_prompts(model, inputs, market, pids, templates, samples=e.samples, temperature=config.temperature,
                             seed=config.seed + 1, config=config.generation)
    ctr = {p: float(np.mean([market.true_ctr(p, q) for q in qs])) for p, qs in zip(pids, sampled)}
    ctr_greedy = {p: market.true_ctr(p, q) for p, q in zip(pids, greedy)}
    products = [market.product(p) for p in pids]
    # Match rates score prompts with the marketplace painter (exact and cheap) whatever the rounds render with.
    sibling = world.match_rate_sibling(products, dict(zip(pids, sampled)), size=market.size, seed=market.seed)
    cross = world.match_rate_cross(products, dict(zip(pids, sampled)), size=market.size, seed=market.seed)
    result: dict[str, Any] = {
        "products": pids, "greedy": greedy, "sampled": sampled,
        "true_ctr": product_bootstrap(list(ctr.values()), seed=config.seed),
        "true_ctr_greedy": product_bootstrap(list(ctr_greedy.values()), seed=config.seed),
        "true_ctr_per_product": ctr,
        "match_rate_sibling": {"rate": sibling["rate"], "per_product": sibling["per_product"]},
        "match_rate_cross": {"rate": cross["rate"], "per_product": cross["per_product"]},
    }
    if baseline is not None:
        rng = np.random.default_rng([config.seed, 77])
        ours = [qs[0] for qs in sampled]
        theirs = [qs[0] for qs in baseline["sampled"]]
        flips = rng.random(len(pids)) < 0.5
        left = [a if f else b for a, b, f in zip(ours, theirs, flips)]
        right = [b if f else a for a, b, f in zip(ours, theirs, flips)]
        logits = judge.logits(market, pids, left, right)
        wins = [float(prefers_left(lg[0], lg[1]) == f) for lg, f in zip(logits, flips)]
        result["rm_win_rate_vs_sft"] = product_bootstrap(wins, seed=config.seed)
    return result


def _scalars(result: dict[str, Any]) -> dict[str, float]:
    out = {"true_ctr": result["true_ctr"]["mean"], "true_ctr_greedy": result["true_ctr_greedy"]["mean"],
           "match_rate_sibling": result["match_rate_sibling"]["rate"],
           "match_rate_cross": result["match_rate_cross"]["rate"]}
    if "rm_win_rate_vs_sft" in result:
        out["rm_win_rate_vs_sft"] = result["rm_win_rate_vs_sft"]["mean"]
    return out


# ================================================================================================
# The job.
# ================================================================================================
def validate(config: ml_collections.ConfigDict) -> None:
    """Types and ranges of every key the job reads (`caig_jax.config_checks`) and the two input workdirs."""
    checks = Checks(config)
    common_checks(checks)
    layer_checks(checks)
    shape = checks.mesh(devices=jax.device_count())
    train_checks(checks, batch_shards=shape[0] * shape[1] if shape else None, processes=jax.process_count())
    checks.integer("rounds", min=1)
    checks.integer("products_per_round", min=2)
    checks.integer("samples", min=2)
    checks.integer("steps_per_round", min=1)
    checks.number("temperature", min=0, min_open=True)
    checks.number("dpo.beta", min=0, min_open=True)
    checks.number("pcpo.beta", min=0, min_open=True)
    checks.number("pcpo.weight", min=0)
    checks.choice("pcpo.swap", ("paper", "conversation"))
    checks.number("pcpo.mask_ratio", min=0, max=1)
    checks.integer("pcpo.patch_size", min=1)
    checks.choice("render.kind", ("market", "sd"))
    checks.integer("render.size", min=32)
    checks.integer("render.steps", min=1)
    checks.integer("lora.rank", min=1)
    checks.number("lora.alpha", min=0, min_open=True)
    checks.number("lora.dropout", min=0, max=1)
    for key in ("max_new_tokens", "batch_size", "sequence_length"):
        checks.integer(f"generation.{key}", min=1)
    checks.integer("generation.prompt_length", min=0)
    checks.integer("eval.products", min=2)
    checks.integer("eval.samples", min=1)
    checks.done()
    for key in ("sft_workdir", "reward_workdir"):
        path = config[key]
        if not path or not os.path.isdir(os.path.join(path, "checkpoints")):
            raise UserError(f"config.{key}={path!r} is not a training workdir with checkpoints",
                            fix=f"pass --config.{key}=DIR (the {key.split('_')[0]} job's --workdir)")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    validate(config)
    start = time.time()
    mesh = parallel.make_mesh(config.mesh.to_dict())
    policy, sft_config, inputs = build_policy(config, mesh)
    market = World(config, config.market_dir or sft_config.data.market_dir, mesh)
    judge = Judge(config.reward_workdir, mesh)
    run_config = ml_collections.ConfigDict(config.to_dict())
    total = config.rounds * config.steps_per_round
    run_config.train.steps = total
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, "config.json"), run_config.to_dict(), default=list)
    trainer = Trainer(run_config, workdir, mesh, policy, make_loss_fn(config))
    trainer.restore()
    eval_dir = os.path.join(workdir, "eval")

    def evaluation(name: str, baseline: dict | None) -> dict[str, Any]:
        path = os.path.join(eval_dir, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        result = evaluate_policy(trainer.model(), inputs, judge, market, config, baseline)
        if jax.process_index() == 0:
            write_json_atomic(path, result)
        return result

    sft_eval = evaluation("sft", None)
    per_round: list[dict[str, Any]] = []
    steps, bs = config.steps_per_round, config.train.batch_size
    try:
        with trainer.session(total) as session:
            data, data_round = None, -1
            while trainer.current_step < total:
                r, k = divmod(trainer.current_step, steps)
                if k == 0 and r > 0 and not os.path.exists(os.path.join(eval_dir, f"{r - 1}.json")):
                    session.writer.write(trainer.current_step, _scalars(evaluation(str(r - 1), sft_eval)),
                                         prefix="heldout/")
                if data_round != r:
                    out_dir = os.path.join(workdir, "rounds", str(r))
                    data = load_round(out_dir) or sample_round(r, trainer, inputs, judge, market, config, mesh,
                                                               out_dir)
                    data_round, trainer.job_state = r, {"round": r}
                n = len(data["ref_chosen"])
                rows = np.random.default_rng([config.seed, r, k]).choice(n, size=bs, replace=n < bs)
                session.run_step({key: value[rows] for key, value in data.items()})
    finally:
        trainer.close()
    last = evaluation(str(config.rounds - 1), sft_eval)
    for r in range(config.rounds):
        with open(os.path.join(eval_dir, f"{r}.json")) as f:
            per_round.append(_scalars(json.load(f)))
    report = {"config": {"pcpo_weight": config.pcpo.weight, "rounds": config.rounds, "samples": config.samples},
              "sft": _scalars(sft_eval), "rounds": per_round, "final": last, "seconds": round(time.time() - start, 1)}
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, "report.json"), report)
        write_atomic(os.path.join(workdir, "report.md"), report_markdown(report, config))
        writer = MetricWriter(workdir)
        writer.write(total, _scalars(last), prefix="heldout/")
        writer.close()
        print(json.dumps({"sft": report["sft"], "final": _scalars(last)}, indent=2))
    return report


def report_markdown(report: dict[str, Any], config) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}%"

    head = ["true CTR (T=1)", "true CTR (greedy)", "sibling match", "cross match", "RM win vs SFT"]
    keys = ["true_ctr", "true_ctr_greedy", "match_rate_sibling", "match_rate_cross", "rm_win_rate_vs_sft"]
    lines = [f"# Preference optimisation (pcpo weight {config.pcpo.weight})", "",
             f"Held-out products: `{config.eval.split}` split, first {config.eval.products}; {config.eval.samples} "
             f"T={config.temperature} samples each. Wall time {report['seconds']} s.", "",
             "| policy | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    rows = [("SFT PM", report["sft"])] + [(f"round {r + 1}", m) for r, m in enumerate(report["rounds"])]
    for name, m in rows:
        lines.append(f"| {name} | " + " | ".join(pct(m.get(k)) for k in keys) + " |")
    f = report["final"]
    lines += ["", f"Final true CTR (T=1): {pct(f['true_ctr']['mean'])} [{pct(f['true_ctr']['ci_low'])}, "
                  f"{pct(f['true_ctr']['ci_high'])}] (product bootstrap); rounds' samples and chosen-vs-rejected grids "
                  "under `rounds/`.", ""]
    return "\n".join(lines)


def steps_per_epoch(products: int, batch_size: int) -> int:
    """Steps for one pass over a round's `products` examples (CAIG: 1 epoch a round)."""
    return max(1, math.ceil(products / batch_size))
