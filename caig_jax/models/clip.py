"""CLIP vision and text transformers (the LLaVA image tower and the Stable Diffusion text encoder).

Both match transformers' `CLIPVisionModel` / `CLIPTextModel` (5.x): pre-LN encoder layers, quick-GELU MLPs
(or the config's activation), learned position embeddings; the vision tower adds a class token and a
pre-encoder LayerNorm (`pre_layrnorm`, transformers' spelling), the text tower a causal mask and a final
LayerNorm. Parameter paths mirror the transformers module names (`embeddings/...`, `encoder/layers/i/...`) so
the converters are plain tables.

Images come in the transformers layout `float32[N, 3, H, W]` (what the CLIP / LLaVA processors output) and are
transposed to NHWC for the patch convolution.

Logical axes: the tower width is `vision_embed` for the vision tower and `embed` for the text tower; attention
kernels `[width, heads]` / `[heads, width]`; MLP `[width, mlp]` / `[mlp, width]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from transformers import CLIPConfig as HFCLIPConfig
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPVisionConfig as HFCLIPVisionConfig

from caig_jax.models import attention, layers

# ------------------------------------------------------------------------------------------------ configs


def _fields_from(cls, hf_config: Any) -> dict:
    return {f.name: getattr(hf_config, f.name) for f in dataclasses.fields(cls) if hasattr(hf_config, f.name)}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """CLIP vision tower architecture (defaults: transformers' `CLIPVisionConfig`)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    remat_policy: str = "none"  # not architecture: what each layer keeps for backward (`layers.REMAT_POLICIES`)
    scan_layers: bool = False  # not architecture: run the encoder layers as one scan (`layers.scan_call`)

    def __post_init__(self):
        layers.check_remat_policy(self.remat_policy)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @classmethod
    def from_hf(cls, hf_config: Any) -> "CLIPVisionConfig":
        """From a transformers `CLIPVisionConfig` (or a `CLIPConfig`: its `vision_config` is used)."""
        if hasattr(hf_config, "vision_config") and not hasattr(hf_config, "patch_size"):
            hf_config = hf_config.vision_config
        return cls(**_fields_from(cls, hf_config))

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPVisionConfig":
        """From a `config.json` dict of a `CLIPVisionModel` or a full `CLIPModel` (parsed by transformers)."""
        if d.get("model_type") == "clip" or "vision_config" in d:
            return cls.from_hf(HFCLIPConfig.from_dict(dict(d)).vision_config)
        return cls.from_hf(HFCLIPVisionConfig.from_dict(dict(d)))


# The well-known tower LLaVA-1.5 / LLaVA-NeXT use (`mm_vision_tower: openai/clip-vit-large-patch14-336`).
CLIP_VIT_L_14_336 = CLIPVisionConfig(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)

BUILTIN_VISION_CONFIGS = {
    "openai/clip-vit-large-patch14-336": CLIP_VIT_L_14_336,
    "openai/clip-vit-large-patch14": dataclasses.replace(CLIP_VIT_L_14_336, image_size=224),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text tower architecture (defaults: transformers' `CLIPTextConfig`)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407
    pad_token_id: int | None = 1

    @classmethod
    def from_hf(cls, hf_config: Any) -> "CLIPTextConfig":
        if hasattr(hf_config, "text_config") and not hasattr(hf_config, "max_position_embeddings"):
            hf_config = hf_config.text_config
        return cls(**_fields_from(cls, hf_config))

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        if d.get("model_type") == "clip" or "text_config" in d:
            return cls.from_hf(HFCLIPConfig.from_dict(dict(d)).text_config)
        return cls.from_hf(HFCLIPTextConfig.from_dict(dict(d)))


# ------------------------------------------------------------------------------------------------ blocks


class CLIPAttention(nnx.Module):
    def __init__(self, width: int, heads: int, width_axis: str, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.num_heads = heads
        self.head_dim = width // heads
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.k_proj = layers.linear(width, width, (width_axis, "heads"), **kw)
        self.v_proj = layers.linear(width, width, (width_axis, "heads"), **kw)
        self.q_proj = layers.linear(width, width, (width_axis, "heads"), **kw)
        self.out_proj = layers.linear(width, width, ("heads", width_axis), **kw)
        self.attention_impl = "xla"  # `attention.set_attention` picks another implementation
        self.attention_mesh = None  # and the mesh it runs on (splash partitions over it)

    def __call__(self, x: jax.Array, mask: attention.Mask | None) -> jax.Array:
        batch, length, _ = x.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        q, k, v = self.q_proj(x).reshape(shape), self.k_proj(x).reshape(shape), self.v_proj(x).reshape(shape)
        return self.out_proj(attention.attention(q, k, v, mask, impl=self.attention_impl, mesh=self.attention_mesh))


class CLIPMLP(nnx.Module):
    def __init__(self, width, hidden, act, width_axis, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.act = act
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = layers.linear(width, hidden, (width_axis, "mlp"), **kw)
        self.fc2 = layers.linear(hidden, width, ("mlp", width_axis), **kw)

    def __call__(self, x):
        return self.fc2(layers.activation(self.act)(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, config, width_axis: str, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        c = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype
        self.self_attn = CLIPAttention(c.hidden_size, c.num_attention_heads, width_axis, **kw)
        norm = dict(epsilon=c.layer_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.layer_norm1 = layers.layer_norm(c.hidden_size, **norm)
        self.mlp = CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act, width_axis, **kw)
        self.layer_norm2 = layers.layer_norm(c.hidden_size, **norm)

    def __call__(self, x, mask=None):
        x = x + self.self_attn(self.layer_norm1(x).astype(self.dtype), mask)
        x = x + self.mlp(self.layer_norm2(x).astype(self.dtype))
        return x


class CLIPEncoder(nnx.Module):
    def __init__(self, config, width_axis: str, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.layers = nnx.List([CLIPEncoderLayer(config, width_axis, **kw) for _ in range(config.num_hidden_layers)])
        self.remat_policy = getattr(config, "remat_policy", "none")
        self.scan_layers = getattr(config, "scan_layers", False)

    def __call__(self, x, mask=None, *, num_layers: int | None = None, collect: bool = False):
        """Runs the first `num_layers` layers (all by default). Returns (x, hidden states incl. the input)."""
        stack = self.layers[: len(self.layers) if num_layers is None else num_layers]
        if self.scan_layers:
            out, per_layer = layers.scan_call(list(stack), self.remat_policy, lambda layer, h: layer(h, mask), x,
                                              collect=collect)
            return out, None if per_layer is None else [x, *per_layer]
        hidden_states = [x] if collect else None
        for layer in stack:
            x = layers.remat_call(layer, self.remat_policy, x, mask)
            if collect:
                hidden_states.append(x)
        return x, hidden_states


def _resolve_layer(index: int, num_layers: int) -> int:
    """transformers' `hidden_states[index]` (length num_layers + 1; 0 = embeddings) -> non-negative index."""
    resolved = index + num_layers + 1 if index < 0 else index
    if not 0 <= resolved <= num_layers:
        raise ValueError(f"feature layer {index} is out of range for a tower with {num_layers} layers")
    return resolved


# ------------------------------------------------------------------------------------------------ vision


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        c = config
        self.config = config
        self.dtype = dtype
        self.class_embedding = layers.param(
            rngs, nnx.initializers.normal(c.hidden_size**-0.5), (c.hidden_size,), ("vision_embed",), param_dtype
        )
        self.patch_embedding = layers.conv2d(
            c.num_channels,
            c.hidden_size,
            c.patch_size,
            strides=c.patch_size,
            padding=0,
            use_bias=False,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
            axes=("conv_h", "conv_w", None, "vision_embed"),
        )
        self.position_embedding = layers.embed(
            c.num_patches + 1, c.hidden_size, ("positions", "vision_embed"), rngs=rngs, dtype=dtype,
            param_dtype=param_dtype,
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """`[N, 3, H, W]` (NCHW, as the processors give) -> `[N, 1 + num_patches, D]`."""
        c = self.config
        if pixel_values.shape[-2:] != (c.image_size, c.image_size):
            raise ValueError(
                f"CLIP vision tower expects {c.image_size}x{c.image_size} images, got pixel_values of shape "
                f"{tuple(pixel_values.shape)}"
            )
        x = jnp.transpose(jnp.asarray(pixel_values), (0, 2, 3, 1)).astype(self.dtype)
        patches = self.patch_embedding(x)  # [N, gh, gw, D]
        n = patches.shape[0]
        patches = patches.reshape(n, -1, c.hidden_size)
        cls = jnp.broadcast_to(self.class_embedding.get_value().astype(self.dtype), (n, 1, c.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding.embedding.get_value().astype(self.dtype)[None]


class CLIPVisionOutput(NamedTuple):
    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


class CLIPVisionModel(nnx.Module):
    """transformers' `CLIPVisionModel`: paths `embeddings/...`, `pre_layrnorm`, `encoder/layers/i/...`,
    `post_layernorm`."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        c = config
        self.config = config
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embeddings = CLIPVisionEmbeddings(c, **kw)
        norm = dict(epsilon=c.layer_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.pre_layrnorm = layers.layer_norm(c.hidden_size, **norm)
        self.encoder = CLIPEncoder(c, "vision_embed", **kw)
        self.post_layernorm = layers.layer_norm(c.hidden_size, **norm)

    def __call__(self, pixel_values: jax.Array, *, output_hidden_states: bool = False) -> CLIPVisionOutput:
        """As `CLIPVisionModel(pixel_values)`: last_hidden_state `[N, 1+P, D]`, pooler_output `[N, D]`
        (post-LN class token), hidden_states (embeddings + every layer) when asked."""
        x = self.pre_layrnorm(self.embeddings(pixel_values)).astype(self.dtype)
        x, hidden_states = self.encoder(x, collect=output_hidden_states)
        pooled = self.post_layernorm(x[:, 0])
        return CLIPVisionOutput(x, pooled, None if hidden_states is None else tuple(hidden_states))

    def features(self, pixel_values: jax.Array, layer: int | Sequence[int] = -2) -> jax.Array:
        """transformers' `hidden_states[layer]` `[N, 1+P, D]` (a list of layers: concatenated on the last axis),
        running only the layers it needs (LLaVA reads the second-to-last layer, so the last one is skipped)."""
        num_layers = self.config.num_hidden_layers
        wanted = [layer] if isinstance(layer, int) else list(layer)
        resolved = [_resolve_layer(i, num_layers) for i in wanted]
        x = self.pre_layrnorm(self.embeddings(pixel_values)).astype(self.dtype)
        if len(resolved) == 1:  # one layer (LLaVA's case): its output is the stack's, nothing else is kept
            return self.encoder(x, num_layers=resolved[0])[0]
        x, hidden_states = self.encoder(x, num_layers=max(resolved), collect=True)
        return jnp.concatenate([hidden_states[i] for i in resolved], axis=-1)


# ------------------------------------------------------------------------------------------------ text


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.token_embedding = layers.embed(config.vocab_size, config.hidden_size, ("vocab", "embed"), **kw)
        self.position_embedding = layers.embed(
            config.max_position_embeddings, config.hidden_size, ("positions", "embed"), **kw
        )

    def __call__(self, input_ids, position_ids):
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


class CLIPTextModel(nnx.Module):
    """transformers' `CLIPTextModel` (the SD-1.5 text encoder): paths `embeddings/{token,position}_embedding`,
    `encoder/layers/i/...`, `final_layer_norm`.

    Call as the PyTorch model: `text_encoder(input_ids, attention_mask=None, position_ids=None,
    output_hidden_states=False)` -> `CLIPTextOutput(last_hidden_state float32[B, T, D], pooler_output [B, D],
    hidden_states)`; `out[0]` is `last_hidden_state` as in diffusers. Eager or under jit.
    """

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embeddings = CLIPTextEmbeddings(config, **kw)
        self.encoder = CLIPEncoder(config, "embed", **kw)
        self.final_layer_norm = layers.layer_norm(
            config.hidden_size, epsilon=config.layer_norm_eps, rngs=rngs, param_dtype=param_dtype
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        input_ids = jnp.asarray(input_ids, jnp.int32)
        batch, length = input_ids.shape
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"CLIP text input has {length} tokens; the model takes at most {self.config.max_position_embeddings}"
            )
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        x = self.embeddings(input_ids, jnp.asarray(position_ids, jnp.int32)).astype(self.dtype)
        mask = attention.causal_mask(length, attention_mask)
        x, hidden_states = self.encoder(x, mask, collect=output_hidden_states)
        last = self.final_layer_norm(x)
        eos = self.config.eos_token_id
        if eos == 2 or eos is None:
            # Legacy CLIP configs: the end token is the largest id in the row.
            pool_index = jnp.argmax(input_ids, axis=-1)
        else:
            pool_index = jnp.argmax((input_ids == eos).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last, pool_index[:, None, None], axis=1)[:, 0]
        hidden_states = None if hidden_states is None else tuple(hidden_states)
        return CLIPTextOutput(last.astype(jnp.float32), pooled.astype(jnp.float32), hidden_states)
