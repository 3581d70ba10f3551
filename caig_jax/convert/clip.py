"""transformers CLIP (vision / text) safetensors -> `caig_jax.models.clip` modules on a mesh.

Our CLIP modules keep transformers' module names, so a parameter path maps to its PyTorch key mechanically
(`torch_key`: '/' -> '.', `kernel` / `scale` / `embedding` -> `weight`) with a layout transform
(`torch_to_flax`: Linear weights transposed to `[in, out]`, conv weights `[out, in, kh, kw]` ->
`[kh, kw, in, out]`). `torch_sources` builds the `sources` table `caig_jax.convert.common.load_state` streams
from; the LLaVA and diffusers converters reuse it with their own key prefixes.

Key layouts handled:
- text: `text_model.*` (hub / older transformers; SD-1.5 `text_encoder/` folders) and the transformers 5.x
  `save_pretrained` layout without the `text_model.` level;
- vision: `vision_model.*` and the 5.x layout without it.

Public API:
  load_clip_text_model(folder, *, dtype=jnp.float32, mesh=None, param_dtype=jnp.float32) -> CLIPTextModel
  load_clip_vision_model(folder, *, dtype=jnp.float32, mesh=None, param_dtype=jnp.float32) -> CLIPVisionModel
  torch_sources(reader, abstract_state, *, our_prefix, ckpt_prefix, rename=None) -> (sources, source_names)
  sources_from_sections(reader, abstract_state, sections, *, our_root="") -> (sources, source_names)
  load_with_sources(abstract_state, sources, source_names, reader, *, what, also_ignore=()) -> nnx.State
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from caig_jax import parallel
from caig_jax.convert.common import (
    CheckpointMismatchError,
    SafetensorsReader,
    flat_paths,
    load_state,
    torch_layout_shape,
)
from caig_jax.errors import MissingPathError
from caig_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}

# Checkpoint tensors that are buffers, not parameters (older transformers saved them): never "unexpected".
IGNORED_KEY_PATTERNS = (r"(^|\.)position_ids$", r"(^|\.)rotary_emb\.inv_freq$")


def is_ignored_key(key: str) -> bool:
    return any(re.search(p, key) for p in IGNORED_KEY_PATTERNS)


def torch_key(path: str, rename: Mapping[str, str] | None = None) -> str:
    """'encoder/layers/0/self_attn/q_proj/kernel' -> 'encoder.layers.0.self_attn.q_proj.weight'.

    rename: exact replacements of dotted module prefixes applied after the mechanical mapping
    (e.g. {'linear_1': 'mm_projector.0'}).
    """
    parts = path.split("/")
    parts[-1] = _LEAF_TO_TORCH.get(parts[-1], parts[-1])
    key = ".".join(parts)
    for old, new in (rename or {}).items():
        if key == old or key.startswith(old + "."):
            key = new + key[len(old) :]
            break
    return key


def torch_to_flax(path: str, array: np.ndarray) -> np.ndarray:
    """PyTorch tensor layout -> ours for the parameter at `path`."""
    if path.endswith("kernel"):
        if array.ndim == 2:
            return np.ascontiguousarray(array.T)
        if array.ndim == 4:
            return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
    return array


def torch_sources(
    reader: SafetensorsReader,
    abstract_state,
    *,
    our_prefix: str = "",
    ckpt_prefix: str = "",
    rename: Mapping[str, str] | None = None,
    skip: Iterable[str] = (),
) -> tuple[dict[str, Callable[[], np.ndarray]], dict[str, str]]:
    """`({our_path: read-and-transform callable}, {our_path: checkpoint key})` for every parameter under
    `our_prefix` (a '/'-path; '' = all), read from `ckpt_prefix + torch_key(rest)`; a bare parameter whose
    path equals `our_prefix` reads `ckpt_prefix` itself.

    A key absent from the checkpoint gets no source (so `load_state` reports it as missing, by our path).
    """
    sources: dict[str, Callable[[], np.ndarray]] = {}
    names: dict[str, str] = {}
    prefix = our_prefix.rstrip("/") + "/" if our_prefix else ""
    skip = tuple(skip)
    for path in flat_paths(abstract_state):
        if any(path.startswith(s) for s in skip):
            continue
        if our_prefix and path == our_prefix.rstrip("/"):
            key = ckpt_prefix  # a bare parameter (e.g. image_newline): ckpt_prefix is its full key
        elif path.startswith(prefix):
            key = ckpt_prefix + torch_key(path[len(prefix) :], rename)
        else:
            continue
        names[path] = key
        if key in reader:
            sources[path] = lambda key=key, path=path: torch_to_flax(path, reader.get(key))
    return sources, names


def unexpected_keys(reader: SafetensorsReader, used: Iterable[str], also_ignore: Iterable[str] = ()) -> list[str]:
    used, also_ignore = set(used), set(also_ignore)
    return sorted(k for k in reader.keys() if k not in used and k not in also_ignore and not is_ignored_key(k))


def trivial_mesh() -> jax.sharding.Mesh:
    """A 1x1x1 mesh on the first device: what `mesh=None` means for every loader."""
    return parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise MissingPathError(f"{path} does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e


def sources_from_sections(
    reader: SafetensorsReader,
    abstract_state,
    sections: Iterable[tuple[str, str, Mapping[str, str] | None]],
    *,
    our_root: str = "",
) -> tuple[dict[str, Callable[[], np.ndarray]], dict[str, str]]:
    """`torch_sources` over several (our_prefix, ckpt_prefix, rename) sections; `our_root` ('backbone') places
    them under a parent module's attribute (a model that nests this one)."""
    root = our_root.rstrip("/") + "/" if our_root else ""
    sources: dict = {}
    names: dict = {}
    for our_prefix, ckpt_prefix, rename in sections:
        s, n = torch_sources(
            reader, abstract_state, our_prefix=root + our_prefix, ckpt_prefix=ckpt_prefix, rename=rename
        )
        sources.update(s)
        names.update(n)
    return sources, names


