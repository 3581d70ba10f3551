"""TFDS builder `products`: CAIG's product list (`tiny.json` layout) for prompt generation and rendering.

    from caig_jax.data.builders import products
    dataset_dir, report = products.build(data_dir, source="products.json")

Input: a JSON list of `{"id", "image": RGBA cut-out path (absolute, or relative to `image_root`, default the JSON
file's folder), "new_caption" (CAIG's key; "caption" or "title" are accepted too), "category"?, "attributes"?
(object or string), "split"?}`. Entries with a `split` go to that split, the others to `default_split`
("train"). Every image is checked with `caig_jax.data.product.load_product_image` (readable, has an alpha
channel, alpha not empty, the product at least `MIN_CUTOUT_SIZE` = 8 px on its short side). Example:

    id, image uint8[H, W, 4] (PNG, RGBA), caption, category, attributes (JSON text)
"""

from __future__ import annotations

import dataclasses
import json
import os

import tensorflow_datasets as tfds

from caig_jax.data.builders import _common
from caig_jax.data.ctr_logs import BadData, DataError
from caig_jax.data import product as product_lib


@dataclasses.dataclass(eq=False)
class ProductsConfig(tfds.core.BuilderConfig):
    source: str = ""
    image_root: str = ""
    default_split: str = "train"
    on_bad: str = "raise"


class Products(tfds.core.GeneratorBasedBuilder):
    """Product cut-outs with captions, categories and attributes."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "image": tfds.features.Image(shape=(None, None, 4), encoding_format="png"),
                "caption": tfds.features.Text(),
                "category": tfds.features.Text(),
                "attributes": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        if not os.path.exists(cfg.source):
            raise DataError(f"products file {cfg.source!r} does not exist")
        self._inputs = _common.InputFiles()  # the JSON file and the images read, fingerprinted as they are read
        self._inputs.add(cfg.source)
        with open(cfg.source, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{cfg.source}: not valid JSON ({e})") from e
        if not isinstance(data, list):
            raise DataError(f"{cfg.source}: expected a JSON list of products, got {type(data).__name__}")
        self._bad = BadData(cfg.on_bad)
        self._counts = {}
        by_split: dict[str, list] = {}
        seen: dict[str, str] = {}
        for i, entry in enumerate(data):
            where = f"{cfg.source}: entry #{i}"
            if not isinstance(entry, dict) or "id" not in entry or "image" not in entry:
                self._bad("malformed_product", f"{where}: needs 'id', 'image' and 'new_caption'")
                continue
            if not product_lib.product_caption(entry):
                self._bad("malformed_product", f"{where} (id {entry['id']!r}): 'new_caption' (or 'caption' / 'title') "
                          "must be a non-empty string")
                continue
            if str(entry["id"]) in seen:
                self._bad("duplicate_id", f"{where}: id {entry['id']!r} already used at {seen[str(entry['id'])]}")
                continue
            seen[str(entry["id"])] = where
            by_split.setdefault(str(entry.get("split", cfg.default_split)), []).append((where, entry))
        return {split: self._generate_examples(split, entries) for split, entries in sorted(by_split.items())}

    def _generate_examples(self, split, entries):
        cfg = self.builder_config
        written = 0
        for where, entry in entries:
            image_path = product_lib.resolve_image_path(cfg.source, str(entry["image"]), cfg.image_root)
            self._inputs.add(image_path)
            try:
                rgba = product_lib.load_product_image(image_path)
            except product_lib.ProductImageError as e:
                reason = "missing_image" if isinstance(e, FileNotFoundError) else "bad_image"
                self._bad(reason, f"{where}: {e}")
                continue
            attributes = entry.get("attributes", {})
            written += 1
            yield str(entry["id"]), {
                "id": str(entry["id"]),
                "image": _common.encode_image(rgba),
                "caption": product_lib.product_caption(entry),
                "category": str(entry.get("category", "")),
                "attributes": attributes if isinstance(attributes, str) else json.dumps(attributes, sort_keys=True),
            }
        self._counts[split] = written
        self.info.metadata["report"] = {"bad_data": self._bad.as_dict(), "examples": dict(self._counts)}
        self.info.metadata["options"] = _common.config_options(cfg)
        self.info.metadata["inputs"] = self._inputs.as_dict()


def build(data_dir: str, *, source: str, image_root: str = "", name: str = "default", default_split: str = "train",
          on_bad: str = "raise", overwrite: bool = False, overwrite_hint: str = "overwrite=True") -> tuple[str, dict]:
    """Builds (or reuses) `products/<name>` under `data_dir` from a tiny.json-layout file."""
    config = ProductsConfig(name=name, source=os.path.abspath(source), image_root=image_root,
                            default_split=default_split, on_bad=on_bad)
    builder = _common.prepare(Products, config, data_dir, overwrite=overwrite, overwrite_hint=overwrite_hint)
    path = str(builder.data_path)
    return path, dict(_common.load_builder(path, "products").info.metadata.get("report", {}))
