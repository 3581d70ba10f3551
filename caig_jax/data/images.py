"""Image encoding shared by the builders and the marketplace (OpenCV: faster than PIL for small PNGs)."""

from __future__ import annotations

import cv2
import numpy as np


def encode_image(image: np.ndarray, fmt: str = "png") -> bytes:
    """uint8[H, W, C] -> PNG or JPEG bytes (TFDS stores encoded bytes as given; no TensorFlow needed)."""
    if fmt not in ("png", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {fmt!r}")
    image = np.ascontiguousarray(image)
    if image.ndim == 3 and image.shape[-1] in (3, 4):  # OpenCV writes BGR(A)
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR if image.shape[-1] == 3 else cv2.COLOR_RGBA2BGRA)
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1] if fmt == "png" else [cv2.IMWRITE_JPEG_QUALITY, 95]
    ok, buf = cv2.imencode(".png" if fmt == "png" else ".jpg", image, params)
    if not ok:
        raise ValueError(f"could not encode an image of shape {image.shape} as {fmt}")
    return buf.tobytes()
