"""diffusers folders and original-LDM single files -> our UNet / VAE / ControlNet (/ CLIP text) on a mesh.

Our module attributes carry diffusers' names, so a parameter path maps to its diffusers key mechanically
(`diffusers_key`); the original LDM (CompVis) layout of single-file SD-1.5 checkpoints (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.transformer.*`, the layout community fine-tunes such as majicMIX ship)
is one more renaming on top (`ldm_unet_key`, `ldm_vae_key`), written from the mapping in diffusers'
`loaders/single_file_utils.py` read in the other direction.

Tensors are streamed one at a time onto the mesh by `caig_jax.convert.common.load_state`; before anything is
read, every missing parameter, unexpected checkpoint key and shape mismatch is collected and raised together as
one `CheckpointMismatchError`.

The other direction is the renderer's export path (`save_diffusers_model`, `save_clip_text_encoder`,
`save_pipeline`): our modules written in the diffusers folder layout as safetensors (diffusers keys, PyTorch
tensor layout, `config.json` from the module's config), readable by diffusers / transformers and by the loaders
here. The render job's tiny preset writes its random weights this way (no PyTorch needed).

Public API:
  load_unet(folder, *, dtype=jnp.float32, mesh=None, param_dtype=None) -> UNet2DConditionModel
  load_vae(folder, *, dtype=jnp.float32, mesh=None, param_dtype=None) -> AutoencoderKL
  load_controlnet(folder, *, dtype=jnp.float32, mesh=None, param_dtype=None) -> ControlNetModel
  load_ldm_single_file(path, *, dtype=jnp.float32, mesh=None, param_dtype=None, unet_config=None,
                       vae_config=None, text_encoder_config=None, load_text_encoder=True)
      -> {"unet": ..., "vae": ..., "text_encoder": ... or None, "configs": {...}}
  save_diffusers_model(module, folder) -> folder          (UNet2DConditionModel / AutoencoderKL / ControlNetModel)
  save_clip_text_encoder(module, folder) -> folder        (transformers CLIPTextModel layout)
  save_pipeline(folder, *, unet, vae, text_encoder, tokenizer, scheduler_config, controlnet=None) -> folder
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from caig_jax import parallel
from caig_jax.convert.clip import is_ignored_key, torch_key
from caig_jax.convert.common import (
    CheckpointMismatchError,
    SafetensorsReader,
    flat_paths,
    load_state,
    torch_layout_shape,
)
from caig_jax.errors import MissingPathError
from caig_jax.files import write_json_atomic
from caig_jax.models.clip import CLIPTextConfig, CLIPTextModel
from caig_jax.models.controlnet import ControlNetConfig, ControlNetModel
from caig_jax.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from caig_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

# ---------------------------------------------------------------------------------------------------------------
# Our parameter path <-> diffusers key, tensor layout
# ---------------------------------------------------------------------------------------------------------------

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def diffusers_key(path: str) -> str:
    """Our flat path ('down_blocks/0/attentions/0/transformer_blocks/0/ff/proj/kernel') -> the diffusers
    state-dict key ('down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight')."""
    parts = path.split("/")
    leaf = _LEAF_NAMES.get(parts[-1], parts[-1])
    out: list[str] = []
    for i, p in enumerate(parts[:-1]):
        prev = parts[i - 1] if i else None
        if p == "to_out":
            out += ["to_out", "0"]  # diffusers: ModuleList([Linear, Dropout])
        elif prev == "ff" and p == "proj":
            out += ["net", "0", "proj"]  # diffusers: FeedForward.net = [GEGLU, Dropout, Linear]
        elif prev == "ff" and p == "out":
            out += ["net", "2"]
        else:
            out.append(p)
    return ".".join(out + [leaf])


def to_flax_layout(array: np.ndarray, leaf: str, target_ndim: int) -> np.ndarray:
    """PyTorch tensor -> our layout: Linear `[out, in]` -> `[in, out]`, Conv `[out, in, kh, kw]` -> `[kh, kw, in, out]`.

    1x1 convolutions stored where we hold a Linear (the LDM VAE's attention q/k/v/proj_out) are squeezed, and
    Linear weights where we hold a 1x1 conv (SD-2-style `proj_in`) are expanded. Anything else is returned as
    is, so that a wrong checkpoint tensor surfaces as a shape mismatch naming it rather than a crash here.
    """
    if leaf != "kernel":
        return array
    if target_ndim == 2:
        if array.ndim == 4 and array.shape[2:] == (1, 1):
            array = array[:, :, 0, 0]
        elif array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        return array.T if array.ndim == 2 else array
    if target_ndim == 4:
        if array.ndim == 2:
            array = array[:, :, None, None]
        return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array
    return array


def _transformed_shape(shape: tuple[int, ...], leaf: str, target_ndim: int) -> tuple[int, ...]:
    # A zero-stride view: the layout transform applied to metadata only, nothing is allocated.
    return tuple(to_flax_layout(np.broadcast_to(np.zeros((), np.bool_), shape), leaf, target_ndim).shape)


# ---------------------------------------------------------------------------------------------------------------
# Generic: build abstract module, check the checkpoint against it, stream tensors in
# ---------------------------------------------------------------------------------------------------------------


def _listing(title: str, items: list[str], limit: int = 40) -> str:
    shown = items[:limit]
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


def _abstract(make_module: Callable[[], nnx.Module], mesh):
    if mesh is None:
        graphdef, state = nnx.split(parallel.abstract_module(make_module))
        return graphdef, state
    return parallel.abstract_with_shardings(make_module, mesh)


def load_module(
    make_module: Callable[[], nnx.Module],
    reader: SafetensorsReader,
    key_of_path: Callable[[str], str],
    *,
    mesh=None,
    what: str,
    consumed_prefixes: tuple[str, ...] = ("",),
    ignore: Callable[[str], bool] = lambda key: False,
):
    """Builds `make_module()` abstractly, maps each parameter to its checkpoint key and loads it onto `mesh`.

    Args:
      make_module: zero-argument constructor of the module.
      reader: the checkpoint.
      key_of_path: our flat path -> checkpoint key.
      mesh: a `('data', 'fsdp', 'tensor')` mesh, or None for unsharded arrays on the default device.
      what: names the checkpoint and component in error messages.
      consumed_prefixes: checkpoint keys with one of these prefixes belong to this module; any of them that no
        parameter reads is reported as unexpected (a single file holds several modules: keys outside the
        prefixes belong to the others).
      ignore: predicate for checkpoint keys that are known to carry no parameter (e.g. `position_ids` buffers).

    Raises:
      CheckpointMismatchError listing every missing key, unexpected key and shape mismatch together.
    """
    graphdef, abstract_state = _abstract(make_module, mesh)
    targets = flat_paths(abstract_state)
    available = set(reader.keys())
    sources: dict[str, Callable[[], np.ndarray]] = {}
    names: dict[str, str] = {}
    missing, mismatched = [], []
    for path, var in targets.items():
        key = key_of_path(path)
        leaf = path.rsplit("/", 1)[-1]
        target_shape = tuple(var.get_value().shape)
        names[path] = key
        if key not in available:
            missing.append(f"{key}  (-> {path}, shape {target_shape})")
            continue
        got = _transformed_shape(reader.shape(key), leaf, len(target_shape))
        if got != target_shape:
            mismatched.append(
                f"{key} -> {path}: file shape {tuple(reader.shape(key))}, model expects "
                f"{torch_layout_shape(leaf, target_shape)} in the file's layout (ours: {target_shape})"
            )
            continue
        sources[path] = lambda key=key, leaf=leaf, nd=len(target_shape): to_flax_layout(reader.get(key), leaf, nd)
    used = set(names.values())
    unexpected = sorted(
        k for k in available if k.startswith(consumed_prefixes) and k not in used and not ignore(k)
    )
    problems = []
    if missing:
        problems.append(_listing("parameters missing from the checkpoint", sorted(missing)))
    if unexpected:
        problems.append(_listing("unexpected checkpoint keys", unexpected))
    if mismatched:
        problems.append(_listing("shape mismatches", sorted(mismatched)))
    if problems:
        raise CheckpointMismatchError(f"{what} does not match the model:\n" + "\n".join(problems))
    state = load_state(abstract_state, sources, what=what, source_names=names)
    return nnx.merge(graphdef, state)


def _model_folder(folder: str | os.PathLike, subfolder: str) -> str:
    """A diffusers model folder (with config.json); a pipeline root is accepted and its `subfolder` used."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise MissingPathError(f"{folder!r} is not a folder (expected a diffusers {subfolder}/ folder)")
    if not os.path.exists(os.path.join(folder, "config.json")) and os.path.isdir(os.path.join(folder, subfolder)):
        folder = os.path.join(folder, subfolder)
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise MissingPathError(f"{folder!r} has no config.json (expected a diffusers {subfolder}/ folder)")
    if not any(n.endswith((".safetensors", ".safetensors.index.json")) for n in os.listdir(folder)):
        bins = [n for n in os.listdir(folder) if n.endswith(".bin")]
        hint = f" (found PyTorch pickles {bins}; re-save them with safe_serialization=True)" if bins else ""
        raise MissingPathError(f"{folder!r} holds no .safetensors weights{hint}")
    return folder


def read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e


def _dtypes(dtype, param_dtype):
    return dtype, (dtype if param_dtype is None else param_dtype)


# ---------------------------------------------------------------------------------------------------------------
# diffusers folders
# ---------------------------------------------------------------------------------------------------------------


def load_unet(folder, *, dtype=jnp.float32, mesh=None, param_dtype=None):
    """Loads a diffusers `UNet2DConditionModel` folder (`config.json` + `diffusion_pytorch_model.safetensors`).

    Args:
      folder: the `unet/` folder (or a pipeline root holding one).
      dtype: compute dtype; `param_dtype` (default: `dtype`) the stored parameter dtype.
      mesh: place parameters sharded on this mesh by their logical axes; None: unsharded, default device.
    Returns:
      `caig_jax.models.unet.UNet2DConditionModel`.
    """

    folder = _model_folder(folder, "unet")
    config = UNet2DConditionConfig.from_dict(read_config(folder))
    dtype, param_dtype = _dtypes(dtype, param_dtype)
    return load_module(
        lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        SafetensorsReader(folder), diffusers_key, mesh=mesh, what=f"UNet checkpoint {folder}",
    )


def load_vae(folder, *, dtype=jnp.float32, mesh=None, param_dtype=None):
    """Loads a diffusers `AutoencoderKL` folder (`vae/`). Same arguments as `load_unet`; returns `AutoencoderKL`."""

    folder = _model_folder(folder, "vae")
    config = AutoencoderKLConfig.from_dict(read_config(folder))
    dtype, param_dtype = _dtypes(dtype, param_dtype)
    return load_module(
        lambda: AutoencoderKL(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        SafetensorsReader(folder), diffusers_key, mesh=mesh, what=f"VAE checkpoint {folder}",
    )


def load_controlnet(folder, *, dtype=jnp.float32, mesh=None, param_dtype=None):
    """Loads a diffusers `ControlNetModel` folder (e.g. lllyasviel/control_v11p_sd15_canny). Returns
    `caig_jax.models.controlnet.ControlNetModel`."""

    folder = _model_folder(folder, "controlnet")
    config = ControlNetConfig.from_dict(read_config(folder))
    dtype, param_dtype = _dtypes(dtype, param_dtype)
    return load_module(
        lambda: ControlNetModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        SafetensorsReader(folder), diffusers_key, mesh=mesh, what=f"ControlNet checkpoint {folder}",
    )


# ---------------------------------------------------------------------------------------------------------------
# Original LDM (CompVis) single-file checkpoints
# ---------------------------------------------------------------------------------------------------------------

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIXES = ("first_stage_model.", "vae.")
LDM_TEXT_PREFIX = "cond_stage_model.transformer."

# runwayml/stable-diffusion-v1-5 `unet/`, `vae/` and `text_encoder/` configs: single files carry no config.
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}

_LDM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_LDM_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _uniform_layers(config) -> int:
    layers_per_block = config.layers_per_block
    if isinstance(layers_per_block, tuple):
        if len(set(layers_per_block)) != 1:
            raise ValueError(f"the LDM layout needs one layers_per_block for all blocks, got {layers_per_block}")
        layers_per_block = layers_per_block[0]
    return int(layers_per_block)


def ldm_unet_key(key: str, config) -> str:
    """diffusers UNet key -> original LDM key (without the `model.diffusion_model.` prefix).

    The inverse of diffusers' `convert_ldm_unet_checkpoint`: input_blocks are numbered 1.. with
    `layers_per_block + 1` slots per level (resnet `.0`, spatial transformer `.1`, downsampler `.0.op`),
    middle_block is resnet / transformer / resnet, output_blocks have `layers_per_block + 1` slots per level
    with the upsampler at `.1.conv` (no attention) or `.2.conv`.
    """
    per = _uniform_layers(config)
    module, _, leaf = key.rpartition(".")
    if module in _LDM_UNET_TOP:
        return f"{_LDM_UNET_TOP[module]}.{leaf}"

    def resnet(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return f"{_LDM_RESNET.get(head, head)}.{tail}"

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        base = 1 + block * (per + 1)
        if kind == "resnets":
            return f"input_blocks.{base + layer}.0.{resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{base + layer}.1.{rest}"
        return f"input_blocks.{base + per}.0.op.{rest.removeprefix('conv.')}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, index, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return f"middle_block.{2 * index}.{resnet(rest)}"
        return f"middle_block.{2 * index + 1}.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        base = block * (per + 1)
        if kind == "resnets":
            return f"output_blocks.{base + layer}.0.{resnet(rest)}"
        if kind == "attentions":
            return f"output_blocks.{base + layer}.1.{rest}"
        slot = 2 if config.up_block_types[block] == "CrossAttnUpBlock2D" else 1
        return f"output_blocks.{base + per}.{slot}.{rest}"
    raise KeyError(f"no LDM name for UNet parameter {key!r}")


_LDM_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_vae_key(key: str, config) -> str:
    """diffusers VAE key -> original LDM key (without the `first_stage_model.` prefix); inverse of
    diffusers' `convert_ldm_vae_checkpoint` (decoder levels are numbered in reverse: up_blocks.i = up.{n-1-i})."""
    n = len(config.block_out_channels)
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(\w+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    attn = r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)"
    if m := re.fullmatch(attn, key):
        return f"{m[1]}.mid.attn_1.{_LDM_VAE_ATTN[m[2]]}.{m[3]}"
    return key  # conv_in / conv_out / quant_conv / post_quant_conv keep their names


def load_ldm_single_file(
    path,
    *,
    dtype=jnp.float32,
    mesh=None,
    param_dtype=None,
    unet_config=None,
    vae_config=None,
    text_encoder_config=None,
    load_text_encoder: bool = True,
) -> dict[str, Any]:
    """Loads a single-file SD checkpoint in the original LDM (CompVis) key layout.

    The file holds `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and
    `cond_stage_model.transformer.text_model.*` (CLIP-L text encoder) tensors, but no configs: the SD-1.5
    configs (`SD15_UNET_CONFIG`, `SD15_VAE_CONFIG`, `SD15_TEXT_ENCODER_CONFIG`) are used unless given (as
    diffusers / transformers `config.json` dicts or our config dataclasses). Other keys (`model_ema.*`, scheduler
    buffers such as `alphas_cumprod`) are ignored: like diffusers, the non-EMA weights are loaded. Under a component's prefix, every key must be
    consumed and every parameter present with the right shape, or a `CheckpointMismatchError` lists them.

    Args:
      path: the `.safetensors` file.
      dtype / param_dtype / mesh: as `load_unet`.
      load_text_encoder: False skips the text encoder (e.g. when a diffusers `text_encoder/` is used instead).

    Returns:
      `{"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel | None,
        "configs": {"unet": UNet2DConditionConfig, "vae": AutoencoderKLConfig, "text_encoder": CLIPTextConfig}}`
    """

    path = os.fspath(path)
    if os.path.isdir(path) or not path.endswith(".safetensors"):
        raise ValueError(f"{path!r}: expected a single-file .safetensors checkpoint in the LDM layout")
    reader = SafetensorsReader(path)
    keys = reader.keys()
    if not any(k.startswith(LDM_UNET_PREFIX) for k in keys):
        raise CheckpointMismatchError(
            f"{path} is not an LDM Stable Diffusion checkpoint: no '{LDM_UNET_PREFIX}*' keys "
            f"(first keys: {sorted(keys)[:8]})"
        )
    dtype, param_dtype = _dtypes(dtype, param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype)  # rngs are made inside each (abstract) constructor

    unet_cfg = UNet2DConditionConfig.from_dict(SD15_UNET_CONFIG if unet_config is None else unet_config)
    unet = load_module(
        lambda: UNet2DConditionModel(unet_cfg, rngs=nnx.Rngs(0), **kw), reader,
        lambda p: LDM_UNET_PREFIX + ldm_unet_key(diffusers_key(p), unet_cfg),
        mesh=mesh, what=f"{path} (UNet, {LDM_UNET_PREFIX}*)", consumed_prefixes=(LDM_UNET_PREFIX,),
    )

    vae_prefix = next((p for p in LDM_VAE_PREFIXES if any(k.startswith(p) for k in keys)), LDM_VAE_PREFIXES[0])
    vae_cfg = AutoencoderKLConfig.from_dict(SD15_VAE_CONFIG if vae_config is None else vae_config)
    vae = load_module(
        lambda: AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0), **kw), reader,
        lambda p: vae_prefix + ldm_vae_key(diffusers_key(p), vae_cfg),
        mesh=mesh, what=f"{path} (VAE, {vae_prefix}*)", consumed_prefixes=(vae_prefix,),
    )

    if isinstance(text_encoder_config, CLIPTextConfig):
        text_cfg = text_encoder_config
    else:
        text_cfg = CLIPTextConfig.from_dict(
            dict(SD15_TEXT_ENCODER_CONFIG if text_encoder_config is None else text_encoder_config)
        )
    text_encoder = None
    if load_text_encoder:
        # Files written from very old transformers lack the `text_model.` level.
        text_prefix = LDM_TEXT_PREFIX + "text_model."
        if not any(k.startswith(text_prefix) for k in keys):
            text_prefix = LDM_TEXT_PREFIX
        text_encoder = load_module(
            lambda: CLIPTextModel(text_cfg, rngs=nnx.Rngs(0), **kw), reader, lambda p: text_prefix + torch_key(p),
            mesh=mesh, what=f"{path} (text encoder, {text_prefix}*)", consumed_prefixes=(LDM_TEXT_PREFIX,),
            ignore=is_ignored_key,
        )
    other = [k for k in keys if not k.startswith((LDM_UNET_PREFIX, vae_prefix, LDM_TEXT_PREFIX))]
    if other:
        logging.info("%s: ignored %d keys outside the UNet/VAE/text encoder (e.g. %s)", path, len(other), other[:3])
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "configs": {"unet": unet_cfg, "vae": vae_cfg, "text_encoder": text_cfg},
    }


