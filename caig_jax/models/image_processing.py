"""Image preprocessing for CLIP / LLaVA-1.5 / LLaVA-NeXT in numpy + PIL (no torch at run time).

Equal, bit for bit, to the transformers 5.23 PIL backend classes (`CLIPImageProcessorPil`,
`LlavaImageProcessorPil`, `LlavaNextImageProcessorPil`; these are also what `AutoImageProcessor` returns
when torchvision is not installed). Exactness comes from doing the same operations in the same order:

* resizing is PIL's `Image.resize` on the uint8 RGB image (bicubic by default), never a float resize;
* rescale is `uint8 -> float64 * rescale_factor -> float32`, normalisation is `(x - mean) / std` in float32
  with mean/std cast to float32 first, exactly as `transformers.image_transforms.{rescale,normalize}` do;
* LLaVA-NeXT pads the resized image to the chosen grid resolution with black (0), not the CLIP mean, and
  pads the number of tiles across a batch with zeros (after normalisation), as transformers does.

Outputs are channels-first: CLIP / LLaVA-1.5 give `pixel_values float32[B, 3, H, W]`; LLaVA-NeXT gives
`pixel_values float32[B, P, 3, H, W]` (P = most tiles in the batch, base image first) and
`image_sizes int32[B, 2]` (original height, width).

Why ours and not those transformers classes themselves (they need no torch either): the same outputs cost
2-8x less host time here, and the host converts every training batch while the devices step
(`benchmarks/bench_image_processing.py`; figures in the README's benchmark section).

The anyres geometry (`select_best_resolution`, `get_anyres_image_grid_shape`, `image_size_to_num_patches`,
`unpad_bounds`) lives here too because the model needs the same arithmetic to pack image features.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# LLaVA-v1.6 grid pinpoints, (height, width) as transformers reads them.
LLAVA_NEXT_GRID_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
BICUBIC = int(Image.Resampling.BICUBIC)

KINDS = ("clip", "llava", "llava_next")
# transformers `image_processor_type` (with or without the Fast/Pil suffix) -> our kind.
_PROCESSOR_TYPES = {
    "CLIPImageProcessor": "clip",
    "LlavaImageProcessor": "llava",
    "LlavaNextImageProcessor": "llava_next",
}


# ----------------------------------------------------------------------------------------------------
# Anyres geometry (shared with the model's feature packing).
# ----------------------------------------------------------------------------------------------------

def select_best_resolution(original_size: Sequence[int],
                           possible_resolutions: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The grid resolution (height, width) that keeps most of the image and wastes least canvas.

    Same loop and tie-breaking (first in list order wins) as transformers' `select_best_resolution`;
    `original_size` is (height, width), each pinpoint is (height, width).
    """
    original_height, original_width = (int(v) for v in original_size)
    best_fit = None
    max_effective_resolution = 0
    min_wasted_resolution = float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width = int(original_width * scale)
        downscaled_height = int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
            effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution):
            max_effective_resolution = effective_resolution
            min_wasted_resolution = wasted_resolution
            best_fit = (int(height), int(width))
    if best_fit is None:
        raise ValueError(f"no grid pinpoint fits image of size {tuple(original_size)}; "
                         f"pinpoints={list(possible_resolutions)}")
    return best_fit


def get_patch_output_size(original_size: Sequence[int], target_resolution: Sequence[int]) -> tuple[int, int]:
    """(height, width) of the image resized to fit inside `target_resolution` keeping its aspect ratio."""
    original_height, original_width = (int(v) for v in original_size)
    target_height, target_width = (int(v) for v in target_resolution)
    scale_w = target_width / original_width
    scale_h = target_height / original_height
    if scale_w < scale_h:
        new_width = target_width
        new_height = min(math.ceil(original_height * scale_w), target_height)
    else:
        new_height = target_height
        new_width = min(math.ceil(original_width * scale_h), target_width)
    return new_height, new_width


