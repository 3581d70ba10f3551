"""`caig` job: the whole of CAIG on the synthetic marketplace, in one process and one workdir (configs/caig.py).

    python -m caig_jax.main --config=configs/caig.py:tiny --workdir=runs/caig

Stages, each the job of its own nested config run into a sub-folder, each skipped when `stages.json` says it is
done (a stage cut short resumes inside its job: checkpoints, saved rounds):

    market -> sft -> reward -> dpo (pcpo.weight 0) -> dpo_pcpo (pcpo.weight w) -> evaluation -> report

`evaluation` reads the held-out products (`eval.split`, default `test`; logged in `test_reads.jsonl`) once: every
Prompt Model (the SFT PM, the DPO PM, the DPO + PCPO PM) writes `eval.samples` prompts at T=`eval.temperature`
and a greedy one per product, rendered with the rounds' renderer and scored with the marketplace's truth, beside
`eval.on_brief` random on-brief prompts and the per-product oracle prompt (`final_evaluation.json`). `report`
turns that, the reward model's own final evaluation and the rounds' curves into `report.md` / `report.json`,
`rounds.png`, `ads_grid.png` (`caig_jax.eval.caig_report`). A workdir is tied to its config (`config.json`): another
config stops with an error instead of mixing results (keys added to the config files since are accepted, logged).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections

from caig_jax import parallel
from caig_jax.config_checks import Checks, common_checks
from caig_jax.config_files import check_saved_config, config_json
from caig_jax.eval import caig_report
from caig_jax.eval.grids import write_grid
from caig_jax.eval.prompt_models import Judge, World, evaluate_policy
from caig_jax.eval.sft import on_brief_prompts
from caig_jax.files import write_json_atomic
from caig_jax.jobs import market as market_job
from caig_jax.jobs import preference as preference_job
from caig_jax.jobs import reward as reward_job
from caig_jax.jobs import sft as sft_job
from caig_jax.trainers.preference import load_trained as load_policy
from caig_jax.trainers.sft import load_trained as load_sft

log = logging.getLogger(__name__)

STAGES = ("market", "sft", "reward", "dpo", "dpo_pcpo", "evaluation", "report")
POLICIES = ("sft", "dpo", "dpo_pcpo")  # the Prompt Models compared (workdir sub-folders)
FINAL_EVALUATION = "final_evaluation.json"


def stage_configs(config: ml_collections.ConfigDict, workdir: str) -> dict[str, ml_collections.ConfigDict]:
    """Each stage's job config: the nested one with the demo's data paths, mesh and seed filled in."""
    market_dir = os.path.join(workdir, "market")
    data_dir, world_dir = os.path.join(market_dir, "tfds"), os.path.join(market_dir, "market")

    def nested(section: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict(section.to_dict())
        c.mesh = ml_collections.ConfigDict(config.mesh.to_dict())
        c.cpu_devices = config.cpu_devices
        if "seed" in c and section is not config.market:
            c.seed = config.seed
        return c

    out = {"market": nested(config.market), "sft": nested(config.sft), "reward": nested(config.reward)}
    out["sft"].data.dir, out["sft"].data.market_dir = data_dir, world_dir
    out["reward"].data.dir = data_dir
    for name, weight in (("dpo", 0.0), ("dpo_pcpo", float(config.preference.pcpo.weight))):
        c = nested(config.preference)
        c.sft_workdir, c.reward_workdir, c.market_dir = (os.path.join(workdir, "sft"), os.path.join(workdir, "reward"),
                                                         world_dir)
        c.pcpo.weight = weight
        out[name] = c
    return out


def validate(config: ml_collections.ConfigDict) -> None:
    """The demo's own keys and every stage's config (the stage jobs' `validate`), before anything is built."""
    checks = Checks(config)
    common_checks(checks)
    checks.mesh(devices=jax.device_count())
    checks.string("eval.split")
    checks.integer("eval.products", min=0)
    checks.integer("eval.samples", min=1)
    checks.number("eval.temperature", min=0, min_open=True)
    checks.integer("eval.on_brief", min=1)
    checks.integer("eval.grid_products", min=1)
    checks.integer("eval.bootstrap_resamples", min=100)
    checks.number("targets.lift_vs_sft", min=0)
    checks.number("targets.match_rate_gain", min=0)
    checks.number("targets.minutes", min=0, min_open=True)
    checks.number("preference.pcpo.weight", min=0, min_open=True)
    checks.done()
    configs = stage_configs(config, "/nonexistent")
    market_job.validate(configs["market"])
    sft_job.validate(configs["sft"])
    reward_job.validate(configs["reward"])
    preference_job.validate(configs["dpo"], check_inputs=False)


class Stages:
    """`<workdir>/stages.json`: {stage: {"seconds": wall seconds, "cpu_seconds": this process's CPU time (all
    threads; on a shared machine the honest measure of the work), "run": start time of the invocation that finished
    it}}, rewritten after each stage."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "stages.json")
        self.done: dict[str, dict[str, float]] = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.done = json.load(f)
        self.invocation = time.time()

    @property
    def seconds(self) -> dict[str, float]:
        return {name: entry["seconds"] for name, entry in self.done.items()}

    @property
    def cpu_seconds(self) -> dict[str, float]:
        return {name: entry["cpu_seconds"] for name, entry in self.done.items() if "cpu_seconds" in entry}

    def one_invocation(self, names) -> bool:
        """Whether stages `names` all ran in one invocation (a from-empty-workdir timing)."""
        return all(n in self.done for n in names) and len({self.done[n]["run"] for n in names}) == 1

    def run(self, name: str, fn) -> bool:
        """Runs `fn()` unless `name` is done; returns whether it ran."""
        if name in self.done:
            log.info("stage %s: done already (%.0f s), skipped", name, self.done[name]["seconds"])
            return False
        log.info("stage %s: starting", name)
        start, cpu = time.time(), time.process_time()
        fn()
        self.done[name] = {"seconds": round(time.time() - start, 1), "cpu_seconds": round(time.process_time() - cpu, 1),
                           "run": self.invocation}
        if jax.process_index() == 0:
            write_json_atomic(self.path, self.done)
        log.info("stage %s: done in %.0f s", name, self.done[name]["seconds"])
        return True


def _check_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Ties the workdir to its config: a different config would mix stages trained under different settings.

    Keys added to the config files since the workdir was made are accepted at this run's values (logged) and
    written into its `config.json`, so later runs are held to them."""
    path = os.path.join(workdir, "config.json")
    text = config_json(config)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if not check_saved_config(saved, text, source=path, what=f"{workdir} holds a CAIG run made with another config",
                                  fix="use a new --workdir for a new config, or re-run with the original one"):
            return
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        write_json_atomic(path, text)


def final_evaluation(config: ml_collections.ConfigDict, workdir: str, configs, mesh) -> dict[str, Any]:
    """The held-out comparison (module docstring): per PM its `evaluate_policy` result, per product the on-brief
    floor and the oracle prompt's true CTR. Written to `final_evaluation.json`."""
    po = configs["dpo_pcpo"]
    market = World(po.render, po.market_dir, mesh)
    judge = Judge(po.reward_workdir, mesh)
    pids = market.products(config.eval.split)
    pids = pids[: config.eval.products] if config.eval.products else pids
    reward_job.log_test_read(workdir, split=config.eval.split, by="caig final evaluation", products=len(pids))
    kwargs = dict(samples=config.eval.samples, temperature=config.eval.temperature, seed=config.seed,
                  generation=po.generation)
    result: dict[str, Any] = {"split": config.eval.split, "products": pids, "policies": {}}
    for name in POLICIES:
        log.info("final evaluation: the %s Prompt Model on %d %s products", name, len(pids), config.eval.split)
        if name == "sft":
            model, _, inputs = load_sft(os.path.join(workdir, "sft"), mesh)
        else:
            model, _, inputs = load_policy(os.path.join(workdir, name), mesh)
        result["policies"][name] = evaluate_policy(model, inputs, judge, market, pids,
                                                   baseline=result["policies"].get("sft"), **kwargs)
        del model
    on_brief, oracle = {}, {}
    for pid in pids:
        product = market.product(pid)
        briefs = on_brief_prompts(product, config.eval.on_brief, config.seed)
        on_brief[pid] = {"prompts": briefs, "true_ctr": [market.true_ctr(pid, q) for q in briefs]}
        if pid in market.truth.oracle:
            prompt = market.truth.oracle[pid]["oracle_prompt"]
            oracle[pid] = {"prompt": prompt, "true_ctr": market.true_ctr(pid, prompt)}
    result["random_on_brief"], result["oracle"] = on_brief, oracle
    result["render"] = {"kind": market.kind, "size": market.size, "seed": market.seed}
    if jax.process_index() == 0:
        write_ads_grid(result, market, pids[: config.eval.grid_products], os.path.join(workdir, "ads_grid.png"))
        write_json_atomic(os.path.join(workdir, FINAL_EVALUATION), result)
    return result


def write_ads_grid(result: dict[str, Any], market: World, pids: list[str], path: str) -> str:
    """Rows: products; columns: each PM's first T=1 prompt, then the oracle prompt; captions: true CTR + prompt."""
    rows = []
    for pid in pids:
        row = [(market.pm_image(pid), market.product(pid).title)]
        k = result["products"].index(pid)
        prompts = [(name, result["policies"][name]["sampled"][k][0]) for name in POLICIES]
        if pid in result["oracle"]:
            prompts.append(("oracle", result["oracle"][pid]["prompt"]))
        for name, prompt in prompts:
            row.append((market.ad(pid, prompt), f"{name} {100 * market.true_ctr(pid, prompt):.2f}%: {prompt}"))
        rows.append(row)
    return write_grid(rows, path)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    validate(config)
    _check_workdir_config(config, workdir)
    stages = Stages(workdir)
    report_path = os.path.join(workdir, "report.json")
    if all(s in stages.done for s in STAGES) and os.path.exists(report_path):
        log.info("%s is a finished CAIG run: nothing to do (report.md)", workdir)
        with open(report_path) as f:
            report = json.load(f)
        caig_report.print_summary(report)
        return report
    configs = stage_configs(config, workdir)
    sub = {name: os.path.join(workdir, name) for name in STAGES[:5]}
    mesh = parallel.make_mesh(config.mesh.to_dict())
    stages.run("market", lambda: market_job.run(configs["market"], sub["market"]))
    stages.run("sft", lambda: sft_job.run(configs["sft"], sub["sft"]))
    stages.run("reward", lambda: reward_job.run(configs["reward"], sub["reward"]))
    stages.run("dpo", lambda: preference_job.run(configs["dpo"], sub["dpo"]))
    stages.run("dpo_pcpo", lambda: preference_job.run(configs["dpo_pcpo"], sub["dpo_pcpo"]))
    stages.run("evaluation", lambda: final_evaluation(config, workdir, configs, mesh))
    report: dict[str, Any] = {}

    def write_report():
        with open(os.path.join(workdir, FINAL_EVALUATION)) as f:
            evaluation = json.load(f)
        report.update(caig_report.build(config, workdir, evaluation,
                                         {k: v for k, v in stages.seconds.items() if k != "report"},
                                         stages.one_invocation(STAGES[:-1]),
                                         {k: v for k, v in stages.cpu_seconds.items() if k != "report"}))
        if jax.process_index() == 0:
            caig_report.write(report, config, workdir)

    stages.run("report", write_report)
    if not report:  # the report stage was done but report.json is gone: make it again (nothing else re-runs)
        write_report()
    caig_report.print_summary(report)
    return report
