"""Building blocks shared by the Stable Diffusion UNet, ControlNet and VAE (diffusers 0.42 semantics, NHWC).

Every block mirrors its diffusers counterpart (`diffusers.models.resnet.ResnetBlock2D`,
`diffusers.models.transformers.transformer_2d.Transformer2DModel`, `...unet_2d_blocks.CrossAttnDownBlock2D`, ...)
and uses the *same attribute names*, so a diffusers state-dict key is our parameter path with `.` for `/`
(`caig_jax.convert.diffusers` adds the few renames: `weight` <-> `kernel` / `scale`, `to_out.0` <-> `to_out`,
`ff.net.0.proj` <-> `ff.proj`, `ff.net.2` <-> `ff.out`).

Activations are NHWC (`[B, H, W, C]`), token sequences `[B, T, C]`. Norms and softmax run in float32 whatever
the compute `dtype`; parameters carry logical axis names (see `caig_jax.parallel.LOGICAL_AXIS_RULES`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from caig_jax.models import attention, layers

# ---------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------


def group_norm(features: int, num_groups: int, *, rngs: nnx.Rngs, eps: float, param_dtype) -> nnx.GroupNorm:
    """`layers.group_norm` with two-pass variance: SD activations (VAE decoder especially) have means large
    against their spread, where E[x^2] - E[x]^2 loses the float32 digits the parity tests need."""
    norm = layers.group_norm(features, num_groups, rngs=rngs, epsilon=eps, param_dtype=param_dtype)
    norm.use_fast_variance = False
    return norm


def layer_norm(features: int, *, rngs: nnx.Rngs, eps: float, param_dtype) -> nnx.LayerNorm:
    """`layers.layer_norm` (float32) with two-pass variance (see `group_norm`)."""
    norm = layers.layer_norm(features, rngs=rngs, epsilon=eps, param_dtype=param_dtype)
    norm.use_fast_variance = False
    return norm


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool,
    freq_shift: float,
    scale: float = 1.0,
    max_period: int = 10000,
) -> jax.Array:
    """diffusers' `get_timestep_embedding`: sinusoidal features of (possibly fractional) timesteps.

    Args:
      timesteps: `[B]` numbers (int or float).
    Returns:
      `float32[B, dim]`, `[cos, sin]` halves when `flip_sin_to_cos` else `[sin, cos]`.
    """
    half = dim // 2
    # The frequencies are static: computed in numpy float32 in the same order torch uses, so the products with
    # large timesteps (up to 999) round the same way as the reference.
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - freq_shift)
    freqs = jnp.asarray(np.exp(exponent).astype(np.float32))
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None, :]
    args = scale * args
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def broadcast_timesteps(timestep, batch: int) -> jax.Array:
    """A scalar or `[B]` timestep -> `float32[B]` (diffusers accepts both)."""
    t = jnp.asarray(timestep, jnp.float32)
    if t.ndim == 0:
        return jnp.broadcast_to(t, (batch,))
    if t.ndim == 1 and t.shape[0] in (1, batch):
        return jnp.broadcast_to(t, (batch,))
    raise ValueError(f"timestep must be a scalar or have shape [{batch}] (one per example), got shape {t.shape}")


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """`F.interpolate(mode="nearest")` on NHWC: source index floor(dst * in / out)."""
    _, h, w, _ = x.shape
    oh, ow = size
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = np.minimum(np.floor(np.arange(oh) * (h / oh)).astype(np.int32), h - 1)
    cols = np.minimum(np.floor(np.arange(ow) * (w / ow)).astype(np.int32), w - 1)
    return x[:, rows][:, :, cols]


# ---------------------------------------------------------------------------------------------------------------
# Time embedding, resnets, resampling
# ---------------------------------------------------------------------------------------------------------------


class TimestepEmbedding(nnx.Module):
    """`linear_1 -> act -> linear_2`: `[B, in_dim] -> [B, time_embed_dim]`."""

    def __init__(self, in_dim: int, time_embed_dim: int, *, act_fn: str = "silu", rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.linear_1 = layers.linear(in_dim, time_embed_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype,
                                      param_dtype=param_dtype)
        self.linear_2 = layers.linear(time_embed_dim, time_embed_dim, ("mlp", "embed"), rngs=rngs, dtype=dtype,
                                      param_dtype=param_dtype)
        self.act_fn = act_fn

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(layers.activation(self.act_fn)(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
    """GroupNorm -> act -> conv3x3 (+ time embedding) -> GroupNorm -> act -> conv3x3, plus a (1x1) shortcut.

    `__call__(x: [B, H, W, Cin], temb: [B, T] | None) -> [B, H, W, Cout]`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int | None,
        groups: int,
        groups_out: int | None = None,
        eps: float = 1e-6,
        act_fn: str = "silu",
        output_scale_factor: float = 1.0,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = group_norm(in_channels, groups, rngs=rngs, eps=eps, param_dtype=param_dtype)
        self.conv1 = layers.conv2d(in_channels, out_channels, 3, padding=1, **kw)
        self.time_emb_proj = (
            layers.linear(temb_channels, out_channels, ("embed", "conv_out"), **kw) if temb_channels else None
        )
        self.norm2 = group_norm(out_channels, groups_out or groups, rngs=rngs, eps=eps, param_dtype=param_dtype)
        self.conv2 = layers.conv2d(out_channels, out_channels, 3, padding=1, **kw)
        self.conv_shortcut = layers.conv2d(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None
        self.act_fn = act_fn
        self.output_scale_factor = output_scale_factor

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        act = layers.activation(self.act_fn)
        h = self.conv1(act(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(act(temb))[:, None, None, :]
        h = self.conv2(act(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return ((x + h) / self.output_scale_factor).astype(h.dtype)


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv (`padding=0` pads right/bottom by one first, as the VAE encoder does)."""

    def __init__(self, channels: int, out_channels: int | None = None, *, padding: int = 1, rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.padding = padding
        self.conv = layers.conv2d(channels, out_channels or channels, 3, strides=2, padding=padding, rngs=rngs,
                                  dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 (or to `output_size`) then a 3x3 conv."""

    def __init__(self, channels: int, out_channels: int | None = None, *, rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.conv = layers.conv2d(channels, out_channels or channels, 3, padding=1, rngs=rngs, dtype=dtype,
                                  param_dtype=param_dtype)

    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        _, h, w, _ = x.shape
        x = resize_nearest(x, output_size or (2 * h, 2 * w))
        return self.conv(x)


# ---------------------------------------------------------------------------------------------------------------
# Attention and transformer blocks
# ---------------------------------------------------------------------------------------------------------------


class Attention(nnx.Module):
    """diffusers `Attention` with the default processor: multi-head (cross-)attention over tokens.

    `__call__(x: [B, T, Cq], context: [B, S, Cc] | None = None) -> [B, T, Cq]`; with `norm_num_groups` it is the
    VAE's spatial self-attention (`group_norm` first, then `residual_connection` and `rescale_output_factor`).
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        bias: bool = False,
        out_bias: bool = True,
        norm_num_groups: int | None = None,
        eps: float = 1e-5,
        residual_connection: bool = False,
        rescale_output_factor: float = 1.0,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.group_norm = (
            group_norm(query_dim, norm_num_groups, rngs=rngs, eps=eps, param_dtype=param_dtype)
            if norm_num_groups
            else None
        )
        self.to_q = layers.linear(query_dim, inner, ("embed", "heads"), use_bias=bias, **kw)
        self.to_k = layers.linear(kv_dim, inner, ("embed", "heads"), use_bias=bias, **kw)
        self.to_v = layers.linear(kv_dim, inner, ("embed", "heads"), use_bias=bias, **kw)
        self.to_out = layers.linear(inner, query_dim, ("heads", "embed"), use_bias=out_bias, **kw)
        self.heads = heads
        self.dim_head = dim_head
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.attention_impl = "xla"  # `attention.set_attention` picks another implementation
        self.attention_mesh = None  # and the mesh it runs on (splash partitions over it)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        residual = x
        if self.group_norm is not None:
            x = self.group_norm(x)
        context = x if context is None else context
        b, t, _ = x.shape
        s = context.shape[1]
        q = self.to_q(x).reshape(b, t, self.heads, self.dim_head)
        k = self.to_k(context).reshape(b, s, self.heads, self.dim_head)
        v = self.to_v(context).reshape(b, s, self.heads, self.dim_head)
        out = attention.attention(q, k, v, impl=self.attention_impl, mesh=self.attention_mesh)
        out = self.to_out(out)
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out


class FeedForward(nnx.Module):
    """GEGLU feed-forward: `proj` (`ff.net.0.proj`, dim -> 2*inner) -> value * gelu(gate) -> `out` (`ff.net.2`)."""

    def __init__(self, dim: int, *, mult: int = 4, activation_fn: str = "geglu", rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        if activation_fn != "geglu":
            raise ValueError(f"unsupported transformer activation_fn {activation_fn!r}; SD-1.5 uses 'geglu'")
        inner = int(dim * mult)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.proj = layers.linear(dim, 2 * inner, ("embed", "mlp"), **kw)
        self.out = layers.linear(inner, dim, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return self.out(value * jax.nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nnx.Module):
    """LayerNorm self-attention, LayerNorm cross-attention on the text, LayerNorm GEGLU MLP; all residual.

    `__call__(x: [B, T, C], context: [B, S, Ccross]) -> [B, T, C]`.
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None,
        only_cross_attention: bool = False,
        norm_eps: float = 1e-5,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.only_cross_attention = only_cross_attention
        self.norm1 = layer_norm(dim, rngs=rngs, eps=norm_eps, param_dtype=param_dtype)
        self.attn1 = Attention(
            dim, heads=heads, dim_head=dim_head,
            cross_attention_dim=cross_attention_dim if only_cross_attention else None, **kw,
        )
        self.norm2 = layer_norm(dim, rngs=rngs, eps=norm_eps, param_dtype=param_dtype)
        self.attn2 = Attention(dim, heads=heads, dim_head=dim_head, cross_attention_dim=cross_attention_dim, **kw)
        self.norm3 = layer_norm(dim, rngs=rngs, eps=norm_eps, param_dtype=param_dtype)
        self.ff = FeedForward(dim, **kw)

    def __call__(self, x: jax.Array, context: jax.Array | None) -> jax.Array:
        dtype = x.dtype
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x.astype(dtype)


class Transformer2DModel(nnx.Module):
    """Spatial transformer: GroupNorm -> proj_in (1x1 conv or linear) -> transformer blocks -> proj_out, residual.

    `__call__(x: [B, H, W, C], context: [B, S, Ccross]) -> [B, H, W, C]`.
    """

    def __init__(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        in_channels: int,
        *,
        num_layers: int = 1,
        cross_attention_dim: int | None = None,
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        inner = num_attention_heads * attention_head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.use_linear_projection = use_linear_projection
        self.norm = group_norm(in_channels, norm_num_groups, rngs=rngs, eps=1e-6, param_dtype=param_dtype)
        if use_linear_projection:
            self.proj_in = layers.linear(in_channels, inner, ("embed", "mlp"), **kw)
            self.proj_out = layers.linear(inner, in_channels, ("mlp", "embed"), **kw)
        else:
            self.proj_in = layers.conv2d(in_channels, inner, 1, **kw)
            self.proj_out = layers.conv2d(inner, in_channels, 1, **kw)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    inner, heads=num_attention_heads, dim_head=attention_head_dim,
                    cross_attention_dim=cross_attention_dim, only_cross_attention=only_cross_attention, **kw,
                )
                for _ in range(num_layers)
            ]
        )

    def __call__(self, x: jax.Array, context: jax.Array | None) -> jax.Array:
        b, h, w, _ = x.shape
        residual = x
        x = self.norm(x)
        if self.use_linear_projection:
            x = self.proj_in(x.reshape(b, h * w, -1))
        else:
            x = self.proj_in(x).reshape(b, h * w, -1)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear_projection:
            x = self.proj_out(x).reshape(b, h, w, -1)
        else:
            x = self.proj_out(x.reshape(b, h, w, -1))
        return (x + residual).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# UNet down / mid / up blocks
# ---------------------------------------------------------------------------------------------------------------


class DownBlock2D(nnx.Module):
    """`num_layers` resnets (+ optional cross-attention transformer after each) and an optional downsampler.

    Covers diffusers' `DownBlock2D` (`cross_attention=False`), `CrossAttnDownBlock2D` and, with
    `temb_channels=None`, the VAE's `DownEncoderBlock2D`.
    `__call__(x, temb, context) -> (x, residuals)`, residuals = one per resnet (+ the downsampled output).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int | None,
        num_layers: int,
        add_downsample: bool,
        resnet_eps: float,
        resnet_act_fn: str,
        resnet_groups: int,
        downsample_padding: int = 1,
        cross_attention: bool = False,
        num_attention_heads: int = 1,
        transformer_layers: int | tuple[int, ...] = 1,
        cross_attention_dim: int | None = None,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        output_scale_factor: float = 1.0,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        if isinstance(transformer_layers, int):
            transformer_layers = (transformer_layers,) * num_layers
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels, out_channels, temb_channels=temb_channels,
                    groups=resnet_groups, eps=resnet_eps, act_fn=resnet_act_fn,
                    output_scale_factor=output_scale_factor, **kw,
                )
                for i in range(num_layers)
            ]
        )
        self.attentions = (
            nnx.List(
                [
                    Transformer2DModel(
                        num_attention_heads, out_channels // num_attention_heads, out_channels,
                        num_layers=transformer_layers[i], cross_attention_dim=cross_attention_dim,
                        norm_num_groups=resnet_groups, use_linear_projection=use_linear_projection,
                        only_cross_attention=only_cross_attention, **kw,
                    )
                    for i in range(num_layers)
                ]
            )
            if cross_attention
            else None
        )
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, out_channels, padding=downsample_padding, **kw)])
            if add_downsample
            else None
        )

    def __call__(self, x, temb=None, context=None):
        residuals = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            residuals.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            residuals.append(x)
        return x, tuple(residuals)


class UpBlock2D(nnx.Module):
    """diffusers' `UpBlock2D` / `CrossAttnUpBlock2D`: each resnet eats the concatenation with one skip residual.

    `__call__(x, residuals, temb, context, upsample_size=None) -> x`; `residuals` are consumed from the end.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        prev_output_channel: int,
        *,
        temb_channels: int,
        num_layers: int,
        add_upsample: bool,
        resnet_eps: float,
        resnet_act_fn: str,
        resnet_groups: int,
        cross_attention: bool = False,
        num_attention_heads: int = 1,
        transformer_layers: int | tuple[int, ...] = 1,
        cross_attention_dim: int | None = None,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        output_scale_factor: float = 1.0,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        if isinstance(transformer_layers, int):
            transformer_layers = (transformer_layers,) * num_layers
        resnets = []
        for i in range(num_layers):
            res_skip = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channel if i == 0 else out_channels
            resnets.append(
                ResnetBlock2D(
                    resnet_in + res_skip, out_channels, temb_channels=temb_channels, groups=resnet_groups,
                    eps=resnet_eps, act_fn=resnet_act_fn, output_scale_factor=output_scale_factor, **kw,
                )
            )
        self.resnets = nnx.List(resnets)
        self.attentions = (
            nnx.List(
                [
                    Transformer2DModel(
                        num_attention_heads, out_channels // num_attention_heads, out_channels,
                        num_layers=transformer_layers[i], cross_attention_dim=cross_attention_dim,
                        norm_num_groups=resnet_groups, use_linear_projection=use_linear_projection,
                        only_cross_attention=only_cross_attention, **kw,
                    )
                    for i in range(num_layers)
                ]
            )
            if cross_attention
            else None
        )
        self.upsamplers = nnx.List([Upsample2D(out_channels, out_channels, **kw)]) if add_upsample else None

    def __call__(self, x, residuals, temb=None, context=None, upsample_size=None):
        residuals = list(residuals)
        for i, resnet in enumerate(self.resnets):
            skip = residuals.pop()
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(nnx.Module):
    """resnet -> (transformer -> resnet) x num_layers. `__call__(x, temb, context) -> x`."""

    def __init__(
        self,
        in_channels: int,
        *,
        temb_channels: int,
        resnet_eps: float,
        resnet_act_fn: str,
        resnet_groups: int,
        num_attention_heads: int,
        cross_attention_dim: int,
        transformer_layers: int | tuple[int, ...] = 1,
        num_layers: int = 1,
        use_linear_projection: bool = False,
        output_scale_factor: float = 1.0,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        if isinstance(transformer_layers, int):
            transformer_layers = (transformer_layers,) * num_layers

        def resnet():
            return ResnetBlock2D(
                in_channels, in_channels, temb_channels=temb_channels, groups=resnet_groups, eps=resnet_eps,
                act_fn=resnet_act_fn, output_scale_factor=output_scale_factor, **kw,
            )

        self.resnets = nnx.List([resnet() for _ in range(num_layers + 1)])
        self.attentions = nnx.List(
            [
                Transformer2DModel(
                    num_attention_heads, in_channels // num_attention_heads, in_channels,
                    num_layers=transformer_layers[i], cross_attention_dim=cross_attention_dim,
                    norm_num_groups=resnet_groups, use_linear_projection=use_linear_projection, **kw,
                )
                for i in range(num_layers)
            ]
        )

    def __call__(self, x, temb=None, context=None):
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context), temb)
        return x


class UNetMidBlock2D(nnx.Module):
    """resnet -> (spatial self-attention -> resnet) x num_layers: the VAE's middle block (no text, no time).

    `__call__(x: [B, H, W, C], temb=None) -> [B, H, W, C]`.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        temb_channels: int | None,
        resnet_eps: float,
        resnet_act_fn: str,
        resnet_groups: int,
        attention_head_dim: int,
        add_attention: bool = True,
        num_layers: int = 1,
        output_scale_factor: float = 1.0,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)

        def resnet():
            return ResnetBlock2D(
                in_channels, in_channels, temb_channels=temb_channels, groups=resnet_groups, eps=resnet_eps,
                act_fn=resnet_act_fn, output_scale_factor=output_scale_factor, **kw,
            )

        self.resnets = nnx.List([resnet() for _ in range(num_layers + 1)])
        self.attentions = (
            nnx.List(
                [
                    Attention(
                        in_channels, heads=in_channels // attention_head_dim, dim_head=attention_head_dim,
                        bias=True, norm_num_groups=resnet_groups, eps=resnet_eps, residual_connection=True,
                        rescale_output_factor=output_scale_factor, **kw,
                    )
                    for _ in range(num_layers)
                ]
            )
            if add_attention
            else None
        )

    def __call__(self, x, temb=None):
        x = self.resnets[0](x, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.attentions is not None:
                b, h, w, c = x.shape
                x = self.attentions[i](x.reshape(b, h * w, c)).reshape(b, h, w, c)
            x = resnet(x, temb)
        return x


class UpDecoderBlock2D(nnx.Module):
    """The VAE decoder's up block: resnets (no skips, no time) then an optional upsampler. `x -> x`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        add_upsample: bool,
        resnet_eps: float,
        resnet_act_fn: str,
        resnet_groups: int,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels, out_channels, temb_channels=None, groups=resnet_groups,
                    eps=resnet_eps, act_fn=resnet_act_fn, **kw,
                )
                for i in range(num_layers)
            ]
        )
        self.upsamplers = nnx.List([Upsample2D(out_channels, out_channels, **kw)]) if add_upsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


