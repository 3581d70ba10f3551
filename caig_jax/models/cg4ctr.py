"""CG4CTR's CTR predictor (Yang et al., WWW 2024 Companion): an image encoder and two text encoders (the product
title and the creative's caption) fused by a small transformer with cross-attention, then an MLP to one scalar.

    model = CG4CTR(CG4CTRConfig(vision=CLIPVisionConfig(...), text=CLIPTextConfig(...)), rngs=nnx.Rngs(0))
    score = model(images, title_ids, title_mask, caption_ids, caption_mask)   # float32[N]

images uint8[N, S, S, 3] (S = `vision.image_size`); *_ids int32[N, T], *_mask int32[N, T] (1 = token).
The scalar is a CTR logit (`objectives.baselines.cg4ctr_loss`): sigmoid(score) is the CTR prediction, and
the pairwise decision is `objectives.reward.prefers_left(score_left, score_right)`.

The encoders are this codebase's ViT and text transformer (`models.clip`: CLIP's architecture, a ViT with a
class token; the paper's are Swin / ViT and BERT-like encoders). Fusion: the image tokens (class token
first) pass `fusion_layers` blocks of self-attention, cross-attention to the concatenated title and caption
tokens (projected to the image width; padding masked) and an MLP; the class token goes through the MLP head.
Parameter paths: `image_encoder/...`, `title_encoder/...`, `caption_encoder/...`, `text_proj`,
`fusion/i/{norm1,self_attn,norm2,cross_attn,norm3,mlp}`, `head_norm`, `head_hidden`, `head_out`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from caig_jax.models import layers
from caig_jax.models.clip import CLIPAttention, CLIPMLP, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from caig_jax.models.attention import Mask, attention

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CG4CTRConfig:
    vision: CLIPVisionConfig
    text: CLIPTextConfig
    fusion_layers: int = 2
    fusion_heads: int = 8
    head_hidden: int = 256


class CrossAttention(nnx.Module):
    """Queries `x [N, Q, D]` attend to `context [N, S, D]` where `context_mask bool[N, S]`."""

    def __init__(self, width: int, heads: int, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.num_heads, self.head_dim = heads, width // heads
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = layers.linear(width, width, ("vision_embed", "heads"), **kw)
        self.k_proj = layers.linear(width, width, ("vision_embed", "heads"), **kw)
        self.v_proj = layers.linear(width, width, ("vision_embed", "heads"), **kw)
        self.out_proj = layers.linear(width, width, ("heads", "vision_embed"), **kw)

    def __call__(self, x, context, context_mask):
        n, q_len, _ = x.shape
        s_len = context.shape[1]
        q = self.q_proj(x).reshape(n, q_len, self.num_heads, self.head_dim)
        k = self.k_proj(context).reshape(n, s_len, self.num_heads, self.head_dim)
        v = self.v_proj(context).reshape(n, s_len, self.num_heads, self.head_dim)
        return self.out_proj(attention(q, k, v, Mask(kv_valid=context_mask)))


class FusionLayer(nnx.Module):
    """Pre-norm block: self-attention over the image tokens, cross-attention to the text tokens, MLP."""

    def __init__(self, width: int, heads: int, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        norm = dict(rngs=rngs, param_dtype=param_dtype)
        self.norm1 = layers.layer_norm(width, **norm)
        self.self_attn = CLIPAttention(width, heads, "vision_embed", **kw)
        self.norm2 = layers.layer_norm(width, **norm)
        self.cross_attn = CrossAttention(width, heads, **kw)
        self.norm3 = layers.layer_norm(width, **norm)
        self.mlp = CLIPMLP(width, 4 * width, "gelu", "vision_embed", **kw)
        self.dtype = dtype

    def __call__(self, x, context, context_mask):
        x = x + self.self_attn(self.norm1(x).astype(self.dtype), None)
        x = x + self.cross_attn(self.norm2(x).astype(self.dtype), context, context_mask)
        return x + self.mlp(self.norm3(x).astype(self.dtype))


class CG4CTR(nnx.Module):
    """`(images, title_ids, title_mask, caption_ids, caption_mask) -> score float32[N]` (a CTR logit)."""

    def __init__(self, config: CG4CTRConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        c = config
        self.config, self.dtype = config, dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        width = c.vision.hidden_size
        self.image_encoder = CLIPVisionModel(c.vision, **kw)
        self.title_encoder = CLIPTextModel(c.text, **kw)
        self.caption_encoder = CLIPTextModel(c.text, **kw)
        self.text_proj = layers.linear(c.text.hidden_size, width, ("embed", "vision_embed"), **kw)
        self.fusion = nnx.List([FusionLayer(width, c.fusion_heads, **kw) for _ in range(c.fusion_layers)])
        self.head_norm = layers.layer_norm(width, rngs=rngs, param_dtype=param_dtype)
        self.head_hidden = layers.linear(width, c.head_hidden, ("vision_embed", "mlp"), **kw)
        self.head_out = layers.linear(c.head_hidden, 1, ("mlp", "classes"), rngs=rngs, dtype=jnp.float32,
                                      param_dtype=param_dtype)

    def encode_text(self, title_ids, title_mask, caption_ids, caption_mask) -> tuple[jax.Array, jax.Array]:
        """(context [N, 2T, D]: title then caption tokens at the image width, mask bool[N, 2T])."""
        title = self.title_encoder(title_ids, attention_mask=title_mask).last_hidden_state
        caption = self.caption_encoder(caption_ids, attention_mask=caption_mask).last_hidden_state
        context = self.text_proj(jnp.concatenate([title, caption], axis=1).astype(self.dtype))
        mask = jnp.concatenate([jnp.asarray(title_mask), jnp.asarray(caption_mask)], axis=1).astype(bool)
        return context, mask

    def score(self, images, context, context_mask) -> jax.Array:
        """float32[N] for images uint8[N, S, S, 3] and their products' `encode_text` (a product's creatives share
        one encoding: a list of K creatives encodes its texts once)."""
        x = jnp.asarray(images, jnp.float32) / 255.0
        x = (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
        tokens = self.image_encoder(jnp.transpose(x, (0, 3, 1, 2))).last_hidden_state  # [N, 1 + P, D]
        for layer in self.fusion:
            tokens = layer(tokens, context, context_mask)
        h = jax.nn.gelu(self.head_hidden(self.head_norm(tokens[:, 0]).astype(self.dtype)))
        return self.head_out(h.astype(jnp.float32))[:, 0]

    def __call__(self, images, title_ids, title_mask, caption_ids, caption_mask) -> jax.Array:
        return self.score(images, *self.encode_text(title_ids, title_mask, caption_ids, caption_mask))
