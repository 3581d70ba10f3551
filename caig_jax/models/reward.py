"""CAIG's pairwise reward model: the LLaVA(-NeXT) MLLM plus two bias-free heads at the last non-pad token.

Input: two ads of one product resized to the same size and concatenated left|right into one image, with an
instruction asking which side is more attractive given the title (and attributes). Output:
`cls_logits float32[B, 2]` (left better, right better; decision "left" iff logit[0] >= logit[1]) and
`ctr_pred float32[B, 2]` ([left_ctr, right_ctr], raw CTRs).

Parameter paths: `backbone/...` (exactly `LlavaModel`'s), `cls/kernel [D, 2]`, `ctr/kernel [D, 2]`.
Checkpoint keys of the heads (CAIG's released reward model): `score.weight` (cls) and
`sku_ctr_linear_fc.weight` (ctr), on top of either the original-LLaVA or a transformers-format folder
(`from_pretrained`).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from caig_jax import parallel
from caig_jax.convert.clip import load_module
from caig_jax.convert.common import SafetensorsReader
from caig_jax.convert.llava import llava_sections
from caig_jax.errors import MissingPathError
from caig_jax.models import layers
from caig_jax.models.clip import CLIPVisionConfig
from caig_jax.models.llama import LlamaConfig
from caig_jax.models.llava import LlavaConfig, LlavaModel, read_llava_config
from caig_jax.models.llava import from_pretrained as llava_from_pretrained

# Our head name -> the checkpoint key prefix CAIG's released reward model uses.
HEAD_KEYS = {"cls": "score.", "ctr": "sku_ctr_linear_fc."}

# The reward-model instruction (CAIG's wording), with optional title / attributes lines.
INSTRUCTION = (
    "Judge whether the left picture or the right picture is more attractive based on the product caption, "
    "the concatenated image and the product attributes."
)


def reward_prompt(caption: str | None = None, attributes: str | dict | None = None) -> str:
    """The user turn of the RM conversation (the `<image>` placeholder is added by the processor)."""
    lines = [INSTRUCTION]
    if caption:
        lines.append(f"Product caption: {caption}")
    if attributes:
        if isinstance(attributes, dict):
            attributes = "; ".join(f"{k}: {v}" for k, v in attributes.items())
        lines.append(f"Product attributes: {attributes}")
    return "\n".join(lines)


class RewardModel(nnx.Module):
    """`(input_ids, pixel_values, image_sizes, attention_mask) -> (cls_logits, ctr_pred)`, each float32[B, 2]."""

    def __init__(
        self,
        config: LlavaConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        backbone: LlavaModel | None = None,
    ):
        self.config = config
        self.backbone = backbone if backbone is not None else LlavaModel(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = config.text_config.hidden_size
        head = dict(rngs=rngs, use_bias=False, dtype=jnp.float32, param_dtype=param_dtype,
                    kernel_init=nnx.initializers.normal(d**-0.5))
        self.cls = layers.linear(d, 2, ("embed", "classes"), **head)
        self.ctr = layers.linear(d, 2, ("embed", "classes"), **head)

    def __call__(self, input_ids, pixel_values, image_sizes=None, attention_mask=None, *, image_layout=None):
        """Inputs as `LlavaModel.__call__`. Returns (cls_logits float32[B, 2], ctr_pred float32[B, 2])."""
        h = self.backbone.last_hidden_state(
            input_ids, pixel_values, image_sizes, attention_mask, image_layout=image_layout
        )  # [B, D] float32, final-normed, at the last non-pad token
        return self.cls(h), self.ctr(h)


def from_pretrained(
    path: str, *, dtype=jnp.float32, mesh=None, param_dtype=jnp.float32, init_missing_heads: bool = False, seed: int = 0
) -> RewardModel:
    """Loads a reward model folder onto `mesh`, streaming tensor by tensor.

    The backbone is any layout `caig_jax.convert.llava.from_pretrained` reads (original LLaVA as in CAIG's
    release, the llava-hf hub layout, or transformers 5.x `save_pretrained`); the heads are `score.weight`
    and `sku_ctr_linear_fc.weight` (PyTorch `[2, D]`). With `init_missing_heads=True` a plain LLaVA folder
    (no head keys) loads with freshly initialised heads, to start reward-model training from an MLLM.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise MissingPathError(f"reward model folder {path!r} does not exist")
    config, layout = read_llava_config(path)
    reader = SafetensorsReader(path)
    what = f"reward model {path} ({layout} layout)"
    sections, lm_head = llava_sections(reader, config, layout, what)
    sections = [(f"backbone/{ours}" if ours else "backbone", ckpt, rename) for ours, ckpt, rename in sections]
    missing_heads = [name for name, prefix in HEAD_KEYS.items() if prefix + "weight" not in reader]
    if len(missing_heads) == 1 or (missing_heads and not init_missing_heads):
        raise ValueError(
            f"{what}: no reward heads ({', '.join(HEAD_KEYS[h] + 'weight' for h in missing_heads)} missing). "
            "Pass init_missing_heads=True to start from a plain LLaVA checkpoint."
        )
    sections += [(name, prefix, None) for name, prefix in HEAD_KEYS.items() if name not in missing_heads]
    also_ignore = [lm_head] if config.text_config.tie_word_embeddings else []
    if not missing_heads:
        return load_module(
            lambda: RewardModel(config, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype),
            reader, mesh, sections=sections, what=what, also_ignore=also_ignore,
        )
    # A plain LLaVA folder: load the backbone, then put freshly initialised heads on the same mesh.
    backbone = llava_from_pretrained(path, dtype=dtype, mesh=mesh, param_dtype=param_dtype)
    model = RewardModel(config, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype, backbone=backbone)
    backbone_mesh = jax.tree.leaves(nnx.state(backbone))[0].sharding.mesh
    for head in (model.cls, model.ctr):
        state = nnx.state(head)
        nnx.update(head, jax.device_put(state, parallel.state_shardings(state, backbone_mesh)))
    return model