def get_anyres_image_grid_shape(image_size: Sequence[int], grid_pinpoints: Sequence[Sequence[int]],
                                tile_size: int) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of original (height, width) `image_size`."""
    height, width = select_best_resolution(image_size, grid_pinpoints)
    return height // tile_size, width // tile_size


def image_size_to_num_patches(image_size: Sequence[int], grid_pinpoints: Sequence[Sequence[int]],
                              tile_size: int) -> int:
    """Number of 'pixel_values' tiles for one image: ceil-divided grid plus the base image."""
    height, width = select_best_resolution(image_size, grid_pinpoints)
    return math.ceil(height / tile_size) * math.ceil(width / tile_size) + 1


def unpad_bounds(original_size: Sequence[int], current_size: Sequence[int]) -> tuple[int, int, int, int]:
    """Slice bounds (top, bottom, left, right) that remove the anyres padding from a feature map.

    `current_size` is the (height, width) of the tiled feature map; the arithmetic (including the
    `round(., 7)`) is transformers' `unpad_image`, so `feature[top:bottom, left:right]` is what it keeps.
    """
    original_height, original_width = (int(v) for v in original_size)
    current_height, current_width = (int(v) for v in current_size)
    original_aspect_ratio = original_width / original_height
    current_aspect_ratio = current_width / current_height
    if original_aspect_ratio > current_aspect_ratio:
        scale_factor = current_width / original_width
        new_height = int(round(original_height * scale_factor, 7))
        padding = (current_height - new_height) // 2
        return padding, current_height - padding, 0, current_width
    scale_factor = current_height / original_height
    new_width = int(round(original_width * scale_factor, 7))
    padding = (current_width - new_width) // 2
    return 0, current_height, padding, current_width - padding


# ----------------------------------------------------------------------------------------------------
# Configuration.
# ----------------------------------------------------------------------------------------------------

def _size_dict(size: Any, *, name: str, square: bool) -> dict[str, int]:
    """transformers' `get_size_dict`: an int means shortest edge (size) or a square (crop_size)."""
    if isinstance(size, Mapping):
        out = {k: int(v) for k, v in size.items() if v is not None}
        allowed = ({"shortest_edge"}, {"shortest_edge", "longest_edge"}, {"height", "width"})
        if set(out) not in allowed:
            raise ValueError(f"{name} must have keys {{shortest_edge[, longest_edge]}} or {{height, width}}, "
                             f"got {dict(size)}")
        return out
    if isinstance(size, (int, np.integer)):
        return {"height": int(size), "width": int(size)} if square else {"shortest_edge": int(size)}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    raise ValueError(f"{name} must be an int, a (height, width) pair or a dict, got {size!r}")


@dataclasses.dataclass
class ImageProcessorConfig:
    """What `preprocessor_config.json` says; defaults are CLIP ViT-L/14-336 (LLaVA-v1.5/1.6).

    kind: 'clip' (resize shortest edge + center crop), 'llava' (optionally pad to a square of the mean
      colour first, `do_pad`) or 'llava_next' (anyres tiling over `image_grid_pinpoints`; `do_pad` pads the
      number of tiles across a batch).
    """
    kind: str = "clip"
    size: dict = dataclasses.field(default_factory=lambda: {"shortest_edge": 336})
    crop_size: dict = dataclasses.field(default_factory=lambda: {"height": 336, "width": 336})
    resample: int = BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD
    do_convert_rgb: bool = True
    do_pad: bool | None = None  # None: False for clip/llava, True for llava_next (transformers' defaults)
    image_grid_pinpoints: tuple | None = None  # llava_next only; None -> LLAVA_NEXT_GRID_PINPOINTS

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"ImageProcessorConfig.kind must be one of {KINDS}, got {self.kind!r}")
        self.size = _size_dict(self.size, name="size", square=False)
        self.crop_size = _size_dict(self.crop_size, name="crop_size", square=True)
        if "height" not in self.crop_size:
            raise ValueError(f"crop_size must have height and width, got {self.crop_size}")
        self.resample = int(self.resample)
        self.image_mean = tuple(float(v) for v in np.atleast_1d(self.image_mean))
        self.image_std = tuple(float(v) for v in np.atleast_1d(self.image_std))
        if self.do_pad is None:
            self.do_pad = self.kind == "llava_next"
        if self.kind == "llava_next":
            pins = self.image_grid_pinpoints if self.image_grid_pinpoints is not None else LLAVA_NEXT_GRID_PINPOINTS
            self.image_grid_pinpoints = tuple((int(h), int(w)) for h, w in pins)
        elif self.image_grid_pinpoints is not None:
            self.image_grid_pinpoints = tuple((int(h), int(w)) for h, w in self.image_grid_pinpoints)

    @property
    def tile_size(self) -> int:
        """Side of the square anyres tiles (transformers uses crop_size['height'])."""
        return int(self.crop_size["height"])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "<dict>") -> "ImageProcessorConfig":
        """From a transformers image-processor dict (`preprocessor_config.json` or the `image_processor`
        entry of `processor_config.json`)."""
        type_name = str(d.get("image_processor_type", "CLIPImageProcessor"))
        base = type_name
        for suffix in ("Fast", "Pil"):
            if base.endswith(suffix):
                base = base[:-len(suffix)]
        if base not in _PROCESSOR_TYPES:
            raise ValueError(f"{source}: image_processor_type {type_name!r} is not supported; expected one of "
                             f"{sorted(_PROCESSOR_TYPES)}")
        kind = _PROCESSOR_TYPES[base]
        kwargs = {"kind": kind}
        for field in dataclasses.fields(cls):
            if field.name != "kind" and d.get(field.name) is not None:
                kwargs[field.name] = d[field.name]
        if kind == "clip" and d.get("use_square_size"):  # KOSMOS-2 compatibility, as transformers does.
            kwargs["size"] = {"height": int(d["size"]["shortest_edge"]), "width": int(d["size"]["shortest_edge"])}
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None


