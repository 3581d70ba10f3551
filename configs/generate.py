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
30 Euler-ancestral steps, CFG 7.5: set the two weight folders).
"""

import ml_collections

PRESETS = ("tiny", "sd15")


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

    if preset == "tiny":
        pass
    elif preset == "sd15":
        c.cpu_devices = 0
        c.render.kind = "sd"
        c.render.size = 512
        c.render.sd_path = "/path/to/stable-diffusion-v1-5"
        c.render.controlnet_path = "/path/to/control_v11p_sd15_canny"
        c.generation.max_new_tokens = 77
    else:
        raise ValueError(f"configs/generate.py: unknown preset {preset!r}; choose 'tiny' or 'sd15'")
    c.lock()
    return c
