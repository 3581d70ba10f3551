"""Generate job: ads for your own products (CAIG's `inference_llava.py` + `sample_llava.py` in one job).

Run (CPU, tiny: on the products of the CAIG demo's held-out split, with its DPO + PCPO Prompt Model and its reward
model; run `configs/caig.py:tiny` into runs/caig first):
    python -m caig_jax.main --config=configs/generate.py:tiny --workdir=runs/generate

Your products: `--config.products=products.json`, a list in CAIG's format read as is:
`[{"id": "...", "image": "cutouts/1.png", "new_caption": "Aurora orange stainless steel water bottle"}, ...]`
(RGBA cut-outs, paths relative to the JSON's folder; `caption` / `title` are read when `new_caption` is absent;
`category` / `attributes` are passed to the reward model when present). Every entry is checked (file, alpha,
caption) before any model is loaded.

Expect: the Prompt Model writes `samples` prompts per product at T=`temperature` with CAIG's instruction templates;
each is rendered around the untouched product; with a reward model every pair of a product's ads is judged
(left|right, sides at random) and the ads are ranked by wins. Writes `<workdir>/ads/<id>/<rank>.png`,
`contact_sheet.png` (a row per product, best first, captioned with prompt and wins) and `prompts.json`
(per product: prompts, ad files, RM wins and logits).

Options:
- `prompt_model`: a Prompt Model: a CAIG demo / preference workdir (e.g. `runs/caig/dpo_pcpo`), an SFT workdir
  (`runs/caig/sft`), or a LLaVA-NeXT folder in transformers layout (`runs/caig/sft/export`, or CAIG's released PM,
  asked with the `template` conversation format).
- `render.kind`: `market` (the synthetic marketplace's painter: cheap, what the demo's world clicks on) or `sd`
  (SD-1.5 + ControlNet inpainting; `render.sd_path`, `render.controlnet_path`: diffusers folders).
- `reward_workdir`: a reward job's workdir (optional: without it the ads keep the sampling order).

Presets (`:ARG`): `tiny` (the demo's outputs, the marketplace painter) and `sd15` (SD-1.5 + ControlNet at 512 px,
30 Euler-ancestral steps, CFG 7.5: set the two weight folders) and `7b` (CAIG's released LLaVA-v1.6-Vicuna-7B Prompt
Model as `prompt_model`, bf16 parameters, mesh tensor=4: a v5e-4 slice; plus the sd15 renderer). Will it fit:
`python -m caig_jax.aot --config=configs/generate.py:7b --topology=v5e:2x2` (the README's table).
"""

import ml_collections

PRESETS = ("tiny", "sd15", "7b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    c = ml_collections.ConfigDict()
    c.job = "generate"
    c.seed = 0
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.cpu_devices = 4

    c.products = "runs/caig/market/market/products/products.json"  # CAIG's products-list JSON
    c.split = "test"  # keep entries whose "split" key is this ("" = every entry; CAIG's lists have no split)
    c.limit = 8  # the first N products (0 = all)
    c.prompt_model = "runs/caig/dpo_pcpo"
    c.template = "vicuna_v1"  # conversation format for a LLaVA-NeXT folder (our workdirs know their own)
    c.attention = "auto"  # a LLaVA-NeXT folder's attention (xla | chunked | splash | cudnn | auto; workdirs: their own)
    # A LLaVA-NeXT folder's compute and parameter dtypes (workdirs: their own). float32 parameters of a 7B model
    # (28 GB) do not fit a 16 GiB v5e chip even split four ways with the KV cache; bf16 ones do.
    c.dtype = "float32"
    c.param_dtype = "float32"
    c.aot_model = "tiny"  # the architecture `python -m caig_jax.aot` compiles when prompt_model is not on this host
    c.reward_workdir = "runs/caig/reward"  # "" = no ranking

    c.samples = 4  # prompts per product
    c.temperature = 1.0
    c.generation = ml_collections.ConfigDict({"max_new_tokens": 40, "batch_size": 32, "prompt_length": 0})

    c.render = ml_collections.ConfigDict()
    c.render.kind = "market"
    c.render.size = 64
    c.render.seed = 0
    c.render.sd_path = ""
    c.render.controlnet_path = ""
    c.render.steps = 30
    c.render.guidance_scale = 7.5
    c.render.dtype = "float32"  # the SD renderer's parameters and compute

    if preset == "tiny":
        pass
    elif preset == "sd15":
        c.cpu_devices = 0
        c.render.kind = "sd"
        c.render.size = 512
        c.render.sd_path = "/path/to/stable-diffusion-v1-5"
        c.render.controlnet_path = "/path/to/control_v11p_sd15_canny"
        c.render.dtype = "bfloat16"
        c.generation.max_new_tokens = 77
    elif preset == "7b":
        # CAIG's released Prompt Model (LLaVA-v1.6-Vicuna-7B, transformers layout) on a v5e-4 slice: bf16 parameters
        # split over tensor=4 (13 GiB per chip with the KV cache; fsdp=4 instead re-gathers every weight at each
        # decode step), 8 prompts per program, 64 new tokens (CAIG's prompts are ~20 words).
        c.cpu_devices = 0
        c.prompt_model = "/path/to/llava-v1.6-vicuna-7b"
        c.template = "vicuna_v1"
        c.dtype = "bfloat16"
        c.param_dtype = "bfloat16"
        c.aot_model = "7b"
        c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 4})
        c.generation.max_new_tokens = 64
        c.generation.batch_size = 8
        c.render.kind = "sd"
        c.render.size = 512
        c.render.sd_path = "/path/to/stable-diffusion-v1-5"
        c.render.controlnet_path = "/path/to/control_v11p_sd15_canny"
        c.render.dtype = "bfloat16"
    else:
        raise ValueError(f"configs/generate.py: unknown preset {preset!r}; choose one of {PRESETS}")
    c.lock()
    return c
