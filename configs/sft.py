"""SFT job: knowledge pre-training of CAIG's Prompt Model (LLaVA-NeXT on e-commerce conversations).

Run (CPU, tiny; the marketplace is built into `<workdir>/market/` first when `data.dir` is empty; measured times
are in the README):
    python -m caig_jax.main --config=configs/sft.py:tiny --workdir=runs/sft_tiny
On a marketplace that exists already (the demo's market stage, or the market job's workdir):
    python -m caig_jax.main --config=configs/sft.py:tiny --workdir=runs/sft_tiny --config.data.dir=/tmp/market/tfds

Expect: a progress bar while the answer-token loss falls, then a JSON summary with the targets (greedy prompts that
parse fully into the world's vocabulary, category / colour exact match, PM T=1.0 true CTR minus random on-brief).
`<workdir>/report.md` has, on the held-out `eval.split` products: loss and token accuracy per task family, the
category and colour exact match of the product descriptions, the background prompts (greedy and T=1.0: parse
rate, true CTR next to random on-brief prompts and the per-product oracle prompt, product-bootstrap intervals),
and `prompt_grid.png` (product, its PM prompts, the ads). `<workdir>/export/` is the PM (LoRA merged) as a
transformers LLaVA-NeXT folder: `LlavaNextForConditionalGeneration.from_pretrained(<workdir>/export)`.
TensorBoard: `tensorboard --logdir <workdir>`.

Tuning: with `--config.eval.split=val` (hyper-parameters were chosen that way); `test` (the default) is read once.
Why the tiny choices (one run each on the 40 val products, so differences of a few points are noise):
- background prompts: each product's best creative by *logged* CTR (`prompt_top_fraction`), repeated 3 times. The
  logged creatives' prompts are 40% on-brief and 60% random, so a PM that imitates all of them samples prompts
  worse than random on-brief ones by construction (an exact imitator of the same-category, same-colour training
  products' prompts reaches 0.88 of on-brief's mean true CTR on val products, computed from the logs); each
  product's top 20% gave T=1.0 prompts at 0.97-1.00 of on-brief (5 runs), its best one repeated 2-3 times 1.03
  (2 runs).
- product descriptions repeated 3 times (the only questions whose colour and category must come from the image);
  left-right flips; shrink / shift augmentation halved held-out category accuracy (the tiny tower learns absolute
  patch positions) and is off. On the 400-product world (280 training products) a larger tower (width 96, 3
  layers), 48 px tiles, the last tower layer as features and 1500 steps did not raise colour exact match above
  ~85-90% on val: the model was right on its training products and confused near colours on new ones. The data
  was the limit: on the 1200-product world (840 training products) the same preset reached 95.8% / 90.8% / 91.7%
  on val over model seeds 0-2 (the CAIG demo's SFT stage), so the tiny preset trains there.

Presets (`:ARG`):
- `tiny`: a randomly initialised tiny LLaVA-NeXT (2 decoder layers of width 96, a 2-layer CLIP tower on 32 px
  tiles, one square anyres pinpoint: 36 image tokens per image), every parameter trained from scratch on the
  1200-product marketplace of the reward job (`configs/market.py:reward`); a word tokenizer built from the
  training conversations into `<workdir>/tokenizer`; the CPU split into 4 XLA devices (`cpu_devices`).
- `7b`: CAIG's setup on LLaVA-v1.6-Vicuna-7B: `--config.model.pretrained=/path/to/llava-v1.6-vicuna-7b`
  (transformers or original-LLaVA layout) and `--config.data.dir=/path/to/tfds` (a `llava_conversations` dataset:
  `caig_jax.data.builders.llava_conversations.build` from LLaVA JSON). LoRA rank 128, alpha 256, dropout 0.05 on
  every LLM linear (q/k/v/o, gate/up/down; not the LM head), vision tower and adapter frozen (only LoRA
  parameters train), bf16 compute with fp32 master weights. Mesh: fsdp=16 x tensor=4 = 64 chips (a v4-128 /
  v5p-128 slice: parameters and Adam moments sharded over fsdp, attention heads and MLP over tensor; for a v4-32
  use `--config.mesh.fsdp=4 --config.mesh.tensor=4`), global batch 128, Vicuna-v1 template, 2048-token buckets.
"""

import ml_collections

from configs import market
from configs._common import train_config

PRESETS = ("tiny", "7b")

