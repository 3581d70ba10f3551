"""diffusers' `ControlNetModel` in Flax NNX (NHWC): a copy of the UNet's encoder half steered by a control image.

The control image (`[B, H, W, 3]` in [0, 1], e.g. a Canny edge map at 8x the latent size) goes through the
conditioning embedding (conv stack down to latent size, zero-initialised output conv) and is added after
`conv_in`; every skip activation of the down path and the middle block's output pass through a zero-initialised
1x1 conv and are scaled by `conditioning_scale`. The results feed `UNet2DConditionModel(...,
down_block_additional_residuals=..., mid_block_additional_residual=...)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from caig_jax.models import diffusion_layers as nn
from caig_jax.models import layers, unet

UNSUPPORTED_CONTROLNET_OPTIONS = {
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default",
    "projection_class_embeddings_input_dim": None,
    "addition_time_embed_dim": None,
}


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """The `config.json` fields of diffusers' `ControlNetModel` (defaults are diffusers')."""

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False

    @classmethod
    def from_dict(cls, config) -> "ControlNetConfig":
        cfg = nn.config_from_dict(cls, config, unsupported=UNSUPPORTED_CONTROLNET_OPTIONS, what="ControlNetModel")
        unet._check_blocks(cfg.down_block_types, None, cfg.block_out_channels, cfg.mid_block_type)
        if cfg.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(
                f"unknown controlnet_conditioning_channel_order {cfg.controlnet_conditioning_channel_order!r}"
            )
        return cfg


class ControlNetConditioningEmbedding(nnx.Module):
    """`[B, H, W, 3] -> [B, H/8, W/8, C0]` (for 4 stages): conv_in, (conv, stride-2 conv) pairs, conv_out; SiLU."""

    def __init__(self, conditioning_embedding_channels: int, conditioning_channels: int,
                 block_out_channels: Sequence[int], *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv_in = layers.conv2d(conditioning_channels, block_out_channels[0], 3, padding=1, **kw)
        blocks = []
        for c_in, c_out in zip(block_out_channels[:-1], block_out_channels[1:]):
            blocks.append(layers.conv2d(c_in, c_in, 3, padding=1, **kw))
            blocks.append(layers.conv2d(c_in, c_out, 3, padding=1, strides=2, **kw))
        self.blocks = nnx.List(blocks)
        self.conv_out = layers.conv2d(block_out_channels[-1], conditioning_embedding_channels, 3, padding=1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.silu(self.conv_in(x))
        for conv in self.blocks:
            x = jax.nn.silu(conv(x))
        return self.conv_out(x)


class ControlNetModel(nnx.Module):
    """ControlNet (SD-1.5 canny: `lllyasviel/control_v11p_sd15_canny`).

    Call:
      `controlnet(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
      guess_mode=False) -> (down_block_res_samples, mid_block_res_sample)`

      - `sample`: `[B, h, w, 4]` latents; `timestep`: scalar or `[B]`; `encoder_hidden_states`: `[B, S, D]`.
      - `controlnet_cond`: `[B, 8h, 8w, 3]` control image in [0, 1], RGB (flipped to BGR if the config asks).
      - `conditioning_scale`: a float, a 0-d array or a `[B]` array (per-example scale).
      - `guess_mode`: diffusers' guess mode (residuals scaled by logspace(-1, 0) ramps).

    Returns a tuple of `float32[B, h_i, w_i, C_i]` residuals (one per UNet skip: `conv_in` output, each resnet,
    each downsampler) and the middle-block residual `float32[B, h/8, w/8, C_last]`.
    """

    def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        cfg = ControlNetConfig.from_dict(config)
        self.config = cfg
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        boc = cfg.block_out_channels
        plan = unet.plan_blocks(
            cfg.down_block_types, attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads, cross_attention_dim=cfg.cross_attention_dim,
            layers_per_block=cfg.layers_per_block, transformer_layers_per_block=cfg.transformer_layers_per_block,
            only_cross_attention=cfg.only_cross_attention,
        )
        self.conv_in = layers.conv2d(cfg.in_channels, boc[0], 3, padding=1, **kw)
        time_embed_dim = boc[0] * 4
        self.time_proj_dim = boc[0]
        self.flip_sin_to_cos = cfg.flip_sin_to_cos
        self.freq_shift = cfg.freq_shift
        self.time_embedding = nn.TimestepEmbedding(boc[0], time_embed_dim, act_fn=cfg.act_fn, **kw)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            boc[0], cfg.conditioning_channels, cfg.conditioning_embedding_out_channels, **kw
        )
        unet.build_down_path(
            self, down_block_types=cfg.down_block_types, block_out_channels=boc, plan=plan,
            temb_channels=time_embed_dim, norm_eps=cfg.norm_eps, act_fn=cfg.act_fn,
            norm_num_groups=cfg.norm_num_groups, downsample_padding=cfg.downsample_padding,
            use_linear_projection=cfg.use_linear_projection, mid_block_type=cfg.mid_block_type,
            mid_block_scale_factor=cfg.mid_block_scale_factor, **kw,
        )
        # One zero conv per UNet skip connection, in the order the UNet's down path produces them.
        zero_convs = [layers.conv2d(boc[0], boc[0], 1, **kw)]
        for i, ch in enumerate(boc):
            zero_convs += [layers.conv2d(ch, ch, 1, **kw) for _ in range(cfg.layers_per_block)]
            if i < len(boc) - 1:
                zero_convs.append(layers.conv2d(ch, ch, 1, **kw))
        self.controlnet_down_blocks = nnx.List(zero_convs)
        self.controlnet_mid_block = layers.conv2d(boc[-1], boc[-1], 1, **kw)

    def __call__(
        self,
        sample: jax.Array,
        timestep,
        encoder_hidden_states: jax.Array,
        controlnet_cond: jax.Array,
        conditioning_scale=1.0,
        guess_mode: bool = False,
    ) -> tuple[tuple[jax.Array, ...], jax.Array]:
        cfg = self.config
        sample = jnp.asarray(sample)
        cond = jnp.asarray(controlnet_cond).astype(self.dtype)
        if cfg.controlnet_conditioning_channel_order == "bgr":
            cond = cond[..., ::-1]
        emb = self.time_embedding(unet.time_embedding_input(self, sample, timestep).astype(self.dtype))
        context = jnp.asarray(encoder_hidden_states).astype(self.dtype)
        x = self.conv_in(sample.astype(self.dtype))
        x = x + self.controlnet_cond_embedding(cond)

        skips: tuple[jax.Array, ...] = (x,)
        for block in self.down_blocks:
            x, res = block(x, emb, context)
            skips += res
        if self.mid_block is not None:
            x = self.mid_block(x, emb, context)

        down = [conv(s).astype(jnp.float32) for conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(x).astype(jnp.float32)

        scale = jnp.asarray(conditioning_scale, jnp.float32)
        if scale.ndim == 1:  # one scale per example
            scale = scale[:, None, None, None]
        if guess_mode and not cfg.global_pool_conditions:
            ramps = np.logspace(-1, 0, len(down) + 1).astype(np.float32)  # 0.1 .. 1.0, as diffusers
            down = [d * (float(r) * scale) for d, r in zip(down, ramps)]
            mid = mid * (float(ramps[-1]) * scale)
        else:
            down = [d * scale for d in down]
            mid = mid * scale
        if cfg.global_pool_conditions:
            down = [jnp.mean(d, axis=(1, 2), keepdims=True) for d in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return tuple(down), mid
