"""Reward job: CAIG's pairwise CTR reward model (LLaVA-NeXT + cls/ctr heads, CE + 0.5 * MSE).

Run (CPU, tiny; marketplace included; its measured time and results are in the README):
    python -m caig_jax.main --config=configs/reward.py:tiny --workdir=runs/reward_tiny

Expect: the synthetic marketplace built into `<workdir>/market/` (first run only), a progress bar with
steps/s and examples/s while the loss falls from ~0.69, a validation pass at the end of training, a second run
of the same length for the `point_weight=0` ablation, then the final evaluation (the test split, read once per
run) and a summary of the headline metrics: the paper's metric (accuracy vs logged labels) with the oracle,
agreement with the true CTR order on test pairs whose true ratio is in [1.05, 1.20] with its product-bootstrap
95% interval, the margin-true Spearman and the top-1 regret. Read `<workdir>/report.md` (headline metrics,
protocol with the val figures, per category, CTR head, calibration, the ablation table) and
`tensorboard --logdir <workdir>`. Re-running a finished workdir prints the saved report (test is not read
again); a different config needs a new workdir. Tuning: `--config.eval.final_test=False` reports on val only
(`<workdir>/validation/`); `benchmarks/reward_seeds.py` runs 3 model seeds x 2 world seeds
(`--config.seed`, `--config.data.market.seed`) and writes one table.

Presets (`:ARG`):
- `tiny`: a randomly initialised tiny LLaVA-NeXT (2 decoder layers of width 64 with RoPE base 30, a 2-layer CLIP
  tower on 32 px tiles) trained from scratch on 32x64 pair images of a 1200-product marketplace
  (`configs/market.py:reward`); a word-level tokenizer is built from the train and val texts into
  `<workdir>/tokenizer`. The CPU is split into 4 XLA devices (`cpu_devices`), the batch sharded over them.
- `7b`: LLaVA-v1.6-Vicuna-7B on a TPU pod slice: set `--config.model.pretrained=/path/to/llava-v1.6-vicuna-7b`
  (transformers or original-LLaVA layout; heads are loaded if present, else initialised) and
  `--config.data.dir=/path/to/tfds` (your `ctr_logs` dataset). bf16 compute with fp32 master weights, frozen
  vision tower, mesh fsdp=16 x tensor=4 = 64 chips (a v4-128 / v5p-128 slice; for a v4-32 use
  `--config.mesh.fsdp=4 --config.mesh.tensor=4`), 512x1024 pair images, global batch 128.
"""

import ml_collections

from configs import market
from configs._common import train_config

