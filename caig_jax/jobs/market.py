"""The `market` job: simulate the marketplace and build its TFDS datasets (configs/market.py).

    python -m caig_jax.main --config=configs/market.py:tiny --workdir=DIR

Writes `DIR/market/` (see `caig_jax.data.simulation.make_market`), `DIR/tfds/` and `DIR/market_report.{json,md}`
(`caig_jax.data.market_datasets.build_world`), and prints a short report.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from caig_jax.config_checks import Checks, common_checks, market_checks
from caig_jax.data.market_datasets import build_world


def validate(config: ml_collections.ConfigDict) -> None:
    """Types and ranges of every key the job reads (`caig_jax.config_checks.market_checks`); the job needs no
    devices, so `mesh` is checked for its form only."""
    checks = Checks(config)
    common_checks(checks)
    checks.mesh()
    market_checks(checks)
    checks.done()


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    return build_world(config, workdir)
