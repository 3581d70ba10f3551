"""`generate` job: background prompts, ads and (optionally) reward-model ranks for a products list (configs/generate.py).

    python -m caig_jax.main --config=configs/generate.py:tiny --workdir=runs/generate \
        --config.products=products.json --config.prompt_model=runs/caig/dpo_pcpo

Order: the products list is read and every entry checked (`data.product.read_products`: file, alpha, caption)
before any model is loaded; then the Prompt Model samples `samples` prompts per product (CAIG's instruction
templates, one per product); the ads are rendered (`render.kind`); a reward model, when given, judges every pair of
a product's ads (sides at random) and ranks them by wins (Copeland; ties keep the sampling order). Outputs:
`ads/<id>/<rank>.png`, `contact_sheet.png`, `prompts.json`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
from tqdm import tqdm

from caig_jax import parallel
from caig_jax.config_checks import Checks, common_checks
from caig_jax.data import product as product_lib
from caig_jax.data.ctr_logs import load_rgb
from caig_jax.data.preference_inputs import instruction
from caig_jax.data.sft_inputs import TEMPLATES
from caig_jax.errors import MissingPathError, UserError
from caig_jax.eval.grids import write_grid
from caig_jax.eval.prompt_models import AdRenderer, Judge, round_robin, tally
from caig_jax.files import write_json_atomic
from caig_jax.models import attention
from caig_jax.models.llava import from_pretrained as llava_from_pretrained
from caig_jax.models.lora import merge_lora
from caig_jax.models.processing import LlavaInputs
from caig_jax.models.prompt_model import generate_replies
from caig_jax.trainers.preference import load_trained as load_policy
from caig_jax.trainers.sft import load_trained as load_sft

log = logging.getLogger(__name__)


def validate(config: ml_collections.ConfigDict) -> None:
    checks = Checks(config)
    common_checks(checks)
    checks.mesh(devices=jax.device_count())
    for key in ("products", "prompt_model"):
        if not checks.string(key):
            checks.problem(key, "a path")
    checks.string("split")
    checks.integer("limit", min=0)
    checks.choice("template", tuple(TEMPLATES))
    checks.choice("attention", attention.CHOICES)
    checks.choice("dtype", ("float32", "bfloat16"))
    checks.choice("param_dtype", ("float32", "bfloat16"))
    checks.choice("aot_model", ("tiny", "7b"))
    checks.string("reward_workdir")
    checks.integer("samples", min=1)
    checks.number("temperature", min=0)
    for key in ("max_new_tokens", "batch_size"):
        checks.integer(f"generation.{key}", min=1)
    checks.integer("generation.prompt_length", min=0)
    checks.choice("render.kind", ("market", "sd"))
    checks.integer("render.size", min=32)
    checks.integer("render.steps", min=1)
    checks.number("render.guidance_scale", min=0)
    checks.choice("render.dtype", ("float32", "bfloat16"))
    if checks.get("dtype", "float32") == "float32" and checks.get("param_dtype", "float32") == "bfloat16":
        checks.problem("param_dtype", "float32 with dtype='float32' (bfloat16 parameters go with bfloat16 compute)")
    checks.done()
    if not os.path.exists(os.path.join(config.prompt_model, "config.json")):
        raise MissingPathError(f"config.prompt_model={config.prompt_model!r} is not a Prompt Model (no config.json)",
                               fix="pass a CAIG demo / preference / SFT workdir, or a LLaVA-NeXT folder")
    if config.reward_workdir and not os.path.isdir(os.path.join(config.reward_workdir, "checkpoints")):
        raise MissingPathError(f"config.reward_workdir={config.reward_workdir!r} is not a reward job's workdir "
                               "(no checkpoints/)", fix="pass the reward job's --workdir, or '' for no ranking")
    if config.render.kind == "sd" and not config.render.sd_path:
        raise UserError("config.render.kind='sd' needs config.render.sd_path (a diffusers SD-1.5 folder)",
                        fix="pass --config.render.sd_path=DIR [--config.render.controlnet_path=DIR]")


def read_products(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """The checked products of `config.products` (the `split` entries, the first `limit`)."""
    products = product_lib.read_products(config.products, require_prompts=False)
    if config.split:
        products = [p for p in products if p["entry"].get("split", config.split) == config.split]
    products = products[: config.limit] if config.limit else products
    if not products:
        raise UserError(f"{config.products}: no product left after split={config.split!r}",
                        fix="pass --config.split='' to use every entry")
    return products


def load_prompt_model(path: str, template: str, attention_impl: str, mesh, *, dtype="float32",
                      param_dtype="float32"):
    """(model, inputs) of a Prompt Model: a preference or SFT workdir (its own tokenizer, template, attention and
    dtypes; LoRA merged) or a LLaVA-NeXT folder (transformers or original-LLaVA layout, asked with `template`,
    attention `attention_impl`, compute `dtype`, parameters streamed in as `param_dtype`)."""
    with open(os.path.join(path, "config.json")) as f:
        job = json.load(f).get("job")
    if job == "caig":
        path, job = os.path.join(path, "dpo_pcpo"), "preference"  # a demo workdir: its DPO + PCPO PM
    if job == "preference":
        model, _, inputs = load_policy(path, mesh)
    elif job == "sft":
        model, _, inputs = load_sft(path, mesh)
    else:
        model = llava_from_pretrained(path, mesh=mesh, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype))
        model = attention.configure(model, attention_impl, mesh, jnp.dtype(dtype))
        return model, LlavaInputs.from_pretrained(path, config=model.config, template=TEMPLATES[template])
    merge_lora(model)
    return model, inputs


def rank(judge: Judge, product: dict[str, Any], ads: list[np.ndarray], rng: np.random.Generator
         ) -> tuple[list[int], list[float], list[dict[str, Any]]]:
    """(order best first, wins per ad, judged pairs) of one product's ads by the RM's pairwise verdicts."""
    pairs = round_robin([len(ads)], rng)
    if not pairs:
        return [0], [0.0], []
    entry = product["entry"]
    logits = judge.ad_logits([ads[a] for _, a, _ in pairs], [ads[b] for _, _, b in pairs],
                             [product["caption"]] * len(pairs), [str(entry.get("category", ""))] * len(pairs),
                             [dict(entry.get("attributes", {}))] * len(pairs))
    (wins,), (judged,) = tally(pairs, logits, [len(ads)])
    return [int(k) for k in np.argsort(-wins, kind="stable")], wins.tolist(), judged


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "product"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    validate(config)
    products = read_products(config)  # every entry checked before a model is loaded
    log.info("%d products from %s", len(products), config.products)
    mesh = parallel.make_mesh(config.mesh.to_dict())
    model, inputs = load_prompt_model(config.prompt_model, config.template, config.attention, mesh,
                                      dtype=config.dtype, param_dtype=config.param_dtype)
    images, conversations = [], []
    for k, p in enumerate(products):
        image = load_rgb(p["image_path"])  # over white, as the conversation dataset gave the PM images in SFT
        images += [image] * config.samples
        conversations += [instruction(p["caption"], k)] * config.samples
    g = config.generation
    replies = generate_replies(model, inputs, images, conversations, max_new_tokens=g.max_new_tokens,
                               temperature=config.temperature, seed=config.seed, batch_size=g.batch_size,
                               prompt_length=g.prompt_length or None)
    del model
    renderer = AdRenderer(config.render, mesh)
    judge = Judge(config.reward_workdir, mesh) if config.reward_workdir else None
    rng = np.random.default_rng([config.seed, 5])
    results, sheet = [], []
    for k, p in enumerate(tqdm(products, desc="render + judge", unit="product")):
        prompts = replies[k * config.samples:(k + 1) * config.samples]
        ads = renderer.ads(p["rgba"], prompts)
        order, wins, judged = (rank(judge, p, ads, rng) if judge is not None
                               else (list(range(len(ads))), None, []))
        folder = os.path.join(workdir, "ads", _safe(p["id"]))
        entries = []
        for r, i in enumerate(order):
            path = os.path.join(folder, f"{r}.png")
            if jax.process_index() == 0:
                os.makedirs(folder, exist_ok=True)
                Image.fromarray(np.asarray(ads[i], np.uint8)).save(path)
            entries.append({"prompt": prompts[i], "ad": os.path.relpath(path, workdir), "sample": i,
                            "rm_wins": None if wins is None else wins[i]})
        results.append({"id": p["id"], "title": p["caption"], "ranked_by_rm": judge is not None,
                        "ads": entries, "pairs": judged})
        sheet.append([(images[k * config.samples], p["caption"])] + [
            (ads[e["sample"]], (f"#{r + 1} ({e['rm_wins']:.0f} wins): " if wins is not None else "") + e["prompt"])
            for r, e in enumerate(entries)])
    out = {"products_file": config.products, "prompt_model": config.prompt_model,
           "reward_workdir": config.reward_workdir, "samples": config.samples, "temperature": config.temperature,
           "render": config.render.to_dict(), "products": results}
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, "prompts.json"), out)
        write_grid(sheet, os.path.join(workdir, "contact_sheet.png"))
        print(f"{len(results)} products, {len(replies)} ads: {os.path.join(workdir, 'contact_sheet.png')}, "
              f"{os.path.join(workdir, 'prompts.json')}")
    return out
