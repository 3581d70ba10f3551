"""PNG grids of captioned images (ads with their prompts and CTRs): what a person looks at after a run."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from caig_jax.files import write_atomic


def _font(size: int = 10):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without sized default fonts
        return ImageFont.load_default()


def captioned(tile: np.ndarray, caption: str, width_chars: int, lines: int = 4) -> np.ndarray:
    """uint8[H, W, 3] with a white band of up to `lines` wrapped caption lines below it."""
    h, w = tile.shape[:2]
    band = Image.new("RGB", (w, 12 * lines + 4), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for k, line in enumerate(textwrap.wrap(caption, width_chars)[:lines]):
        draw.text((2, 2 + 12 * k), line, fill=(0, 0, 0), font=_font())
    return np.concatenate([np.asarray(tile, np.uint8)[..., :3], np.asarray(band)], axis=0)


def write_grid(rows: Sequence[Sequence[tuple[np.ndarray, str]]], path: str, *, size: int = 128) -> str:
    """Writes a PNG of `rows` of (image, caption) cells, each image resized to `size` x `size`; returns `path`."""
    chars = max(12, size // 6)
    grid_rows = []
    width = max(len(r) for r in rows)
    blank = (np.full((size, size, 3), 255, np.uint8), "")
    for row in rows:
        cells = list(row) + [blank] * (width - len(row))
        tiles = [captioned(np.asarray(Image.fromarray(np.asarray(im, np.uint8)[..., :3]).resize((size, size))), text,
                           chars) for im, text in cells]
        grid_rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles],
                                        axis=1))
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(grid_rows, axis=0)).save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())
    return path