def load_with_sources(
    abstract, sources, names, reader: SafetensorsReader, *, what: str, also_ignore: Iterable[str] = ()
):
    """`load_state` with the unexpected keys computed from what `sources` consume, shapes checked in the file's
    (PyTorch) layout before anything is read; missing parameters are also named by the checkpoint key that was
    looked for."""
    missing_named = {p: k for p, k in names.items() if p not in sources}
    unexpected = unexpected_keys(reader, [names[p] for p in sources], also_ignore)
    targets = flat_paths(abstract)
    file_shapes = {
        p: (reader.shape(names[p]), torch_layout_shape(p, targets[p].get_value().shape))
        for p in sources
        if p in targets
    }
    try:
        return load_state(
            abstract, sources, unexpected=unexpected, what=what, source_names=names, file_shapes=file_shapes
        )
    except CheckpointMismatchError as e:
        if not missing_named:
            raise
        listed = "\n".join(f"    {k} (-> {p})" for p, k in list(missing_named.items())[:30])
        more = f"\n    ... and {len(missing_named) - 30} more" if len(missing_named) > 30 else ""
        raise CheckpointMismatchError(f"{e}\n  checkpoint keys looked for and not found:\n{listed}{more}") from None


def load_module(
    make_module: Callable[[], nnx.Module],
    reader: SafetensorsReader,
    mesh,
    *,
    sections: Iterable[tuple[str, str, Mapping[str, str] | None]],
    what: str,
    also_ignore: Iterable[str] = (),
) -> nnx.Module:
    """Builds `make_module` abstractly on `mesh` (None: first device) and streams its parameters from `reader`.

    sections: (our_prefix, ckpt_prefix, rename) triples covering the module's parameters.
    also_ignore: checkpoint keys that are neither loaded nor unexpected.
    """
    mesh = mesh if mesh is not None else trivial_mesh()
    graphdef, abstract = parallel.abstract_with_shardings(make_module, mesh)
    sources, names = sources_from_sections(reader, abstract, sections)
    state = load_with_sources(abstract, sources, names, reader, what=what, also_ignore=also_ignore)
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------------ loaders


def detect_prefix(reader: SafetensorsReader, anchor: str, candidates: Iterable[str], what: str) -> str:
    candidates = list(candidates)
    for prefix in candidates:
        if prefix + anchor in reader:
            return prefix
    sample = sorted(reader.keys())[:10]
    raise ValueError(
        f"{what}: cannot find {anchor!r} under any of the prefixes {candidates}; first keys: {sample}"
    )


def load_clip_text_model(folder: str, *, dtype=jnp.float32, mesh=None, param_dtype=jnp.float32) -> CLIPTextModel:
    """A transformers `CLIPTextModel.save_pretrained` folder (e.g. SD-1.5's `text_encoder/`) -> CLIPTextModel."""
    config = CLIPTextConfig.from_dict(read_json(os.path.join(folder, "config.json")))
    reader = SafetensorsReader(folder)
    prefix = detect_prefix(reader, "embeddings.token_embedding.weight", ["text_model.", ""], folder)
    return load_module(
        lambda: CLIPTextModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        reader,
        mesh,
        sections=[("", prefix, None)],
        what=f"CLIP text encoder {folder}",
    )


def load_clip_vision_model(
    folder: str, *, dtype=jnp.float32, mesh=None, param_dtype=jnp.float32
) -> CLIPVisionModel:
    """A transformers `CLIPVisionModel.save_pretrained` folder -> CLIPVisionModel."""
    config = CLIPVisionConfig.from_dict(read_json(os.path.join(folder, "config.json")))
    reader = SafetensorsReader(folder)
    prefix = detect_prefix(reader, "embeddings.patch_embedding.weight", ["vision_model.", ""], folder)
    return load_module(
        lambda: CLIPVisionModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        reader,
        mesh,
        sections=[("", prefix, None)],
        what=f"CLIP vision tower {folder}",
    )
