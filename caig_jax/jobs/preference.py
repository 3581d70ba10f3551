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
round is never sampled twice), `samples.jsonl` (product, prompts, RM logits, chosen side, true CTRs, which
sequences were cut to `generation.sequence_length`) and `grid.png` (chosen vs rejected ads); `eval/<r>.json` the
held-out figures (`eval/sft.json` before round 0);
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

from caig_jax import files, parallel
from caig_jax.config_checks import Checks, common_checks, layer_checks, train_checks
from caig_jax.data.preference_inputs import corrupt, sequence_batch
from caig_jax.errors import UserError
from caig_jax.eval.grids import write_grid
from caig_jax.eval.prompt_models import Judge, World, evaluate_policy, round_robin, sample_prompts, scalars, tally
from caig_jax.files import save_npz_atomic, write_atomic, write_json_atomic
from caig_jax.metrics import MetricWriter
from caig_jax.models import attention
from caig_jax.trainers.preference import build_policy, make_loss_fn, reference_params, sequence_logps_of
from caig_jax.trainers.trainer import Trainer

log = logging.getLogger(__name__)


# ================================================================================================
# Judging a round's samples.
# ================================================================================================
def choose(judge: Judge, market: World, pids: list[str], prompts: list[list[str]], rng: np.random.Generator
           ) -> list[dict[str, Any]]:
    """Chosen / rejected per product by the RM: N = 2 one pair (sides at random); N > 2 every pair, best vs worst
    by pairwise wins (ties: the earlier sample)."""
    sizes = [len(options) for options in prompts]
    pairs = round_robin(sizes, rng)
    logits = judge.logits(market, [pids[r] for r, _, _ in pairs], [prompts[r][a] for r, a, _ in pairs],
                          [prompts[r][b] for r, _, b in pairs])
    wins, judged = tally(pairs, logits, sizes)
    records = []
    for pid, options, row_wins, row_pairs in zip(pids, prompts, wins, judged):
        order = np.argsort(-row_wins, kind="stable")
        records.append({"product": pid, "prompts": list(options), "pairs": row_pairs, "chosen": int(order[0]),
                        "rejected": int(order[-1])})
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
    for rec in records:
        rec["answers_cut"] = []
    for prefix, parts in (("chosen", (images, titles, chosen, templates)),
                          ("rejected", (images, titles, rejected, templates)),
                          ("corrupt", (c_images, c_titles, c_answers, c_templates))):
        try:
            tensors, cut = sequence_batch(inputs, llava_config, *parts, length)
        except ValueError as e:
            raise UserError(f"round {r}: {e}", fix="raise config.generation.sequence_length") from None
        for key, value in tensors.items():
            data[f"{prefix}_{key}"] = value
        for i in np.flatnonzero(cut):
            records[i]["answers_cut"].append(prefix)
        if cut.any():
            # Rare (a sampled lone byte token re-tokenizes as three); cutting keeps the round's shapes and both
            # models score the same cut sequence, where stopping would lose the run.
            log.warning("round %d: %d of %d %s sequences longer than generation.sequence_length=%d: their answers "
                        "are cut to fit (samples.jsonl: answers_cut)", r, int(cut.sum()), len(cut), prefix, length)
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
# The job.
# ================================================================================================
def validate(config: ml_collections.ConfigDict, check_inputs: bool = True) -> None:
    """Types and ranges of every key the job reads (`caig_jax.config_checks`) and, with `check_inputs`, the two
    input workdirs (the CAIG demo checks its stages' configs before those workdirs exist)."""
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
    checks.choice("render.attention", attention.CHOICES)
    checks.choice("model.attention", attention.CHOICES)
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
    for key in ("sft_workdir", "reward_workdir") if check_inputs else ():
        path = config[key]
        if not path or not os.path.isdir(os.path.join(path, "checkpoints")):
            raise UserError(f"config.{key}={path!r} is not a training workdir with checkpoints",
                            fix=f"pass --config.{key}=DIR (the {key.split('_')[0]} job's --workdir)")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    validate(config)
    start = time.time()
    mesh = parallel.make_mesh(config.mesh.to_dict())
    policy, sft_config, inputs = build_policy(config, mesh)
    market = World(config.render, config.market_dir or sft_config.data.market_dir, mesh)
    judge = Judge(config.reward_workdir, mesh)
    run_config = ml_collections.ConfigDict(config.to_dict())
    total = config.rounds * config.steps_per_round
    run_config.train.steps = total
    files.makedirs(workdir)  # local or gs://
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
        result = evaluate_policy(trainer.model(), inputs, judge, market,
                                 market.products(config.eval.split)[: config.eval.products],
                                 samples=config.eval.samples, temperature=config.temperature, seed=config.seed,
                                 generation=config.generation, baseline=baseline)
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
                    session.writer.write(trainer.current_step, scalars(evaluation(str(r - 1), sft_eval)),
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
            per_round.append(scalars(json.load(f)))
    report = {"config": {"pcpo_weight": config.pcpo.weight, "rounds": config.rounds, "samples": config.samples},
              "sft": scalars(sft_eval), "rounds": per_round, "final": last, "seconds": round(time.time() - start, 1)}
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, "report.json"), report)
        write_atomic(os.path.join(workdir, "report.md"), report_markdown(report, config))
        writer = MetricWriter(workdir)
        writer.write(total, scalars(last), prefix="heldout/")
        writer.close()
        print(json.dumps({"sft": report["sft"], "final": scalars(last)}, indent=2))
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
