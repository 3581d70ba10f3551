"""Ahead-of-time compile of a job's real step for a TPU topology, on this (CPU) host: does it fit, how fast can it be.

    pip install --target /opt/libtpu -r requirements-tpu.txt        # once; libtpu compiles for TPUs on any host
    PYTHONPATH=/opt/libtpu python -m caig_jax.aot --config=configs/reward.py:7b --topology=v5p-128

The job's jitted step is built from abstract shapes exactly as the job builds it (the reward job: the engine's
train step on the RewardModel, the preset's batch and sequence length), placed on a mesh of the topology's devices
with the project's logical-axis rules, lowered and compiled by libtpu, and the compiled program's numbers are
printed per chip: argument, output, temporary and total memory against the chip's HBM, FLOPs (the model count
6ND + attention, and XLA's count) and the step-time lower bound at the chip's peak. It exits 1 with a message when
the program does not fit.

Inference jobs compile their whole run: `configs/render.py:sd15` the renderer's sampling program (text encoder,
VAE encode, 30 Euler-a steps of ControlNet + UNet with CFG, VAE decode) for one batch, and `configs/generate.py:7b`
LLaVA-NeXT 7B generation (prefill + KV-cache decode); their "step" is that whole run, their FLOPs are counted from
one unrolled call of the loop body (XLA's count covers a while loop's body once), and generation also prints the
memory-bandwidth bound of reading the weights once per new token.

`--topology` takes a slice name (`v5p-128`, `v5e-256`, `v4-64`: cores for v4/v5p, chips for v5e, as Cloud TPU
names them) or a libtpu topology (`v5p:4x4x4`, `v5e:2x2`). The config's `mesh` must multiply to the chip count
(`-1` fills it). Presets whose `model.pretrained` folder does not exist on this host use the architecture of
LLaVA-v1.6-Vicuna-7B (`caig_jax.models.llava.llava_next_vicuna_7b`) for `7b` presets and the tiny model otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tempfile
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax.experimental import topologies
from jax.sharding import AxisType, Mesh
from ml_collections import config_flags

from caig_jax import parallel
from caig_jax.config_files import add_config_root
from caig_jax.errors import UserError
from caig_jax.models import attention as attention_lib
from caig_jax.models.llava import LlavaModel, layout_for, llava_next_vicuna_7b, read_llava_config
from caig_jax.models.lora import apply_lora
from caig_jax.models.reward import RewardModel, tiny_llava_config
from caig_jax.trainers.preference import make_loss_fn as make_preference_loss
from caig_jax.trainers.reward import make_loss_fn
from caig_jax.trainers.sft import make_loss_fn as make_sft_loss
from caig_jax.trainers.trainer import Trainer

# Cloud TPU slice names -> libtpu topologies. v4 / v5p names count TensorCores (2 per chip), v5e names chips.
SLICES = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4", "v4-64": "v4:2x4x4", "v4-128": "v4:4x4x4",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4",
    "v5p-128": "v5p:4x4x4", "v5p-256": "v5p:4x4x8",
    "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-32": "v5e:4x8", "v5e-64": "v5e:8x8",
    "v5e-128": "v5e:8x16", "v5e-256": "v5e:16x16",
}


# The SFT step's sequence length: its longest length bucket at LLaVA-NeXT-7B's largest anyres image (a 2x2 grid of
# 336 px tiles: 576 + 48 x (48 + 1) = 2928 image tokens) plus its text, padded to the 7b preset's bucket multiple.
SFT_SEQUENCE_LENGTH = 3072


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: int
    peak_bf16_flops: float  # per chip, dense
    hbm_bytes_per_s: float


# By libtpu's device_kind. Public Cloud TPU figures.
CHIPS = {
    "TPU v4": Chip(32 * 2**30, 275e12, 1228e9),
    "TPU v5": Chip(95 * 2**30, 459e12, 2765e9),  # v5p
    "TPU v5 lite": Chip(16 * 2**30, 197e12, 819e9),  # v5e
}


def topology_devices(name: str) -> list:
    """The devices of a TPU topology (`SLICES` name or libtpu form), from libtpu, without any TPU attached."""
    libtpu_name = SLICES.get(name, name)
    if ":" not in libtpu_name:
        raise UserError(f"--topology={name!r} is not a known slice name ({', '.join(SLICES)}) nor a libtpu "
                        "topology such as v5p:4x4x4", fix="pass one of those")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    try:
        return list(topologies.get_topology_desc(libtpu_name, "tpu").devices)
    except Exception as e:  # noqa: BLE001  (no libtpu, or a name libtpu rejects: both one message)
        raise UserError(f"cannot describe TPU topology {libtpu_name!r}: {str(e).splitlines()[0][:200]}",
                        fix="pip install --target DIR -r requirements-tpu.txt; PYTHONPATH=DIR") from None


def topology_mesh(devices: list, sizes: dict) -> Mesh:
    shape = parallel.resolve_mesh_shape(sizes, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


@dataclasses.dataclass
class Program:
    """A job's step ready to lower: `fn(*args)` with abstract `args` (ShapeDtypeStructs carrying shardings)."""

    lowered: Any
    model_flops: float  # per step, whole slice
    flops_note: str
    # Times each chip reads all its argument bytes (the weights) from HBM in one run: a decode loop reads them
    # once per token, which bounds generation by memory bandwidth, not FLOPs. 0: not a bound worth printing.
    weight_reads: int = 0


