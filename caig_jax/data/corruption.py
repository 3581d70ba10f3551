"""The corrupted product x^ of PCPO (host-side numpy): patch masking and caption swap.

CAIG's PCPO compares log pi(y+|x) with log pi(y+|x^), where x^ is the product with its identity damaged; per
example, 50/50 (`corruption_kind`), either (CAIG paper and released code; shared/DESIGN.md section 2):

  mask: the product image with `int(0.75 * n_patches)` of its 32x32 patches zeroed, on the raw pixels before
        preprocessing (`mask_patches`);
  swap: the same image with another product's caption and attributes, never the product itself
        (`swap_partner` picks the other sample; CAIG's released code may pick the sample itself).

The patch grid covers every pixel: it is ceil(H / p) x ceil(W / p) patches anchored at the top-left corner, so
when H or W is not a multiple of p the last row / column of patches is narrower (partial) and counts as a patch
like any other. With H and W multiples of p this is CAIG's grid exactly.
"""

from __future__ import annotations

import math
import numbers

import numpy as np


def mask_patches(image: np.ndarray, seed, *, patch_size: int = 32, ratio: float = 0.75) -> np.ndarray:
    """A copy of `image` with `int(ratio * n_patches)` whole patches set to 0.

    Args:
      image: [H, W, C] array, normally uint8; the dtype is kept and the input is not modified.
      seed: int (anything `np.random.default_rng` accepts); the patches are drawn without replacement from
        `np.random.default_rng(seed)`, so the same seed masks the same patches.
      patch_size: side p of the square patches, in pixels.
      ratio: share of the n_patches = ceil(H / p) * ceil(W / p) patches to zero, in [0, 1].

    Returns:
      [H, W, C] array of the input's dtype: zero on the chosen patches, equal to `image` everywhere else.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be [H, W, C] (ndim 3), got shape {image.shape}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, numbers.Integral) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if not 0.0 <= ratio <= 1.0:  # also rejects NaN
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
    height, width = image.shape[:2]
    rows, cols = math.ceil(height / patch_size), math.ceil(width / patch_size)
    n_patches = rows * cols
    chosen = np.random.default_rng(seed).choice(n_patches, int(ratio * n_patches), replace=False)
    patch_is_masked = np.zeros(n_patches, bool)
    patch_is_masked[chosen] = True
    # Patch grid -> pixel grid; the crop makes the last row / column of patches the partial ones.
    pixel_is_masked = np.repeat(np.repeat(patch_is_masked.reshape(rows, cols), patch_size, 0), patch_size, 1)
    out = image.copy()
    out[pixel_is_masked[:height, :width]] = 0
    return out


def swap_partner(index: int, n: int, rng) -> int:
    """Index of the sample whose caption replaces sample `index`'s: uniform over the other n - 1 of 0..n-1.

    `rng`: a `np.random.Generator` (or a seed for one).
    """
    if n < 2:
        raise ValueError(f"a caption swap needs another sample: n must be >= 2, got {n}")
    if not 0 <= index < n:
        raise ValueError(f"index must be in [0, {n}), got {index}")
    other = int(np.random.default_rng(rng).integers(n - 1))
    # Draw among n - 1 slots and skip over `index`, so the sample itself is never picked and no retry is needed.
    return other + (other >= index)


def corruption_kind(rng) -> str:
    """'mask' or 'swap' with probability 1/2 each; `rng`: a `np.random.Generator` or a seed (deterministic)."""
    return "mask" if np.random.default_rng(rng).random() < 0.5 else "swap"
