"""caig_jax.data.product: CAIG's crop / fit 0.78 / centre, inpainting mask, canny control, paste-back."""

import numpy as np
import pytest
from PIL import Image

from caig_jax.data import product as P


def _cutout(h=60, w=30, pad=(7, 11, 5, 13)) -> np.ndarray:
    """An RGBA cut-out: a w x h coloured box (with a stripe) inside transparent padding (top, bottom, left, right)."""
    top, bottom, left, right = pad
    rgba = np.zeros((h + top + bottom, w + left + right, 4), np.uint8)
    rgba[top : top + h, left : left + w] = (200, 40, 30, 255)
    rgba[top + h // 2 : top + h // 2 + 4, left : left + w, :3] = (20, 200, 60)
    return rgba


def test_crop_to_alpha_is_the_alpha_bounding_box():
    rgba = _cutout()
    crop = P.crop_to_alpha(rgba)
    assert crop.shape == (60, 30, 4)
    assert np.all(crop[..., 3] == 255)
    with pytest.raises(ValueError, match="empty"):
        P.crop_to_alpha(np.zeros((5, 5, 4), np.uint8))


@pytest.mark.parametrize("h,w", [(60, 30), (20, 80), (50, 50)])
def test_place_product_fits_078_keeps_aspect_and_centres(h, w):
    size = 200
    placed = P.place_product(_cutout(h, w), size=size)
    assert placed.shape == (size, size, 4) and placed.dtype == np.uint8
    top, bottom, left, right = P.alpha_box(placed[..., 3])
    ph, pw = bottom - top, right - left
    assert max(ph, pw) == pytest.approx(0.78 * size, abs=1.0)  # longer side fills 0.78 of the canvas
    assert ph / pw == pytest.approx(h / w, rel=0.03)  # aspect kept
    assert (top + bottom) / 2 == pytest.approx(size / 2, abs=1.0)  # centred
    assert (left + right) / 2 == pytest.approx(size / 2, abs=1.0)
    # Colours survive the resize (premultiplied: no dark fringe mixed into opaque pixels).
    inner = placed[top + 3 : top + 8, left + 3 : right - 3]
    assert np.abs(inner[..., :3].astype(int) - (200, 40, 30)).max() <= 2


def test_place_product_upscales_small_products():
    placed = P.place_product(_cutout(6, 3, pad=(1, 1, 1, 1)), size=100)
    top, bottom, _, _ = P.alpha_box(placed[..., 3])
    assert bottom - top == pytest.approx(78, abs=1)


def test_inpaint_mask_is_inverted_alpha_dilated():
    size = 128
    placed = P.place_product(_cutout(), size=size)
    alpha = placed[..., 3]
    mask = P.inpaint_mask(alpha, dilate=20)
    assert mask.shape == (size, size) and mask.dtype == np.float32
    assert mask.min() >= 0 and mask.max() <= 1
    product = alpha == 255
    background = alpha == 0
    assert np.all(mask[background] == 1.0)  # everything outside the product is painted
    # The painted region reaches ~10 px into the product (a 20x20 kernel), but not its core.
    top, bottom, left, right = P.alpha_box(alpha)
    row = (top + bottom) // 2
    inside = mask[row, left : right]
    assert np.all(inside[:9] == 1.0) and np.all(inside[-9:] == 1.0)
    assert np.all(mask[row, left + 12 : right - 12] == 0.0)
    assert mask[product].mean() < 1.0
    # No dilation = exactly the inverted alpha; an RGBA input uses its alpha.
    np.testing.assert_allclose(P.inpaint_mask(placed, dilate=0), (255 - alpha) / 255.0)


def test_control_image_is_canny_of_the_product_alone():
    size = 128
    placed = P.place_product(_cutout(), size=size)
    control = P.control_image(placed)
    assert control.shape == (size, size, 3) and control.dtype == np.uint8
    assert set(np.unique(control)) <= {0, 255}
    assert np.array_equal(control[..., 0], control[..., 1]) and np.array_equal(control[..., 0], control[..., 2])
    edges = control[..., 0] > 0
    assert edges.any()
    # Only the product's outline and inner stripe: nothing far from the product.
    top, bottom, left, right = P.alpha_box(placed[..., 3])
    far = np.ones_like(edges)
    far[max(top - 2, 0) : bottom + 2, max(left - 2, 0) : right + 2] = False
    assert not edges[far].any()
    # The product's own pixels decide: a different background colour under transparent pixels changes nothing.
    noisy = placed.copy()
    noisy[placed[..., 3] == 0, :3] = 255
    np.testing.assert_array_equal(P.control_image(noisy), control)


def test_paste_product_restores_product_pixels_with_undilated_alpha():
    size = 96
    placed = P.place_product(_cutout(), size=size)
    rng = np.random.default_rng(0)
    painted = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = P.paste_product(painted, placed)
    alpha = placed[..., 3]
    np.testing.assert_array_equal(out[alpha == 255], placed[..., :3][alpha == 255])
    np.testing.assert_array_equal(out[alpha == 0], painted[alpha == 0])
    with pytest.raises(ValueError, match="shape"):
        P.paste_product(painted[:10], placed)


def test_load_product_image_round_trip_and_errors(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(_cutout(), "RGBA").save(good)
    np.testing.assert_array_equal(P.load_product_image(good), _cutout())

    with pytest.raises(FileNotFoundError, match="missing.png"):
        P.load_product_image(tmp_path / "missing.png")

    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(P.ProductImageError, match="garbage.png"):
        P.load_product_image(garbage)

    rgb = tmp_path / "rgb.jpg"
    Image.fromarray(_cutout()[..., :3]).save(rgb)
    with pytest.raises(P.ProductImageError, match=r"rgb\.jpg.*no alpha"):
        P.load_product_image(rgb)

    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA").save(empty)
    with pytest.raises(P.ProductImageError, match=r"empty\.png.*empty alpha"):
        P.load_product_image(empty)
    # All of them are ValueErrors too (one except clause catches every bad product image).
    assert issubclass(P.ProductImageError, ValueError) and issubclass(P.MissingProductImageError, ValueError)
