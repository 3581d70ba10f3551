"""Our LLaVA / LLaVA-NeXT -> a transformers folder that `LlavaNextForConditionalGeneration.from_pretrained` (or
`LlavaForConditionalGeneration`) loads: the inverse of the loaders in `caig_jax.convert.llava` / `convert.clip`.

    save_pretrained(model, folder, tokenizer=tokenizer, image_processor=processor_config)

writes `config.json` (a transformers `LlavaNextConfig` / `LlavaConfig`), `generation_config.json`,
`model.safetensors` (or `model-0000k-of-0000n.safetensors` shards + `model.safetensors.index.json` past
`max_shard_bytes`), the tokenizer's files and `preprocessor_config.json`. Keys are transformers 5.x
`save_pretrained`'s (`language_model.model.*`, `language_model.lm_head.weight`, `vision_tower.*` without the
`vision_model.` level, `multi_modal_projector.*`, `image_newline`), computed by the loaders' own key mapping
(`llava_sections` + `sources_from_sections`), so what this writes is exactly what `from_pretrained` reads back;
tensors are put back in PyTorch layout (Linear `[out, in]`, conv `[out, in, kh, kw]`).

A model with LoRA adapters is refused: merge them first (`caig_jax.models.lora.merge_lora`). Tensors are streamed
one at a time into the safetensors file (written by hand: an 8-byte header length, the JSON header, the raw
little-endian data), so the host holds one tensor, not the model. On multi-process runs every process must call
this (sharded parameters are gathered); only process 0 writes.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from caig_jax.convert.clip import sources_from_sections
from caig_jax.convert.llava import TRANSFORMERS, llava_sections
from caig_jax.files import write_json_atomic
from caig_jax.models.image_processing import ImageProcessorConfig
from caig_jax.models.llava import LlavaConfig, LlavaModel
from caig_jax.models.lora import lora_layers

# numpy dtype -> safetensors dtype name
_SAFETENSORS_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_IMAGE_PROCESSOR_TYPES = {"clip": "CLIPImageProcessor", "llava": "LlavaImageProcessor",
                          "llava_next": "LlavaNextImageProcessor"}


class _KeyLayout:
    """Stands in for a checkpoint reader holding the transformers 5.x key layout, so that `llava_sections`
    (which detects prefixes from the keys present) returns that layout's prefixes."""

    _ANCHORS = frozenset({"language_model.model.embed_tokens.weight", "vision_tower.embeddings.patch_embedding.weight",
                          "multi_modal_projector.linear_1.weight", "image_newline"})

    def __contains__(self, key: str) -> bool:
        return key in self._ANCHORS

    def keys(self):
        return sorted(self._ANCHORS)


# ------------------------------------------------------------------------------------------------ config


def transformers_config(config: LlavaConfig) -> dict[str, Any]:
    """The transformers `config.json` dict of a `LlavaConfig` (`LlavaNextConfig` when anyres, else `LlavaConfig`):
    `caig_jax.models.llava.read_llava_config` reads it back to an equal `LlavaConfig`."""
    t, v = config.text_config, config.vision_config
    rope = {"rope_type": t.rope_type, "rope_theta": float(t.rope_theta)}
    rope.update({k: val for k, val in (t.rope_scaling or ()) if k not in ("rope_type", "type")})
    eos = list(t.eos_token_id) if isinstance(t.eos_token_id, tuple) else t.eos_token_id
    text = {
        "model_type": "llama", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim, "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
        "rope_parameters": rope, "attention_bias": t.attention_bias, "mlp_bias": t.mlp_bias,
        "hidden_act": t.hidden_act, "tie_word_embeddings": t.tie_word_embeddings, "bos_token_id": t.bos_token_id,
        "eos_token_id": eos, "pad_token_id": t.pad_token_id,
    }
    vision = {
        "model_type": "clip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
        "num_channels": v.num_channels, "image_size": v.image_size, "patch_size": v.patch_size,
        "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps,
    }
    layer = config.vision_feature_layer
    out = {
        "architectures": ["LlavaNextForConditionalGeneration" if config.anyres else "LlavaForConditionalGeneration"],
        "model_type": "llava_next" if config.anyres else "llava",
        "text_config": text,
        "vision_config": vision,
        "image_token_index": config.image_token_id,
        "vision_feature_layer": list(layer) if isinstance(layer, tuple) else layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "projector_hidden_act": config.projector_hidden_act,
        "multimodal_projector_bias": config.multimodal_projector_bias,
        "tie_word_embeddings": t.tie_word_embeddings,
        "pad_token_id": config.pad_token_id,
        "image_seq_length": config.tokens_per_tile,
    }
    if config.anyres:
        out["image_grid_pinpoints"] = [list(p) for p in config.image_grid_pinpoints]
    return out


