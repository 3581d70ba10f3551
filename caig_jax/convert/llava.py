"""LLaVA / LLaVA-NeXT checkpoints -> `caig_jax.models.llava.LlavaModel`, streamed tensor by tensor onto a mesh.

Three key layouts (detected from the keys, per component):

- hub (llava-hf checkpoints, transformers 4.x): `language_model.model.*`, `language_model.lm_head.weight`,
  `vision_tower.vision_model.*`, `multi_modal_projector.linear_{1,2}.*`, `image_newline`;
- transformers 5.x `save_pretrained`: the same without the tower's `vision_model.` level (`vision_tower.*`);
- original LLaVA repository: `model.{embed_tokens,layers,norm}.*`, `lm_head.weight`,
  `model.vision_tower.vision_tower.vision_model.*`, `model.mm_projector.{0,2}.*`, `model.image_newline`.

(The in-memory transformers 5.x names `model.language_model.*`, `model.vision_tower.*`,
`model.multi_modal_projector.*`, `model.image_newline`, `lm_head.weight`, written by some 4.5x versions, load too.)

The architecture comes from `config.json`: a transformers `LlavaConfig` / `LlavaNextConfig` (parsed by
transformers, so its defaults apply), or LLaVA's own keys (`LlavaLlamaForCausalLM`: Llama keys at the top level,
`mm_projector_type`, `mm_vision_select_layer`, `mm_vision_select_feature`, `image_aspect_ratio`,
`image_grid_pinpoints` as (width, height) pairs, `mm_patch_merge_type`, `mm_vision_tower` = a local folder with a
CLIP config or a well-known name such as `openai/clip-vit-large-patch14-336`). The weights always come from the
checkpoint. Missing / unexpected keys and shape mismatches raise `CheckpointMismatchError` listing them all.

Public API:
  load_llava(path, *, dtype=jnp.float32, mesh=None, param_dtype=jnp.float32, ignore_keys=()) -> LlavaModel
  llava_sections(reader, config, layout, what) -> (sections, lm_head_key)   (for models nesting a LlavaModel)
  read_llava_config(path) -> (LlavaConfig, layout name)
  load_llama(path, *, dtype=jnp.float32, mesh=None, param_dtype=jnp.float32) -> LlamaForCausalLM
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import jax.numpy as jnp
from flax import nnx

from caig_jax.convert.clip import detect_prefix, load_module, read_json
from caig_jax.convert.common import SafetensorsReader
from caig_jax.errors import MissingPathError
from caig_jax.models.clip import BUILTIN_VISION_CONFIGS, CLIPVisionConfig
from caig_jax.models.llama import LlamaForCausalLM, config_from_mapping
from caig_jax.models.llava import LLAVA_IMAGE_TOKEN_INDEX, LlavaConfig, LlavaModel, eos_and_pad_ids

TRANSFORMERS = "transformers"
ORIGINAL = "original_llava"


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
    from transformers import LlavaConfig as HFLlavaConfig
    from transformers import LlavaNextConfig as HFLlavaNextConfig

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
        raise NotImplementedError(f"{where}: mm_projector_type {projector!r}; only 'mlp2x_gelu' is implemented")
    select = d.get("mm_vision_select_feature", "patch")
    strategies = {"patch": "default", "cls_patch": "full"}
    if select not in strategies:
        raise ValueError(f"{where}: mm_vision_select_feature {select!r}; expected one of {sorted(strategies)}")
    aspect = d.get("image_aspect_ratio", "square")
    merge = d.get("mm_patch_merge_type", "flat")
    anyres = str(aspect).startswith("anyres")
    if anyres and merge != "spatial_unpad":
        raise NotImplementedError(
            f"{where}: image_aspect_ratio {aspect!r} with mm_patch_merge_type {merge!r}; anyres is implemented as "
            "LLaVA-NeXT's 'spatial_unpad' (base image + unpadded grid + image_newline)"
        )
    if aspect not in ("anyres", "pad", "square", "resize", None) and not anyres:
        raise NotImplementedError(f"{where}: image_aspect_ratio {aspect!r} is not implemented")
    pinpoints = d.get("image_grid_pinpoints") or ()
    if anyres and (isinstance(pinpoints, str) or not pinpoints):
        raise NotImplementedError(f"{where}: image_grid_pinpoints {pinpoints!r}; expected a list of [width, height]")
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


def llava_sections(reader: SafetensorsReader, config: LlavaConfig, layout: str, what: str = "checkpoint"):
    """`(sections, head_key)`: (our_prefix, ckpt_prefix, rename) triples mapping every `LlavaModel` parameter
    to its checkpoint key (prefixes detected from the keys present), and the LM head's key (to ignore when the
    embeddings are tied). Models that nest a LlavaModel (the reward model) feed these to
    `caig_jax.convert.clip.sources_from_sections(..., our_root='backbone')` and add their own heads."""
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


def load_llava(
    path: str, *, dtype=jnp.float32, mesh=None, param_dtype=jnp.float32, ignore_keys: Iterable[str] = ()
) -> LlavaModel:
    """Builds the model for `path`'s config on `mesh` (None: first device) and streams the weights in.

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