# Parameter-path regexes for `train.freeze` (paths of `caig_jax.models.llava.LlavaModel`).
VISION_TOWER = "^vision_tower/"
ADAPTER = "^multi_modal_projector/"
# Every linear layer of the Llama decoder (LLaVA's `find_all_linear_names`: not the LM head).
LLM_LINEARS = r"layers/\d+/(self_attn|mlp)/"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    c = ml_collections.ConfigDict()
    c.job = "sft"
    c.seed = 0
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.cpu_devices = 4  # CPU hosts: split into this many XLA devices, the batch sharded over them (0: one device)

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""  # TFDS data dir with llava_conversations; "" = build the marketplace into <workdir>/market
    c.data.market_dir = ""  # the marketplace folder (products, logs, world report); "" = next to data.dir's tfds/
    # The marketplace built when data.dir is "": the reward job's 1200-product world (840 training products; on the
    # 400-product world, 280 training products were too few to learn colour names from the image: see above).
    c.data.market = market.get_config("reward")
    c.data.config_name = ""  # llava_conversations config ("" = the only one)
    c.data.train_split = "train"
    c.data.val_split = "val"
    c.data.template = "vicuna_v1"  # LLaVA's conv_vicuna_v1 (CAIG trains with --version v1)
    c.data.image_size = 32  # tiny presets: the tower's tile side (pretrained: from the checkpoint)
    # Training images, transformed per row (labels unchanged, colours untouched): mirrored left-right with
    # probability 1/2, shrunk by up to `augment_shrink` and shifted by up to `augment_shift` of the side. The tiny
    # tower learns absolute patch positions: shrink 0.2 + shift 0.1 cut held-out category accuracy in half on val.
    c.data.random_flip = True
    c.data.augment_shrink = 0.0
    c.data.augment_shift = 0.0
    c.data.num_buckets = 3  # at most this many padded lengths (compiled step shapes)
    c.data.bucket_multiple = 16
    # Background-prompt conversations to train on: 'all' logged creatives' prompts, or each product's top
    # `prompt_top_fraction` by logged CTR (clicks / impressions of the marketplace's logs: no hidden truth).
    c.data.prompt_selection = "top_logged_ctr"
    c.data.prompt_top_fraction = 0.1  # 8-10 creatives a product: its best logged one
    # The training mixture: family -> how many times each of its conversations is repeated in an epoch.
    c.data.family_weights = ml_collections.ConfigDict(
        {"describe_product": 3, "describe_background": 1, "background_prompt": 3})

    c.model = ml_collections.ConfigDict()
    c.model.pretrained = ""  # LLaVA(-NeXT) folder; "" = the tiny random model below
    c.model.dtype = "float32"  # compute dtype (bfloat16 on TPU); parameters stay float32
    c.model.attention = "auto"  # xla | chunked | splash | cudnn | auto (from the mesh's devices; models/attention.py)
    c.model.lora_rank = 0  # >0: LoRA on the LLM linears matching lora_target (set train.trainable='lora')
    c.model.lora_alpha = 256.0
    c.model.lora_dropout = 0.0
    c.model.lora_target = LLM_LINEARS
    c.model.remat_policy = "none"  # recompute layer activations in backward: none | full | dots | dots_no_batch
    c.model.scan_layers = False  # True: the decoder's training passes and the tower run as one scan (fast compile)
    c.model.tiny = ml_collections.ConfigDict()
    c.model.tiny.hidden_size = 96
    c.model.tiny.intermediate_size = 192
    c.model.tiny.num_layers = 2
    c.model.tiny.num_heads = 4
    c.model.tiny.num_kv_heads = 2
    c.model.tiny.rope_theta = 100.0
    c.model.tiny.vision_hidden_size = 64
    c.model.tiny.vision_layers = 2
    c.model.tiny.vision_heads = 4
    c.model.tiny.vision_patch_size = 8
    c.model.tiny.vision_feature_layer = -2  # LLaVA's: the second-to-last tower layer's patch features

    c.train = train_config()
    c.train.steps = 800
    c.train.batch_size = 32
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 50
    c.train.weight_decay = 0.01
    c.train.end_lr_ratio = 0.05
    c.train.log_every = 25
    c.train.eval_every = 0  # >0: teacher-forced val loss / accuracy every N steps (always: the final evaluation)
    c.train.checkpoint_every = 400

    c.eval = ml_collections.ConfigDict()
    c.eval.split = "test"  # the held-out split of the final evaluation (`val` while tuning)
    c.eval.batch_size = 64
    c.eval.samples = 4  # T=1.0 prompts per product
    c.eval.temperature = 1.0
    c.eval.on_brief = 16  # random on-brief prompts per product (the baseline)
    c.eval.max_new_tokens = 40

    c.export = ml_collections.ConfigDict()
    c.export.enabled = True  # write <workdir>/export (transformers LLaVA-NeXT, LoRA merged)
    c.export.dtype = ""  # "" = as trained (float32); "bfloat16" halves it

    if preset == "tiny":
        pass
    elif preset == "7b":
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 16, 4
        c.cpu_devices = 0
        c.data.dir = "/path/to/tfds"
        c.data.prompt_selection = "all"
        c.data.random_flip = False
        c.data.augment_shrink = 0.0
        c.data.augment_shift = 0.0
        c.data.family_weights = ml_collections.ConfigDict()
        c.data.num_buckets = 4
        c.data.bucket_multiple = 128
        c.model.pretrained = "/path/to/llava-v1.6-vicuna-7b"
        c.model.dtype = "bfloat16"
        c.model.lora_rank = 128
        c.model.lora_alpha = 256.0
        c.model.lora_dropout = 0.05
        # With scan, 'dots_no_batch' does not fit (7B reward step, v5p-128: 148.6 G of HLO temporaries vs 95.7 G);
        # 'full' does (26.7 GiB per chip, 28%): each layer keeps only its input, at the cost of one more forward.
        c.model.remat_policy = "full"
        c.model.scan_layers = True
        c.train.trainable = "lora"  # only the adapters: the vision tower and the projector stay frozen
        c.train.freeze = (VISION_TOWER, ADAPTER)
        c.train.steps = 3000
        c.train.batch_size = 128
        c.train.learning_rate = 2e-4
        c.train.warmup_steps = 90
        c.train.weight_decay = 0.0
        c.train.end_lr_ratio = 0.0
        c.train.log_every = 10
        c.train.eval_every = 500
        c.train.checkpoint_every = 250
        c.eval.batch_size = 128
        c.eval.max_new_tokens = 77
        c.export.dtype = "bfloat16"
    else:
        raise ValueError(f"configs/sft.py: unknown preset {preset!r}; choose 'tiny' or '7b'")
    c.lock()
    return c