# ---------------------------------------------------------------------------------------------------------------
# Export: our modules -> the diffusers folder layout (the inverse of the loaders above)
# ---------------------------------------------------------------------------------------------------------------

# The diffusers release whose folder layout (keys, config fields, model_index.json) this writes.
DIFFUSERS_LAYOUT_VERSION = "0.42.1"
_CLASS_NAMES = {UNet2DConditionModel: "UNet2DConditionModel", AutoencoderKL: "AutoencoderKL",
                ControlNetModel: "ControlNetModel"}


def to_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """Our layout -> PyTorch's (the inverse of `to_flax_layout` for diffusers-named modules): Linear `[in, out]` ->
    `[out, in]`, Conv `[kh, kw, in, out]` -> `[out, in, kh, kw]`; everything else as is."""
    if leaf != "kernel":
        return array
    if array.ndim == 2:
        return array.T
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array


def module_tensors(module: nnx.Module, key_of_path: Callable[[str], str]) -> dict[str, np.ndarray]:
    """`{checkpoint key: tensor in PyTorch layout}` for every parameter of `module` (gathered to the host;
    bfloat16 / float16 parameters are written as float32)."""
    tensors = {}
    for path, var in flat_paths(nnx.state(module, nnx.Param)).items():
        array = np.asarray(jax.device_get(var.get_value()))
        if array.dtype.name in ("bfloat16", "float16"):
            array = array.astype(np.float32)
        tensors[key_of_path(path)] = np.ascontiguousarray(to_torch_layout(array, path.rsplit("/", 1)[-1]))
    return tensors


