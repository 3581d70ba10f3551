"""Readers for per-creative CTR logs in the public layouts, with bad-data handling.

Two layouts (documented precisely in caig_jax/data/README.md):

(a) CreativeRanking (Alibaba): `ROOT/list/{train,val,test}_data_list.txt`, one row per creative and day,
    tab-separated `item_id  image_name  date  impressions  clicks` (runs of spaces are accepted when a
    row has no tab; an optional header row naming the columns is skipped), images in `ROOT/images/`.
    Daily rows of one (item_id, image_name) are summed into one creative. The split files define the
    splits; an item listed in two split files is bad data.
(b) CG4CTR / CAIG JSON: a JSON object `{key: [creative, ...]}` (CAIG's scripts; the item is the
    creative's `item_id`, else the key up to its first '_'), a JSON list of creatives, or JSON lines.
    A creative has `creative_id`, `item_id`, `creative_image_hash`, `exp_impression_cnt`,
    `exp_click_cnt`; the image is `IMAGES_DIR/basename(creative_image_hash)`, trying the extensions
    .jpg/.jpeg/.png/.webp when the name has none on disk. Splits: one file per split, or one file split by
    a hash of the item id (`split_by_item`).

Optional per-item side file (`read_item_side_file`): caption, category and attributes per item, in CAIG's
products layout (`[{"id", "new_caption", "category", "attributes"}]`) or `{item_id: {...}}`.

Bad data (a malformed row, a non-integer or negative count, clicks > impressions, a missing or
unreadable image, an item in two splits) raises `DataError` naming the file and line (or JSON key), unless
`on_bad="skip"`, which skips the row/creative/item and counts it in the `BadData` report.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from caig_jax.errors import UserError

CREATIVE_RANKING_SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class DataError(UserError, ValueError):
    """Bad input data; the message names the file and line (or JSON key) and what was expected."""


class BadData:
    """Bad-data policy and counter: `raise` (default) stops at the first problem, `skip` counts it."""

    MAX_EXAMPLES = 20

    def __init__(self, on_bad: str = "raise"):
        if on_bad not in ("raise", "skip"):
            raise ValueError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")
        self.on_bad = on_bad
        self.counts: collections.Counter = collections.Counter()
        self.examples: list[str] = []

    def __call__(self, reason: str, message: str) -> None:
        """Reports one problem: raises DataError, or (skip) counts `reason` and keeps a few messages."""
        if self.on_bad == "raise":
            raise DataError(f"{message} [{reason}; pass on_bad='skip' to skip and count such data]")
        self.counts[reason] += 1
        if len(self.examples) < self.MAX_EXAMPLES:
            self.examples.append(f"{reason}: {message}")

    def as_dict(self) -> dict[str, Any]:
        return {"on_bad": self.on_bad, "skipped": dict(sorted(self.counts.items())), "examples": list(self.examples)}


@dataclasses.dataclass
class Creative:
    """One creative (ad image) of an item with its aggregated counts."""

    item_id: str
    name: str  # the image name as the logs write it
    image: str  # path of the image file
    impressions: int
    clicks: int
    where: str  # "file:line" (or "file: key ..., creative #i") of its first row, for error messages
    true_ctr: float = math.nan  # simulation only (truth file)

    def record(self) -> dict[str, Any]:
        """The dict `caig_jax.data.pairs` expects."""
        return {"item_id": self.item_id, "image": self.image, "impressions": self.impressions, "clicks": self.clicks}


def _parse_count(text: Any) -> int | None:
    if isinstance(text, bool):
        return None
    if isinstance(text, int):
        return text
    if isinstance(text, float):
        return int(text) if text.is_integer() else None
    try:
        return int(str(text).strip())
    except ValueError:
        try:
            f = float(str(text).strip())
        except ValueError:
            return None
        return int(f) if f.is_integer() else None


def _check_counts(impressions: Any, clicks: Any, where: str, bad: BadData) -> tuple[int, int] | None:
    imp, clk = _parse_count(impressions), _parse_count(clicks)
    if imp is None or clk is None:
        bad("malformed_count", f"{where}: impressions={impressions!r}, clicks={clicks!r} must be whole numbers")
        return None
    if imp < 0 or clk < 0:
        bad("negative_count", f"{where}: impressions={imp}, clicks={clk} must be >= 0")
        return None
    if clk > imp:
        bad("clicks_gt_impressions", f"{where}: clicks={clk} > impressions={imp}")
        return None
    return imp, clk


def resolve_image(images_dir: str, name: str) -> str | None:
    """`images_dir/basename(name)`, or with a known image extension appended; None when no such file."""
    base = os.path.join(images_dir, os.path.basename(str(name)))
    if os.path.isfile(base):
        return base
    if not os.path.splitext(base)[1]:
        for ext in IMAGE_EXTENSIONS:
            if os.path.isfile(base + ext):
                return base + ext
    return None


def _split_fields(line: str) -> list[str]:
    return line.split("\t") if "\t" in line else line.split()


def read_creative_ranking(
    root: str,
    *,
    images_dir: str | None = None,
    splits: Sequence[str] = CREATIVE_RANKING_SPLITS,
    bad: BadData | None = None,
) -> dict[str, list[Creative]]:
    """Reads the CreativeRanking layout. Returns {split: [Creative]} for the split files that exist."""
    bad = bad or BadData()
    images_dir = images_dir or os.path.join(root, "images")
    list_dir = os.path.join(root, "list")
    out: dict[str, list[Creative]] = {}
    item_split: dict[str, tuple[str, str]] = {}  # item -> (split, where) of its first row
    for split in splits:
        path = os.path.join(list_dir, f"{split}_data_list.txt")
        if not os.path.exists(path):
            continue
        creatives: dict[tuple[str, str], Creative] = {}
        dropped_items: set[str] = set()
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                fields = [x.strip() for x in _split_fields(line)]
                if lineno == 1 and len(fields) == 5 and any("impression" in x.lower() for x in fields):
                    continue  # header row
                if len(fields) != 5 or not fields[0] or not fields[1]:
                    bad("malformed_row", f"{where}: expected 5 tab-separated fields item_id, image_name, date, "
                        f"impressions, clicks; got {len(fields)}: {line[:200]!r}")
                    continue
                item_id, name, _date, imp, clk = fields
                counts = _check_counts(imp, clk, where, bad)
                if counts is None:
                    continue
                if item_id in dropped_items:
                    continue
                first = item_split.get(item_id)
                if first is not None and first[0] != split:
                    bad("item_in_two_splits", f"{where}: item {item_id!r} is also in split {first[0]!r} "
                        f"({first[1]}); splits must be disjoint by item")
                    dropped_items.add(item_id)
                    continue
                item_split.setdefault(item_id, (split, where))
                key = (item_id, name)
                if key not in creatives:
                    image = resolve_image(images_dir, name)
                    if image is None:
                        bad("missing_image", f"{where}: image {os.path.join(images_dir, name)!r} does not exist")
                        # Only this creative is dropped; None remembers to skip its other daily rows.
                        creatives[key] = None  # type: ignore[assignment]
                        continue
                    creatives[key] = Creative(item_id, name, image, 0, 0, where)
                creative = creatives[key]
                if creative is None:
                    continue
                creative.impressions += counts[0]
                creative.clicks += counts[1]
        out[split] = [c for c in creatives.values() if c is not None and c.item_id not in dropped_items]
    if not out:
        raise DataError(
            f"{list_dir}: no split files found; expected one or more of "
            + ", ".join(f"{s}_data_list.txt" for s in splits)
        )
    return out


def _json_entries(path: str) -> list[tuple[str, Any, Any]]:
    """(where, key, entry) for each creative of a CAIG/CG4CTR JSON, JSON-list or JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
        lines = None
    except json.JSONDecodeError as e:
        if "Extra data" not in str(e):
            raise DataError(f"{path}: not valid JSON ({e})") from e
        data, lines = None, text.splitlines()
    entries = []
    if lines is not None:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entries.append((f"{path}:{lineno}", None, json.loads(line)))
            except json.JSONDecodeError as e:
                entries.append((f"{path}:{lineno}", None, DataError(f"{path}:{lineno}: not valid JSON ({e})")))
    elif isinstance(data, dict):
        for key, creatives in data.items():
            if not isinstance(creatives, list):
                entries.append((f"{path}: key {key!r}", key, DataError(
                    f"{path}: key {key!r} must map to a list of creatives, got {type(creatives).__name__}")))
                continue
            for i, creative in enumerate(creatives):
                entries.append((f"{path}: key {key!r}, creative #{i}", key, creative))
    elif isinstance(data, list):
        for i, creative in enumerate(data):
            entries.append((f"{path}: entry #{i}", None, creative))
    else:
        raise DataError(f"{path}: expected a JSON object {{key: [creatives]}}, a list, or JSON lines")
    return entries


