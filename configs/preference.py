"""Preference job: CAIG's DPO + PCPO rounds on the Prompt Model (sample -> render -> judge -> update).

Run (CPU, tiny; needs an SFT PM and a reward model trained on the same marketplace; measured times are in the
README):
    python -m caig_jax.main --config=configs/preference.py:tiny --workdir=runs/po_tiny \\
        --config.sft_workdir=runs/sft_tiny --config.reward_workdir=runs/reward_tiny
Plain DPO (the PCPO ablation): `--config.pcpo.weight=0`.

Expect: per round a line of sampling / judging, a progress bar over the round's steps with the DPO / PCPO losses
and TRL's `rewards/*` metrics, then the held-out figures (true CTR of the policy's prompts, truth-based match
rates, RM win rate vs the SFT PM) per round in `report.md`, `rounds/<r>/grid.png` (chosen vs rejected ads) and
TensorBoard.

Presets (`:ARG`):
- `tiny`: the tiny PM of `configs/sft.py:tiny` with LoRA rank 8 on its linears, 3 rounds of 64 products x 2
  samples, the marketplace painter as the renderer.
- `7b`: CAIG's settings (LoRA r128 a256 dropout 0.05 on every LLM linear, vision tower and adapter frozen, lr 2e-5
  cosine without warmup, 5 rounds, N = 2 at T = 1.0, beta 0.5 for DPO and PCPO, PCPO weight 1) on
  LLaVA-v1.6-Vicuna-7B, bf16, mesh fsdp=16 x tensor=4.
"""

import ml_collections

from configs import sft
from configs._common import train_config

PRESETS = ("tiny", "7b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    c = ml_collections.ConfigDict()
    c.job = "preference"
    c.seed = 0
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.cpu_devices = 4
    c.sft_workdir = ""  # the SFT job's workdir: the policy's start and the fixed reference
    c.reward_workdir = ""  # the reward job's workdir: the judge
    c.market_dir = ""  # the marketplace folder; "" = the one the SFT run trained on

    c.rounds = 3
    c.products_per_round = 64
    c.samples = 2  # prompts per product (N); N > 2 takes best vs worst by the RM's pairwise wins
    c.temperature = 1.0
    c.steps_per_round = 8  # optimizer steps on a round's data (batches drawn from its products)

    c.dpo = ml_collections.ConfigDict({"beta": 0.5})
    c.pcpo = ml_collections.ConfigDict()
    c.pcpo.weight = 1.0  # L = mean L_DPO + weight * mean L_PCPO; 0 = plain DPO
    c.pcpo.beta = 0.5
    c.pcpo.swap = "paper"  # 'paper': another product's title, same image, same y+; 'conversation': CAIG's code
    c.pcpo.mask_ratio = 0.75
    c.pcpo.patch_size = 32

    c.render = ml_collections.ConfigDict()
    c.render.kind = "market"  # 'market': the marketplace painter; 'sd': SD-1.5 + ControlNet inpainting (render.sd_path)
    c.render.size = 64  # the market painter's ad size (SD: the checkpoint's resolution)
    c.render.seed = 0
    c.render.sd_path = ""
    c.render.controlnet_path = ""
    c.render.steps = 30
    c.render.guidance_scale = 7.5
    c.render.attention = "auto"  # the SD renderer's attention, as model.attention

    c.model = ml_collections.ConfigDict()
    c.model.remat_policy = "none"  # recompute layer activations in backward: none | full | dots | dots_no_batch
    c.model.scan_layers = False  # True: the decoder's training passes and the tower run as one scan (fast compile)
    # attention: xla | chunked | splash | cudnn | auto (from the mesh's devices; models/attention.py)
    c.model.attention = "auto"
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    c.lora.target = sft.LLM_LINEARS

    c.generation = ml_collections.ConfigDict()
    c.generation.max_new_tokens = 24
    c.generation.prompt_length = 0  # padded prompt length of the sampler (0: the longest, rounded up to 16)
    c.generation.batch_size = 64
    c.generation.sequence_length = 128  # instruction + answer tokens of a preference sequence

    c.train = train_config()
    c.train.trainable = "lora"  # only the new adapters: the SFT PM's weights, tower and projector stay frozen
    c.train.batch_size = 16
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 0
    c.train.end_lr_ratio = 0.0
    c.train.log_every = 4
    c.train.checkpoint_every = 8

    c.eval = ml_collections.ConfigDict()
    c.eval.split = "val"  # held-out products for the per-round curves (`test` once, by the final comparison)
    c.eval.products = 40
    c.eval.samples = 2

    if preset == "tiny":
        pass
    elif preset == "7b":
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 16, 4
        c.cpu_devices = 0
        c.rounds = 5
        c.products_per_round = 2048
        c.steps_per_round = 16  # one epoch of 2048 products at batch 128
        c.render.kind = "sd"
        c.render.size = 512
        c.render.sd_path = "/path/to/stable-diffusion-v1-5"
        c.render.controlnet_path = "/path/to/control_v11p_sd15_canny"
        # With scan, 'dots_no_batch' does not fit (7B reward step, v5p-128: 148.6 G of HLO temporaries vs 95.7 G);
        # 'full' does (26.7 GiB per chip, 28%): each layer keeps only its input, at the cost of one more forward.
        c.model.remat_policy = "full"
        c.model.scan_layers = True
        c.lora.rank, c.lora.alpha, c.lora.dropout = 128, 256.0, 0.05
        c.generation.max_new_tokens = 77
        c.generation.batch_size = 128
        c.generation.sequence_length = 3072
        c.train.batch_size = 128
        c.train.learning_rate = 2e-5
        c.train.checkpoint_every = 16
        c.eval.products = 512
    else:
        raise ValueError(f"configs/preference.py: unknown preset {preset!r}; choose 'tiny' or '7b'")
    c.lock()
    return c