def _config_json(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def save_diffusers_model(module: nnx.Module, folder: str) -> str:
    """Writes a UNet, VAE or ControlNet as a diffusers model folder: `config.json` (the module's config, with
    diffusers' `_class_name`) and `diffusion_pytorch_model.safetensors` (diffusers keys, PyTorch layout). The
    inverse of `load_unet` / `load_vae` / `load_controlnet`; diffusers' `from_pretrained` reads it too."""
    class_name = next((name for cls, name in _CLASS_NAMES.items() if isinstance(module, cls)), None)
    if class_name is None:
        raise TypeError(f"save_diffusers_model writes {sorted(_CLASS_NAMES.values())}, got {type(module).__name__}")
    os.makedirs(folder, exist_ok=True)
    save_file(module_tensors(module, diffusers_key), os.path.join(folder, "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt"})
    config = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_LAYOUT_VERSION, **_config_json(module.config)}
    write_json_atomic(os.path.join(folder, "config.json"), config)
    return folder


def save_clip_text_encoder(module: CLIPTextModel, folder: str) -> str:
    """Writes our CLIPTextModel as transformers 5.x `CLIPTextModel.save_pretrained` does (`config.json` +
    `model.safetensors`, keys without the `text_model.` level): SD's `text_encoder/` folder. The inverse of
    `caig_jax.convert.clip.load_clip_text_model`."""
    os.makedirs(folder, exist_ok=True)
    save_file(module_tensors(module, torch_key), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **_config_json(module.config)}
    write_json_atomic(os.path.join(folder, "config.json"), config)
    return folder


