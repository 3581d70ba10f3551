"""Stable Diffusion's `UNet2DConditionModel` in Flax NNX (diffusers 0.42 semantics, NHWC).

Built from a diffusers `unet/config.json` (as a dict or `UNet2DConditionConfig`). Parameter paths follow the
diffusers state-dict names (see `caig_jax.models.diffusion_layers`), so `caig_jax.convert.diffusers.load_unet` maps a diffusers
folder or an original-LDM single file onto it.

SD-1.5's naming quirk is kept: `attention_head_dim` in its config is the *number of heads* per block
(8 heads of 40/80/160 channels), exactly as diffusers reads it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from caig_jax.models import diffusion_layers as nn
from caig_jax.models import layers

_SUPPORTED_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_SUPPORTED_UP = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers options we do not implement -> the only accepted value (their defaults).
UNSUPPORTED_UNET_OPTIONS = {
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
    "projection_class_embeddings_input_dim": None,
    "addition_time_embed_dim": None,
    "num_attention_heads": None,  # diffusers' UNet2DConditionModel rejects it too
}


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig:
    """The `config.json` fields of diffusers' `UNet2DConditionModel` that SD-1.x/2.x UNets use.

    Defaults are diffusers' defaults; `UNet2DConditionConfig.from_dict(json.load(...))` builds one.
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False  # attention logits/softmax are always float32 here
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    dropout: float = 0.0  # inference only: no dropout is applied

    @classmethod
    def from_dict(cls, config) -> "UNet2DConditionConfig":
        cfg = nn.config_from_dict(cls, config, unsupported=UNSUPPORTED_UNET_OPTIONS, what="UNet2DConditionModel")
        _check_blocks(cfg.down_block_types, cfg.up_block_types, cfg.block_out_channels, cfg.mid_block_type)
        return cfg


def _check_blocks(down, up, block_out_channels, mid_block_type) -> None:
    bad = [t for t in down if t not in _SUPPORTED_DOWN] + [t for t in (up or ()) if t not in _SUPPORTED_UP]
    if bad:
        raise ValueError(f"unsupported block types {bad}; supported: {_SUPPORTED_DOWN + _SUPPORTED_UP}")
    if up is not None and len(down) != len(up):
        raise ValueError(f"down_block_types {down} and up_block_types {up} must have the same length")
    if len(block_out_channels) != len(down):
        raise ValueError(f"block_out_channels {block_out_channels} must have one entry per down block {down}")
    if mid_block_type not in ("UNetMidBlock2DCrossAttn", None):
        raise ValueError(f"unsupported mid_block_type {mid_block_type!r}; supported: UNetMidBlock2DCrossAttn, None")


@dataclasses.dataclass(frozen=True)
class _BlockPlan:
    """Per-block settings after diffusers' expansion rules (ints broadcast, heads quirk)."""

    heads: tuple[int, ...]
    cross_attention_dim: tuple[int, ...]
    layers: tuple[int, ...]
    transformer_layers: tuple[int, ...]
    only_cross_attention: tuple[bool, ...]


def plan_blocks(
    down_block_types: Sequence[str],
    *,
    attention_head_dim,
    num_attention_heads,
    cross_attention_dim,
    layers_per_block,
    transformer_layers_per_block,
    only_cross_attention,
) -> _BlockPlan:
    n = len(down_block_types)
    # diffusers: `num_attention_heads = num_attention_heads or attention_head_dim` (SD's naming quirk).
    heads = num_attention_heads if num_attention_heads is not None else attention_head_dim
    return _BlockPlan(
        heads=nn.per_block(heads, n, "attention_head_dim"),
        cross_attention_dim=nn.per_block(cross_attention_dim, n, "cross_attention_dim"),
        layers=nn.per_block(layers_per_block, n, "layers_per_block"),
        transformer_layers=nn.per_block(transformer_layers_per_block, n, "transformer_layers_per_block"),
        only_cross_attention=nn.per_block(only_cross_attention, n, "only_cross_attention"),
    )


