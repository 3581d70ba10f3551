"""Small CTR-log folders written by the data tests themselves (CreativeRanking and CAIG JSON layouts)."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image


def colour(k: int) -> tuple[int, int, int]:
    """A distinct solid colour per creative index, to check which image landed where."""
    return ((37 * k) % 256, (91 * k + 50) % 256, (53 * k + 100) % 256)


def write_logs(root: str, *, items: int = 12, creatives: int = 5, seed: int = 0, size: int = 20,
               splits=("train", "val", "test")) -> dict:
    """Writes ROOT/list/{split}_data_list.txt (2 daily rows per creative) + ROOT/images + ROOT/items.json.

    Returns {"records": {split: [aggregated record dicts]}, "colours": {image_name: rgb}}.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "list"), exist_ok=True)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    records = {s: [] for s in splits}
    colours, side = {}, []
    k = 0
    for i in range(items):
        split = splits[i % len(splits)]
        item = f"it{i:03d}"
        side.append({"id": item, "new_caption": f"product {i}", "category": f"cat{i % 3}",
                     "attributes": {"price": str(10 + i)}})
        lines = []
        for j in range(creatives):
            name = f"{item}_{j}.png"
            c = colour(k)
            k += 1
            colours[name] = c
            Image.fromarray(np.full((size, size + 4, 3), c, np.uint8)).save(os.path.join(root, "images", name))
            day1, day2 = int(rng.integers(400, 3000)), int(rng.integers(400, 3000))
            p = rng.uniform(0.02, 0.04)
            c1, c2 = int(rng.binomial(day1, p)), int(rng.binomial(day2, p))
            lines += [f"{item}\t{name}\t20240101\t{day1}\t{c1}", f"{item}\t{name}\t20240102\t{day2}\t{c2}"]
            records[split].append({"item_id": item, "image": name, "impressions": day1 + day2, "clicks": c1 + c2})
        with open(os.path.join(root, "list", f"{split}_data_list.txt"), "a") as f:
            f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "items.json"), "w") as f:
        json.dump(side, f)
    return {"records": records, "colours": colours}


def write_caig_json(path: str, images_dir: str, *, items: int = 10, creatives: int = 4, seed: int = 0) -> list[dict]:
    """CAIG's JSON layout: {"<item>_<n>": [creative, ...]}; images named by their hash (no extension)."""
    rng = np.random.default_rng(seed)
    os.makedirs(images_dir, exist_ok=True)
    data, flat = {}, []
    for i in range(items):
        item = f"{1000 + i}"
        lst = []
        for j in range(creatives):
            h = f"hash{i:03d}{j}"
            Image.fromarray(np.full((12, 12, 3), colour(i * 10 + j), np.uint8)).save(os.path.join(images_dir, h + ".jpg"))
            imp = int(rng.integers(1500, 6000))
            clk = int(rng.binomial(imp, rng.uniform(0.02, 0.04)))
            lst.append({"creative_id": f"c{i}_{j}", "item_id": item, "creative_image_hash": f"https://x/{h}",
                        "exp_impression_cnt": imp, "exp_click_cnt": clk})
            flat.append({"item_id": item, "image": h, "impressions": imp, "clicks": clk})  # the name as logged
        data[f"{item}_sol"] = lst
    with open(path, "w") as f:
        json.dump(data, f)
    return flat
