"""Shared helpers for the renderer parity tests: tiny random diffusers models, layout conversion, jitted calls."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
import torch
from flax import nnx

# Parity tolerance of the issue: max|ours - ref| / max|ref| in float32. Never loosen it.
TOL = 1e-4

TINY_UNET = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4),  # SD's quirk: the number of heads per block
    norm_num_groups=8,
)

TINY_CONTROLNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
    norm_num_groups=8,
    conditioning_embedding_out_channels=(8, 16),  # one stride-2 stage: control image at 2x the latent size
)

TINY_VAE = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=32,
)

TINY_CLIP_TEXT = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)


def perturb(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Adds noise to every parameter: zero-initialised convs (ControlNet) and unit norms would otherwise hide
    layout bugs (a zero kernel looks the same in any layout)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def nhwc(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 2, 3, 1)


def nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def jitted(module: nnx.Module):
    """`module(*args, **kwargs)` as one jitted program over the split state (what the pipeline does).

    Keep the returned callable to reuse its compilations; `params=` runs another module of the same structure
    (e.g. the same UNet loaded from another checkpoint) through the same compiled program.
    """
    graphdef, state = nnx.split(module)
    fn = jax.jit(lambda state, *args, **kwargs: nnx.merge(graphdef, state)(*args, **kwargs))

    def call(*args, params=None, **kwargs):
        return fn(state if params is None else params, *args, **kwargs)

    return call


class Loaded(NamedTuple):
    ref: Any  # the PyTorch diffusers model
    ours: Any  # ours, loaded from `folder`
    folder: str
    apply: Any  # jitted(ours)


_CACHE: dict[tuple[str, int], Loaded] = {}


def tiny_unet(tmp_path_factory) -> Loaded:
    """The tiny random UNet, saved with save_pretrained and loaded through `load_unet`.

    Cached per pytest session (keyed on its `tmp_path_factory`), so the test modules share the model and its
    compiled programs: a fixture in a test module (not conftest) would be built once per module.
    """
    from diffusers import UNet2DConditionModel

    from caig_jax.convert.diffusers import load_unet

    cache_key = ("unet", id(tmp_path_factory))
    if cache_key in _CACHE:
        return _CACHE[cache_key]
    torch.manual_seed(0)
    ref = perturb(UNet2DConditionModel(**TINY_UNET), seed=1)
    folder = tmp_path_factory.mktemp("unet")
    ref.save_pretrained(folder)
    ours = load_unet(folder)
    _CACHE[cache_key] = Loaded(ref, ours, str(folder), jitted(ours))
    return _CACHE[cache_key]


def _randomise_zero_convs(controlnet, seed: int) -> None:
    """ControlNet's zero convolutions start at zero; a random tiny model should exercise the residual path."""
    gen = torch.Generator().manual_seed(seed)
    modules = list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]
    modules.append(controlnet.controlnet_cond_embedding.conv_out)
    with torch.no_grad():
        for m in modules:
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.05)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.05)


def write_tiny_sd_with_diffusers(folder: str, *, seed: int = 0) -> tuple[str, str]:
    """The render job's tiny SD + ControlNet shapes (`caig_jax.jobs.render.TINY_*`), made and written by PyTorch
    diffusers' `save_pretrained` (the parity tests' reference weights; the job itself writes its own with
    `caig_jax.convert.diffusers.save_pipeline`). Returns (sd_path, controlnet_path)."""
    import json
    import os

    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        PNDMScheduler,
        StableDiffusionControlNetInpaintPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from caig_jax.diffusion.schedulers import SD15_SCHEDULER_CONFIG
    from caig_jax.jobs import render as render_job

    torch.manual_seed(seed)
    tokenizer = render_job.tiny_clip_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **render_job.TINY_TEXT,
    )
    controlnet = ControlNetModel(**render_job.TINY_CONTROLNET).eval()
    _randomise_zero_convs(controlnet, seed + 1)
    pipe = StableDiffusionControlNetInpaintPipeline(
        vae=AutoencoderKL(**render_job.TINY_VAE).eval(),
        text_encoder=CLIPTextModel(text_config).eval(),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**render_job.TINY_UNET).eval(),
        controlnet=controlnet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    # SD-1.5 ships a hand-written scheduler config without defaults (e.g. no timestep_spacing); keep that.
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SD15_SCHEDULER_CONFIG, f, indent=2)
    return folder, os.path.join(folder, "controlnet")

