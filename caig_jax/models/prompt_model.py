"""Text replies of a LLaVA model (the Prompt Model) to image + conversation prompts, batched at fixed shapes.

    replies = generate_replies(model, inputs, images, conversations, max_new_tokens=32, temperature=1.0, seed=0)

`conversations` are turn lists ending with a user turn (its `<image>`, if any, included); `images` one image
(uint8[H, W, 3] or None) per conversation. Prompts are rendered with `inputs.template`, left padded to one
length (`prompt_length`, default the longest rounded up to 16) and cut into batches of exactly `batch_size`
rows (the last filled by repeating a row), so every call with the same sizes reuses one compiled
`caig_jax.models.llava.generate` program whatever the temperature or seed. Sampling: temperature 0 is greedy;
otherwise batch `k` of the call samples with seed `hash(seed, k)`, so a row's sample depends on (seed, its
position in the call, its inputs). Replies are decoded up to the first EOS, special tokens dropped, stripped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from caig_jax.models.llava import LlavaModel, generate
from caig_jax.models.processing import LlavaInputs


def prompt_batch(inputs: LlavaInputs, images: Sequence[Any], conversations: Sequence[Any], *,
                 prompt_length: int | None = None, pad_patches_to: int | None = None) -> dict[str, np.ndarray]:
    """The left-padded generation batch (input_ids, attention_mask, pixel_values, image_sizes) of the prompts."""
    has_images = any(im is not None for im in images)
    return inputs.prompts(list(images) if has_images else None, list(conversations), max_len=prompt_length,
                          pad_to_multiple_of=None if prompt_length else 16, pad_patches_to=pad_patches_to)


def decode_replies(tokenizer: Any, tokens: np.ndarray, eos_ids: Sequence[int]) -> list[str]:
    """int[B, N] sampled ids -> the text before each row's first EOS (special tokens skipped, stripped)."""
    out = []
    for row in np.asarray(tokens):
        stop = [k for k, t in enumerate(row) if int(t) in set(eos_ids)]
        out.append(tokenizer.decode(row[: stop[0]] if stop else row, skip_special_tokens=True).strip())
    return out


def generate_replies(model: LlavaModel, inputs: LlavaInputs, images: Sequence[Any], conversations: Sequence[Any], *,
                     max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                     batch_size: int = 64, prompt_length: int | None = None) -> list[str]:
    """One reply per conversation (see the module docstring). `prompt_length` fixes the padded prompt length
    (default: the longest prompt rounded up to 16); a longer prompt raises naming it."""
    n = len(conversations)
    if len(images) != n:
        raise ValueError(f"{len(images)} images for {n} conversations")
    if n == 0:
        return []
    config = model.config
    batch = prompt_batch(inputs, images, conversations, prompt_length=prompt_length,
                         pad_patches_to=config.max_patches if config.anyres else None)
    replies: list[str] = []
    for k, start in enumerate(range(0, n, batch_size)):
        rows = np.arange(start, min(start + batch_size, n))
        rows = np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows))])
        part = {key: value[rows] for key, value in batch.items()}
        tokens = generate(model, part["input_ids"], part.get("pixel_values"), part.get("image_sizes"),
                          part["attention_mask"], max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, seed=int(np.random.default_rng([seed, k]).integers(2**31)))
        texts = decode_replies(inputs.tokenizer, np.asarray(tokens), config.eos_token_ids)
        replies += texts[: min(batch_size, n - start)]
    return replies
