"""TFDS builder `ctr_logs`: CTR logs -> CAIG reward pairs (left|right images, label, CTRs), by item split.

    from caig_jax.data.builders import ctr_logs
    dataset_dir, report = ctr_logs.build(data_dir, source="ROOT", layout="creative_ranking")

Input layouts: `caig_jax.data.ctr_logs` and caig_jax/data/README.md. Each example (one kept pair):

    image       uint8[S, 2S, 3]  both creatives resized to S x S (`image_size`, 512 by default), left|right
    label       0 = left has the higher logged CTR, 1 = right has
    ctr         float32[2]       logged CTRs [left, right] (clicks / impressions)
    impressions int64[2], clicks int64[2]
    true_ctr    float32[2]       the simulator's ground truth (NaN without a truth file)
    item_id, left_id, right_id (image names), caption, category, attributes (JSON text)

Splits are by item: the CreativeRanking list files, one CAIG JSON per split, or one JSON split by a hash
of the item id. The build report (pair counts, drop reasons, skipped bad data) is stored in the dataset's
metadata (`builder.info.metadata["report"]`) and returned by `build`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import cv2
import numpy as np
import tensorflow_datasets as tfds

from caig_jax.data import ctr_logs as logs_lib
from caig_jax.data import pairs as pairs_lib
from caig_jax.data.builders import _common
from caig_jax.data.ctr_logs import BadData, DataError

LAYOUTS = ("creative_ranking", "caig_json")


@dataclasses.dataclass(eq=False)
class CtrLogsConfig(tfds.core.BuilderConfig):
    layout: str = "creative_ranking"
    source: str = ""  # creative_ranking: the ROOT folder; caig_json: one JSON file (split by item hash)
    json_files: tuple = ()  # caig_json: ((split, path), ...), one file per split (instead of `source`)
    split_fractions: tuple = (("train", 0.8), ("val", 0.1), ("test", 0.1))  # for a single caig_json file
    images_dir: str = ""  # default: ROOT/images (creative_ranking), the JSON file's folder/images (caig_json)
    side_file: str = ""  # optional per-item caption / category / attributes
    truth_file: str = ""  # optional, simulation only: image_name<TAB>true_ctr
    min_impressions: int = 1000
    min_ratio: float = 1.05
    max_ratio: float = 1.20
    max_pairs_per_item: int = 0  # > 0: a seeded random subset of each item's pairs (not CAIG's; for wide sets)
    seed: int = 0  # left/right order and hash splits
    image_size: int = 512
    image_format: str = "png"
    on_bad: str = "raise"  # or "skip": skip and count bad rows / images
    splits: tuple = ()  # build only these splits (default: every split the input has)


class CtrLogs(tfds.core.GeneratorBasedBuilder):
    """CAIG reward pairs from CTR logs (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        s = cfg.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(s, 2 * s, 3), encoding_format=cfg.image_format),
                "label": tfds.features.ClassLabel(names=["left", "right"]),
                "ctr": tfds.features.Tensor(shape=(2,), dtype=np.float32),
                "impressions": tfds.features.Tensor(shape=(2,), dtype=np.int64),
                "clicks": tfds.features.Tensor(shape=(2,), dtype=np.int64),
                "true_ctr": tfds.features.Tensor(shape=(2,), dtype=np.float32),
                "item_id": tfds.features.Text(),
                "left_id": tfds.features.Text(),
                "right_id": tfds.features.Text(),
                "caption": tfds.features.Text(),
                "category": tfds.features.Text(),
                "attributes": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    # -- reading -------------------------------------------------------------------------------------

    def _read(self, bad: BadData) -> dict[str, list[logs_lib.Creative]]:
        cfg = self.builder_config
        if cfg.layout == "creative_ranking":
            if not cfg.source:
                raise DataError("ctr_logs: layout 'creative_ranking' needs source=ROOT (holding list/ and images/)")
            return logs_lib.read_creative_ranking(cfg.source, images_dir=cfg.images_dir or None, bad=bad)
        if cfg.layout == "caig_json":
            if cfg.json_files:
                by_split = {}
                for split, path in cfg.json_files:
                    images = cfg.images_dir or os.path.join(os.path.dirname(path), "images")
                    by_split[split] = logs_lib.read_caig_json(path, images, bad=bad)
                _check_disjoint(by_split, bad)
                return by_split
            if not cfg.source:
                raise DataError("ctr_logs: layout 'caig_json' needs source=FILE.json or json_files=((split, path), ...)")
            images = cfg.images_dir or os.path.join(os.path.dirname(cfg.source), "images")
            creatives = logs_lib.read_caig_json(cfg.source, images, bad=bad)
            return logs_lib.split_by_item(creatives, dict(cfg.split_fractions), cfg.seed)
        raise DataError(f"ctr_logs: unknown layout {cfg.layout!r}; expected one of {LAYOUTS}")

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        bad = BadData(cfg.on_bad)
        by_split = self._read(bad)
        if cfg.splits:
            missing = sorted(set(cfg.splits) - set(by_split))
            if missing:
                raise DataError(f"ctr_logs: splits {missing} not in the input (it has {sorted(by_split)})")
            by_split = {s: by_split[s] for s in cfg.splits}
        side = logs_lib.read_item_side_file(cfg.side_file, bad=bad) if cfg.side_file else {}
        truth = logs_lib.read_truth_file(cfg.truth_file) if cfg.truth_file else {}
        self._inputs = self._input_files(by_split)
        rule = pairs_lib.PairRule(cfg.min_impressions, cfg.min_ratio, cfg.max_ratio, cfg.max_pairs_per_item)
        self._report = {"bad_data": bad, "splits": {}}
        self._bad = bad
        generators = {}
        for split_index, (split, creatives) in enumerate(sorted(by_split.items())):
            for c in creatives:
                c.true_ctr = truth.get(c.name, math.nan)
            pairs, report = pairs_lib.pair_indices([c.record() for c in creatives], rule, seed=[cfg.seed, split_index])
            report["items_with_pairs"] = len({p.item_id for p in pairs})
            self._report["splits"][split] = report
            generators[split] = self._generate_examples(split, creatives, pairs, side)
        return generators

    def _input_files(self, by_split: dict[str, list[logs_lib.Creative]]) -> _common.InputFiles:
        """Every file this build read (log files, side and truth files, the creatives' images), fingerprinted."""
        cfg = self.builder_config
        inputs = _common.InputFiles()
        if cfg.layout == "creative_ranking":
            list_dir = os.path.join(cfg.source, "list")
            inputs.add(*(os.path.join(list_dir, f"{s}_data_list.txt") for s in logs_lib.CREATIVE_RANKING_SPLITS))
        else:
            inputs.add(*([path for _, path in cfg.json_files] or [cfg.source]))
        inputs.add(cfg.side_file, cfg.truth_file)
        for creatives in by_split.values():
            inputs.add(*(c.image for c in creatives))
        return inputs

    # -- writing -------------------------------------------------------------------------------------

    def _generate_examples(self, split, creatives, pairs, side):
        cfg = self.builder_config
        s = cfg.image_size
        report = self._report["splits"][split]
        report.setdefault("pairs_dropped_unreadable_image", 0)
        cache: dict[int, np.ndarray | None] = {}
        current_item = None

        def image(index: int) -> np.ndarray | None:
            if index not in cache:
                c = creatives[index]
                try:
                    rgb = logs_lib.load_rgb(c.image)
                except DataError as e:
                    self._bad("unreadable_image", f"{e} (referenced at {c.where})")
                    cache[index] = None
                    return None
                interp = cv2.INTER_AREA if min(rgb.shape[:2]) >= s else cv2.INTER_CUBIC
                cache[index] = cv2.resize(rgb, (s, s), interpolation=interp)
            return cache[index]

        for n, p in enumerate(pairs):
            if p.item_id != current_item:  # pairs come grouped by item: keep only this item's images
                cache.clear()
                current_item = p.item_id
            left, right = image(p.left), image(p.right)
            if left is None or right is None:
                report["pairs_dropped_unreadable_image"] += 1
                continue
            lc, rc = creatives[p.left], creatives[p.right]
            meta = side.get(str(p.item_id), {})
            attributes = meta.get("attributes", {})
            yield f"{split}/{n:08d}", {
                "image": _common.encode_image(np.concatenate([left, right], axis=1), cfg.image_format),
                "label": p.label,
                "ctr": np.array([p.left_ctr, p.right_ctr], np.float32),
                "impressions": np.array([lc.impressions, rc.impressions], np.int64),
                "clicks": np.array([lc.clicks, rc.clicks], np.int64),
                "true_ctr": np.array([lc.true_ctr, rc.true_ctr], np.float32),
                "item_id": str(p.item_id),
                "left_id": lc.name,
                "right_id": rc.name,
                "caption": meta.get("caption", ""),
                "category": meta.get("category", ""),
                "attributes": attributes if isinstance(attributes, str) else json.dumps(attributes, sort_keys=True),
            }
        report["pairs_written"] = report["pairs_kept"] - report["pairs_dropped_unreadable_image"]
        # Written to metadata.json by TFDS once every split is done.
        self.info.metadata["report"] = {
            "bad_data": self._bad.as_dict(),
            "splits": self._report["splits"],
        }
        self.info.metadata["options"] = _common.config_options(cfg)
        self.info.metadata["inputs"] = self._inputs.as_dict()


