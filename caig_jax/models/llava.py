"""LLaVA-1.5 and LLaVA-NeXT (anyres) multimodal LLM: CLIP tower -> mlp2x_gelu adapter -> Llama decoder.

Numerically this is transformers' `LlavaForConditionalGeneration` (one image per example, `pixel_values
[N, 3, H, W]`) or `LlavaNextForConditionalGeneration` (`pixel_values [N, P, 3, H, W]` tiles, `image_sizes
[N, 2]`): image features from a configurable tower layer (default -2, CLS dropped), projected, anyres-packed
(LLaVA-NeXT: base image, then the unpadded tile grid with an `image_newline` after every row) and written into
the text embeddings at the image-token positions, in order.

Public API (stable; external checks call it):
  from_pretrained(path, *, dtype=jnp.float32, mesh=None, param_dtype=jnp.float32) -> LlavaModel
      transformers LLaVA / LLaVA-NeXT folders (hub or 5.x save_pretrained layout, sharded or not) and the
      original LLaVA repository layout (key layouts: `caig_jax.convert.llava`).
  read_llava_config(path) -> (LlavaConfig, layout name): transformers configs (parsed by transformers, so its
      defaults apply) or LLaVA's own keys (Llama keys at the top level, `mm_projector_type`,
      `mm_vision_select_layer`, `mm_vision_select_feature`, `image_aspect_ratio`, `image_grid_pinpoints` as
      (width, height) pairs, `mm_patch_merge_type`, `mm_vision_tower` = a local folder with a CLIP config or a
      well-known name such as `openai/clip-vit-large-patch14-336`).
  model(input_ids, pixel_values, image_sizes=None, attention_mask=None) -> float32[B, T, vocab]
  model.hidden_states(input_ids, pixel_values, image_sizes=None, attention_mask=None) -> float32[B, T, D]
      final-normed last hidden states (what the reward heads read at the last non-pad token).
  model.token_logprobs(input_ids, pixel_values, image_sizes=None, attention_mask=None) -> float32[B, T]
      log p(input_ids[:, t] | input_ids[:, :t], image) at index t (0 at t = 0); `sequence_logprob` sums them
      over a response mask (DPO / PCPO).
  generate(model, input_ids, pixel_values, image_sizes=None, attention_mask=None, *, max_new_tokens,
           temperature=0.0, top_p=1.0, seed=0, eos_token_ids=None, pad_token_id=None) -> int32[B, max_new_tokens]
  llava_next_vicuna_7b() -> LlavaConfig   (llava-hf/llava-v1.6-vicuna-7b-hf's architecture)

Inputs are numpy or jax arrays; image tokens are already expanded in `input_ids` (one per feature, as the
transformers processor does). Padding: left padding (positions = cumsum(mask) - 1, as transformers' generate);
right padding also works for the forward / log-prob functions. Image token id: `model.config.image_token_id`
(transformers folders: `image_token_index`; original LLaVA folders: LLaVA's own placeholder -200 unless the
config names one).

Jit: every method works eagerly (inputs concrete: the anyres layout is computed on the host, token counts are
checked, and the computation runs as one cached jitted program) and inside `jax.jit` / `nnx.jit` with static
shapes (traced `image_sizes` go through a `jax.pure_callback` to the same host code; trainers on multi-host pods
pass `image_layout=anyres_layout(...)` computed in their input pipeline instead).

Image-token scatter: with one image per example (`pixel_values.shape[0] == B`) the k-th image token of row b
receives feature k of image b (a per-row cumulative index, batch-local under data sharding). When the number of
images differs from B (LLaVA-1.5 multi-image prompts) the k-th image token of the flattened batch receives the
k-th feature of the flattened, packed image buffer (transformers' `masked_scatter` order).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from transformers import LlavaConfig as HFLlavaConfig
from transformers import LlavaNextConfig as HFLlavaNextConfig

from caig_jax import parallel
from caig_jax.convert.clip import load_module, read_json
from caig_jax.convert.common import SafetensorsReader
from caig_jax.convert.llava import ORIGINAL, TRANSFORMERS, llava_sections
from caig_jax.errors import MissingPathError
from caig_jax.models import adapter, layers
from caig_jax.models.clip import BUILTIN_VISION_CONFIGS, CLIP_VIT_L_14_336, CLIPVisionConfig, CLIPVisionModel
from caig_jax.models.image_processing import LLAVA_NEXT_GRID_PINPOINTS
from caig_jax.models.llama import (
    LlamaConfig,
    LlamaForCausalLM,
    config_from_mapping,
    positions_from_mask,
    sample_logits,
)
from caig_jax.models.llama import (
    token_logprobs as _token_logprobs_from_logits,
)

# LLaVA's own image placeholder id in input_ids (llava/constants.py IMAGE_TOKEN_INDEX).
LLAVA_IMAGE_TOKEN_INDEX = -200


# ------------------------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """Architecture of a LLaVA model.

    anyres: True for LLaVA-NeXT (tiles + base image, unpad, image_newline), False for LLaVA-1.5.
    image_grid_pinpoints: (height, width) pairs (transformers' convention; original LLaVA configs list
      (width, height) and are swapped on import).
    vision_feature_layer: transformers' `hidden_states` index (or a tuple of them, concatenated).
    vision_feature_select_strategy: 'default' drops the CLS token, 'full' keeps it (LLaVA-1.5 only).
    """

    text_config: LlamaConfig
    vision_config: CLIPVisionConfig
    anyres: bool = True
    image_token_id: int = 32000
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    image_grid_pinpoints: tuple[tuple[int, int], ...] = LLAVA_NEXT_GRID_PINPOINTS
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int = 0

    def __post_init__(self):
        if isinstance(self.vision_feature_layer, list):
            object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))
        object.__setattr__(
            self, "image_grid_pinpoints", tuple(tuple(int(v) for v in p) for p in self.image_grid_pinpoints)
        )
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                "vision_feature_select_strategy must be 'default' or 'full', got "
                f"{self.vision_feature_select_strategy!r}"
            )
        if self.anyres and self.vision_feature_select_strategy != "default":
            raise NotImplementedError(
                "LLaVA-NeXT with vision_feature_select_strategy='full' packs CLS tokens into the tile grid, which "
                "transformers itself does not support; use 'default'"
            )
        if self.anyres and not self.image_grid_pinpoints:
            raise ValueError("a LLaVA-NeXT (anyres) config needs image_grid_pinpoints")

    @property
    def num_feature_layers(self) -> int:
        return 1 if isinstance(self.vision_feature_layer, int) else len(self.vision_feature_layer)

    @property
    def tokens_per_tile(self) -> int:
        """Feature tokens one tower image gives (patches, plus CLS for the 'full' strategy)."""
        return self.vision_config.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @property
    def max_patches(self) -> int:
        """Most tower images one LLaVA-NeXT image can need (largest pinpoint's tiles + base)."""
        if not self.anyres:
            return 1
        return adapter.max_anyres_patches(self.image_grid_pinpoints, tile_size=self.vision_config.image_size)

    @property
    def max_image_features(self) -> int:
        """Static upper bound on the feature tokens of one image."""
        if not self.anyres:
            return self.tokens_per_tile
        return adapter.max_anyres_features(
            self.image_grid_pinpoints, tile_size=self.vision_config.image_size, grid_size=self.vision_config.grid_size
        )

    def num_image_features(self, image_size: Sequence[int] | None = None) -> int:
        """Feature (= image-token) count of one image of (height, width) `image_size`."""
        if not self.anyres:
            return self.tokens_per_tile
        layout = adapter.anyres_layout(
            [image_size],
            self.image_grid_pinpoints,
            tile_size=self.vision_config.image_size,
            grid_size=self.vision_config.grid_size,
        )
        return int(adapter.anyres_num_features(layout, self.vision_config.grid_size)[0])

    @classmethod
    def from_hf(cls, hf_config: Any, *, generation_config: dict | None = None) -> "LlavaConfig":
        """From a transformers `LlavaConfig` / `LlavaNextConfig` object (defaults already applied)."""
        anyres = getattr(hf_config, "model_type", "") == "llava_next"
        text = LlamaConfig.from_hf(hf_config.text_config)
        # transformers ties the head by the top-level flag (LlavaConfig copies the text config's flag up).
        text = dataclasses.replace(text, tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)))
        eos, pad = eos_and_pad_ids(text, hf_config, generation_config)
        layer = hf_config.vision_feature_layer
        return cls(
            text_config=text,
            vision_config=CLIPVisionConfig.from_hf(hf_config.vision_config),
            anyres=anyres,
            image_token_id=int(getattr(hf_config, "image_token_id", None) or hf_config.image_token_index),
            vision_feature_layer=tuple(layer) if isinstance(layer, (list, tuple)) else int(layer),
            vision_feature_select_strategy=hf_config.vision_feature_select_strategy,
            projector_hidden_act=hf_config.projector_hidden_act,
            multimodal_projector_bias=bool(getattr(hf_config, "multimodal_projector_bias", True)),
            image_grid_pinpoints=tuple(map(tuple, hf_config.image_grid_pinpoints)) if anyres else (),
            eos_token_ids=eos,
            pad_token_id=pad,
        )


