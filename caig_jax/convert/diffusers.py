"""diffusers folders and original-LDM single files -> our UNet / VAE / ControlNet (/ CLIP text) on a mesh.

Our module attributes carry diffusers' names, so a parameter path maps to its diffusers key mechanically
(`diffusers_key`); the original LDM (CompVis) layout of single-file SD-1.5 checkpoints (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.transformer.*`, the layout community fine-tunes such as majicMIX ship)
is one more renaming on top (`ldm_unet_key`, `ldm_vae_key`), written from the mapping in diffusers'
`loaders/single_file_utils.py` read in the other direction.

Tensors are streamed one at a time onto the mesh by `caig_jax.convert.common.load_state`; before anything is
read, every missing parameter, unexpected checkpoint key and shape mismatch is collected and raised together as
one `CheckpointMismatchError`.

Public API:
  load_unet(folder, *, dtype=jnp.float32, mesh=None, param_dtype=None) -> UNet2DConditionModel
  load_vae(folder, *, dtype=jnp.float32, mesh=None, param_dtype=None) -> AutoencoderKL
  load_controlnet(folder, *, dtype=jnp.float32, mesh=None, param_dtype=None) -> ControlNetModel
  load_ldm_single_file(path, *, dtype=jnp.float32, mesh=None, param_dtype=None, unet_config=None,
                       vae_config=None, text_encoder_config=None, load_text_encoder=True)
      -> {"unet": ..., "vae": ..., "text_encoder": ... or None, "configs": {...}}
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from caig_jax import parallel
from caig_jax.convert.common import CheckpointMismatchError, SafetensorsReader, flat_paths, load_state

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
        graphdef, state = nnx.split(nnx.eval_shape(make_module))
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
                f"{key} -> {path}: checkpoint shape {tuple(reader.shape(key))} (as {got}), model expects {target_shape}"
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
        raise FileNotFoundError(f"{folder!r} is not a folder (expected a diffusers {subfolder}/ folder)")
    if not os.path.exists(os.path.join(folder, "config.json")) and os.path.isdir(os.path.join(folder, subfolder)):
        folder = os.path.join(folder, subfolder)
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder!r} has no config.json (expected a diffusers {subfolder}/ folder)")
    if not any(n.endswith((".safetensors", ".safetensors.index.json")) for n in os.listdir(folder)):
        bins = [n for n in os.listdir(folder) if n.endswith(".bin")]
        hint = f" (found PyTorch pickles {bins}; re-save them with safe_serialization=True)" if bins else ""
        raise FileNotFoundError(f"{folder!r} holds no .safetensors weights{hint}")
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
      `caig_jax.render.unet.UNet2DConditionModel`.
    """
    from caig_jax.render.unet import UNet2DConditionConfig, UNet2DConditionModel

    folder = _model_folder(folder, "unet")
    config = UNet2DConditionConfig.from_dict(read_config(folder))
    dtype, param_dtype = _dtypes(dtype, param_dtype)
    return load_module(
        lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        SafetensorsReader(folder), diffusers_key, mesh=mesh, what=f"UNet checkpoint {folder}",
    )


def load_vae(folder, *, dtype=jnp.float32, mesh=None, param_dtype=None):
    """Loads a diffusers `AutoencoderKL` folder (`vae/`). Same arguments as `load_unet`; returns `AutoencoderKL`."""
    from caig_jax.render.vae import AutoencoderKL, AutoencoderKLConfig

    folder = _model_folder(folder, "vae")
    config = AutoencoderKLConfig.from_dict(read_config(folder))
    dtype, param_dtype = _dtypes(dtype, param_dtype)
    return load_module(
        lambda: AutoencoderKL(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        SafetensorsReader(folder), diffusers_key, mesh=mesh, what=f"VAE checkpoint {folder}",
    )


def load_controlnet(folder, *, dtype=jnp.float32, mesh=None, param_dtype=None):
    """Loads a diffusers `ControlNetModel` folder (e.g. lllyasviel/control_v11p_sd15_canny). Returns
    `caig_jax.render.controlnet.ControlNetModel`."""
    from caig_jax.render.controlnet import ControlNetConfig, ControlNetModel

    folder = _model_folder(folder, "controlnet")
    config = ControlNetConfig.from_dict(read_config(folder))
    dtype, param_dtype = _dtypes(dtype, param_dtype)
    return load_module(
        lambda: ControlNetModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        SafetensorsReader(folder), diffusers_key, mesh=mesh, what=f"ControlNet checkpoint {folder}",
    )