def _check_disjoint(by_split: dict[str, list[logs_lib.Creative]], bad: BadData) -> None:
    """Items must not cross splits: with skip, an item stays in the first split (by name) that has it."""
    owner: dict[str, tuple[str, str]] = {}
    for split in sorted(by_split):
        keep = []
        for c in by_split[split]:
            first = owner.setdefault(c.item_id, (split, c.where))
            if first[0] != split:
                bad("item_in_two_splits", f"{c.where}: item {c.item_id!r} is also in split {first[0]!r} ({first[1]})")
                continue
            keep.append(c)
        by_split[split] = keep


def build(data_dir: str, *, name: str = "default", overwrite: bool = False, overwrite_hint: str = "overwrite=True",
          **options: Any) -> tuple[str, dict]:
    """Builds (or reuses) `ctr_logs/<name>` under `data_dir`. Options: the fields of `CtrLogsConfig`.

    Returns (dataset folder, build report). Raises `DataError` on bad data unless on_bad="skip", and when the
    dataset exists with other options or was built from input files that changed since, unless `overwrite`
    (`overwrite_hint` says how the caller's user sets it).
    """
    if "json_files" in options and isinstance(options["json_files"], dict):
        options["json_files"] = tuple(sorted(options["json_files"].items()))
    if "splits" in options:
        options["splits"] = tuple(options["splits"])
    if "split_fractions" in options and isinstance(options["split_fractions"], dict):
        options["split_fractions"] = tuple(options["split_fractions"].items())
    builder = _common.prepare(CtrLogs, CtrLogsConfig(name=name, **options), data_dir, overwrite=overwrite,
                              overwrite_hint=overwrite_hint)
    path = str(builder.data_path)
    return path, dict(_common.load_builder(path, "ctr_logs").info.metadata.get("report", {}))
