"""Baselines job: the paper's reward-model baselines (VAM, CG4CTR, a zero-shot MLLM) under the reward protocol.

Run (CPU, tiny; the same marketplace as `configs/reward.py:tiny`, built into `<workdir>/market` when
`data.dir` is empty; its measured times and results are in the README's baselines section):
    python -m caig_jax.main --config=configs/baselines.py:vam_tiny --workdir=runs/vam_tiny
    python -m caig_jax.main --config=configs/baselines.py:cg4ctr_tiny --workdir=runs/cg4ctr_tiny
    python -m caig_jax.main --config=configs/baselines.py:zero_shot_tiny --workdir=runs/zero_shot_tiny

Expect: the training split's pairs regrouped into product lists (world seed 0: 840 products, 7070 creatives, up to 10 per
product), a progress bar (CG4CTR's list-wise loss stays near its soft labels' entropy, ~1.9), a val evaluation at the
end, then the final evaluation (test read once, `test_reads.jsonl`) and the reward model's headline metrics in
`<workdir>/report.md`.
`benchmarks/reward_comparison.py` runs every row of the paper's comparison over seeds and writes one table.

Presets (`:ARG`):
- `vam_tiny` (also `tiny`): VAM's visual prior, a 3-stage ResNet of BasicBlocks (widths 16/32/64, one block each,
  GroupNorm) on the 32 px creatives the reward preset sees; smoothed CTR with a Beta(1, 39) prior (the
  marketplace's median CTR is ~2.5%), rank label softmax(1000 * CTR), + 0.5 * point MSE to 100 * CTR.
- `cg4ctr_tiny`: CG4CTR, a 2-layer ViT (width 64, 8 px patches) + two 2-layer text encoders (title; attributes
  as the caption) fused by 2 cross-attention blocks, an MLP to a CTR logit; 0.9 list-wise + 0.1 point.
- `zero_shot_tiny`: the reward preset's tiny LLaVA-NeXT untrained (random weights) asked the RM question; the
  log-probabilities of "left" and "right" decide. Set `--config.model.pretrained=FOLDER` for a real (or SFT,
  exported) LLaVA folder; `zero_shot` is the 7B layout (`/path/to/llava-v1.6-vicuna-7b`).
- `vam`, `cg4ctr`: the papers' sizes on 224 px creatives (ResNet-18; ViT-B/16 + 12-layer 768-wide text
  encoders) for an accelerator: set `--config.data.dir` to your `ctr_logs` dataset (CreativeRanking).
"""

import ml_collections

from configs import market
from configs import reward as reward_config
from configs._common import train_config