def load_image_processor_config(path: str) -> ImageProcessorConfig | None:
    """The image-processor config stored in a checkpoint folder, or None when the folder has none.

    Reads `preprocessor_config.json` (flat, older transformers and hub checkpoints) or the
    `image_processor` entry of `processor_config.json` (what transformers 5.x `save_pretrained` writes).
    """
    pre = os.path.join(path, "preprocessor_config.json")
    if os.path.exists(pre):
        with open(pre) as f:
            return ImageProcessorConfig.from_dict(json.load(f), source=pre)
    proc = os.path.join(path, "processor_config.json")
    if os.path.exists(proc):
        with open(proc) as f:
            d = json.load(f)
        if isinstance(d.get("image_processor"), Mapping):
            return ImageProcessorConfig.from_dict(d["image_processor"], source=f"{proc}[image_processor]")
    return None


# ----------------------------------------------------------------------------------------------------
# Single-image operations on uint8 HWC arrays.
# ----------------------------------------------------------------------------------------------------

def to_rgb_uint8(image: Any) -> np.ndarray:
    """A PIL image or a uint8 array (H, W), (H, W, 1|3|4) -> uint8[H, W, 3].

    Transparency is composited onto white, as transformers' `convert_to_rgb` does (PIL `alpha_composite`
    for PIL images, `round(a * rgb + (1 - a) * 255)` for RGBA arrays).
    """
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.array(Image.alpha_composite(background, rgba).convert("RGB"))
        return np.array(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a PIL.Image or a uint8 numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 (H, W[, C]) in [0, 255], got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image arrays must be channels-last (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
                         f"got shape {image.shape}")
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    if image.shape[-1] == 4:
        alpha = image[..., 3:4] / 255
        composite = alpha * image[..., :3] + (1 - alpha) * 255
        return np.round(composite).astype(np.uint8)
    return np.ascontiguousarray(image)


def resize(image: np.ndarray, size_hw: Sequence[int], resample: int = BICUBIC) -> np.ndarray:
    """uint8[H, W, 3] -> uint8[h, w, 3] with PIL (PIL returns an exact copy when the size is unchanged)."""
    height, width = (int(v) for v in size_hw)
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def _resize_output_size(height: int, width: int, size: Mapping[str, int]) -> tuple[int, int]:
    """Output (height, width) for a size dict, as transformers' PIL backend computes it."""
    if "longest_edge" in size:  # get_size_with_aspect_ratio
        target, max_size = size["shortest_edge"], size["longest_edge"]
        raw_size = None
        min_original, max_original = float(min(height, width)), float(max(height, width))
        if max_original / min_original * target > max_size:
            raw_size = max_size * min_original / max_original
            target = int(round(raw_size))
        if (height <= width and height == target) or (width <= height and width == target):
            return height, width
        if width < height:
            ow = target
            oh = int(raw_size * height / width) if raw_size is not None else int(target * height / width)
            return oh, ow
        oh = target
        ow = int(raw_size * width / height) if raw_size is not None else int(target * width / height)
        return oh, ow
    if "shortest_edge" in size:  # get_resize_output_image_size(default_to_square=False)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    return size["height"], size["width"]


def center_crop(image: np.ndarray, crop_hw: Sequence[int]) -> np.ndarray:
    """Center crop of uint8[H, W, C]; zero-pads first when the image is smaller (transformers' rule)."""
    orig_height, orig_width = image.shape[:2]
    crop_height, crop_width = (int(v) for v in crop_hw)
    top = (orig_height - crop_height) // 2
    left = (orig_width - crop_width) // 2
    if top >= 0 and left >= 0 and top + crop_height <= orig_height and left + crop_width <= orig_width:
        return image[top:top + crop_height, left:left + crop_width]
    new_height, new_width = max(crop_height, orig_height), max(crop_width, orig_width)
    canvas = np.zeros((new_height, new_width) + image.shape[2:], dtype=image.dtype)
    top_pad = math.ceil((new_height - orig_height) / 2)
    left_pad = math.ceil((new_width - orig_width) / 2)
    canvas[top_pad:top_pad + orig_height, left_pad:left_pad + orig_width] = image
    top, left = top + top_pad, left + left_pad
    return canvas[max(0, top):min(new_height, top + crop_height), max(0, left):min(new_width, left + crop_width)]


def pad_to_square(image: np.ndarray, background_color: Sequence[int]) -> np.ndarray:
    """LLaVA-1.5 `expand2square`: centre uint8[H, W, 3] on a square of `background_color`."""
    height, width = image.shape[:2]
    if height == width:
        return image
    side = max(height, width)
    out = np.empty((side, side, image.shape[2]), dtype=image.dtype)
    out[...] = np.asarray(background_color, dtype=image.dtype)
    if width > height:
        start = (side - height) // 2
        out[start:start + height] = image
    else:
        start = (side - width) // 2
        out[:, start:start + width] = image
    return out


def _to_pixel_values(image: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """resize(size) -> center crop -> rescale -> normalize, uint8[H, W, 3] -> float32[3, h, w]."""
    if cfg.do_resize:
        image = resize(image, _resize_output_size(*image.shape[:2], cfg.size), cfg.resample)
    if cfg.do_center_crop:
        image = center_crop(image, (cfg.crop_size["height"], cfg.crop_size["width"]))
    x = np.transpose(image, (2, 0, 1))
    if cfg.do_rescale:
        # float64 multiply then float32 cast: transformers' `rescale`, needed for bit equality.
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    else:
        x = x.astype(np.float32)
    if cfg.do_normalize:
        mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
        x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=np.float32)


def anyres_tiles(image: np.ndarray, cfg: ImageProcessorConfig) -> list[np.ndarray]:
    """uint8 RGB image -> [base image resized to the tile size] + row-major tiles of the padded image."""
    tile = cfg.tile_size
    height, width = image.shape[:2]
    best = select_best_resolution((height, width), cfg.image_grid_pinpoints)
    resized = resize(image, get_patch_output_size((height, width), best), cfg.resample)
    new_h, new_w = resized.shape[:2]
    pad_y, r_y = divmod(best[0] - new_h, 2)
    pad_x, r_x = divmod(best[1] - new_w, 2)
    # Black (0) padding, exactly as transformers' `_pad_for_patching` (and the original LLaVA) do. np.pad copies
    # even when there is nothing to pad: its two calls were a third of the processor's time on 32x64 pairs.
    padded = resized
    if (new_h, new_w) != tuple(best):
        padded = np.pad(resized, ((pad_y, pad_y + r_y), (pad_x, pad_x + r_x), (0, 0)), constant_values=0)
    tiles = [padded[i:i + tile, j:j + tile] for i in range(0, best[0], tile) for j in range(0, best[1], tile)]
    base_hw = ((cfg.size["height"], cfg.size["width"]) if "height" in cfg.size
               else (cfg.size["shortest_edge"], cfg.size["shortest_edge"]))
    return [resize(image, base_hw, cfg.resample)] + tiles


# ----------------------------------------------------------------------------------------------------
# The processor.
# ----------------------------------------------------------------------------------------------------

class ImageProcessor:
    """Images -> the pixel arrays a LLaVA model takes, laid out as the transformers processor gives them.

    `processor(images)` -> dict:
      kind 'clip' / 'llava': `pixel_values float32[N, 3, H, W]`;
      kind 'llava_next': `pixel_values float32[N, P, 3, H, W]` and `image_sizes int32[N, 2]` (orig H, W).
    """

    def __init__(self, config: ImageProcessorConfig | None = None):
        self.config = config if config is not None else ImageProcessorConfig()

    @classmethod
    def from_pretrained(cls, path: str, *, default: ImageProcessorConfig | None = None) -> "ImageProcessor":
        """From a checkpoint folder; `default` (or CLIP ViT-L/14-336) when it has no image-processor config."""
        cfg = load_image_processor_config(path)
        if cfg is None:
            cfg = default if default is not None else ImageProcessorConfig()
        return cls(cfg)

    @property
    def kind(self) -> str:
        return self.config.kind

    def preprocess_one(self, image: Any) -> tuple[np.ndarray, tuple[int, int]]:
        """One image -> (float32[3, H, W] or float32[P_i, 3, H, W] for anyres, original (height, width))."""
        cfg = self.config
        rgb = to_rgb_uint8(image) if cfg.do_convert_rgb else _as_uint8_hwc3(image)
        orig_hw = (int(rgb.shape[0]), int(rgb.shape[1]))
        if cfg.kind == "llava_next":
            return np.stack([_to_pixel_values(t, cfg) for t in anyres_tiles(rgb, cfg)]), orig_hw
        if cfg.kind == "llava" and cfg.do_pad:
            background = tuple(int(x * 255) for x in cfg.image_mean) if cfg.image_mean else (0, 0, 0)
            rgb = pad_to_square(rgb, background)
        return _to_pixel_values(rgb, cfg), orig_hw

    def __call__(self, images: Any, *, pad_patches_to: int | None = None) -> dict[str, np.ndarray]:
        """A list of images (PIL or uint8 arrays) -> batch dict (see the class docstring).

        pad_patches_to: for 'llava_next', pad the tile axis to this fixed P instead of the batch maximum
          (fixed shapes avoid recompiling a jitted model); padding tiles are zeros, as transformers pads.
        """
        if isinstance(images, (Image.Image, np.ndarray)):
            images = [images]
        images = list(images)
        if not images:
            raise ValueError("ImageProcessor needs at least one image")
        outs = [self.preprocess_one(im) for im in images]
        pixels = [p for p, _ in outs]
        if self.kind != "llava_next":
            shapes = {p.shape for p in pixels}
            if len(shapes) != 1:
                raise ValueError(f"processed images have different shapes {sorted(shapes)}; enable do_center_crop "
                                 "or resize to a fixed height/width")
            return {"pixel_values": np.stack(pixels)}
        num = [p.shape[0] for p in pixels]
        target = max(num) if pad_patches_to is None else int(pad_patches_to)
        if target < max(num):
            raise ValueError(f"pad_patches_to={pad_patches_to} is smaller than the {max(num)} tiles of an image")
        if self.config.do_pad or pad_patches_to is not None:
            pixels = [p if p.shape[0] == target else np.pad(p, ((0, target - p.shape[0]), (0, 0), (0, 0), (0, 0)))
                      for p in pixels]
        elif len(set(num)) != 1:
            raise ValueError(f"images give different numbers of tiles {num} and do_pad is False")
        return {"pixel_values": np.stack(pixels),
                "image_sizes": np.asarray([hw for _, hw in outs], dtype=np.int32)}

    def max_num_patches(self) -> int:
        """Most tiles any image can give (for `pad_patches_to`): largest pinpoint grid plus the base image."""
        if self.kind != "llava_next":
            return 1
        tile = self.config.tile_size
        return max(math.ceil(h / tile) * math.ceil(w / tile) for h, w in self.config.image_grid_pinpoints) + 1


def _as_uint8_hwc3(image: Any) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"with do_convert_rgb=False images must already be uint8 (H, W, 3), got "
                         f"{arr.dtype} {arr.shape}")
    return arr