def save_pipeline(folder: str, *, unet, vae, text_encoder, tokenizer, scheduler_config: dict[str, Any],
                  controlnet=None) -> str:
    """Writes a Stable Diffusion (+ ControlNet inpainting) pipeline folder in diffusers' layout:
    `unet/ vae/ text_encoder/ tokenizer/ scheduler/ [controlnet/]` and `model_index.json` (written last: a folder
    without it is incomplete). `tokenizer` is a transformers CLIP tokenizer (saved with its `save_pretrained`);
    `scheduler_config` the `scheduler_config.json` dict (its `_class_name` names the diffusers scheduler)."""
    os.makedirs(folder, exist_ok=True)
    save_diffusers_model(unet, os.path.join(folder, "unet"))
    save_diffusers_model(vae, os.path.join(folder, "vae"))
    save_clip_text_encoder(text_encoder, os.path.join(folder, "text_encoder"))
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    write_json_atomic(os.path.join(folder, "scheduler", "scheduler_config.json"), scheduler_config)
    index = {
        "_class_name": "StableDiffusionControlNetInpaintPipeline" if controlnet is not None else "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_LAYOUT_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_config.get("_class_name", "PNDMScheduler")],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if controlnet is not None:
        save_diffusers_model(controlnet, os.path.join(folder, "controlnet"))
        index["controlnet"] = ["diffusers", "ControlNetModel"]
    write_json_atomic(os.path.join(folder, "model_index.json"), index)
    return folder
