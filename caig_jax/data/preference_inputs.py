"""The Prompt Model's preference data: instructions for a product, and (x, y) / (x^, y) token tensors.

x is CAIG's prompt-generation instruction with the product image and title (the marketplace's background-prompt
task, `caig_jax.data.simulation.PROMPT_INSTRUCTIONS`), y a background prompt. x^ corrupts the product and keeps
y (PCPO): the product image with 75% of its 32x32 patches zeroed (`caig_jax.data.corruption.mask_patches`), or
another product's title with the same image ('paper' swap); `swap='conversation'` is CAIG's released code (the
other sample's instruction *and* its chosen answer).

    x = instruction(title, k)                                   # the k-th instruction template
    batch, cut = sequence_batch(inputs, config, images, titles, answers, ks, length)  # inputs, answers cut
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from caig_jax.data.corruption import corruption_kind, mask_patches, swap_partner
from caig_jax.data.simulation import PROMPT_INSTRUCTIONS
from caig_jax.models.llava import LlavaConfig, layout_for
from caig_jax.models.processing import LlavaInputs

SWAPS = ("paper", "conversation")


def instruction(title: str, template: int) -> list[dict[str, str]]:
    """The user turn asking for a background prompt for the product `title` (its image goes with it)."""
    return [{"role": "user", "content": "<image>\n" + PROMPT_INSTRUCTIONS[template % len(PROMPT_INSTRUCTIONS)]
             .format(title=title)}]


def sequence_batch(inputs: LlavaInputs, llava_config: LlavaConfig, images: Sequence[np.ndarray],
                   titles: Sequence[str], answers: Sequence[str], templates: Sequence[int], length: int
                   ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Model inputs of (instruction + answer) conversations, right padded to `length`, and which answers were cut.

    Returns (tensors, cut): input_ids / attention_mask / loss_mask int32[B, length] (loss_mask: the answer's tokens
    and its `</s>`), pixel_values float32[B, P, 3, S, S] and image_layout int32[B, 7]; `cut` bool[B]: the answer did
    not fit in `length` and was cut there (its `</s>` lost). An answer can be longer as text than it was sampled:
    a lone byte-fallback token decodes to U+FFFD, which tokenizes back as three bytes. An instruction that leaves
    no room for any answer token raises `ValueError` naming `length`.
    """
    conversations = [instruction(t, k) + [{"role": "assistant", "content": a}]
                     for t, a, k in zip(titles, answers, templates, strict=True)]
    batch = inputs(list(images), conversations, padding_side="right", max_len=length, truncation=True,
                   pad_patches_to=llava_config.max_patches)
    # A whole conversation ends with the answer's </s>; one that fills `length` without it was cut. (An empty
    # answer renders as a bare `ASSISTANT:`, LLaVA's rendering, and has no answer token: it is not a cut.)
    cut = (batch["attention_mask"][:, -1] == 1) & (batch["input_ids"][:, -1] != inputs.tokenizer.eos_token_id)
    no_answer = np.flatnonzero(cut & (batch["loss_mask"].sum(axis=1) == 0))
    if no_answer.size:
        raise ValueError(f"the instruction of conversation {int(no_answer[0])} fills length={length}: no answer token "
                         f"fits")
    return {
        "input_ids": batch["input_ids"].astype(np.int32),
        "attention_mask": batch["attention_mask"].astype(np.int32),
        "loss_mask": batch["loss_mask"].astype(np.int32),
        "pixel_values": batch["pixel_values"].astype(np.float32),
        "image_layout": layout_for(llava_config, batch["image_sizes"]).astype(np.int32),
    }, cut


def corrupt(images: Sequence[np.ndarray], titles: Sequence[str], chosen: Sequence[str], templates: Sequence[int],
            seed: int, *, swap: str = "paper", mask_ratio: float = 0.75, patch_size: int = 32
            ) -> tuple[list[np.ndarray], list[str], list[str], list[int], list[str]]:
    """x^ per example (50/50 patch masking or another product's title; never the product itself), with y+ kept
    (`swap='paper'`) or, for a swap, the partner's chosen answer too (`swap='conversation'`, CAIG's code).

    Returns (images, titles, answers, templates, kinds) of the corrupted sequences.
    """
    if swap not in SWAPS:
        raise ValueError(f"pcpo swap={swap!r}: expected one of {SWAPS}")
    out_images, out_titles, out_answers, out_templates, kinds = [], [], [], [], []
    n = len(titles)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        kind = corruption_kind(rng) if n > 1 else "mask"
        image, title, answer, template = images[i], titles[i], chosen[i], templates[i]
        if kind == "mask":
            image = mask_patches(np.asarray(images[i]), int(rng.integers(1 << 31)), patch_size=patch_size,
                                 ratio=mask_ratio)
        else:
            j = swap_partner(i, n, rng)
            title = titles[j]
            if swap == "conversation":
                answer, template = chosen[j], templates[j]
        out_images.append(image)
        out_titles.append(title)
        out_answers.append(answer)
        out_templates.append(template)
        kinds.append(kind)
    return out_images, out_titles, out_answers, out_templates, kinds