def _llava_config(config):
    """The job's LLaVA architecture: its `model.pretrained` folder's, LLaVA-v1.6-Vicuna-7B's for a 7b preset whose
    folder is not on this host, else the tiny model."""
    pretrained = config.model.pretrained
    if pretrained and os.path.isdir(pretrained):
        return read_llava_config(pretrained)[0]
    if config.model.dtype == "bfloat16" or config.data.image_size >= 336:  # the 7b preset without its folder
        return llava_next_vicuna_7b()
    return tiny_llava_config(config.model.tiny, config.data.image_size, vocab_size=1024, image_token_id=1023,
                             pad_id=0)


def _layer_settings(llava_config, model_config):
    """`llava_config` with the job's `model.remat_policy` and `model.scan_layers` (what `set_remat` / `set_scan`
    do to a built model)."""
    settings = dict(remat_policy=model_config.remat_policy, scan_layers=model_config.scan_layers)
    return dataclasses.replace(llava_config, text_config=dataclasses.replace(llava_config.text_config, **settings),
                               vision_config=dataclasses.replace(llava_config.vision_config, **settings))


def _batch_spec(mesh: Mesh):
    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(mesh, len(shape)))
    return spec


def _param_count(module) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def reward_program(config, mesh: Mesh) -> Program:
    """The reward job's train step (`caig_jax.trainers.reward` + the engine), abstract, on `mesh`."""
    llava_config = _layer_settings(_llava_config(config), config.model)
    dtype = jnp.dtype(config.model.dtype)
    graphdef, state = parallel.abstract_with_shardings(
        lambda: RewardModel(llava_config, rngs=nnx.Rngs(0), dtype=dtype), mesh)
    # `auto` from the target topology's devices: a TPU step compiled on a CPU host gets splash attention.
    model = attention_lib.configure(nnx.merge(graphdef, state), config.model.get("attention", "auto"), mesh, dtype)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir, mesh, model, make_loss_fn(config.loss.point_weight))
        trainer.close()
    b, t, s = config.train.batch_size, config.model.max_text_len, config.data.image_size
    patches = int(layout_for(llava_config, [(s, 2 * s)])[0, 0]) if llava_config.anyres else 1
    tile = llava_config.vision_config.image_size
    spec = _batch_spec(mesh)
    batch = {
        "input_ids": spec((b, t), jnp.int32), "attention_mask": spec((b, t), jnp.int32),
        "pixel_values": spec((b, patches, 3, tile, tile), jnp.float32),
        "image_layout": spec((b, 7), jnp.int32), "label": spec((b,), jnp.int32), "ctr": spec((b, 2), jnp.float32),
    }
    lowered = trainer.lower_step(batch)
    text = llava_config.text_config
    n_llm, n_tower = _param_count(model.backbone.language_model), _param_count(model.backbone.vision_tower)
    tokens = b * t
    attention = 12 * text.num_hidden_layers * b * t * t * text.hidden_size  # fwd+bwd of QK^T and PV
    tower_tokens = b * patches * (llava_config.vision_config.num_patches + 1)
    flops = 6 * n_llm * tokens + attention + 2 * n_tower * tower_tokens
    return Program(lowered, flops, f"6*N*T ({n_llm / 1e9:.2f}B LLM params x {tokens} tokens) + attention "
                                   f"12*L*B*T^2*d + 2*N_tower*tokens (tower forward only: frozen); remat adds "
                                   "a recomputed forward that is not counted")