# ---------------------------------------------------------------------------------------------------------------
# diffusers config.json -> frozen dataclass
# ---------------------------------------------------------------------------------------------------------------


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def config_from_dict(cls, config, *, unsupported: dict, what: str):
    """Builds the frozen config dataclass `cls` from a diffusers `config.json` dict (or returns `config` if it
    already is one).

    Keys that are fields of `cls` are taken (lists become tuples); keys in `unsupported` must keep their
    diffusers default (a feature we do not implement) or a ValueError names them; keys starting with `_`
    (`_class_name`, `_diffusers_version`) and unknown keys are ignored.
    """
    if isinstance(config, cls):
        return config
    if not isinstance(config, dict):
        config = dict(config)
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = [
        f"{k}={config[k]!r} (supported: {v!r})"
        for k, v in unsupported.items()
        if k in config and _freeze(config[k]) != _freeze(v)
    ]
    if bad:
        raise ValueError(f"{what}: config options not supported by caig_jax: " + "; ".join(bad))
    return cls(**{k: _freeze(v) for k, v in config.items() if k in fields})


def per_block(value, n: int, name: str) -> tuple:
    """An int/str/bool (same for every block) or a per-block sequence -> a tuple of length `n`."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"config {name}={value!r} must have one entry per block ({n})")
        return tuple(value)
    return (value,) * n
