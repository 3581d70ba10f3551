"""CAIG's pairwise reward model: the LLaVA(-NeXT) MLLM plus two bias-free heads at the last non-pad token.

Input: two ads of one product resized to the same size and concatenated left|right into one image, with an
instruction asking which side is more attractive given the title (and attributes). Output:
`cls_logits float32[B, 2]` (left better, right better; decision "left" iff logit[0] >= logit[1]) and
`ctr_pred float32[B, 2]` ([left_ctr, right_ctr], raw CTRs).

Parameter paths: `backbone/...` (exactly `LlavaModel`'s), `cls/kernel [D, 2]`, `ctr/kernel [D, 2]`.
Checkpoint keys of the heads (CAIG's released reward model): `score.weight` (cls) and
`sku_ctr_linear_fc.weight` (ctr), on top of either the original-LLaVA or a transformers-format folder.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from caig_jax import parallel
from caig_jax.errors import MissingPathError
from caig_jax.models import layers
from caig_jax.models.llava import LlavaConfig, LlavaModel, last_non_pad_index  # noqa: F401 (re-exported)

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

    The backbone is any layout `caig_jax.models.llava.from_pretrained` reads (original LLaVA as in CAIG's
    release, the llava-hf hub layout, or transformers 5.x `save_pretrained`); the heads are `score.weight`
    and `sku_ctr_linear_fc.weight` (PyTorch `[2, D]`). With `init_missing_heads=True` a plain LLaVA folder
    (no head keys) loads with freshly initialised heads, to start reward-model training from an MLLM.
    """
    from caig_jax.convert import llava as convert_llava
    from caig_jax.convert.clip import load_module
    from caig_jax.convert.common import SafetensorsReader

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise MissingPathError(f"reward model folder {path!r} does not exist")
    config, layout = convert_llava.read_llava_config(path)
    reader = SafetensorsReader(path)
    what = f"reward model {path} ({layout} layout)"
    sections, lm_head = convert_llava.llava_sections(reader, config, layout, what)
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
    backbone = convert_llava.load_llava(path, dtype=dtype, mesh=mesh, param_dtype=param_dtype)
    model = RewardModel(config, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype, backbone=backbone)
    backbone_mesh = jax.tree.leaves(nnx.state(backbone))[0].sharding.mesh
    for head in (model.cls, model.ctr):
        state = nnx.state(head)
        nnx.update(head, jax.device_put(state, parallel.state_shardings(state, backbone_mesh)))
    return model