def tiny_llava_config(tiny: Any, image_size: int, vocab_size: int, image_token_id: int, pad_id: int) -> LlavaConfig:
    """A small random LLaVA-NeXT for CPU runs: `tiny` holds the sizes (`configs/reward.py`'s `model.tiny`); the
    anyres grid has one pinpoint, (image_size, 2 * image_size): a left|right pair is exactly two tiles."""
    return LlavaConfig(
        text_config=LlamaConfig(
            vocab_size=vocab_size, hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
            num_hidden_layers=tiny.num_layers, num_attention_heads=tiny.num_heads,
            num_key_value_heads=tiny.num_kv_heads, max_position_embeddings=1024, rms_norm_eps=1e-5,
            rope_theta=tiny.rope_theta, bos_token_id=1, eos_token_id=2,
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=tiny.vision_hidden_size, intermediate_size=2 * tiny.vision_hidden_size,
            num_hidden_layers=tiny.vision_layers, num_attention_heads=tiny.vision_heads, image_size=image_size,
            patch_size=tiny.vision_patch_size,
        ),
        anyres=True,
        image_token_id=image_token_id,
        image_grid_pinpoints=((image_size, 2 * image_size),),
        eos_token_ids=(2,),
        pad_token_id=pad_id,
    )


MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_layout")


@functools.partial(jax.jit, static_argnums=0)
def _predict(graphdef, state, batch):
    model = nnx.merge(graphdef, state)
    return model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                 image_layout=batch["image_layout"])


def predict_batch(model: RewardModel, batch: dict, mesh) -> dict[str, np.ndarray]:
    """`{'cls_logits': float32[b, 2], 'ctr_pred': float32[b, 2]}` for this process's rows of a batch.

    `batch` is this process's numpy batch (`caig_jax.data.reward_inputs`: input_ids, attention_mask,
    pixel_values, image_layout); b must divide by the batch shards this process holds
    (`caig_jax.eval.pairwise.evaluate` pads it). Outputs are this process's rows, in input order.
    """
    inputs = {k: batch[k] for k in MODEL_KEYS}
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        cls_logits, ctr_pred = _predict(graphdef, state, parallel.global_batch(mesh, inputs))
    return {"cls_logits": parallel.local_rows(cls_logits), "ctr_pred": parallel.local_rows(ctr_pred)}