def eos_and_pad_ids(text: LlamaConfig, top_config: Any, generation_config: dict | None) -> tuple[tuple[int, ...], int]:
    """EOS ids and the pad id generate() writes after EOS: generation_config.json first, then the configs; with
    no pad id anywhere, the first EOS id (what transformers' generate falls back to)."""
    gen = generation_config or {}
    eos = gen.get("eos_token_id", None)
    if eos is None:
        eos = getattr(top_config, "eos_token_id", None) if top_config is not None else None
    if eos is None:
        eos = text.eos_token_id
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []))
    pad = gen.get("pad_token_id", None)
    if pad is None and top_config is not None:
        pad = getattr(top_config, "pad_token_id", None)
    if pad is None:
        pad = text.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return eos_ids, int(pad)


def llava_next_vicuna_7b() -> LlavaConfig:
    """llava-hf/llava-v1.6-vicuna-7b-hf (CAIG's PM / RM backbone): CLIP ViT-L/14-336 + Vicuna-7B v1.5."""
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        pad_token_id=0,
    )
    return LlavaConfig(
        text_config=text,
        vision_config=CLIP_VIT_L_14_336,
        anyres=True,
        image_token_id=32000,
        image_grid_pinpoints=LLAVA_NEXT_GRID_PINPOINTS,
        eos_token_ids=(2,),
        pad_token_id=32001,
    )


