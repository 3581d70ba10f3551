"""Render job: paint backgrounds around product cut-outs for a list of prompts (CAIG's renderer).

    python -m caig_jax.main --config=configs/render.py:tiny --workdir=/tmp/render

Input: `config.products`, a JSON list of `{"id", "image": RGBA cut-out path (relative to the JSON file or
absolute), "new_caption" (or "caption" / "title"), "prompt": str or [str, ...]}` (the layout of CAIG's
`tiny.json`, plus prompts).
Output in the workdir:
  renders/<id>_<k>.png      one image per product and prompt
  contact_sheet.png         all renders in a grid (one row per product)
  render_report.json / .md  settings, timings (images/s, seconds per step) and the list of files

The config is checked first (`validate`), then every product image, before any model is loaded: a missing
file, an unreadable image, an image without an alpha channel, with an empty alpha or with a product under
`caig_jax.data.product.MIN_CUTOUT_SIZE` (8 px) on its short side fails with a message naming the file.

`write_tiny_sd` makes a tiny random Stable Diffusion + ControlNet in the diffusers folder layout with our own
modules' init and export path (no PyTorch): the `tiny` preset uses it when no weights are given, since nothing
can be downloaded; its images are noise-like by construction.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw
from tqdm import tqdm
from transformers import CLIPTokenizer

import caig_jax.render as render
from caig_jax import parallel
from caig_jax.config_checks import Checks, ConfigError, common_checks
from caig_jax.convert.diffusers import save_pipeline
from caig_jax.data import market
from caig_jax.data import product as product_lib
from caig_jax.diffusion.schedulers import SCHEDULERS, SD15_SCHEDULER_CONFIG
from caig_jax.files import write_json_atomic
from caig_jax.models import attention
from caig_jax.models.clip import CLIPTextConfig, CLIPTextModel
from caig_jax.models.controlnet import ControlNetConfig, ControlNetModel
from caig_jax.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from caig_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

# ---------------------------------------------------------------------------------------------------------------
# A tiny random SD-1.5-shaped pipeline in the diffusers folder layout.
# ---------------------------------------------------------------------------------------------------------------

TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
    norm_num_groups=8,
)
TINY_CONTROLNET = dict(
    in_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
    norm_num_groups=8,
    conditioning_embedding_out_channels=(8, 16, 16),  # two stride-2 stages: the VAE's scale factor 4
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=64,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_clip_tokenizer():
    """A byte-level CLIP tokenizer with no merges (every byte is a token; `</w>` marks word ends), built offline.

    Ids: 0 = <|startoftext|>, 1 = <|endoftext|> (also the pad token, as SD-1.5's), then 512 byte tokens.
    """
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _bytes_to_unicode().values():
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _truncated_normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Normal(0, std) truncated to 2 standard deviations, with `std` the truncated distribution's own (as
    `jax.nn.initializers.variance_scaling(..., "truncated_normal")`)."""
    x = rng.standard_normal(shape)
    while (bad := np.abs(x) > 2).any():
        x[bad] = rng.standard_normal(int(bad.sum()))
    return (x * std / 0.87962566103423978).astype(np.float32)


def host_init(make_module, seed: int) -> nnx.Module:
    """`make_module()`'s module with its parameters drawn on the host, from the distributions our layers'
    initialisers use (`caig_jax.models.layers`): kernels lecun-normal (variance 1 / fan-in), embeddings
    normal(0.02), norm scales 1, biases 0.

    Why not the module's own jitted init: on CPU, compiling the tiny UNet's init program alone takes 15-20 s
    (hundreds of separate random-number kernels); this takes milliseconds and only the shapes come from JAX.
    """
    graphdef, abstract = nnx.split(parallel.abstract_module(make_module))
    rng = np.random.default_rng(seed)
    filled = []
    for path, var in nnx.to_flat_state(abstract):
        shape, leaf = tuple(var.get_value().shape), str(path[-1])
        if leaf == "kernel":
            value = _truncated_normal(rng, shape, (1.0 / max(1, int(np.prod(shape[:-1])))) ** 0.5)
        elif leaf == "embedding":
            value = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        elif leaf == "scale":
            value = np.ones(shape, np.float32)
        elif leaf == "bias":
            value = np.zeros(shape, np.float32)
        else:
            raise ValueError(f"host_init: no initialiser for parameter {'/'.join(map(str, path))} {shape}")
        filled.append((path, var.replace(jnp.asarray(value, var.get_value().dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def write_tiny_sd(folder: str, *, seed: int = 0) -> tuple[str, str]:
    """Writes a tiny random SD + ControlNet inpainting pipeline into `folder`: our own modules, their parameters
    drawn by `host_init`, written by the renderer's export path (`caig_jax.convert.diffusers.save_pipeline`); no
    PyTorch involved.

    Layout: `model_index.json`, `unet/ vae/ text_encoder/ tokenizer/ scheduler/ controlnet/` (the scheduler
    config is SD-1.5's PNDM json as shipped). The shapes follow SD-1.5's structure at toy sizes (64x64 images,
    VAE scale factor 4, 16x16 latents, 32-d text); the tokenizer is `tiny_clip_tokenizer` (built offline).
    ControlNet's zero convolutions get our layers' random init, so a random tiny model exercises the residual
    path. Returns (sd_path, controlnet_path) = (folder, folder/controlnet).
    """
    tokenizer = tiny_clip_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TINY_TEXT,
    )
    save_pipeline(
        folder,
        unet=host_init(lambda: UNet2DConditionModel(UNet2DConditionConfig.from_dict(TINY_UNET), rngs=nnx.Rngs(0)),
                       seed),
        vae=host_init(lambda: AutoencoderKL(AutoencoderKLConfig.from_dict(TINY_VAE), rngs=nnx.Rngs(0)), seed + 1),
        text_encoder=host_init(lambda: CLIPTextModel(text_config, rngs=nnx.Rngs(0)), seed + 2),
        tokenizer=tokenizer,
        scheduler_config=dict(SD15_SCHEDULER_CONFIG),
        controlnet=host_init(lambda: ControlNetModel(ControlNetConfig.from_dict(TINY_CONTROLNET), rngs=nnx.Rngs(0)),
                             seed + 3),
    )
    return folder, os.path.join(folder, "controlnet")


# ---------------------------------------------------------------------------------------------------------------
# Synthetic products (the products list itself is read by `caig_jax.data.product.read_products`).
# ---------------------------------------------------------------------------------------------------------------


def write_synthetic_products(folder: str, num_products: int, prompts_per_product: int, seed: int) -> str:
    """Draws `num_products` RGBA products of the marketplace (`caig_jax.data.market`) with prompts, writes them as
    PNGs plus a products.json in `folder`, and returns the JSON path."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(num_products):
        category = list(market.CATEGORIES)[i % len(market.CATEGORIES)]
        item = market.make_product(i, category, seed)
        rgba = market.product_image(item, 256)
        pid, caption = item.id, item.title
        prompts = [market.sample_prompt(rng, category) for _ in range(prompts_per_product)]
        name = f"{pid}.png"
        Image.fromarray(rgba, "RGBA").save(os.path.join(folder, name))
        entries.append({"id": pid, "image": name, "caption": caption, "prompt": prompts})
    path = os.path.join(folder, "products.json")
    with open(path, "w") as f:
        json.dump(entries, f, indent=2)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Outputs.
# ---------------------------------------------------------------------------------------------------------------


def _safe_name(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    return keep.strip("._") or "product"


def contact_sheet(rows: list[list[np.ndarray]], labels: list[str], pad: int = 4, label_h: int = 14) -> np.ndarray:
    """Grid of uint8[R, R, 3] images, one row per product (ragged rows are padded white), label above each row."""
    res = rows[0][0].shape[0]
    cols = max(len(r) for r in rows)
    height = len(rows) * (res + label_h + pad) + pad
    width = cols * (res + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (images, label) in enumerate(zip(rows, labels)):
        top = pad + r * (res + label_h + pad)
        draw.text((pad, top), label[: max(8, width // 7)], fill=(0, 0, 0))
        for c, image in enumerate(images):
            sheet.paste(Image.fromarray(image), (pad + c * (res + pad), top + label_h))
    return np.asarray(sheet)


def _resolve_model(config: ml_collections.ConfigDict, workdir: str):

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(config.dtype)
    if dtype is None:
        raise ConfigError(f"config.dtype={config.dtype!r}: expected 'float32' or 'bfloat16'")
    mesh = parallel.make_mesh(dict(config.mesh))
    sd_path = config.sd_path
    controlnet_path = config.controlnet_path or None
    if not sd_path:
        if not config.tiny_random_weights:
            raise ConfigError(
                "config.sd_path is empty: give the SD-1.5 diffusers folder (or LDM .safetensors) with "
                "--config.sd_path=... and the ControlNet canny folder with --config.controlnet_path=..."
            )
        folder = os.path.join(workdir, "tiny_sd")
        if not os.path.exists(os.path.join(folder, "model_index.json")):
            write_tiny_sd(folder, seed=config.seed)
        sd_path, controlnet_path = folder, os.path.join(folder, "controlnet")
        logging.warning(
            "No weights given (config.sd_path is empty): rendering with a TINY RANDOM Stable Diffusion written to "
            "%s. Nothing can be downloaded here; the images are noise by construction. Use the sd15 preset with "
            "real weights for real backgrounds.", folder,
        )
    renderer = render.from_pretrained(sd_path, controlnet_path=controlnet_path, dtype=dtype, mesh=mesh,
                                      attention=config.attention)
    return renderer, sd_path, controlnet_path


def validate(config: ml_collections.ConfigDict) -> None:
    """Types and ranges of every key the job reads (`caig_jax.config_checks`); raises `ConfigError` before any
    product is drawn or model built."""
    checks = Checks(config)
    common_checks(checks)
    checks.mesh(devices=jax.device_count())
    checks.string("sd_path")
    checks.string("controlnet_path")
    checks.boolean("tiny_random_weights")
    checks.choice("dtype", ("float32", "bfloat16"))
    checks.choice("attention", attention.CHOICES)
    checks.string("products")
    checks.boolean("synthetic_products")
    checks.integer("num_products", min=1)
    checks.integer("prompts_per_product", min=1)
    checks.choice("scheduler", SCHEDULERS)
    checks.integer("steps", min=1)
    checks.number("guidance_scale", min=0)
    checks.number("controlnet_scale", min=0)
    checks.string("negative_prompt")
    checks.integer("batch_size", min=1)
    if checks.get("sd_path", "x") == "" and checks.get("tiny_random_weights", True) is False:
        checks.problem("sd_path", "the SD-1.5 diffusers folder or LDM .safetensors (empty only with "
                       "tiny_random_weights=True)")
    if checks.get("products", "x") == "" and checks.get("synthetic_products", True) is False:
        checks.problem("products", "the products JSON path (empty only with synthetic_products=True)")
    checks.done()


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Renders every (product, prompt) of `config.products`; see the module docstring for the outputs."""
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    # ---- products first: every input problem surfaces before any model is loaded.
    products_path = config.products
    if not products_path:
        if not config.synthetic_products:
            raise ConfigError("config.products is empty: give the products JSON with --config.products=PATH")
        products_path = write_synthetic_products(
            os.path.join(workdir, "products"), config.num_products, config.prompts_per_product, config.seed
        )
        logging.info("No products file given: drew %d synthetic products into %s", config.num_products, products_path)
    products = product_lib.read_products(products_path)
    names: dict[str, str] = {}
    for p in products:
        other = names.setdefault(_safe_name(p["id"]), p["id"])
        if other != p["id"]:
            raise product_lib.ProductsFileError(f"{products_path!r}: ids {other!r} and {p['id']!r} map to the same file name")
    work = [(p, k, prompt) for p in products for k, prompt in enumerate(p["prompts"])]
    logging.info("%d products, %d images to render", len(products), len(work))

    renderer, sd_path, controlnet_path = _resolve_model(config, workdir)
    if renderer.controlnet is None:
        logging.warning("No ControlNet given (config.controlnet_path is empty): inpainting without edge control")
    out_dir = os.path.join(workdir, "renders")
    os.makedirs(out_dir, exist_ok=True)

    # ---- render in batches; the first batch includes compilation.
    batch_size = max(1, int(config.batch_size))
    negative = config.negative_prompt or None
    renders: dict[tuple[str, int], np.ndarray] = {}
    files: dict[tuple[str, int], str] = {}
    batch_times = []
    bar = tqdm(total=len(work), unit="img", desc="render", dynamic_ncols=True)
    for start in range(0, len(work), batch_size):
        chunk = work[start : start + batch_size]
        t0 = time.perf_counter()
        images = renderer.inpaint_product(
            [p["rgba"] for p, _, _ in chunk],
            [prompt for _, _, prompt in chunk],
            steps=config.steps,
            guidance_scale=config.guidance_scale,
            scheduler=config.scheduler,
            seed=config.seed + start,
            negative_prompts=negative,
            controlnet_scale=config.controlnet_scale,
        )
        batch_times.append((time.perf_counter() - t0, len(chunk)))
        for (p, k, _), image in zip(chunk, images):
            path = os.path.join(out_dir, f"{_safe_name(p['id'])}_{k}.png")
            Image.fromarray(image).save(path)
            renders[(p["id"], k)] = image
            files[(p["id"], k)] = os.path.relpath(path, workdir)
        if len(batch_times) > 1:  # the first batch includes compilation
            steady = batch_times[1:]
            bar.set_postfix(s_per_step=f"{sum(t for t, _ in steady) / len(steady) / config.steps:.3f}")
        else:
            bar.set_postfix(first_batch="incl. compilation")
        bar.update(len(chunk))
    bar.close()

    # ---- contact sheet and report.
    rows = [[renders[(p["id"], k)] for k in range(len(p["prompts"]))] for p in products]
    labels = [f"{p['id']}: {p['caption']}" for p in products]
    sheet_path = os.path.join(workdir, "contact_sheet.png")
    Image.fromarray(contact_sheet(rows, labels)).save(sheet_path)

    total = sum(t for t, _ in batch_times)
    steady = batch_times[1:]
    steady_images = sum(n for _, n in steady)
    report = {
        "sd_path": sd_path,
        "controlnet_path": controlnet_path,
        "tiny_random_weights": not config.sd_path,
        "products_file": products_path,
        "num_products": len(products),
        "num_images": len(work),
        "resolution": renderer.resolution,
        "steps": config.steps,
        "scheduler": config.scheduler,
        "guidance_scale": config.guidance_scale,
        "controlnet_scale": config.controlnet_scale,
        "negative_prompt": config.negative_prompt,
        "batch_size": batch_size,
        "bucket_size": renderer.bucket_size(min(batch_size, len(work))),
        "mesh": {k: int(v) for k, v in renderer.mesh.shape.items()},
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
        "dtype": config.dtype,
        "seconds_total": round(total, 3),
        "seconds_first_batch_incl_compile": round(batch_times[0][0], 3),
        "images_per_second_steady": round(steady_images / sum(t for t, _ in steady), 4) if steady else None,
        "seconds_per_step_steady": round(sum(t for t, _ in steady) / len(steady) / config.steps, 4) if steady else None,
        "compilations": renderer.num_compiles,
        "contact_sheet": os.path.relpath(sheet_path, workdir),
        "renders": [
            {"id": p["id"], "caption": p["caption"], "prompt": p["prompts"][k], "file": files[(p["id"], k)]}
            for p in products
            for k in range(len(p["prompts"]))
        ],
    }
    write_json_atomic(os.path.join(workdir, "render_report.json"), report)
    lines = [
        "# Render report",
        "",
        f"- model: `{sd_path}`" + (" (TINY RANDOM weights: noise by construction)" if not config.sd_path else ""),
        f"- ControlNet: `{controlnet_path}`",
        f"- {len(work)} images of {len(products)} products at {renderer.resolution}px, {config.scheduler}, "
        f"{config.steps} steps, CFG {config.guidance_scale}, control scale {config.controlnet_scale}",
        f"- total {total:.1f} s (first batch incl. compilation {batch_times[0][0]:.1f} s)"
        + (f"; steady {report['images_per_second_steady']} images/s, {report['seconds_per_step_steady']} s/step"
           if steady else ""),
        f"- contact sheet: `{report['contact_sheet']}`",
        "",
        "| id | caption | prompt | file |",
        "| --- | --- | --- | --- |",
    ]
    for r in report["renders"]:
        lines.append(f"| {r['id']} | {r['caption']} | {r['prompt']} | `{r['file']}` |")
    with open(os.path.join(workdir, "render_report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    logging.info("Wrote %d renders to %s, contact sheet %s", len(work), out_dir, sheet_path)