def generation_config(config: LlavaConfig) -> dict[str, Any]:
    eos = list(config.eos_token_ids)
    return {"bos_token_id": config.text_config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": config.pad_token_id}


def image_processor_dict(processor_config: ImageProcessorConfig) -> dict[str, Any]:
    """A transformers `preprocessor_config.json` dict of our image-processor config (what
    `ImageProcessorConfig.from_dict` and transformers' image processors read)."""
    c = processor_config
    out = {
        "image_processor_type": _IMAGE_PROCESSOR_TYPES[c.kind], "size": dict(c.size), "crop_size": dict(c.crop_size),
        "resample": c.resample, "do_resize": c.do_resize, "do_center_crop": c.do_center_crop,
        "do_rescale": c.do_rescale, "rescale_factor": c.rescale_factor, "do_normalize": c.do_normalize,
        "image_mean": list(c.image_mean), "image_std": list(c.image_std), "do_convert_rgb": c.do_convert_rgb,
        "do_pad": c.do_pad,
    }
    if c.kind == "llava_next":
        out["image_grid_pinpoints"] = [list(p) for p in c.image_grid_pinpoints]
    return out


# ------------------------------------------------------------------------------------------------ weights


def transformers_keys(model: LlavaModel) -> dict[str, str]:
    """`{our parameter path: transformers checkpoint key}` for every parameter of `model` (the loaders' mapping)."""
    adapters = lora_layers(model)
    if adapters:
        raise ValueError(f"the model has {len(adapters)} LoRA adapters (e.g. {adapters[0][0]}): merge them first "
                         "with caig_jax.models.lora.merge_lora(model); an export holds plain weights")
    layout = _KeyLayout()
    sections, _ = llava_sections(layout, model.config, TRANSFORMERS, "export")
    state = nnx.state(model, nnx.Param)
    _, names = sources_from_sections(layout, state, sections)
    ours = {"/".join(str(p) for p in path) for path, _ in nnx.to_flat_state(state)}
    unmapped = sorted(ours - set(names))
    if unmapped:
        raise ValueError(f"export: no transformers key for parameters {unmapped[:10]}")
    return {path: names[path] for path in sorted(ours)}


def flax_to_torch(path: str, array: np.ndarray) -> np.ndarray:
    """Our layout -> PyTorch's for the parameter at `path` (the inverse of `convert.clip.torch_to_flax`)."""
    if path.endswith("kernel"):
        if array.ndim == 2:
            return np.ascontiguousarray(array.T)
        if array.ndim == 4:
            return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    return np.ascontiguousarray(array)


def _host_value(x: jax.Array) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ------------------------------------------------------------------------------------------------ safetensors


def _header(entries: list[tuple[str, np.dtype, tuple[int, ...]]]) -> tuple[bytes, list[int]]:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset, sizes = 0, []
    for key, dtype, shape in entries:
        if np.dtype(dtype) not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{key}: dtype {dtype} cannot be written to safetensors here")
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": _SAFETENSORS_DTYPES[np.dtype(dtype)], "shape": list(shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
        sizes.append(size)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    return blob, sizes


def write_safetensors(path: str, entries: list[tuple[str, np.dtype, tuple[int, ...]]], tensors) -> None:
    """Writes a safetensors file whose header lists `entries` (key, dtype, shape) and whose data are the arrays
    of the `tensors` iterable, consumed in the same order (one array in memory at a time). Atomic."""
    header, sizes = _header(entries)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for (key, dtype, shape), size, array in zip(entries, sizes, tensors, strict=True):
            array = np.ascontiguousarray(array)
            if array.dtype != np.dtype(dtype) or tuple(array.shape) != tuple(shape):
                raise ValueError(f"{key}: got {array.dtype}{array.shape}, the header says {dtype}{tuple(shape)}")
            data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            assert len(data) == size
            f.write(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ export


def save_pretrained(
    model: LlavaModel,
    folder: str,
    *,
    tokenizer: Any = None,
    image_processor: ImageProcessorConfig | None = None,
    dtype: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> dict[str, str]:
    """Writes `model` (LoRA merged) as a transformers LLaVA(-NeXT) folder; returns `{what: path}`.

    Args:
      model: a `LlavaModel` without LoRA adapters (`merge_lora` first).
      folder: created if missing; files already there with the same names are replaced.
      tokenizer: a transformers tokenizer (its `save_pretrained` files are written), or None.
      image_processor: our `ImageProcessorConfig` (written as `preprocessor_config.json`), or None.
      dtype: the stored dtype of floating tensors (None: as the parameters are, float32 for our training runs;
        `"bfloat16"` halves a 7B export to ~14 GB).
      max_shard_bytes: larger exports are split into shards with a `model.safetensors.index.json`.
    """
    config: LlavaConfig = model.config
    cast = None if dtype is None else np.dtype(ml_dtypes.bfloat16 if str(dtype) == "bfloat16" else dtype)
    params = {"/".join(str(p) for p in path): v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    keys = sorted(transformers_keys(model).items(), key=lambda kv: kv[1])
    entries = []
    for path, key in keys:
        value = params[path].get_value()
        shape = tuple(value.shape)
        if path.endswith("kernel") and len(shape) == 2:
            shape = shape[::-1]
        elif path.endswith("kernel") and len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])
        floating = np.issubdtype(np.dtype(value.dtype), np.floating)
        stored = cast if cast is not None and floating else np.dtype(value.dtype)
        entries.append((key, stored, shape))
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(folder, exist_ok=True)

    stored_dtype = {key: dt for key, dt, _ in entries}

    def tensors(selected):
        for path, key in selected:
            yield flax_to_torch(path, _host_value(params[path].get_value())).astype(stored_dtype[key], copy=False)

    # Shards: consecutive keys, each under max_shard_bytes (a single larger tensor gets a shard of its own).
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, dt, shape) in enumerate(entries):
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    written: dict[str, str] = {}
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    for name, index in zip(names, shards):
        selected = [keys[i] for i in index]
        gen = tensors(selected)
        if writer:
            write_safetensors(os.path.join(folder, name), [entries[i] for i in index], gen)
        else:
            for _ in gen:  # every process takes part in the gathers
                pass
    if not writer:
        return written
    if len(shards) > 1:
        total = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for _, d, s in entries)
        weight_map = {entries[i][0]: name for name, index in zip(names, shards) for i in index}
        write_json_atomic(os.path.join(folder, "model.safetensors.index.json"),
                          {"metadata": {"total_size": total}, "weight_map": weight_map})
        written["index"] = os.path.join(folder, "model.safetensors.index.json")
    written["weights"] = os.path.join(folder, names[0])
    write_json_atomic(os.path.join(folder, "config.json"), transformers_config(config))
    write_json_atomic(os.path.join(folder, "generation_config.json"), generation_config(config))
    written["config"] = os.path.join(folder, "config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        written["tokenizer"] = folder
    if image_processor is not None:
        write_json_atomic(os.path.join(folder, "preprocessor_config.json"), image_processor_dict(image_processor))
        written["image_processor"] = os.path.join(folder, "preprocessor_config.json")
    return written