CAIG_JSON_KEYS = ("creative_image_hash", "exp_impression_cnt", "exp_click_cnt")


def read_caig_json(path: str, images_dir: str, *, bad: BadData | None = None) -> list[Creative]:
    """Reads creatives from a CG4CTR/CAIG JSON file (see the module docstring)."""
    bad = bad or BadData()
    if not os.path.exists(path):
        raise DataError(f"CTR log file {path!r} does not exist")
    creatives: list[Creative] = []
    seen: dict[tuple[str, str], str] = {}
    for where, key, entry in _json_entries(path):
        if isinstance(entry, DataError):
            bad("malformed_row", str(entry))
            continue
        if not isinstance(entry, dict):
            bad("malformed_row", f"{where}: a creative must be a JSON object, got {type(entry).__name__}")
            continue
        missing = [k for k in CAIG_JSON_KEYS if k not in entry]
        item_id = entry.get("item_id", str(key).split("_")[0] if key is not None else None)
        if missing or item_id in (None, ""):
            bad("malformed_row", f"{where}: missing key(s) {missing or ['item_id']}; a creative needs "
                f"creative_id, item_id, creative_image_hash, exp_impression_cnt, exp_click_cnt")
            continue
        counts = _check_counts(entry["exp_impression_cnt"], entry["exp_click_cnt"], where, bad)
        if counts is None:
            continue
        name = str(entry["creative_image_hash"])
        creative_id = str(entry.get("creative_id", name))
        dup = seen.get((str(item_id), creative_id))
        if dup is not None:
            bad("duplicate_creative", f"{where}: creative {creative_id!r} of item {item_id!r} already at {dup}")
            continue
        image = resolve_image(images_dir, name)
        if image is None:
            bad("missing_image", f"{where}: image {os.path.join(images_dir, os.path.basename(name))!r} does not exist")
            continue
        seen[(str(item_id), creative_id)] = where
        creatives.append(Creative(str(item_id), os.path.basename(name), image, counts[0], counts[1], where))
    return creatives