PRESETS = ("tiny", "vam_tiny", "cg4ctr_tiny", "zero_shot_tiny", "vam", "cg4ctr", "zero_shot")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"configs/baselines.py: unknown preset {preset!r}; choose one of {PRESETS}")
    kind = "zero_shot" if preset.startswith("zero_shot") else ("cg4ctr" if preset.startswith("cg4ctr") else "vam")
    tiny = preset in ("tiny", "vam_tiny", "cg4ctr_tiny", "zero_shot_tiny")
    c = ml_collections.ConfigDict()
    c.job = "baselines"
    c.seed = 0
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.cpu_devices = 4  # as configs/reward.py: the batch sharded over 4 XLA CPU devices

    # The reward preset's data section: the same world, splits and training pairs.
    c.data = ml_collections.ConfigDict()
    c.data.dir = ""  # TFDS data dir with ctr_logs; "" = build the marketplace into <workdir>/market
    c.data.market = market.get_config("reward")
    c.data.image_size = 32  # side of one creative (a pair's half)
    c.data.train_split = "train"
    c.data.train_config = "market_wide"  # the pair set whose creatives form the lists (as the reward model's)
    c.data.cache_train_examples = False  # the creative lists hold the training images in memory already
    c.data.val_split = "val"
    c.data.test_split = "test"

    c.model = ml_collections.ConfigDict()
    c.model.kind = kind
    c.model.dtype = "float32"
    c.loss = ml_collections.ConfigDict()
    c.train = train_config()
    c.train.batch_size = 8  # product lists per step (each up to 10 creatives)
    c.train.steps = 1000
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 100
    c.train.weight_decay = 0.01
    c.train.end_lr_ratio = 0.05
    c.train.log_every = 20
    c.train.eval_every = 1000
    c.train.checkpoint_every = 500
    if kind == "vam":
        c.model.vam = ml_collections.ConfigDict()
        c.model.vam.widths = (16, 32, 64)
        c.model.vam.blocks = (1, 1, 1)
        c.model.vam.stem_kernel = 3
        c.model.vam.stem_stride = 1
        c.model.vam.stem_pool = False
        c.model.vam.norm_groups = 8
        c.loss.prior_clicks = 1.0  # smoothed CTR (clicks + a) / (impressions + a + b)
        c.loss.prior_non_clicks = 39.0
        c.loss.label_temperature = 1000.0  # rank label softmax(1000 * smoothed CTR)
        c.loss.point_weight = 0.5  # + 0.5 * MSE(point, 100 * smoothed CTR)
    elif kind == "cg4ctr":
        c.model.cg4ctr = ml_collections.ConfigDict()
        c.model.cg4ctr.vision_hidden_size = 64
        c.model.cg4ctr.vision_layers = 2
        c.model.cg4ctr.vision_heads = 4
        c.model.cg4ctr.patch_size = 8
        c.model.cg4ctr.text_hidden_size = 64
        c.model.cg4ctr.text_layers = 2
        c.model.cg4ctr.text_heads = 4
        c.model.cg4ctr.max_text_len = 32  # the marketplace's longest title / attributes text: 29 tokens
        c.model.cg4ctr.fusion_layers = 2
        c.model.cg4ctr.fusion_heads = 4
        c.model.cg4ctr.head_hidden = 64
        c.loss.list_weight = 0.9
        c.loss.point_weight = 0.1
    else:  # zero-shot: the reward preset's model section (tiny LLaVA-NeXT, its tokenizer and prompt length)
        rm = reward_config.get_config("tiny" if tiny else "7b")
        c.model.pretrained = rm.model.pretrained
        c.model.max_text_len = rm.model.max_text_len
        c.model.tiny = ml_collections.ConfigDict(rm.model.tiny.to_dict())
        c.model.dtype = rm.model.dtype

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 64
    c.eval.bootstrap_resamples = 1000
    c.eval.final_test = True  # False: a tuning run reported on val (`<workdir>/validation/`), test not read

    if not tiny:
        c.data.dir = "/path/to/tfds"
        c.data.train_config = ""
        c.data.image_size = 224 if kind != "zero_shot" else 512
        c.cpu_devices = 0
        c.train.batch_size = 64
        c.train.steps = 20000
        c.train.learning_rate = 1e-4
        c.train.warmup_steps = 500
        c.train.eval_every = 2000
        c.train.checkpoint_every = 1000
        c.eval.batch_size = 128
        if kind == "vam":  # ResNet-18
            c.model.vam.widths, c.model.vam.blocks = (64, 128, 256, 512), (2, 2, 2, 2)
            c.model.vam.stem_kernel, c.model.vam.stem_stride, c.model.vam.stem_pool = 7, 2, True
            c.model.vam.norm_groups = 32
        elif kind == "cg4ctr":  # ViT-B/16 + BERT-base-sized text encoders
            g = c.model.cg4ctr
            g.vision_hidden_size, g.vision_layers, g.vision_heads, g.patch_size = 768, 12, 12, 16
            g.text_hidden_size, g.text_layers, g.text_heads, g.max_text_len = 768, 12, 12, 64
            g.fusion_layers, g.fusion_heads, g.head_hidden = 2, 12, 256
            c.model.dtype = "bfloat16"
        else:
            c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 16, 4
    c.lock()
    return c
