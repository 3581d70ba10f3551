"""CAIG's product handling around the background renderer (pure numpy / PIL / OpenCV, no JAX).

The renderer never paints the product: it paints the *background* around an untouched product cut-out.
This module holds the steps on either side of the diffusion loop, shared by the SD renderer
(`caig_jax.render`) and the synthetic marketplace (`caig_jax.data.market`) so both place products alike:

    rgba = load_product_image(path)                # uint8[H, W, 4], checked: readable, alpha box >= 8 px
    placed = place_product(rgba, size=512)         # crop to the alpha box, fit 0.78 of the canvas, centre
    mask = inpaint_mask(placed[..., 3])            # 1 = paint: the inverted alpha, dilated with a 20x20 kernel
    control = control_image(placed)                # Canny(100, 200) edges of the product alone, 3 channels
    ... the renderer paints `image_rgb` where mask == 1 ...
    ad = paste_product(image_rgb, placed)          # the original product pixels back, UNdilated alpha

Facts (from CAIG's public code, see shared/DESIGN.md): 512x512 canvas; the product is cropped to its
alpha bounding box, scaled (keeping its aspect ratio) so that its longer side is 0.78 of the canvas and
centred; the inpainting mask is the inverted alpha dilated 20x20, so the painted region reaches slightly
*into* the product's border (the seam is painted), and the product is pasted back with the undilated
alpha, which covers that border again with the original pixels.
"""

from __future__ import annotations

import json
import os
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from caig_jax.errors import MissingPathError, UserError

# The smallest product a cut-out may hold: the short side of its alpha bounding box, in pixels. Placement scales
# the product to 0.78 of the canvas (400 px of 512), so a smaller box would be blown up 50x or more into a
# featureless block (a 1x1 cut-out becomes a flat square) instead of a product.
MIN_CUTOUT_SIZE = 8


class ProductImageError(UserError, ValueError):
    """A product cut-out cannot be used (unreadable, no alpha channel, empty alpha, a product smaller than
    `MIN_CUTOUT_SIZE`). Names the file."""


class MissingProductImageError(ProductImageError, FileNotFoundError):
    """The product image file does not exist."""


def load_product_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an RGBA product cut-out. Returns uint8[H, W, 4].

    Raises `MissingProductImageError` (a FileNotFoundError) for a missing file and `ProductImageError`
    (a ValueError) for an unreadable image, an image without an alpha channel (RGB, greyscale, or a
    palette image without transparency), an alpha channel that is zero everywhere, or a product (the
    alpha's bounding box) whose short side is under `MIN_CUTOUT_SIZE` = 8 pixels. Every message names the file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingProductImageError(f"product image {path!r} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
                im.mode == "P" and "transparency" in im.info
            )
            if not has_alpha:
                raise ProductImageError(
                    f"product image {path!r} has no alpha channel (mode {im.mode}); CAIG needs an RGBA cut-out "
                    "whose alpha marks the product"
                )
            rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8).copy()
    except ProductImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ProductImageError(f"product image {path!r} cannot be read as an image: {e}") from e
    if not np.any(rgba[..., 3]):
        raise ProductImageError(f"product image {path!r} has an empty alpha channel (fully transparent)")
    check_cutout_size(rgba, f"product image {path!r}")
    return rgba


def check_cutout_size(rgba: np.ndarray, what: str = "product cut-out") -> None:
    """Raises `ProductImageError` when the product (the non-zero alpha's bounding box) is smaller than
    `MIN_CUTOUT_SIZE` pixels on its short side; `what` names the image in the message."""
    top, bottom, left, right = alpha_box(np.asarray(rgba)[..., 3])
    h, w = bottom - top, right - left
    if min(h, w) < MIN_CUTOUT_SIZE:
        raise ProductImageError(
            f"{what}: the product (its alpha's bounding box) is {w}x{h} px; at least {MIN_CUTOUT_SIZE} px on the "
            f"short side is needed (placement scales it to 0.78 of the canvas)",
            fix="use a larger cut-out of the product (RGBA, alpha marking the product)",
        )


def _check_rgba(rgba: np.ndarray, name: str = "rgba") -> np.ndarray:
    rgba = np.asarray(rgba)
    if rgba.ndim != 3 or rgba.shape[-1] != 4:
        raise ValueError(f"{name} must be uint8[H, W, 4], got shape {rgba.shape}")
    if rgba.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {rgba.dtype}")
    return rgba