def split_by_item(
    creatives: Sequence[Creative], fractions: Mapping[str, float], seed: int = 0
) -> dict[str, list[Creative]]:
    """Assigns whole items to splits by a hash of (seed, item_id): stable under reordering and additions."""
    names = list(fractions)
    total = float(sum(fractions.values()))
    if total <= 0 or any(v < 0 for v in fractions.values()):
        raise ValueError(f"split fractions must be >= 0 with a positive sum, got {dict(fractions)}")
    bounds = np.cumsum([fractions[n] / total for n in names])
    out: dict[str, list[Creative]] = {n: [] for n in names}
    for c in creatives:
        h = hashlib.sha256(f"{seed}:{c.item_id}".encode()).digest()
        u = int.from_bytes(h[:8], "little") / 2**64
        out[names[min(int(np.searchsorted(bounds, u, side="right")), len(names) - 1)]].append(c)
    return out


def read_item_side_file(path: str, *, bad: BadData | None = None) -> dict[str, dict[str, Any]]:
    """Per-item caption/category/attributes. Returns {item_id: {"caption", "category", "attributes"}}.

    Accepts CAIG's products layout (a JSON list of `{"id" or "item_id", "new_caption" or "caption" or
    "title", "category"?, "attributes"?}`), an object `{item_id: {...}}`, or JSON lines of the list form.
    `attributes` may be an object or a string.
    """
    bad = bad or BadData()
    if not os.path.exists(path):
        raise DataError(f"item side file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
        rows = list(data.items()) if isinstance(data, dict) else [(None, r) for r in data]
        wheres = [f"{path}: key {k!r}" if k is not None else f"{path}: entry #{i}" for i, (k, _) in enumerate(rows)]
    except json.JSONDecodeError:
        rows, wheres = [], []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((None, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from e
                wheres.append(f"{path}:{lineno}")
    out: dict[str, dict[str, Any]] = {}
    for (key, row), where in zip(rows, wheres):
        if not isinstance(row, dict):
            bad("malformed_side_row", f"{where}: expected a JSON object, got {type(row).__name__}")
            continue
        item_id = key if key is not None else row.get("item_id", row.get("id"))
        caption = row.get("new_caption", row.get("caption", row.get("title", "")))
        if item_id in (None, "") or not isinstance(caption, str):
            bad("malformed_side_row", f"{where}: needs an id/item_id and a string new_caption/caption")
            continue
        attributes = row.get("attributes", {})
        if not isinstance(attributes, (dict, str)):
            bad("malformed_side_row", f"{where}: attributes must be an object or a string")
            continue
        out[str(item_id)] = {"caption": caption, "category": str(row.get("category", "")), "attributes": attributes}
    return out


def read_truth_file(path: str) -> dict[str, float]:
    """Simulation only: `image_name \\t true_ctr [\\t ...]` rows (header allowed) -> {image_name: ctr}."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.rstrip("\r\n").split("\t")
            if lineno == 1 and fields[0] == "image_name":
                continue
            if len(fields) < 2:
                raise DataError(f"{path}:{lineno}: expected image_name<TAB>true_ctr")
            try:
                out[fields[0]] = float(fields[1])
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: true_ctr {fields[1]!r} is not a number") from e
    return out


def load_rgb(path: str) -> np.ndarray:
    """Reads an ad image as uint8[H, W, 3]; transparency is composited over white (as CG4CTR does).

    Raises DataError naming the file when it cannot be decoded.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, im)
            return np.asarray(im.convert("RGB"), np.uint8)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"image {path!r} cannot be read: {e}") from e
