"""LLaVA / LLaVA-NeXT checkpoint key layouts -> our parameter paths (`caig_jax.models.llava.from_pretrained` and
`caig_jax.models.reward.from_pretrained` load with them; this module imports no composite model, so the models
can import it without a cycle).

Three key layouts (detected from the keys, per component):

- hub (llava-hf checkpoints, transformers 4.x): `language_model.model.*`, `language_model.lm_head.weight`,
  `vision_tower.vision_model.*`, `multi_modal_projector.linear_{1,2}.*`, `image_newline`;
- transformers 5.x `save_pretrained`: the same without the tower's `vision_model.` level (`vision_tower.*`);
- original LLaVA repository: `model.{embed_tokens,layers,norm}.*`, `lm_head.weight`,
  `model.vision_tower.vision_tower.vision_model.*`, `model.mm_projector.{0,2}.*`, `model.image_newline`.

(The in-memory transformers 5.x names `model.language_model.*`, `model.vision_tower.*`,
`model.multi_modal_projector.*`, `model.image_newline`, `lm_head.weight`, written by some 4.5x versions, load too.)

The architecture comes from `config.json` (`caig_jax.models.llava.read_llava_config`); the weights always come
from the checkpoint. Missing / unexpected keys and shape mismatches raise `CheckpointMismatchError` listing them.

Public API:
  llava_sections(reader, config, layout, what) -> (sections, lm_head_key)
  load_llama(path, *, dtype=jnp.float32, mesh=None, param_dtype=jnp.float32) -> LlamaForCausalLM
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
from flax import nnx

from caig_jax.convert.clip import detect_prefix, load_module, read_json
from caig_jax.convert.common import SafetensorsReader
from caig_jax.models.llama import LlamaForCausalLM, config_from_mapping

# Checkpoint layouts (`caig_jax.models.llava.read_llava_config` names one).
TRANSFORMERS = "transformers"
ORIGINAL = "original_llava"


def llava_sections(reader: SafetensorsReader, config: Any, layout: str, what: str = "checkpoint"):
    """`(sections, head_key)`: (our_prefix, ckpt_prefix, rename) triples mapping every `LlavaModel` parameter
    to its checkpoint key (prefixes detected from the keys present), and the LM head's key (to ignore when the
    embeddings are tied). Models that nest a LlavaModel (the reward model) feed these to
    `caig_jax.convert.clip.sources_from_sections(..., our_root='backbone')` and add their own heads. `config` is a
    `caig_jax.models.llava.LlavaConfig`."""
    if layout == ORIGINAL:
        body = detect_prefix(reader, "embed_tokens.weight", ["model."], what)
        vision = detect_prefix(
            reader,
            "embeddings.patch_embedding.weight",
            ["model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_tower."],
            what,
        )
        head = "lm_head.weight"
        projector = ("model.mm_projector.", {"linear_1": "0", "linear_2": "2"})
        newline = "model.image_newline"
    else:
        body = detect_prefix(reader, "embed_tokens.weight", ["language_model.model.", "model.language_model."], what)
        vision = detect_prefix(
            reader,
            "embeddings.patch_embedding.weight",
            ["vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.", "model.vision_tower."],
            what,
        )
        head = "language_model.lm_head.weight" if body.startswith("language_model.") else "lm_head.weight"
        projector = (
            detect_prefix(
                reader, "linear_1.weight", ["multi_modal_projector.", "model.multi_modal_projector."], what
            ),
            None,
        )
        newline = "image_newline" if "image_newline" in reader else "model.image_newline"
    sections = [
        ("vision_tower", vision, None),
        ("multi_modal_projector", projector[0], projector[1]),
        ("language_model/embed_tokens", body + "embed_tokens.", None),
        ("language_model/layers", body + "layers.", None),
        ("language_model/norm", body + "norm.", None),
    ]
    if not config.text_config.tie_word_embeddings:
        sections.append(("language_model/lm_head", head[: -len("weight")], None))
    if config.anyres:
        sections.append(("image_newline", newline, None))
    return sections, head


def load_llama(path: str, *, dtype=jnp.float32, mesh=None, param_dtype=jnp.float32) -> LlamaForCausalLM:
    """A transformers `LlamaForCausalLM` folder (`model.*`, `lm_head.weight`) -> LlamaForCausalLM."""
    path = os.fspath(path)
    config = config_from_mapping(read_json(os.path.join(path, "config.json")))
    reader = SafetensorsReader(path)
    what = f"Llama checkpoint {path}"
    body = detect_prefix(reader, "embed_tokens.weight", ["model.", ""], what)
    sections = [("embed_tokens", body + "embed_tokens.", None), ("layers", body + "layers.", None),
                ("norm", body + "norm.", None)]
    if not config.tie_word_embeddings:
        sections.append(("lm_head", "lm_head.", None))
    return load_module(
        lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        reader,
        mesh,
        sections=sections,
        what=what,
        also_ignore=["lm_head.weight"] if config.tie_word_embeddings else [],
    )