# ------------------------------------------------------------------------------------------------ helpers


def _is_tracer(*xs) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs)


def _host(x) -> np.ndarray | None:
    """numpy copy of a concrete array (None stays None)."""
    if x is None:
        return None
    return np.asarray(x)


def layout_for(config: LlavaConfig, image_sizes) -> np.ndarray:
    """Host-side anyres layout int32[N, 7] for `image_sizes` [N, 2] (height, width)."""
    return adapter.anyres_layout(
        np.asarray(image_sizes),
        config.image_grid_pinpoints,
        tile_size=config.vision_config.image_size,
        grid_size=config.vision_config.grid_size,
    )


# ------------------------------------------------------------------------------------------------ model


class LlavaModel(nnx.Module):
    """LLaVA(-NeXT) with its LM head. Parameter paths: `vision_tower/...` (CLIPVisionModel),
    `multi_modal_projector/linear_{1,2}`, `image_newline` (LLaVA-NeXT only), `language_model/...`
    (LlamaForCausalLM: `embed_tokens`, `layers/i/...`, `norm`, `lm_head`)."""

    def __init__(self, config: LlavaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = config.text_config.hidden_size
        self.vision_tower = CLIPVisionModel(config.vision_config, **kw)
        self.multi_modal_projector = adapter.MultiModalProjector(
            config.vision_config.hidden_size * config.num_feature_layers,
            d,
            act=config.projector_hidden_act,
            use_bias=config.multimodal_projector_bias,
            **kw,
        )
        self.image_newline = (
            layers.param(rngs, nnx.initializers.normal(d**-0.5), (d,), ("embed",), param_dtype)
            if config.anyres
            else None
        )
        self.language_model = LlamaForCausalLM(config.text_config, **kw)

    # -- image features ----------------------------------------------------------------------------------

    def image_features(self, pixel_values: jax.Array, image_layout: jax.Array | None = None):
        """Projected, packed features per image.

        pixel_values: LLaVA-NeXT `[N, P, 3, H, W]` (P >= tiles + 1), LLaVA-1.5 `[N, 3, H, W]`.
        image_layout: LLaVA-NeXT only, int32[N, 7] from `layout_for` / `adapter.anyres_layout`.
        Returns (features `[N, F, D]` in the compute dtype, num_features int32[N]) with F the static
        `config.max_image_features` (LLaVA-NeXT) or the per-image token count (LLaVA-1.5).
        """
        c = self.config
        pixel_values = jnp.asarray(pixel_values)
        if c.anyres:
            if pixel_values.ndim != 5:
                raise ValueError(
                    f"LLaVA-NeXT expects pixel_values [num_images, num_patches, 3, H, W], got {pixel_values.shape}"
                )
            num_images, num_patches = pixel_values.shape[:2]
            flat = pixel_values.reshape(num_images * num_patches, *pixel_values.shape[2:])
        else:
            if pixel_values.ndim != 4:
                raise ValueError(f"LLaVA-1.5 expects pixel_values [num_images, 3, H, W], got {pixel_values.shape}")
            num_images, num_patches, flat = pixel_values.shape[0], 1, pixel_values
        feats = self.vision_tower.features(flat.astype(self.dtype), c.vision_feature_layer)
        if c.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        feats = self.multi_modal_projector(feats.astype(self.dtype))  # [N*P, tokens, D]
        if not c.anyres:
            return feats, jnp.full((num_images,), feats.shape[1], jnp.int32)
        tokens, d = feats.shape[1], feats.shape[2]
        newline = jnp.broadcast_to(self.image_newline.get_value().astype(feats.dtype), (num_images, 1, d))
        table = jnp.concatenate([feats.reshape(num_images, num_patches * tokens, d), newline], axis=1)
        grid = c.vision_config.grid_size
        index = adapter.anyres_gather_index(
            image_layout, grid_size=grid, max_patches=num_patches, max_features=c.max_image_features
        )
        packed = jnp.take_along_axis(table, index[:, :, None], axis=1)
        return packed, adapter.anyres_num_features(jnp.asarray(image_layout, jnp.int32), grid)

    def _layout(self, image_sizes, image_layout, num_images: int):
        if not self.config.anyres:
            return None
        if image_layout is not None:
            return jnp.asarray(image_layout, jnp.int32)
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes [num_images, 2] (original height, width)")
        if not _is_tracer(image_sizes):
            return jnp.asarray(layout_for(self.config, _host(image_sizes)))
        config = self.config

        def host_layout(sizes):
            return layout_for(config, np.asarray(sizes)).astype(np.int32)

        return jax.pure_callback(
            host_layout,
            jax.ShapeDtypeStruct((num_images, len(adapter.LAYOUT_FIELDS)), jnp.int32),
            image_sizes,
            vmap_method="sequential",
        )

    def embed_inputs(self, input_ids, pixel_values=None, image_sizes=None, *, image_layout=None) -> jax.Array:
        """Text embeddings `[B, T, D]` with image features written at the image-token positions."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        embeds = self.language_model.embed(input_ids)
        if pixel_values is None:
            return embeds
        pixel_values = jnp.asarray(pixel_values)
        num_images = pixel_values.shape[0]
        layout = self._layout(image_sizes, image_layout, num_images)
        features, num_features = self.image_features(pixel_values, layout)
        is_image = input_ids == self.config.image_token_id
        batch, length = input_ids.shape
        max_f = features.shape[1]
        if num_images == batch:
            # Per row: the k-th image token takes feature k of this row's image (batch-local gather).
            slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, max_f - 1)
            gathered = jnp.take_along_axis(features, slot[:, :, None], axis=1)
        else:
            # transformers' masked_scatter order over the whole batch: image i's features follow image i-1's.
            ordinal = jnp.cumsum(is_image.reshape(-1)) - 1
            ends = jnp.cumsum(num_features)
            image = jnp.clip(jnp.searchsorted(ends, ordinal, side="right"), 0, num_images - 1)
            starts = ends - num_features
            k = jnp.clip(ordinal - starts[image], 0, max_f - 1)
            gathered = features.reshape(num_images * max_f, -1)[image * max_f + k].reshape(batch, length, -1)
        return jnp.where(is_image[:, :, None], gathered.astype(embeds.dtype), embeds)

    def check_inputs(self, input_ids, pixel_values, image_sizes=None, image_layout=None) -> None:
        """Eager checks with actionable messages (skipped under tracing): tile counts, image-token counts."""
        c = self.config
        ids = _host(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
        if pixel_values is None:
            if (ids == c.image_token_id).any():
                raise ValueError(
                    f"input_ids contain image tokens (id {c.image_token_id}) but no pixel_values were given"
                )
            return
        pv_shape = tuple(np.shape(pixel_values))
        num_images = pv_shape[0]
        tile = c.vision_config.image_size
        if pv_shape[-3:] != (c.vision_config.num_channels, tile, tile):
            raise ValueError(f"pixel_values {pv_shape}: expected trailing dims (3, {tile}, {tile})")
        if c.anyres:
            layout = _host(image_layout) if image_layout is not None else None
            if layout is None:
                if image_sizes is None:
                    raise ValueError("LLaVA-NeXT needs image_sizes [num_images, 2] (original height, width)")
                sizes = _host(image_sizes).reshape(-1, 2)
                if sizes.shape[0] != num_images:
                    raise ValueError(f"image_sizes has {sizes.shape[0]} rows but pixel_values has {num_images} images")
                layout = layout_for(c, sizes)
            too_few = np.nonzero(layout[:, 0] > pv_shape[1])[0]
            if too_few.size:
                i = int(too_few[0])
                raise ValueError(
                    f"image {i} needs {layout[i, 0]} tiles (base + grid) for its size but pixel_values has only "
                    f"{pv_shape[1]} per image"
                )
            num_features = np.asarray(adapter.anyres_num_features(layout, c.vision_config.grid_size))
        else:
            num_features = np.full((num_images,), c.tokens_per_tile)
        counts = (ids == c.image_token_id).sum(axis=1)
        if num_images == ids.shape[0]:
            bad = np.nonzero(counts != num_features)[0]
            if bad.size:
                rows = ", ".join(
                    f"row {int(b)}: {int(counts[b])} tokens vs {int(num_features[b])} features" for b in bad[:8]
                )
                raise ValueError(
                    f"image tokens (id {c.image_token_id}) in input_ids do not match the image features: {rows}. "
                    "Expand each image placeholder to the image's feature count (see LlavaConfig.num_image_features)."
                )
        elif counts.sum() != num_features.sum():
            raise ValueError(
                f"input_ids hold {int(counts.sum())} image tokens (id {c.image_token_id}) but the "
                f"{num_images} images give {int(num_features.sum())} features"
            )

    # -- forward -----------------------------------------------------------------------------------------

    def _hidden(self, input_ids, pixel_values, image_sizes, attention_mask, image_layout, last_token_only=False):
        """`[B, T, D]` final hidden states, or `[B, 1, D]` at each row's last non-pad token (`last_token_only`:
        the last layer then computes only that row)."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        attention_mask = jnp.asarray(attention_mask)
        embeds = self.embed_inputs(input_ids, pixel_values, image_sizes, image_layout=image_layout)
        query_index = last_non_pad_index(attention_mask)[:, None] if last_token_only else None
        hidden, _ = self.language_model.decode(
            embeds, positions=positions_from_mask(attention_mask), kv_mask=attention_mask, query_index=query_index
        )
        return hidden

    def _dispatch(self, method: str, input_ids, pixel_values, image_sizes, attention_mask, image_layout):
        if _is_tracer(input_ids, pixel_values, image_sizes, attention_mask, image_layout):
            return getattr(self, method)(input_ids, pixel_values, image_sizes, attention_mask, image_layout)
        self.check_inputs(input_ids, pixel_values, image_sizes, image_layout)
        if self.config.anyres and pixel_values is not None and image_layout is None:
            image_layout = layout_for(self.config, _host(image_sizes).reshape(-1, 2))
        graphdef, state = nnx.split(self)
        return _jitted_method(graphdef, state, method, input_ids, pixel_values, attention_mask, image_layout)

    def _logits_impl(self, input_ids, pixel_values, image_sizes, attention_mask, image_layout):
        hidden = self._hidden(input_ids, pixel_values, image_sizes, attention_mask, image_layout)
        return self.language_model.logits(hidden)

    def _hidden_impl(self, input_ids, pixel_values, image_sizes, attention_mask, image_layout):
        return self._hidden(input_ids, pixel_values, image_sizes, attention_mask, image_layout).astype(jnp.float32)

    def _last_hidden_impl(self, input_ids, pixel_values, image_sizes, attention_mask, image_layout):
        hidden = self._hidden(input_ids, pixel_values, image_sizes, attention_mask, image_layout, last_token_only=True)
        return hidden[:, 0].astype(jnp.float32)

    def _logprobs_impl(self, input_ids, pixel_values, image_sizes, attention_mask, image_layout):
        logits = self._logits_impl(input_ids, pixel_values, image_sizes, attention_mask, image_layout)
        ids = jnp.asarray(input_ids, jnp.int32)
        lp = _token_logprobs_from_logits(logits[:, :-1], ids[:, 1:])
        return jnp.pad(lp, ((0, 0), (1, 0)))

    def __call__(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, *, image_layout=None):
        """`float32[B, T, vocab]` logits, as transformers' LLaVA(-NeXT) `forward(...).logits`."""
        return self._dispatch("_logits_impl", input_ids, pixel_values, image_sizes, attention_mask, image_layout)

    def hidden_states(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, *, image_layout=None):
        """Final-normed last-layer hidden states `float32[B, T, D]` (the input of the LM head)."""
        return self._dispatch("_hidden_impl", input_ids, pixel_values, image_sizes, attention_mask, image_layout)

    def last_hidden_state(
        self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, *, image_layout=None
    ):
        """`float32[B, D]`: the final-normed hidden state at each row's last non-pad token (what a reward head
        reads), computing only that row of the last layer."""
        return self._dispatch("_last_hidden_impl", input_ids, pixel_values, image_sizes, attention_mask, image_layout)

    def token_logprobs(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, *, image_layout=None):
        """`float32[B, T]`: entry t is log p(input_ids[:, t] | input_ids[:, :t], image); entry 0 is 0."""
        return self._dispatch("_logprobs_impl", input_ids, pixel_values, image_sizes, attention_mask, image_layout)


