"""The `market` job: simulate the marketplace and build its TFDS datasets (configs/market.py).

    python -m caig_jax.main --config=configs/market.py:tiny --workdir=DIR

Writes `DIR/market/` (see `caig_jax.data.simulation.make_market`), `DIR/tfds/` and `DIR/market_report.{json,md}`
(`caig_jax.data.market_datasets.build_world`), and prints a short report.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from caig_jax.data.market_datasets import build_world


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    os.makedirs(workdir, exist_ok=True)
    return build_world(config, workdir)