def build_down_path(
    module: nnx.Module,
    *,
    down_block_types: Sequence[str],
    block_out_channels: Sequence[int],
    plan: _BlockPlan,
    temb_channels: int,
    norm_eps: float,
    act_fn: str,
    norm_num_groups: int,
    downsample_padding: int,
    use_linear_projection: bool,
    mid_block_type: str | None,
    mid_block_scale_factor: float,
    rngs: nnx.Rngs,
    dtype,
    param_dtype,
) -> None:
    """Sets `module.down_blocks` and `module.mid_block` (shared by the UNet and the ControlNet)."""
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    blocks = []
    out_ch = block_out_channels[0]
    for i, kind in enumerate(down_block_types):
        in_ch, out_ch = out_ch, block_out_channels[i]
        blocks.append(
            nn.DownBlock2D(
                in_ch, out_ch, temb_channels=temb_channels, num_layers=plan.layers[i],
                add_downsample=i < len(down_block_types) - 1, resnet_eps=norm_eps, resnet_act_fn=act_fn,
                resnet_groups=norm_num_groups, downsample_padding=downsample_padding,
                cross_attention=kind == "CrossAttnDownBlock2D", num_attention_heads=plan.heads[i],
                transformer_layers=plan.transformer_layers[i], cross_attention_dim=plan.cross_attention_dim[i],
                use_linear_projection=use_linear_projection, only_cross_attention=plan.only_cross_attention[i], **kw,
            )
        )
    module.down_blocks = nnx.List(blocks)
    module.mid_block = (
        nn.UNetMidBlock2DCrossAttn(
            block_out_channels[-1], temb_channels=temb_channels, resnet_eps=norm_eps, resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups, num_attention_heads=plan.heads[-1],
            cross_attention_dim=plan.cross_attention_dim[-1], transformer_layers=plan.transformer_layers[-1],
            use_linear_projection=use_linear_projection, output_scale_factor=mid_block_scale_factor, **kw,
        )
        if mid_block_type == "UNetMidBlock2DCrossAttn"
        else None
    )


def time_embedding_input(module, sample: jax.Array, timestep) -> jax.Array:
    """`float32[B, block_out_channels[0]]` sinusoidal features of a scalar or per-example timestep."""
    t = nn.broadcast_timesteps(timestep, sample.shape[0])
    return nn.timestep_embedding(
        t, module.time_proj_dim, flip_sin_to_cos=module.flip_sin_to_cos, freq_shift=module.freq_shift
    )