def sft_program(config, mesh: Mesh) -> Program:
    """The SFT job's train step (`caig_jax.trainers.sft` + the engine: LoRA on the LLM when the preset has it),
    abstract, on `mesh`, at the longest bucket a LLaVA-NeXT conversation can need (`SFT_SEQUENCE_LENGTH`)."""
    llava_config = _layer_settings(_llava_config(config), config.model)
    dtype = jnp.dtype(config.model.dtype)

    def make():
        model = LlavaModel(llava_config, rngs=nnx.Rngs(0), dtype=dtype)
        if config.model.lora_rank:
            apply_lora(model.language_model, rank=config.model.lora_rank, alpha=config.model.lora_alpha,
                       target=config.model.lora_target, seed=config.seed, dropout=config.model.lora_dropout)
        return model

    graphdef, state = parallel.abstract_with_shardings(make, mesh)
    model = attention_lib.configure(nnx.merge(graphdef, state), config.model.get("attention", "auto"), mesh, dtype)
    accum = config.train.grad_accum_steps
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir, mesh, model, make_sft_loss(accum))
        trainer.close()
    b, t = config.train.batch_size, SFT_SEQUENCE_LENGTH
    tile = llava_config.vision_config.image_size
    spec = _batch_spec(mesh)
    batch = {"input_ids": spec((b, t), jnp.int32), "attention_mask": spec((b, t), jnp.int32),
             "loss_mask": spec((b, t), jnp.int32),
             "pixel_values": spec((b, llava_config.max_patches, 3, tile, tile), jnp.float32),
             "image_layout": spec((b, 7), jnp.int32)}
    if accum > 1:
        batch["loss_weight"] = spec((b,), jnp.float32)
    lowered = trainer.lower_step(batch)
    text = llava_config.text_config
    n_llm, n_tower = _param_count(model.language_model), _param_count(model.vision_tower)
    tower_tokens = b * llava_config.max_patches * (llava_config.vision_config.num_patches + 1)
    flops = 6 * n_llm * b * t + 12 * text.num_hidden_layers * b * t * t * text.hidden_size + 2 * n_tower * tower_tokens
    return Program(lowered, flops, f"6*N*T ({n_llm / 1e9:.2f}B LLM params x {b * t} tokens; LoRA: the frozen "
                                   "weights still take the full backward through activations) + attention "
                                   "12*L*B*T^2*d + 2*N_tower*tokens (tower forward only: frozen)")


def preference_program(config, mesh: Mesh) -> Program:
    """The preference job's train step (LoRA on the PM, three sequences per example), abstract, on `mesh`. The PM
    has LLaVA-v1.6-Vicuna-7B's shapes (CAIG's PM; the SFT workdir is not read), bf16 compute."""
    llava_config = _layer_settings(llava_next_vicuna_7b(), config.model)
    dtype = jnp.bfloat16

    def make():
        model = LlavaModel(llava_config, rngs=nnx.Rngs(0), dtype=dtype)
        apply_lora(model.language_model, rank=config.lora.rank, alpha=config.lora.alpha, target=config.lora.target,
                   seed=config.seed, dropout=config.lora.dropout)
        return model

    graphdef, state = parallel.abstract_with_shardings(make, mesh)
    model = attention_lib.configure(nnx.merge(graphdef, state), config.model.get("attention", "auto"), mesh, dtype)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir, mesh, model, make_preference_loss(config))
        trainer.close()
    b, t = config.train.batch_size, config.generation.sequence_length
    tile = llava_config.vision_config.image_size
    spec = _batch_spec(mesh)
    batch = {}
    for prefix in ("chosen", "rejected", "corrupt"):
        batch.update({f"{prefix}_input_ids": spec((b, t), jnp.int32),
                      f"{prefix}_attention_mask": spec((b, t), jnp.int32),
                      f"{prefix}_loss_mask": spec((b, t), jnp.int32),
                      f"{prefix}_pixel_values": spec((b, llava_config.max_patches, 3, tile, tile), jnp.float32),
                      f"{prefix}_image_layout": spec((b, 7), jnp.int32)})
        batch[f"ref_{prefix}"] = spec((b,), jnp.float32)
    lowered = trainer.lower_step(batch)
    text = llava_config.text_config
    n_llm = _param_count(model.language_model)
    tokens = 3 * b * t
    flops = 6 * n_llm * tokens + 12 * text.num_hidden_layers * 3 * b * t * t * text.hidden_size
    return Program(lowered, flops, f"6*N*T over the 3 sequences ({n_llm / 1e9:.2f}B params x {tokens} tokens; "
                                   "LoRA: the frozen weights still take the full backward through activations) "
                                   "+ attention; tower forward not counted")