def alpha_box(alpha: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the non-zero alpha region, bottom/right exclusive."""
    rows = np.flatnonzero(np.any(alpha > 0, axis=1))
    cols = np.flatnonzero(np.any(alpha > 0, axis=0))
    if rows.size == 0:
        raise ValueError("alpha channel is empty: nothing to crop to")
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def crop_to_alpha(rgba: np.ndarray) -> np.ndarray:
    """Crops uint8[H, W, 4] to the bounding box of its non-zero alpha. Returns uint8[h, w, 4]."""
    rgba = _check_rgba(rgba)
    top, bottom, left, right = alpha_box(rgba[..., 3])
    return rgba[top:bottom, left:right].copy()


def _resize_rgba(rgba: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resizes RGBA with premultiplied colour, so transparent pixels' colours do not bleed into the edge."""
    h, w = rgba.shape[:2]
    interp = cv2.INTER_AREA if (width < w and height < h) else cv2.INTER_CUBIC
    alpha = rgba[..., 3:].astype(np.float32) / 255.0
    premult = np.concatenate([rgba[..., :3].astype(np.float32) * alpha, alpha * 255.0], axis=-1)
    out = cv2.resize(premult, (width, height), interpolation=interp)
    out = np.clip(out, 0.0, 255.0)
    a = out[..., 3:] / 255.0
    rgb = np.where(a > 1e-6, out[..., :3] / np.maximum(a, 1e-6), 0.0)
    return np.concatenate([np.clip(rgb, 0, 255), out[..., 3:]], axis=-1).round().astype(np.uint8)


def place_product(rgba: np.ndarray, size: int = 512, fill: float = 0.78) -> np.ndarray:
    """Crops to the alpha box, scales the product so its longer side is `fill * size` (aspect kept) and
    centres it on a transparent `size x size` canvas. Returns uint8[size, size, 4]."""
    if not 0.0 < fill <= 1.0:
        raise ValueError(f"fill must be in (0, 1], got {fill}")
    product = crop_to_alpha(rgba)
    h, w = product.shape[:2]
    scale = fill * size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    product = _resize_rgba(product, new_w, new_h)
    canvas = np.zeros((size, size, 4), np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = product
    return canvas


def inpaint_mask(placed_alpha: np.ndarray, dilate: int = 20) -> np.ndarray:
    """The region the renderer paints: float32[H, W] in [0, 1], 1 = background to paint.

    `placed_alpha` is uint8[H, W] (or a placed uint8[H, W, 4], whose alpha is used). The mask is the
    inverted alpha (255 - alpha) dilated with a `dilate x dilate` kernel, as in CAIG, so it grows about
    dilate/2 pixels into the product; `paste_product` restores those pixels afterwards.
    """
    alpha = np.asarray(placed_alpha)
    if alpha.ndim == 3 and alpha.shape[-1] == 4:
        alpha = alpha[..., 3]
    if alpha.ndim != 2:
        raise ValueError(f"placed_alpha must be uint8[H, W] or uint8[H, W, 4], got shape {alpha.shape}")
    inverted = 255 - alpha.astype(np.uint8)
    if dilate > 0:
        inverted = cv2.dilate(inverted, np.ones((dilate, dilate), np.uint8))
    return inverted.astype(np.float32) / 255.0


def control_image(placed_rgba: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """ControlNet-canny conditioning: Canny(low, high) edges of the product alone (composited over black,
    so the product's outline is an edge too), repeated to 3 channels. Returns uint8[H, W, 3] in {0, 255}."""
    placed_rgba = _check_rgba(placed_rgba, "placed_rgba")
    alpha = placed_rgba[..., 3:].astype(np.float32) / 255.0
    product_only = (placed_rgba[..., :3].astype(np.float32) * alpha).round().astype(np.uint8)
    edges = cv2.Canny(np.ascontiguousarray(product_only), low, high)
    return np.repeat(edges[..., None], 3, axis=-1)


def paste_product(image_rgb: np.ndarray, placed_rgba: np.ndarray) -> np.ndarray:
    """Pastes the original product pixels over a rendered image with the *undilated* alpha.

    image_rgb: uint8[H, W, 3] (or float in [0, 255]); placed_rgba: uint8[H, W, 4] from `place_product`.
    Returns uint8[H, W, 3].
    """
    placed_rgba = _check_rgba(placed_rgba, "placed_rgba")
    image_rgb = np.asarray(image_rgb)
    if image_rgb.shape != placed_rgba.shape[:2] + (3,):
        raise ValueError(
            f"image_rgb has shape {image_rgb.shape}, expected {placed_rgba.shape[:2] + (3,)} to match placed_rgba"
        )
    alpha = placed_rgba[..., 3:].astype(np.float32) / 255.0
    out = image_rgb.astype(np.float32) * (1.0 - alpha) + placed_rgba[..., :3].astype(np.float32) * alpha
    return np.clip(out.round(), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Product lists (CAIG's JSON layout).
# ---------------------------------------------------------------------------------------------------------------
class ProductsFileError(UserError, ValueError):
    """The products JSON is malformed (names the file and the entry)."""


def read_products(path: str, *, require_prompts: bool = True) -> list[dict[str, Any]]:
    """Reads and checks the products JSON; loads every image (RGBA, non-empty alpha) before returning.

    Returns a list of {"id": str, "image_path": str, "caption": str, "prompts": [str, ...], "rgba": uint8[H,W,4],
    "entry": the JSON object}. Without `require_prompts` (CAIG's product lists for prompt generation:
    `{"id", "image", "new_caption"}`) the `prompt` key is optional and every product needs a non-empty caption.
    Image paths are relative to the JSON file's folder unless absolute. The caption is CAIG's `new_caption` key,
    else `caption`, else `title` (`product_caption`; CAIG's product lists use `new_caption`).
    """
    if not os.path.exists(path):
        raise MissingPathError(f"products file {path!r} does not exist")
    try:
        with open(path) as f:
            entries = json.load(f)
    except json.JSONDecodeError as e:
        raise ProductsFileError(f"products file {path!r} is not valid JSON: {e}") from e
    if not isinstance(entries, list) or not entries:
        raise ProductsFileError(f"products file {path!r} must hold a non-empty JSON list of products")
    products, seen = [], set()
    for i, entry in enumerate(entries):
        where = f"{path!r} entry {i}"
        if not isinstance(entry, dict):
            raise ProductsFileError(f"{where}: expected an object with id, image, caption, prompt; got {entry!r}")
        for key in ("id", "image", "prompt") if require_prompts else ("id", "image"):
            if key not in entry:
                raise ProductsFileError(f"{where}: missing key {key!r} (keys: {sorted(entry)})")
        pid = str(entry["id"])
        if pid in seen:
            raise ProductsFileError(f"{where}: duplicate id {pid!r}")
        seen.add(pid)
        prompts = entry.get("prompt", [])
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or (
                require_prompts and not prompts):
            raise ProductsFileError(f"{where} (id {pid!r}): 'prompt' must be a string or a non-empty list of strings")
        if not require_prompts and not product_caption(entry):
            raise ProductsFileError(f"{where} (id {pid!r}): no caption: one of {', '.join(CAPTION_KEYS)} must be a "
                                    "non-empty string (the product's title, which the Prompt Model is asked about)")
        image_path = entry["image"]
        if not isinstance(image_path, str) or not image_path:
            raise ProductsFileError(f"{where} (id {pid!r}): 'image' must be a path string")
        image_path = resolve_image_path(path, image_path)
        rgba = load_product_image(image_path)  # names the file on any problem
        products.append(
            {"id": pid, "image_path": image_path, "caption": product_caption(entry), "prompts": prompts,
             "rgba": rgba, "entry": entry}
        )
    return products


CAPTION_KEYS = ("new_caption", "caption", "title")  # CAIG's products lists use `new_caption`


def product_caption(entry: dict[str, Any]) -> str:
    """The caption of a products-list entry: CAIG's `new_caption`, else `caption`, else `title` ("" if none)."""
    for key in CAPTION_KEYS:
        if isinstance(entry.get(key), str) and entry[key].strip():
            return entry[key]
    return ""


def resolve_image_path(json_path: str, image: str, image_root: str = "") -> str:
    """A products-list image path: absolute as is, else relative to `image_root` when given, else to the folder
    of the JSON file that names it."""
    if os.path.isabs(image):
        return image
    return os.path.join(image_root or os.path.dirname(os.path.abspath(json_path)), image)