PRESETS = ("tiny", "7b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    c = ml_collections.ConfigDict()
    c.job = "reward"
    c.seed = 0
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    # On a CPU host: split it into this many XLA devices, the batch sharded over them (caig_jax.parallel.
    # set_cpu_devices: XLA's CPU backend runs most fused elementwise ops on one thread). 0: one device.
    c.cpu_devices = 4

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""  # TFDS data dir with ctr_logs; "" = build the marketplace into <workdir>/market
    # The marketplace built when data.dir is "" (1200 products); its `seed` (`--config.data.market.seed`) is the
    # world seed, independent of the model seed `c.seed`.
    c.data.market = market.get_config("reward")
    c.data.image_size = 32  # side of each half of the left|right pair image
    c.data.random_flip = True  # swap left/right (and labels) at random while training
    c.data.train_split = "train"
    # ctr_logs config to train on ("" = the only / default one). The marketplace also builds `market_wide`
    # (same train items, ratio >= 1.05 with no upper bound): the tiny model learns the click model from its
    # clearly ordered pairs; val/test always use CAIG's 1.05-1.20 pairs (`market`). See data/README.md.
    c.data.train_config = "market_wide"
    # Keep the training pairs in memory after their first read, for later epochs and the ablation run (no
    # record read + PNG decode per step). Small data only (the tiny marketplace: ~170 MB).
    c.data.cache_train_examples = True
    c.data.val_split = "val"
    c.data.test_split = "test"

    c.model = ml_collections.ConfigDict()
    c.model.pretrained = ""  # LLaVA(-NeXT) folder; "" = the tiny random model below
    c.model.dtype = "float32"  # compute dtype (bfloat16 on TPU); parameters stay float32
    # Fixed sequence length (image tokens included): one compiled program. The marketplace's longest RM
    # conversation is 164 tokens with the tiny tokenizer; a longer one fails naming max_len.
    c.model.max_text_len = 176
    c.model.attention = "auto"  # xla | chunked | splash | cudnn | auto (from the mesh's devices; models/attention.py)
    c.model.remat_policy = "none"  # recompute layer activations in backward: none | full | dots | dots_no_batch
    c.model.scan_layers = False  # True: the decoder's training passes and the tower run as one scan (fast compile)
    c.model.lora_rank = 0  # >0: LoRA on the LLM's linear layers (set train.trainable='lora')
    c.model.lora_alpha = 256.0
    c.model.lora_target = r"layers/\d+/(self_attn|mlp)/"
    c.model.tiny = ml_collections.ConfigDict()
    c.model.tiny.hidden_size = 64
    c.model.tiny.intermediate_size = 128
    c.model.tiny.num_layers = 2
    c.model.tiny.num_heads = 4
    c.model.tiny.num_kv_heads = 2
    # RoPE base of the tiny decoder. Llama's 10000 spreads a 16-dim head's 8 periods over 6 to 19869 tokens: only
    # 2 are short enough to resolve LLaVA-NeXT's row-major tile layout (the left tile's columns and the right's
    # alternate every 4 tokens) and 3 barely turn over our 176 tokens. Base 30 spreads them over 6 to 125 tokens.
    c.model.tiny.rope_theta = 30.0
    c.model.tiny.vision_hidden_size = 64
    c.model.tiny.vision_layers = 2
    c.model.tiny.vision_heads = 4
    c.model.tiny.vision_patch_size = 8

    c.loss = ml_collections.ConfigDict()
    c.loss.point_weight = 0.5  # CE + point_weight * MSE(ctr_pred, [left_ctr, right_ctr])
    c.ablation_point_weights = (0.0,)  # extra runs (same data, same seed) reported side by side

    c.train = train_config()
    c.train.steps = 2000  # x2 with the ablation run
    c.train.batch_size = 32
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 100
    c.train.weight_decay = 0.01
    c.train.end_lr_ratio = 0.05
    c.train.log_every = 20
    # Evaluate on val (the only split choices are made on) every this many steps and at the end of training
    # (the engine's eval hook); test is read once, afterwards, by the final evaluation (eval.final_test).
    c.train.eval_every = 2000
    c.train.checkpoint_every = 400
    c.train.extra_trainable = ("^cls/", "^ctr/")  # heads train even when trainable='lora'

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 64
    # Product-clustered bootstrap resamples of the final (test) evaluation's intervals (caig_jax.eval.intervals).
    c.eval.bootstrap_resamples = 1000
    # True: after training, the final evaluation reads the test split once (jobs/reward.py). False: a tuning run,
    # reported on the val split (`<workdir>/validation/`) without reading test.
    c.eval.final_test = True

    if preset == "tiny":
        pass
    elif preset == "7b":
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 16, 4
        c.cpu_devices = 0
        c.data.dir = "/path/to/tfds"
        c.data.train_config = ""
        c.data.cache_train_examples = False
        c.data.image_size = 512
        c.model.pretrained = "/path/to/llava-v1.6-vicuna-7b"
        c.model.dtype = "bfloat16"
        c.model.max_text_len = 3072
        # With scan, 'dots_no_batch' does not fit (7B reward step, v5p-128: 148.6 G of HLO temporaries vs 95.7 G);
        # 'full' does (26.7 GiB per chip, 28%): each layer keeps only its input, at the cost of one more forward.
        c.model.remat_policy = "full"
        c.model.scan_layers = True
        c.ablation_point_weights = ()
        c.train.freeze = ("^backbone/vision_tower/",)
        c.train.steps = 3000
        c.train.batch_size = 128
        c.train.learning_rate = 2e-5
        c.train.warmup_steps = 90
        c.train.weight_decay = 0.0
        c.train.end_lr_ratio = 0.0
        c.train.log_every = 10
        c.train.eval_every = 500
        c.train.checkpoint_every = 250
        c.eval.batch_size = 128
    else:
        raise ValueError(f"configs/reward.py: unknown preset {preset!r}; choose 'tiny' or '7b'")
    c.lock()
    return c
