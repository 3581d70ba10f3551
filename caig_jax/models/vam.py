"""VAM's visual prior (Wang et al., WWW 2021, "A Hybrid Bandit Model with Visual Priors for Creative Ranking"):
a ResNet that scores one creative from its image alone, with a ranking score and a point (CTR) head.

    model = VAM(VAMConfig(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)), rngs=nnx.Rngs(0))  # ResNet-18
    score, point = model(images)      # images uint8[N, H, W, 3] -> float32[N], float32[N]

The pairwise decision on a left|right pair is `objectives.reward.prefers_left(score_left, score_right)`.
Normalisation is GroupNorm, not ResNet's BatchNorm: the engine's step is a pure function of the parameters
(no running statistics to carry), and a prediction must not depend on what else is in the batch.
Parameter paths: `stem`, `stem_norm`, `stages/i/j/{conv1,norm1,conv2,norm2,shortcut,shortcut_norm}`,
`score`, `point`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from caig_jax.models import layers

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class VAMConfig:
    """A ResNet of BasicBlocks: `blocks[i]` blocks of width `widths[i]`, stages after the first halve the size.

    ResNet-18 (the paper's): widths (64, 128, 256, 512), blocks (2, 2, 2, 2), a 7x7 stride-2 stem and a 3x3
    max-pool, 224 px images. Small images (32 px) take a 3x3 stride-1 stem without pooling.
    """

    widths: tuple[int, ...] = (64, 128, 256, 512)
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    stem_kernel: int = 7
    stem_stride: int = 2
    stem_pool: bool = True
    norm_groups: int = 32

    def __post_init__(self):
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError(f"VAMConfig: widths {self.widths} and blocks {self.blocks} need the same non-zero length")


def _norm(channels: int, groups: int, rngs: nnx.Rngs, param_dtype) -> nnx.GroupNorm:
    return layers.group_norm(channels, min(groups, channels), rngs=rngs, param_dtype=param_dtype)


class BasicBlock(nnx.Module):
    """ResNet's two 3x3 convolutions with a residual (a 1x1 projection when the shape changes)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=False)
        self.conv1 = layers.conv2d(in_ch, out_ch, 3, strides=stride, padding=1, **kw)
        self.norm1 = _norm(out_ch, groups, rngs, param_dtype)
        self.conv2 = layers.conv2d(out_ch, out_ch, 3, padding=1, **kw)
        self.norm2 = _norm(out_ch, groups, rngs, param_dtype)
        project = stride != 1 or in_ch != out_ch
        self.shortcut = layers.conv2d(in_ch, out_ch, 1, strides=stride, **kw) if project else None
        self.shortcut_norm = _norm(out_ch, groups, rngs, param_dtype) if project else None
        self.dtype = dtype

    def __call__(self, x):
        y = jax.nn.relu(self.norm1(self.conv1(x)).astype(self.dtype))
        y = self.norm2(self.conv2(y))
        skip = x if self.shortcut is None else self.shortcut_norm(self.shortcut(x))
        return jax.nn.relu(y + skip).astype(self.dtype)


class VAM(nnx.Module):
    """`images uint8[N, H, W, 3] -> (score float32[N], point float32[N])`."""

    def __init__(self, config: VAMConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        c = config
        self.config, self.dtype = config, dtype
        self.stem = layers.conv2d(3, c.widths[0], c.stem_kernel, strides=c.stem_stride, padding=c.stem_kernel // 2,
                                  use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                  axes=("conv_h", "conv_w", None, "conv_out"))
        self.stem_norm = _norm(c.widths[0], c.norm_groups, rngs, param_dtype)
        stages, in_ch = [], c.widths[0]
        for i, (width, count) in enumerate(zip(c.widths, c.blocks)):
            blocks = []
            for j in range(count):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(in_ch, width, stride, c.norm_groups, rngs=rngs, dtype=dtype,
                                         param_dtype=param_dtype))
                in_ch = width
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        head = dict(rngs=rngs, dtype=jnp.float32, param_dtype=param_dtype)
        self.score = layers.linear(in_ch, 1, ("embed", "classes"), **head)
        self.point = layers.linear(in_ch, 1, ("embed", "classes"), **head)

    def features(self, images: jax.Array) -> jax.Array:
        """float32[N, C]: globally average-pooled last-stage features."""
        x = jnp.asarray(images, jnp.float32) / 255.0
        x = ((x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)).astype(self.dtype)
        x = jax.nn.relu(self.stem_norm(self.stem(x))).astype(self.dtype)
        if self.config.stem_pool:
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = self.features(images)
        return self.score(h)[:, 0], self.point(h)[:, 0]
