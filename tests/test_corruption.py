"""caig_jax.data.corruption: patch masking (count, untouched pixels, determinism, partial edge patches), the
caption-swap partner and the 50/50 corruption choice."""

import math

import numpy as np
import pytest

from caig_jax.data.corruption import corruption_kind, mask_patches, swap_partner


def _image(h, w, c=3, seed=0):
    """uint8 image with no zero pixel, so that zeroed pixels are exactly the masked ones."""
    return np.random.default_rng(seed).integers(1, 256, (h, w, c), dtype=np.uint8)


def _patch_states(before, after, p):
    """Per patch of the ceil-grid: 'zero' (every pixel 0), 'same' (unchanged) or 'mixed'."""
    rows, cols = math.ceil(before.shape[0] / p), math.ceil(before.shape[1] / p)
    states = np.empty((rows, cols), object)
    for r in range(rows):
        for c in range(cols):
            a, b = before[r * p:(r + 1) * p, c * p:(c + 1) * p], after[r * p:(r + 1) * p, c * p:(c + 1) * p]
            states[r, c] = "zero" if not b.any() else "same" if np.array_equal(a, b) else "mixed"
    return states


@pytest.mark.parametrize("h, w, p, ratio", [(128, 96, 32, 0.75), (64, 64, 16, 0.5), (32, 32, 32, 0.75),
                                            (64, 64, 32, 1.0), (64, 64, 32, 0.0)])
def test_exact_count_of_whole_zero_patches(h, w, p, ratio):
    image = _image(h, w)
    out = mask_patches(image, seed=3, patch_size=p, ratio=ratio)
    assert out.shape == image.shape and out.dtype == np.uint8
    states = _patch_states(image, out, p)
    n_patches = (h // p) * (w // p)
    assert np.sum(states == "zero") == int(ratio * n_patches)
    assert np.sum(states == "same") == n_patches - int(ratio * n_patches)  # nothing else was touched


def test_caig_count_on_a_512_image():
    image = _image(512, 512)
    out = mask_patches(image, seed=0)
    zero_pixels = np.sum(~out.any(-1))
    assert zero_pixels == int(0.75 * 256) * 32 * 32  # 192 of the 256 patches
    untouched = out.any(-1)
    np.testing.assert_array_equal(out[untouched], image[untouched])


def test_deterministic_in_seed_and_seeds_differ():
    image = _image(128, 128)
    a, b = mask_patches(image, 7), mask_patches(image, 7)
    np.testing.assert_array_equal(a, b)
    masks = {mask_patches(image, seed).any(-1).tobytes() for seed in range(5)}
    assert len(masks) == 5


def test_input_not_modified_and_new_array_returned():
    image = _image(64, 64)
    before = image.copy()
    out = mask_patches(image, 1)
    np.testing.assert_array_equal(image, before)
    assert not np.shares_memory(out, image)
    out = mask_patches(image, 1, ratio=0.0)
    np.testing.assert_array_equal(out, image)
    assert not np.shares_memory(out, image)


def test_sizes_not_multiple_of_patch_size_use_partial_edge_patches():
    # 70 x 45 with p = 32: a 3 x 2 grid, the last row 6 pixels high and the last column 13 wide.
    image = _image(70, 45)
    for seed in range(20):
        out = mask_patches(image, seed, ratio=0.5)
        states = _patch_states(image, out, 32)
        assert states.shape == (3, 2)
        assert np.sum(states == "zero") == int(0.5 * 6) and np.sum(states == "same") == 3
    # ratio 1 zeroes every pixel: the grid covers the whole image.
    assert not mask_patches(image, 0, ratio=1.0).any()


def test_other_dtypes_and_channels_are_kept():
    image = _image(64, 32, c=4).astype(np.float32) / 255.0
    out = mask_patches(image, 2, ratio=0.5)
    assert out.dtype == np.float32 and out.shape == (64, 32, 4)
    assert np.sum(_patch_states(image, out, 32) == "zero") == 1


@pytest.mark.parametrize("kwargs, name", [
    (dict(image=np.ones((8, 8), np.uint8)), "image"),
    (dict(patch_size=0), "patch_size"),
    (dict(patch_size=2.5), "patch_size"),
    (dict(ratio=1.5), "ratio"),
    (dict(ratio=-0.1), "ratio"),
    (dict(ratio=float("nan")), "ratio"),
])
def test_bad_arguments_are_named(kwargs, name):
    args = dict(image=_image(8, 8), seed=0) | kwargs
    with pytest.raises(ValueError, match=name):
        mask_patches(**args)


def test_swap_partner_never_itself_and_covers_the_others():
    n = 5
    rng = np.random.default_rng(0)
    for index in range(n):
        partners = [swap_partner(index, n, rng) for _ in range(200)]
        assert index not in partners
        assert set(partners) == set(range(n)) - {index}
        assert all(isinstance(p, int) for p in partners)
    assert swap_partner(0, 2, rng) == 1 and swap_partner(1, 2, rng) == 0


def test_swap_partner_is_uniform():
    rng = np.random.default_rng(1)
    counts = np.bincount([swap_partner(2, 4, rng) for _ in range(3000)], minlength=4)
    assert counts[2] == 0
    assert np.all(np.abs(counts[[0, 1, 3]] - 1000) < 150)  # about 5 standard deviations


def test_swap_partner_rejects_bad_input():
    with pytest.raises(ValueError, match="n must be >= 2"):
        swap_partner(0, 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="index"):
        swap_partner(3, 3, np.random.default_rng(0))


def test_corruption_kind_is_deterministic_and_balanced():
    assert [corruption_kind(s) for s in range(20)] == [corruption_kind(s) for s in range(20)]
    rng = np.random.default_rng(2)
    kinds = [corruption_kind(rng) for _ in range(2000)]
    assert set(kinds) == {"mask", "swap"}
    assert abs(kinds.count("mask") - 1000) < 120  # about 5 standard deviations
