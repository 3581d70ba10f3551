"""Render job: CAIG's SD-1.5 + ControlNet(canny) inpainting of backgrounds around product cut-outs.

Run (CPU, about a minute, mostly compilation):
    python -m caig_jax.main --config=configs/render.py:tiny --workdir=/tmp/render

`tiny` needs no weights: with `sd_path` empty it writes a TINY RANDOM Stable Diffusion + ControlNet (diffusers
layout, 64x64 images) into `<workdir>/tiny_sd` and says so in the log, because nothing can be downloaded here;
its images are noise by construction. Without `products` it draws a few synthetic products (caig_jax.data.market)
into `<workdir>/products/`. Expect a progress bar in images/s, then `<workdir>/renders/<id>_<k>.png` (one per
product and prompt), `<workdir>/contact_sheet.png` and `<workdir>/render_report.{json,md}`.

Real weights (`sd15`: CAIG's settings, Euler-ancestral, 30 steps, CFG 7.5, control scale 1.0, 512x512, bf16
parameters, batch 8 over the `data` axis):
    python -m caig_jax.main --config=configs/render.py:sd15 --workdir=/tmp/render_sd15 \\
        --config.sd_path=/ckpt/stable-diffusion-v1-5 \\
        --config.controlnet_path=/ckpt/control_v11p_sd15_canny \\
        --config.products=/data/products.json
`sd_path` is a diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/) or a single-file LDM
`.safetensors` with a tokenizer/ folder beside it. The products JSON is a list of
`{"id", "image": RGBA cut-out path (relative to the JSON's folder, or absolute), "new_caption" (CAIG's key;
"caption" works too), "prompt": str or [str, ...]}`; a missing, unreadable, alpha-less or empty-alpha image, or
a product under 8 px on its short side, stops the job before any model is loaded, naming the file.
"""

import ml_collections

PRESETS = ("tiny", "sd15")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/render.py; choose one of {PRESETS}")
    c = ml_collections.ConfigDict()
    c.job = "render"
    c.seed = 0
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.cpu_devices = 0  # on a CPU host: split it into this many XLA devices (see configs/reward.py); 0: one
    # Model: a diffusers SD folder or LDM single file, and a ControlNet folder ("" = none).
    c.sd_path = ""
    c.controlnet_path = ""
    c.tiny_random_weights = False  # with sd_path empty: write and use a tiny random SD (tiny preset only)
    c.dtype = "float32"  # or "bfloat16" (accelerators)
    c.attention = "auto"  # xla | chunked | splash | cudnn | auto (from the mesh's devices; models/attention.py)
    # Products: the JSON list; "" = draw synthetic ones when `synthetic_products`.
    c.products = ""
    c.synthetic_products = False
    c.num_products = 4
    c.prompts_per_product = 2
    # Sampling (CAIG's settings).
    c.scheduler = "euler_ancestral"  # euler_ancestral | euler | ddim | dpmpp_2m
    c.steps = 30
    c.guidance_scale = 7.5
    c.controlnet_scale = 1.0
    c.negative_prompt = ""
    c.batch_size = 8  # images per sampling call, padded to a multiple of the mesh's data x fsdp size
    if preset == "tiny":
        c.tiny_random_weights = True
        c.synthetic_products = True
        c.steps = 4
    elif preset == "sd15":
        # bf16 parameters and compute: SD-1.5 + ControlNet (1.2B parameters, 2.4 GB) fits every accelerator chip
        # whole, so the batch goes over `data` and no tensor axis is needed (`python -m caig_jax.aot
        # --config=configs/render.py:sd15 --topology=v5e:2x2`: the README's table).
        c.dtype = "bfloat16"
    c.lock()
    return c
