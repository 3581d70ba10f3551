"""Tiny random transformers LLaVA / LLaVA-NeXT / Llama / CLIP models and inputs shared by the MLLM tests.

Sizes: towers of width 32, 28x28 images with 14x14 patches (a 2x2 feature grid per tile), 2 vision layers (the
default feature layer -2 is the first layer's output, so the last layer is skipped), 2 decoder layers with
grouped-query attention (4 heads, 2 KV heads), vocabulary 200 with the image token 199. LLaVA-NeXT pinpoints
(28, 56), (56, 28), (56, 56) give 2-5 tower images (tiles + base) per image.
"""

from __future__ import annotations

import numpy as np

# The parity tolerance of the project, stated once: max|ours - ref| / max|ref|.
TOL = 1e-4

IMAGE_TOKEN = 199
PINPOINTS = [[28, 56], [56, 28], [56, 56]]
# Non-square sizes so unpadding crops rows for one and columns for the other; (60, 20) is tall, (30, 50) wide.
NEXT_SIZES = np.array([[30, 50], [60, 20]], np.int64)

VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=28,
    patch_size=14,
    projection_dim=16,
)
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=200,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def rel_err(ours, ref, mask=None) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if mask is not None:
        ours, ref = ours[np.asarray(mask, bool)], ref[np.asarray(mask, bool)]
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def llava_next_torch(seed: int = 0, **overrides):
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    kw = dict(
        vision_config=VISION,
        text_config=TEXT,
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=PINPOINTS,
        image_seq_length=4,
    )
    kw.update(overrides)
    return LlavaNextForConditionalGeneration(LlavaNextConfig(**kw)).eval()


def llava_torch(seed: int = 0, **overrides):
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    kw = dict(vision_config=VISION, text_config=TEXT, image_token_index=IMAGE_TOKEN, image_seq_length=4)
    kw.update(overrides)
    return LlavaForConditionalGeneration(LlavaConfig(**kw)).eval()


def prompt_batch(feature_counts, *, extra_lengths, seed: int = 0, image_token: int = IMAGE_TOKEN):
    """Left-padded `(input_ids int64[B, T], attention_mask int64[B, T])`: BOS, 2 text tokens, the image tokens,
    then `extra_lengths[b]` text tokens (ids in [3, 150), never the image token, EOS or BOS)."""
    rng = np.random.default_rng(seed)
    rows = []
    for n, extra in zip(feature_counts, extra_lengths):
        rows.append(np.concatenate([[1], rng.integers(3, 150, 2), [image_token] * n, rng.integers(3, 150, extra)]))
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for b, r in enumerate(rows):
        ids[b, length - len(r) :] = r
        mask[b, length - len(r) :] = 1
    return ids, mask


def next_pixel_values(num_images: int, max_patches: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((num_images, max_patches, 3, 28, 28)).astype(np.float32)


def torch_logits(model, ids, mask, pixel_values, image_sizes=None):
    import torch

    kw = dict(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        pixel_values=torch.tensor(pixel_values),
    )
    if image_sizes is not None:
        kw["image_sizes"] = torch.tensor(image_sizes)
    with torch.no_grad():
        return model(**kw).logits.numpy()
