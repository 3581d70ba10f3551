"""The LLaVA adapter (`mlp2x_gelu` projector) and the anyres packing of image features.

Anyres (LLaVA-NeXT) in one paragraph: an image of size (H, W) is assigned the best grid resolution from
`image_grid_pinpoints` (`select_best_resolution`), cut into `nph x npw` tiles of the tower's size plus one
resized base image; every tile gives an `h x w` grid of patch features. The features the LLM sees are the base
image's `h*w` tokens followed by the tiles' features stitched into one `(nph*h) x (npw*w)` grid, the grid
cropped back to the image's aspect ratio ("unpad") and an `image_newline` vector appended after every row.

The *layout* (tile grid, crop offsets, token counts) depends only on `image_sizes`, so it is computed on the
host with the exact float64 arithmetic transformers uses (`anyres_layout`, numpy, on the geometry helpers of
`caig_jax.models.image_processing`, which the image processor shares; exact float64 matters: rational arithmetic
picks a different pinpoint than transformers for a few hundred sizes in 3000 x 3000). The *packing* is then a
gather with static shapes (`anyres_gather_index`): for every feature slot `k < max_features` it says which
`(patch, position)` row of the tower output (or the newline row) goes there, so the whole model stays
jit-friendly with a static `max_features` and a per-example `num_features`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from caig_jax.models import image_processing as geometry
from caig_jax.models import layers

# Order of the integer columns of an anyres layout (int32[B, 7]).
LAYOUT_FIELDS = ("num_patches", "grid_h", "grid_w", "row_offset", "col_offset", "rows", "cols")


class MultiModalProjector(nnx.Module):
    """`mlp2x_gelu`: Linear(vision_width * n_layers -> d) -> GELU -> Linear(d -> d); paths `linear_1`, `linear_2`
    (transformers' names; LLaVA's `mm_projector.0` / `.2`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        act: str = "gelu",
        use_bias: bool = True,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        self.act = act
        kw = dict(rngs=rngs, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = layers.linear(in_features, out_features, ("vision_embed", "mlp"), **kw)
        self.linear_2 = layers.linear(out_features, out_features, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(layers.activation(self.act)(self.linear_1(x)))


# ------------------------------------------------------------------------------------------------ layout (host)


def anyres_layout(image_sizes, pinpoints, *, tile_size: int, grid_size: int) -> np.ndarray:
    """int32[B, 7] per-image layout (`LAYOUT_FIELDS`) for `image_sizes` int[B, 2] (height, width).

    tile_size: the tower's image size (336); grid_size: patches per tile side (24).
    """
    image_sizes = np.asarray(image_sizes).reshape(-1, 2)
    out = np.zeros((image_sizes.shape[0], len(LAYOUT_FIELDS)), np.int32)
    pinpoints = [tuple(int(v) for v in p) for p in pinpoints]
    for i, size in enumerate(image_sizes.tolist()):
        grid_h, grid_w = geometry.get_anyres_image_grid_shape(size, pinpoints, tile_size)
        top, bottom, left, right = geometry.unpad_bounds(size, (grid_h * grid_size, grid_w * grid_size))
        num_patches = geometry.image_size_to_num_patches(size, pinpoints, tile_size)
        out[i] = (num_patches, grid_h, grid_w, top, left, bottom - top, right - left)
    return out


def max_anyres_features(pinpoints, *, tile_size: int, grid_size: int) -> int:
    """Static upper bound on one image's feature tokens: base + the largest un-cropped grid with newlines."""
    best = 0
    for height, width in pinpoints:
        rows, cols = (height // tile_size) * grid_size, (width // tile_size) * grid_size
        best = max(best, rows * (cols + 1))
    return grid_size * grid_size + best


def max_anyres_patches(pinpoints, *, tile_size: int) -> int:
    return max((-(-h // tile_size)) * (-(-w // tile_size)) for h, w in pinpoints) + 1


# ------------------------------------------------------------------------------------------------ packing (jit)


def anyres_num_features(layout: jax.Array, grid_size: int) -> jax.Array:
    """int32[B]: feature tokens per image (base `grid_size**2` + rows * (cols + 1))."""
    rows, cols = layout[:, 5], layout[:, 6]
    return grid_size * grid_size + rows * (cols + 1)


def anyres_gather_index(layout: jax.Array, *, grid_size: int, max_patches: int, max_features: int) -> jax.Array:
    """int32[B, max_features]: for feature slot k of image b, the row of the flattened per-image source table
    `[max_patches * grid_size**2 + 1, D]` (patch-major tower features, then the newline row last) it reads.
    Slots beyond the image's `num_features` point at the newline row (they are never scattered).
    """
    layout = jnp.asarray(layout, jnp.int32)
    tokens = grid_size * grid_size
    newline_row = max_patches * tokens
    grid_w, row_off, col_off, cols = (layout[:, i][:, None] for i in (2, 3, 4, 6))
    k = jnp.arange(max_features, dtype=jnp.int32)[None, :]
    # Base image: slot k < tokens reads patch 0, position k.
    base = k
    # Unpadded grid: slot j = k - tokens walks rows of (cols + 1) entries, the last being the newline.
    j = jnp.maximum(k - tokens, 0)
    r, c = j // (cols + 1), j % (cols + 1)
    big_r, big_c = r + row_off, c + col_off  # position in the un-cropped (grid_h*g) x (grid_w*g) grid
    patch = 1 + (big_r // grid_size) * grid_w + (big_c // grid_size)
    grid_row = patch * tokens + (big_r % grid_size) * grid_size + (big_c % grid_size)
    grid_row = jnp.where(c == cols, newline_row, grid_row)
    index = jnp.where(k < tokens, base, grid_row)
    num_features = anyres_num_features(layout, grid_size)[:, None]
    return jnp.where(k < num_features, index, newline_row).astype(jnp.int32)
