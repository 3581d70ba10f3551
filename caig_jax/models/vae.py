"""Stable Diffusion's `AutoencoderKL` (the VAE) in Flax NNX, NHWC, diffusers 0.42 semantics.

`encode` maps images in [-1, 1] to a diagonal Gaussian over latents; `decode` maps latents back. The
`scaling_factor` (0.18215 for SD-1.5) is *not* applied inside, exactly as in diffusers: a pipeline multiplies
`encode(x).sample(key)` by it before diffusion and divides by it before `decode`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from caig_jax.models import diffusion_layers as nn
from caig_jax.models import layers


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """The `vae/config.json` fields of diffusers' `AutoencoderKL` (defaults are diffusers')."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, config) -> "AutoencoderKLConfig":
        cfg = nn.config_from_dict(cls, config, unsupported={}, what="AutoencoderKL")
        bad = [t for t in cfg.down_block_types if t != "DownEncoderBlock2D"]
        bad += [t for t in cfg.up_block_types if t != "UpDecoderBlock2D"]
        if bad:
            raise ValueError(f"AutoencoderKL: unsupported block types {bad}; supported: DownEncoderBlock2D, "
                             "UpDecoderBlock2D")
        if not (len(cfg.down_block_types) == len(cfg.up_block_types) == len(cfg.block_out_channels)):
            raise ValueError("AutoencoderKL: down_block_types, up_block_types and block_out_channels must have "
                             "the same length")
        return cfg


@struct.dataclass
class DiagonalGaussianDistribution:
    """The encoder's posterior: `mean`, `logvar` (clamped to [-30, 20]), both `float32[B, h, w, latent_channels]`.

    A pytree, so `jax.jit`-ed functions may return it.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussianDistribution":
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """`mean + std * N(0, 1)` with noise from `key`."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL to N(0, 1) per example, `float32[B]`."""
        return 0.5 * jnp.sum(self.mean**2 + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


class Encoder(nnx.Module):
    """`[B, H, W, 3] -> [B, H/2^(L-1), W/2^(L-1), 2 * latent_channels]` (mean and logvar moments)."""

    def __init__(self, cfg: AutoencoderKLConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        boc = cfg.block_out_channels
        self.conv_in = layers.conv2d(cfg.in_channels, boc[0], 3, padding=1, **kw)
        blocks, out_ch = [], boc[0]
        for i in range(len(boc)):
            in_ch, out_ch = out_ch, boc[i]
            blocks.append(
                nn.DownBlock2D(
                    in_ch, out_ch, temb_channels=None, num_layers=cfg.layers_per_block,
                    add_downsample=i < len(boc) - 1, resnet_eps=1e-6, resnet_act_fn=cfg.act_fn,
                    resnet_groups=cfg.norm_num_groups, downsample_padding=0, **kw,
                )
            )
        self.down_blocks = nnx.List(blocks)
        self.mid_block = nn.UNetMidBlock2D(
            boc[-1], temb_channels=None, resnet_eps=1e-6, resnet_act_fn=cfg.act_fn,
            resnet_groups=cfg.norm_num_groups, attention_head_dim=boc[-1], add_attention=cfg.mid_block_add_attention,
            **kw,
        )
        self.conv_norm_out = nn.group_norm(boc[-1], cfg.norm_num_groups, rngs=rngs, eps=1e-6,
                                           param_dtype=param_dtype)
        self.conv_out = layers.conv2d(boc[-1], 2 * cfg.latent_channels, 3, padding=1, **kw)
        self.act_fn = cfg.act_fn

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x, _ = block(x)
        x = self.mid_block(x)
        return self.conv_out(layers.activation(self.act_fn)(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """`[B, h, w, latent_channels] -> [B, h * 2^(L-1), w * 2^(L-1), 3]`."""

    def __init__(self, cfg: AutoencoderKLConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        boc = cfg.block_out_channels
        rboc = tuple(reversed(boc))
        self.conv_in = layers.conv2d(cfg.latent_channels, boc[-1], 3, padding=1, **kw)
        self.mid_block = nn.UNetMidBlock2D(
            boc[-1], temb_channels=None, resnet_eps=1e-6, resnet_act_fn=cfg.act_fn,
            resnet_groups=cfg.norm_num_groups, attention_head_dim=boc[-1], add_attention=cfg.mid_block_add_attention,
            **kw,
        )
        blocks, out_ch = [], rboc[0]
        for i in range(len(boc)):
            prev, out_ch = out_ch, rboc[i]
            blocks.append(
                nn.UpDecoderBlock2D(
                    prev, out_ch, num_layers=cfg.layers_per_block + 1, add_upsample=i < len(boc) - 1,
                    resnet_eps=1e-6, resnet_act_fn=cfg.act_fn, resnet_groups=cfg.norm_num_groups, **kw,
                )
            )
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = nn.group_norm(boc[0], cfg.norm_num_groups, rngs=rngs, eps=1e-6, param_dtype=param_dtype)
        self.conv_out = layers.conv2d(boc[0], cfg.out_channels, 3, padding=1, **kw)
        self.act_fn = cfg.act_fn

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(layers.activation(self.act_fn)(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """SD's KL autoencoder.

    - `encode(x: [B, H, W, 3] in [-1, 1]) -> DiagonalGaussianDistribution` over `[B, H/8, W/8, 4]` latents
      (for SD's 4-level VAE); `.sample(key)`, `.mode()`, `.mean`, `.logvar`, `.std`.
    - `decode(z: [B, h, w, 4]) -> float32[B, 8h, 8w, 3]` (roughly in [-1, 1]; not clipped).
    - `__call__(x, *, sample_posterior=False, key=None)` = decode(encode(x) mode or sample), like diffusers' forward.
    - `scaling_factor` / `shift_factor`: from the config; latents for the UNet are
      `(z - shift_factor) * scaling_factor` (`shift_factor` is None, i.e. 0, for SD-1.5).
    """

    def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        cfg = AutoencoderKLConfig.from_dict(config)
        self.config = cfg
        self.dtype = dtype
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = None if cfg.shift_factor is None else float(cfg.shift_factor)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        latent = cfg.latent_channels
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        self.quant_conv = layers.conv2d(2 * latent, 2 * latent, 1, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = layers.conv2d(latent, latent, 1, **kw) if cfg.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> DiagonalGaussianDistribution:
        moments = self.encoder(jnp.asarray(x).astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussianDistribution.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        z = jnp.asarray(z).astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array, *, sample_posterior: bool = False, key: jax.Array | None = None) -> jax.Array:
        posterior = self.encode(x)
        z = posterior.sample(key) if sample_posterior else posterior.mode()
        return self.decode(z)