class UNet2DConditionModel(nnx.Module):
    """Text-conditioned denoising UNet (SD-1.5: 4 levels 320/640/1280/1280, 8 heads, 768-d text).

    Call:
      `unet(sample, timestep, encoder_hidden_states, down_block_additional_residuals=None,
      mid_block_additional_residual=None) -> float32[B, h, w, out_channels]`

      - `sample`: `[B, h, w, in_channels]` noisy latents (NHWC).
      - `timestep`: a scalar or `[B]` (int or float), as diffusers accepts.
      - `encoder_hidden_states`: `[B, S, cross_attention_dim]` text features (`[B, 77, 768]` for SD-1.5).
      - `down_block_additional_residuals` / `mid_block_additional_residual`: a ControlNet's outputs (NHWC),
        added to the skip connections and to the middle block's output; give both or neither.

    Returns the predicted noise (or v), float32. Callable eagerly and inside `jax.jit`.
    """

    def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        cfg = UNet2DConditionConfig.from_dict(config)
        self.config = cfg
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        boc = cfg.block_out_channels
        plan = plan_blocks(
            cfg.down_block_types, attention_head_dim=cfg.attention_head_dim, num_attention_heads=None,
            cross_attention_dim=cfg.cross_attention_dim, layers_per_block=cfg.layers_per_block,
            transformer_layers_per_block=cfg.transformer_layers_per_block,
            only_cross_attention=cfg.only_cross_attention,
        )
        if any(not isinstance(t, int) for t in plan.transformer_layers):
            raise ValueError("nested transformer_layers_per_block (per-layer lists) are not supported")
        self.conv_in = layers.conv2d(cfg.in_channels, boc[0], cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2,
                                     **kw)
        time_embed_dim = cfg.time_embedding_dim or boc[0] * 4
        self.time_proj_dim = boc[0]
        self.flip_sin_to_cos = cfg.flip_sin_to_cos
        self.freq_shift = cfg.freq_shift
        self.time_embedding = nn.TimestepEmbedding(boc[0], time_embed_dim, act_fn=cfg.act_fn, **kw)
        build_down_path(
            self, down_block_types=cfg.down_block_types, block_out_channels=boc, plan=plan,
            temb_channels=time_embed_dim, norm_eps=cfg.norm_eps, act_fn=cfg.act_fn,
            norm_num_groups=cfg.norm_num_groups, downsample_padding=cfg.downsample_padding,
            use_linear_projection=cfg.use_linear_projection, mid_block_type=cfg.mid_block_type,
            mid_block_scale_factor=cfg.mid_block_scale_factor, **kw,
        )
        n = len(boc)
        rev = lambda xs: tuple(reversed(xs))  # noqa: E731
        rboc, rheads, rcad = rev(boc), rev(plan.heads), rev(plan.cross_attention_dim)
        rlayers, rtl, roca = rev(plan.layers), rev(plan.transformer_layers), rev(plan.only_cross_attention)
        ups = []
        out_ch = rboc[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev, out_ch = out_ch, rboc[i]
            ups.append(
                nn.UpBlock2D(
                    rboc[min(i + 1, n - 1)], out_ch, prev, temb_channels=time_embed_dim, num_layers=rlayers[i] + 1,
                    add_upsample=i < n - 1, resnet_eps=cfg.norm_eps, resnet_act_fn=cfg.act_fn,
                    resnet_groups=cfg.norm_num_groups, cross_attention=kind == "CrossAttnUpBlock2D",
                    num_attention_heads=rheads[i], transformer_layers=rtl[i], cross_attention_dim=rcad[i],
                    use_linear_projection=cfg.use_linear_projection, only_cross_attention=roca[i], **kw,
                )
            )
        self.up_blocks = nnx.List(ups)
        self.conv_norm_out = nn.group_norm(boc[0], cfg.norm_num_groups, rngs=rngs, eps=cfg.norm_eps,
                                           param_dtype=param_dtype)
        self.conv_out = layers.conv2d(boc[0], cfg.out_channels, cfg.conv_out_kernel,
                                      padding=(cfg.conv_out_kernel - 1) // 2, **kw)

    def __call__(
        self,
        sample: jax.Array,
        timestep,
        encoder_hidden_states: jax.Array,
        down_block_additional_residuals: Sequence[jax.Array] | None = None,
        mid_block_additional_residual: jax.Array | None = None,
    ) -> jax.Array:
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError(
                "give both down_block_additional_residuals and mid_block_additional_residual (a ControlNet's "
                "outputs) or neither"
            )
        cfg = self.config
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.time_embedding(time_embedding_input(self, sample, timestep).astype(self.dtype))
        context = jnp.asarray(encoder_hidden_states).astype(self.dtype)
        x = self.conv_in(jnp.asarray(sample).astype(self.dtype))

        skips: tuple[jax.Array, ...] = (x,)
        for block in self.down_blocks:
            x, res = block(x, emb, context)
            skips += res
        if down_block_additional_residuals is not None:
            extra = tuple(down_block_additional_residuals)
            if len(extra) != len(skips) or any(a.shape[1:] != b.shape[1:] for a, b in zip(extra, skips)):
                raise ValueError(
                    f"down_block_additional_residuals: expected {len(skips)} arrays shaped "
                    f"{[tuple(s.shape) for s in skips]}, got {[tuple(a.shape) for a in extra]}"
                )
            skips = tuple(s + a.astype(s.dtype) for s, a in zip(skips, extra))

        if self.mid_block is not None:
            x = self.mid_block(x, emb, context)
        if mid_block_additional_residual is not None:
            x = x + jnp.asarray(mid_block_additional_residual).astype(x.dtype)

        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            # diffusers forwards the skip's spatial size when the latent size is not a multiple of 2**levels.
            upsample_size = tuple(skips[-1].shape[1:3]) if i < len(self.up_blocks) - 1 else None
            x = block(x, res, emb, context, upsample_size)

        x = layers.activation(cfg.act_fn)(self.conv_norm_out(x))
        return self.conv_out(x).astype(jnp.float32)