# ---------------------------------------------------------------------------------------------------------------
# Inference programs: the renderer's whole sampling run and LLaVA generation. Their loops are `while` loops, which
# XLA's cost analysis counts once, so their FLOPs are counted from one unrolled call of the loop body.
# ---------------------------------------------------------------------------------------------------------------


def _unrolled_flops(fn: Callable, *args) -> float:
    """XLA's FLOP count of `fn(*args)` (abstract, unsharded args), from the lowered HLO: nothing is compiled."""
    cost = jax.jit(fn).lower(*args).cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


def _unsharded(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _renderer_modules(config):
    """(unet, vae, text encoder, controlnet) configs of the render job: its `sd_path` folders when they exist on
    this host, SD-1.5 + ControlNet v1.1 canny otherwise; the job's tiny random pipeline for `tiny_random_weights`."""
    from caig_jax.convert.diffusers import (SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG,
                                            read_config)
    from caig_jax.jobs.render import TINY_CONTROLNET, TINY_TEXT, TINY_UNET, TINY_VAE
    from caig_jax.models.clip import CLIPTextConfig
    from caig_jax.models.controlnet import ControlNetConfig
    from caig_jax.models.unet import UNet2DConditionConfig
    from caig_jax.models.vae import AutoencoderKLConfig

    if config.sd_path and os.path.isdir(config.sd_path):
        unet, vae, text = (read_config(os.path.join(config.sd_path, sub)) for sub in ("unet", "vae", "text_encoder"))
        controlnet = read_config(config.controlnet_path) if config.controlnet_path else None
        return (UNet2DConditionConfig.from_dict(unet), AutoencoderKLConfig.from_dict(vae),
                CLIPTextConfig.from_dict(text), controlnet and ControlNetConfig.from_dict(controlnet))
    if not config.sd_path and config.tiny_random_weights:
        return (UNet2DConditionConfig.from_dict(TINY_UNET), AutoencoderKLConfig.from_dict(TINY_VAE),
                CLIPTextConfig(vocab_size=1000, **TINY_TEXT), ControlNetConfig.from_dict(TINY_CONTROLNET))
    # control_v11p_sd15_canny's config.json: diffusers' ControlNetModel defaults at SD-1.5's text width.
    return (UNet2DConditionConfig.from_dict(SD15_UNET_CONFIG), AutoencoderKLConfig.from_dict(SD15_VAE_CONFIG),
            CLIPTextConfig.from_dict(SD15_TEXT_ENCODER_CONFIG), ControlNetConfig(cross_attention_dim=768))


def render_program(config, mesh: Mesh) -> Program:
    """The render job's sampling program (`caig_jax.diffusion.pipeline`: text encoder, VAE encode, `steps`
    scheduler steps of ControlNet + UNet on the CFG-doubled batch, VAE decode; ControlNet inpainting as CAIG runs
    it), abstract, for one batch of `config.batch_size` images sharded over ('data', 'fsdp') of `mesh`."""
    from caig_jax.diffusion import pipeline, schedulers
    from caig_jax.models.clip import CLIPTextModel
    from caig_jax.models.controlnet import ControlNetModel
    from caig_jax.models.unet import UNet2DConditionModel
    from caig_jax.models.vae import AutoencoderKL

    unet_c, vae_c, text_c, cn_c = _renderer_modules(config)
    if cn_c is None:
        raise UserError("config.controlnet_path is empty: the AOT render program is ControlNet inpainting",
                        fix="pass --config.controlnet_path=DIR (or leave sd_path unset for SD-1.5's shapes)")
    dtype = jnp.dtype(config.dtype)  # the render job stores parameters in its compute dtype
    makers = [lambda cls=cls, c=c: cls(c, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
              for cls, c in ((UNet2DConditionModel, unet_c), (AutoencoderKL, vae_c), (CLIPTextModel, text_c),
                             (ControlNetModel, cn_c))]
    split = [parallel.abstract_with_shardings(make, mesh) for make in makers]
    modules = [attention_lib.configure(nnx.merge(g, s), config.attention, mesh, dtype) for g, s in split]
    graphdefs, states = zip(*(nnx.split(m) for m in modules))

    vae_scale = 2 ** (len(vae_c.block_out_channels) - 1)
    sample = unet_c.sample_size[0] if isinstance(unet_c.sample_size, (tuple, list)) else unet_c.sample_size
    latent, resolution, channels = int(sample or 64), int(sample or 64) * vae_scale, unet_c.in_channels
    b, text_len = config.batch_size, text_c.max_position_embeddings
    shards = parallel.num_batch_shards(mesh)
    b = -(-b // shards) * shards  # the renderer pads a batch to its bucket
    spec = _batch_spec(mesh)
    inputs = {
        "input_ids": spec((b, text_len), jnp.int32), "negative_input_ids": spec((b, text_len), jnp.int32),
        "noise": spec((b, latent, latent, channels), jnp.float32),
        "image_noise": spec((b, latent, latent, channels), jnp.float32),
        "image": spec((b, resolution, resolution, 3), jnp.uint8),
        "mask": spec((b, resolution, resolution), jnp.float32),
        "control": spec((b, resolution, resolution, 3), jnp.uint8),
        "keys": spec((b, 2), jnp.uint32),
        "guidance_scale": jax.ShapeDtypeStruct((), jnp.float32),
        "controlnet_scale": jax.ShapeDtypeStruct((), jnp.float32),
    }
    scheduler = schedulers.scheduler_config_from_dict(config.scheduler, dict(schedulers.SD15_SCHEDULER_CONFIG))
    cfg = config.guidance_scale > 1.0
    program_spec = pipeline.ProgramSpec(scheduler=scheduler, num_steps=config.steps, latent_hw=(latent, latent),
                                        begin_index=0, inpaint=True, use_controlnet=True, cfg=cfg)
    program = pipeline._get_program(program_spec, tuple(graphdefs), mesh)[0]
    with jax.set_mesh(mesh):
        lowered = program.lower(tuple(states), inputs)

    # One denoising step's networks on the CFG batch, counted by XLA on the unrolled call (no loop in it), with the
    # plain attention: XLA does not look into a Pallas kernel (splash counted the UNet's step as 0 FLOPs).
    graphdefs = tuple(nnx.split(attention_lib.set_attention(m, "xla"))[0] for m in modules)
    rows = 2 * b if cfg else b
    x = jax.ShapeDtypeStruct((rows, latent, latent, channels), dtype)
    context = jax.ShapeDtypeStruct((rows, text_len, unet_c.cross_attention_dim), dtype)
    control = jax.ShapeDtypeStruct((rows, resolution, resolution, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((), jnp.float32)

    def denoise(unet_state, cn_state, x, t, context, control):
        down, mid = nnx.merge(graphdefs[3], cn_state)(x, t, context, control)
        return nnx.merge(graphdefs[0], unet_state)(x, t, context, down_block_additional_residuals=down,
                                                  mid_block_additional_residual=mid)

    step_flops = _unrolled_flops(denoise, _unsharded(states[0]), _unsharded(states[3]), x, t, context, control)
    image = jax.ShapeDtypeStruct((b, resolution, resolution, 3), dtype)
    ends_flops = (
        _unrolled_flops(lambda s, x: nnx.merge(graphdefs[1], s).encode(x).mean, _unsharded(states[1]), image)
        + _unrolled_flops(lambda s, z: nnx.merge(graphdefs[1], s).decode(z), _unsharded(states[1]),
                          jax.ShapeDtypeStruct((b, latent, latent, channels), dtype))
        + _unrolled_flops(lambda s, ids: nnx.merge(graphdefs[2], s)(ids)[0], _unsharded(states[2]),
                          jax.ShapeDtypeStruct((rows, text_len), jnp.int32)))
    return Program(lowered, config.steps * step_flops + ends_flops,
                   f"{config.steps} steps x {step_flops:.3e} (ControlNet + UNet on {rows} rows"
                   f"{' = 2 x batch for CFG' if cfg else ''}) + text encoder and VAE encode/decode "
                   f"{ends_flops:.3e}; each counted by XLA on one unrolled call")


# The text of a generation prompt (CAIG's instruction template and the product title), in tokens, next to the image.
GENERATE_TEXT_TOKENS = 64


def _prompt_model_config(config):
    """The generate job's Prompt Model architecture: its `prompt_model` LLaVA-NeXT folder's when that is on this
    host, else `config.aot_model`'s (`7b`: LLaVA-v1.6-Vicuna-7B; `tiny`: a tiny random LLaVA-NeXT)."""
    folder = config.prompt_model
    if os.path.isdir(folder) and os.path.exists(os.path.join(folder, "config.json")):
        try:
            return read_llava_config(folder)[0]
        except Exception:  # noqa: BLE001  (a job workdir's config.json is not a LLaVA config: use aot_model)
            pass
    if config.aot_model == "7b":
        return llava_next_vicuna_7b()
    sizes = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4, rope_theta=30.0,
                 vision_hidden_size=32, vision_layers=2, vision_heads=2, vision_patch_size=8)
    return tiny_llava_config(types.SimpleNamespace(**sizes), 32, vocab_size=1024, image_token_id=1023, pad_id=0)


def generate_program(config, mesh: Mesh) -> Program:
    """The generate job's Prompt Model sampling (`caig_jax.models.llava.generate`: prefill with one image per
    prompt, then `generation.max_new_tokens` decode steps over a KV cache, one while loop), abstract, for a batch of
    `generation.batch_size` prompts of `generation.prompt_length` tokens (0: the largest anyres image's features
    plus `GENERATE_TEXT_TOKENS`), parameters in `param_dtype`."""
    from caig_jax.models.llava import _generate_jit

    llava_config = _prompt_model_config(config)
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    graphdef, state = parallel.abstract_with_shardings(
        lambda: LlavaModel(llava_config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype), mesh)
    model = attention_lib.configure(nnx.merge(graphdef, state), config.attention, mesh, dtype)
    graphdef, state = nnx.split(model)
    g = config.generation
    shards = parallel.num_batch_shards(mesh)
    b = -(-g.batch_size // shards) * shards
    t = g.prompt_length or llava_config.max_image_features + GENERATE_TEXT_TOKENS
    new = g.max_new_tokens
    tile = llava_config.vision_config.image_size
    spec = _batch_spec(mesh)
    inputs = {"ids": spec((b, t), jnp.int32), "mask": spec((b, t), jnp.int32), "index": spec((b,), jnp.int32),
              "pv": spec((b, llava_config.max_patches, 3, tile, tile), jnp.float32),
              "layout": spec((b, 7), jnp.int32)}
    scalar = jax.ShapeDtypeStruct
    with jax.set_mesh(mesh):
        lowered = _generate_jit.lower(graphdef, state, inputs, scalar((4,), jnp.int32), scalar((), jnp.int32),
                                      scalar((), jnp.float32), scalar((), jnp.float32), scalar((), jnp.uint32),
                                      max_new_tokens=new, mesh=mesh)
    text = llava_config.text_config
    n_llm = _param_count(model.language_model) - text.vocab_size * text.hidden_size  # the lookup table is no matmul
    n_tower = _param_count(model.vision_tower)
    cache = t + new
    tower_tokens = b * llava_config.max_patches * (llava_config.vision_config.num_patches + 1)
    # QK^T and PV against the whole preallocated cache (masked, not skipped): 4 * L * d per query and cache slot.
    attention = 4 * text.num_hidden_layers * text.hidden_size * b * (t + new) * cache
    flops = 2 * n_llm * b * (t + new) + attention + 2 * n_tower * tower_tokens
    return Program(lowered, flops,
                   f"2*N*tokens ({n_llm / 1e9:.2f}B LLM matmul params x {b} x ({t} prompt + {new} new) tokens) + "
                   f"attention 4*L*d*tokens*{cache} cache slots + 2*N_tower*{tower_tokens} tower tokens",
                   weight_reads=new)


PROGRAMS: dict[str, Callable[[Any, Mesh], Program]] = {"reward": reward_program, "sft": sft_program,
                                                        "preference": preference_program, "render": render_program,
                                                        "generate": generate_program}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def analyse(config, topology: str) -> dict[str, Any]:
    """Compiles `config`'s step for `topology`; returns the per-chip figures (raises UserError when unsupported)."""
    if config.job not in PROGRAMS:
        raise UserError(f"config.job={config.job!r}: the AOT tool builds {sorted(PROGRAMS)}",
                        fix="add the job's step builder to caig_jax.aot.PROGRAMS")
    devices = topology_devices(topology)
    mesh = topology_mesh(devices, config.mesh.to_dict())
    chip = CHIPS.get(devices[0].device_kind)
    program = PROGRAMS[config.job](config, mesh)
    result: dict[str, Any] = {"topology": topology, "chips": len(devices), "device_kind": devices[0].device_kind,
                              "mesh": dict(mesh.shape)}
    try:
        compiled = program.lowered.compile()
    except Exception as e:  # noqa: BLE001  (XLA reports an HBM overflow as a compile error)
        message = str(e).splitlines()[0][:400]
        result.update(fits=False, error=message)
        return result
    memory = compiled.memory_analysis()
    arg, out, temp = memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.temp_size_in_bytes
    total = arg + out + temp - memory.alias_size_in_bytes
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    per_chip_flops = program.model_flops / len(devices)
    result.update(
        fits=chip is None or total <= chip.hbm_bytes,
        argument_bytes=arg, output_bytes=out, temp_bytes=temp, alias_bytes=memory.alias_size_in_bytes,
        total_bytes=total, hbm_bytes=None if chip is None else chip.hbm_bytes,
        hbm_fraction=None if chip is None else total / chip.hbm_bytes,
        model_flops_per_chip=per_chip_flops, xla_flops_per_chip=float(cost.get("flops", float("nan"))),
        step_lower_bound_s=None if chip is None else per_chip_flops / chip.peak_bf16_flops,
        memory_lower_bound_s=(None if chip is None or not program.weight_reads
                              else program.weight_reads * arg / chip.hbm_bytes_per_s),
        weight_reads=program.weight_reads, flops_note=program.flops_note,
    )
    return result


def report(result: dict[str, Any]) -> str:
    lines = [f"{result['topology']}: {result['chips']} x {result['device_kind']}, mesh {result['mesh']}"]
    if "error" in result:
        lines.append(f"does not compile: {result['error']}")
        return "\n".join(lines)
    hbm = result["hbm_bytes"]
    lines += [
        f"per chip: arguments {_gib(result['argument_bytes'])}, outputs {_gib(result['output_bytes'])}, "
        f"temporaries {_gib(result['temp_bytes'])}, total {_gib(result['total_bytes'])}"
        + ("" if hbm is None else f" of {_gib(hbm)} HBM ({100 * result['hbm_fraction']:.1f}%)"),
        f"FLOPs per chip and step: model {result['model_flops_per_chip']:.3e} ({result['flops_note']}); "
        f"XLA's count {result['xla_flops_per_chip']:.3e}",
    ]
    if result["step_lower_bound_s"] is not None:
        lines.append(f"step-time lower bound at peak: {result['step_lower_bound_s']:.3f} s")
    if result.get("memory_lower_bound_s") is not None:
        lines.append(f"memory-bandwidth lower bound: {result['memory_lower_bound_s']:.3f} s "
                     f"({result['weight_reads']} reads of the {_gib(result['argument_bytes'])} of arguments)")
    lines.append("fits" if result["fits"] else "DOES NOT FIT")
    return "\n".join(lines)


_FLAGS: dict = {}


def _define_flags() -> None:
    """The command line's flags, defined only when run as a program: `caig_jax.main` defines `--config` too, and
    both modules may be imported into one process (tests, notebooks)."""
    _FLAGS["config"] = config_flags.DEFINE_config_file("config", None, "Job config, `configs/NAME.py[:PRESET]`.",
                                                       lock_config=True)
    _FLAGS["topology"] = flags.DEFINE_string("topology", "v5p-128", "TPU slice name or libtpu topology.")


def _parse_flags(argv: list[str]) -> list[str]:
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec:
        add_config_root(spec.partition(":")[0])
    return flags.FLAGS(argv)


def main(argv) -> None:
    del argv
    try:
        result = analyse(_FLAGS["config"].value, _FLAGS["topology"].value)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    print(report(result))
    if not result["fits"]:
        sys.exit(1)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=_parse_flags)
