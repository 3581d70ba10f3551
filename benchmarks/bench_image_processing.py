"""LLaVA-NeXT image preprocessing: ours (`caig_jax.models.image_processing`) vs transformers' PIL backend.

    python benchmarks/bench_image_processing.py

Times one batch through each (numpy out, no torch), after a warm-up call, median of 7; checks the outputs are
bit-identical first. Shapes: the tiny reward job's batch (64 left|right pairs of 32x64) and 8 images at the
7B preset's 336-px tiles (336x672, two tiles + base).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import LlavaNextImageProcessorPil  # noqa: E402

from caig_jax.models.image_processing import ImageProcessor, ImageProcessorConfig  # noqa: E402


def _median_seconds(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    rng = np.random.default_rng(0)
    print("| images | size | ours s | transformers s | transformers / ours |")
    print("| --- | --- | --- | --- | --- |")
    for side, n in ((32, 64), (336, 8)):
        images = [rng.integers(0, 255, (side, 2 * side, 3), dtype=np.uint8) for _ in range(n)]
        size, crop = {"shortest_edge": side}, {"height": side, "width": side}
        ours = ImageProcessor(ImageProcessorConfig(kind="llava_next", size=size, crop_size=crop,
                                                   image_grid_pinpoints=((side, 2 * side),)))
        theirs = LlavaNextImageProcessorPil(size=size, crop_size=crop, image_grid_pinpoints=[[side, 2 * side]])
        a, b = ours(images)["pixel_values"], theirs(images, return_tensors="np")["pixel_values"]
        if not np.array_equal(a, b):
            raise SystemExit("outputs differ: the comparison would be meaningless")
        t_ours = _median_seconds(lambda: ours(images))
        t_theirs = _median_seconds(lambda: theirs(images, return_tensors="np"))
        print(f"| {n} | {side}x{2 * side} | {t_ours:.3f} | {t_theirs:.3f} | {t_theirs / t_ours:.2f}x |")


if __name__ == "__main__":
    main()