def set_remat(model: LlavaModel, policy: str) -> LlavaModel:
    """Rematerialises every decoder and tower layer in the backward pass with `policy` (`layers.REMAT_POLICIES`;
    'none' turns it off). Same values; less activation memory for more compute. Returns `model` (changed in place)."""
    layers.check_remat_policy(policy)
    model.language_model.config = dataclasses.replace(model.language_model.config, remat_policy=policy)
    model.vision_tower.encoder.remat_policy = policy
    return model


def set_scan(model: LlavaModel, scan: bool) -> LlavaModel:
    """Runs the decoder's cache-free passes and the vision tower as one `jax.lax.scan` over their layers (`scan`)
    or as a Python loop. Same values and parameter layout; a deep model compiles in a fraction of the time.
    Returns `model` (changed in place)."""
    model.language_model.config = dataclasses.replace(model.language_model.config, scan_layers=bool(scan))
    model.vision_tower.encoder.scan_layers = bool(scan)
    return model


def last_non_pad_index(attention_mask: jax.Array) -> jax.Array:
    """int32[B]: position of the last token with mask 1 (right padding: len-1; left padding: T-1)."""
    mask = jnp.asarray(attention_mask, jnp.int32)
    length = mask.shape[1]
    return (length - 1 - jnp.argmax(mask[:, ::-1], axis=1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _jitted_method(graphdef, state, method, input_ids, pixel_values, attention_mask, image_layout):
    model = nnx.merge(graphdef, state)
    return getattr(model, method)(input_ids, pixel_values, None, attention_mask, image_layout)


def sequence_logprob(
    model: LlavaModel,
    input_ids,
    pixel_values,
    image_sizes=None,
    attention_mask=None,
    *,
    response_mask,
    image_layout=None,
) -> jax.Array:
    """`float32[B]`: sum of log p(token) over the tokens where `response_mask[B, T]` is 1 (the response y in
    log pi(y | x) for DPO / PCPO). Mask the response tokens only, not the prompt or padding."""
    lp = model.token_logprobs(input_ids, pixel_values, image_sizes, attention_mask, image_layout=image_layout)
    return jnp.sum(lp * jnp.asarray(response_mask, jnp.float32), axis=-1)


# ------------------------------------------------------------------------------------------------ generate


def _model_mesh(state) -> jax.sharding.Mesh | None:
    for leaf in jax.tree.leaves(state):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def generate(
    model: LlavaModel,
    input_ids,
    pixel_values,
    image_sizes=None,
    attention_mask=None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> jax.Array:
    """Samples `max_new_tokens` tokens after each (left-padded) prompt: `int32[B, max_new_tokens]`.

    Prefill and decode run in one jitted program (`jax.lax.while_loop`, stops early once every row has hit
    EOS) over a KV cache preallocated to `T + max_new_tokens`. temperature 0 is greedy (transformers'
    `do_sample=False`); otherwise softmax(logits / temperature) within the top-p nucleus, with one PRNG stream
    per example (`fold_in(key(seed), example_index)`, then the step), so a row's sample depends only on the
    seed, its index and its inputs. After a row's EOS (`config.eos_token_ids`, or `eos_token_ids` if given) the
    rest is `config.pad_token_id` (or `pad_token_id`); overriding them does not recompile.
    The batch is padded to a multiple of the mesh's ('data', 'fsdp') size and sharded over it; new batches of
    the same shapes reuse the compiled program. Prompts must be left-padded (`attention_mask[:, -1] == 1`);
    pixel_values holds one image per prompt (or None). On multi-process runs (pods) every process passes its own
    prompts and gets its own rows back (untested here: this machine has one process).
    """
    c = model.config
    ids = np.asarray(input_ids, np.int32)
    batch, length = ids.shape
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    if not mask[:, -1].all():
        rows = np.nonzero(mask[:, -1] == 0)[0][:8].tolist()
        raise ValueError(f"generate needs left-padded prompts: attention_mask[:, -1] is 0 for rows {rows}")
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    model.check_inputs(ids, pixel_values, image_sizes)
    pv = None if pixel_values is None else np.asarray(pixel_values)
    if pv is not None and pv.shape[0] != batch:
        raise ValueError(f"generate takes one image per prompt: pixel_values has {pv.shape[0]} for {batch} prompts")
    layout = layout_for(c, np.asarray(image_sizes).reshape(-1, 2)) if (c.anyres and pv is not None) else None

    graphdef, state = nnx.split(model)
    mesh = _model_mesh(state)
    inputs = {"ids": ids, "mask": mask, "index": np.arange(batch, dtype=np.int32)}
    if pv is not None:
        inputs["pv"] = pv.astype(np.float32)
    if layout is not None:
        inputs["layout"] = layout
    processes = jax.process_count()
    if mesh is not None:
        shards = parallel.num_batch_shards(mesh)
        # Multi-process: each process passes its own prompts; it pads them to its share of the batch shards.
        local_multiple = shards // processes if processes > 1 and shards % processes == 0 else shards
        inputs, _ = parallel.pad_to_multiple(inputs, local_multiple)
        local_padded = inputs["ids"].shape[0]
        if processes == 1:
            inputs = {k: jax.device_put(v, parallel.batch_sharding(mesh, v.ndim)) for k, v in inputs.items()}
        else:
            # Global example indices keep the per-example RNG streams distinct across processes.
            inputs["index"] = inputs["index"] + np.int32(jax.process_index() * local_padded)
            inputs = parallel.global_batch(mesh, inputs)
    eos = list(c.eos_token_ids if eos_token_ids is None else eos_token_ids)
    # Fixed-length EOS table (-1 never matches a token) so that a different EOS list reuses the program.
    eos = np.asarray(eos + [-1] * max(0, 4 - len(eos)), np.int32)
    pad = np.int32(c.pad_token_id if pad_token_id is None else pad_token_id)
    out = _generate_jit(
        graphdef,
        state,
        inputs,
        eos,
        pad,
        jnp.float32(temperature),
        jnp.float32(top_p),
        jnp.uint32(seed),
        max_new_tokens=int(max_new_tokens),
        mesh=mesh,
    )
    if mesh is not None and processes > 1:
        # Rows are laid out process by process (make_array_from_process_local_data); return this process's.
        full = multihost_utils.process_allgather(out, tiled=True)
        start = jax.process_index() * local_padded
        return jnp.asarray(full[start : start + batch])
    return out[:batch]


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_new_tokens", "mesh"))
def _generate_jit(graphdef, state, inputs, eos, pad, temperature, top_p, seed, *, max_new_tokens: int, mesh):
    model = nnx.merge(graphdef, state)
    c = model.config
    lm = model.language_model
    ids, mask, index = inputs["ids"], inputs["mask"], inputs["index"]
    batch, length = ids.shape
    total = length + max_new_tokens

    def constrain(x, spec):
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    # -- prefill -------------------------------------------------------------------------------------------
    embeds = model.embed_inputs(ids, inputs.get("pv"), None, image_layout=inputs.get("layout"))
    positions = positions_from_mask(mask)
    kv_heads = c.text_config.num_key_value_heads
    tensor = mesh.shape["tensor"] if mesh is not None else 1
    cache_spec = P(parallel.BATCH_AXES, None, "tensor" if kv_heads % tensor == 0 and tensor > 1 else None, None)
    cache = jax.tree.map(lambda a: constrain(a, cache_spec), lm.init_cache(batch, total))
    kv_mask = jnp.concatenate([mask.astype(jnp.bool_), jnp.zeros((batch, max_new_tokens), jnp.bool_)], axis=1)
    hidden, cache = lm.decode(embeds, positions=positions, kv_mask=kv_mask, cache=cache, cache_index=0)
    logits = lm.logits(hidden[:, -1])
    next_pos = jnp.sum(mask, axis=1).astype(jnp.int32)
    base_key = jax.random.key(seed)
    row_keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(index)

    # -- decode loop ---------------------------------------------------------------------------------------
    def cond(carry):
        step, _, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, kv_mask, logits, next_pos, done, out = carry
        keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
        token = sample_logits(logits, keys, temperature=temperature, top_p=top_p)
        token = jnp.where(done, pad, token)
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
        done = done | jnp.any(token[:, None] == eos[None, :], axis=1)
        slot = length + step
        kv_mask = kv_mask | (jnp.arange(total)[None, :] == slot)
        hidden, cache = lm.decode(
            lm.embed(token[:, None]), positions=next_pos[:, None], kv_mask=kv_mask, cache=cache, cache_index=slot
        )
        return step + 1, cache, kv_mask, lm.logits(hidden[:, 0]), next_pos + 1, done, out

    out = jnp.full((batch, max_new_tokens), pad, jnp.int32)
    done = jnp.zeros((batch,), jnp.bool_)
    carry = (jnp.int32(0), cache, kv_mask, logits, next_pos, done, out)
    out = jax.lax.while_loop(cond, body, carry)[-1]
    return constrain(out, P(parallel.BATCH_AXES, None))


# ------------------------------------------------------------------------------------------------ loading


def _generation_config(folder: str) -> dict | None:
    path = os.path.join(folder, "generation_config.json")
    return read_json(path) if os.path.exists(path) else None


def _is_original_llava(d: dict) -> bool:
    return "text_config" not in d and any(k in d for k in ("mm_vision_tower", "mm_projector_type", "mm_hidden_size"))


def read_llava_config(folder: str) -> tuple[LlavaConfig, str]:
    """(LlavaConfig, 'transformers' | 'original_llava') from a checkpoint folder's config.json."""
    config_path = os.path.join(folder, "config.json")
    d = read_json(config_path)
    generation = _generation_config(folder)
    if _is_original_llava(d):
        return original_llava_config(d, folder, generation), ORIGINAL
    model_type = d.get("model_type")
    if model_type not in ("llava", "llava_next"):
        raise ValueError(
            f"{config_path}: model_type {model_type!r} is neither a transformers LLaVA ('llava', 'llava_next') nor "
            "an original LLaVA config (mm_vision_tower / mm_projector_type keys)"
        )
    cls = HFLlavaNextConfig if model_type == "llava_next" else HFLlavaConfig
    hf = cls.from_dict(d)
    if hf.text_config.model_type != "llama":
        raise NotImplementedError(f"{config_path}: text model {hf.text_config.model_type!r}; only Llama is implemented")
    if getattr(hf.vision_config, "model_type", "") not in ("clip_vision_model", "clip"):
        raise NotImplementedError(
            f"{config_path}: vision tower {hf.vision_config.model_type!r}; only CLIP is implemented"
        )
    return LlavaConfig.from_hf(hf, generation_config=generation), TRANSFORMERS


def _vision_config_for(name: str, folder: str) -> CLIPVisionConfig:
    candidates = [name] if os.path.isabs(name) else [os.path.join(folder, name), name]
    for candidate in candidates:
        config_file = os.path.join(candidate, "config.json")
        if os.path.isfile(config_file):
            return CLIPVisionConfig.from_dict(read_json(config_file))
    if name in BUILTIN_VISION_CONFIGS:
        return BUILTIN_VISION_CONFIGS[name]
    raise ValueError(
        f"mm_vision_tower {name!r}: no folder with a config.json there (looked in {candidates}) and not a built-in "
        f"tower name ({sorted(BUILTIN_VISION_CONFIGS)})"
    )


def original_llava_config(d: dict, folder: str, generation: dict | None = None) -> LlavaConfig:
    """LlavaConfig from the original LLaVA repository's config.json keys."""
    where = os.path.join(folder, "config.json")
    tower = d.get("mm_vision_tower") or d.get("vision_tower")
    if not tower:
        raise ValueError(f"{where}: no mm_vision_tower key: cannot tell the vision tower's architecture")
    vision = _vision_config_for(tower, folder)
    projector = d.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ValueError(f"{where}: mm_projector_type {projector!r}; only 'mlp2x_gelu' is implemented")
    select = d.get("mm_vision_select_feature", "patch")
    strategies = {"patch": "default", "cls_patch": "full"}
    if select not in strategies:
        raise ValueError(f"{where}: mm_vision_select_feature {select!r}; expected one of {sorted(strategies)}")
    aspect = d.get("image_aspect_ratio", "square")
    merge = d.get("mm_patch_merge_type", "flat")
    anyres = str(aspect).startswith("anyres")
    if anyres and merge != "spatial_unpad":
        raise ValueError(
            f"{where}: image_aspect_ratio {aspect!r} with mm_patch_merge_type {merge!r}; anyres is implemented as "
            "LLaVA-NeXT's 'spatial_unpad' (base image + unpadded grid + image_newline)"
        )
    if aspect not in ("anyres", "pad", "square", "resize", None) and not anyres:
        raise ValueError(f"{where}: image_aspect_ratio {aspect!r} is not implemented")
    pinpoints = d.get("image_grid_pinpoints") or ()
    if anyres and (isinstance(pinpoints, str) or not pinpoints):
        raise ValueError(f"{where}: image_grid_pinpoints {pinpoints!r}; expected a list of [width, height]")
    mm_hidden = d.get("mm_hidden_size")
    if mm_hidden is not None and mm_hidden != vision.hidden_size:
        raise ValueError(
            f"{where}: mm_hidden_size={mm_hidden} but the vision tower {tower!r} has hidden_size={vision.hidden_size}"
        )
    text = config_from_mapping({k: v for k, v in d.items() if not k.startswith("mm_")})
    eos, pad = eos_and_pad_ids(text, None, generation)
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        anyres=anyres,
        image_token_id=int(d.get("image_token_index", LLAVA_IMAGE_TOKEN_INDEX)),
        vision_feature_layer=int(d.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=strategies[select],
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        # LLaVA lists (width, height); transformers and we use (height, width).
        image_grid_pinpoints=tuple((int(p[1]), int(p[0])) for p in pinpoints) if anyres else (),
        eos_token_ids=eos,
        pad_token_id=pad,
    )


def from_pretrained(
    path: str, *, dtype=jnp.float32, mesh=None, param_dtype=jnp.float32, ignore_keys: Iterable[str] = ()
) -> LlavaModel:
    """Loads a LLaVA / LLaVA-NeXT folder onto `mesh` (None: the first device), streaming tensor by tensor.

    Detects the layout from the folder: transformers `LlavaForConditionalGeneration` /
    `LlavaNextForConditionalGeneration` (hub keys `language_model.model.*`, `vision_tower.vision_model.*`, or
    the transformers 5.x save_pretrained keys) or the original LLaVA repository (`LlavaLlamaForCausalLM`:
    `model.mm_projector.*`, `model.vision_tower.vision_tower.vision_model.*`, `mm_*` config keys).
    dtype: compute dtype (bfloat16 on accelerators); param_dtype: parameter storage dtype.
    ignore_keys: checkpoint keys that are not the MLLM's and are not errors (e.g. reward heads a caller reads).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise MissingPathError(f"LLaVA checkpoint folder {path!r} does not exist")
    config, layout = read_llava_config(path)
    reader = SafetensorsReader(path)
    what = f"LLaVA checkpoint {path} ({layout} layout)"
    sections, head = llava_sections(reader, config, layout, what)
    # A tied model's head is the token table; a saved copy of it is not an error.
    also_ignore = list(ignore_keys) + ([head] if config.text_config.tie_word_embeddings else [])
    return load_module(
        lambda: LlavaModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        reader,
        mesh,
        sections=sections,
        what=what,
        also_ignore=also_ignore,
    )


