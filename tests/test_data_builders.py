"""TFDS builders `llava_conversations` and `products` on data the test writes."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from caig_jax.data import loader
from caig_jax.data.builders import llava_conversations, products
from caig_jax.data.ctr_logs import DataError


def _conv(i, image=True, q="Describe the product."):
    entry = {"id": f"e{i}", "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + q},
                                              {"from": "gpt", "value": f"answer {i}"}]}
    if image:
        entry["image"] = f"imgs/{i % 2}.png"
    return entry


@pytest.fixture()
def conv_dir(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.full((6, 8, 3), 10, np.uint8)).save(tmp_path / "imgs" / "0.png")
    rgba = np.full((6, 8, 4), 200, np.uint8)
    rgba[:, :4, 3] = 255  # left half opaque, right half 200/255 opaque
    Image.fromarray(rgba, "RGBA").save(tmp_path / "imgs" / "1.png")
    return tmp_path


def test_llava_conversations_round_trip(conv_dir):
    train = conv_dir / "train.json"
    train.write_text(json.dumps([_conv(i) for i in range(5)] + [_conv(9, image=False, q="Say hi.")]))
    val = conv_dir / "val.json"
    val.write_text(json.dumps([_conv(20 + i) for i in range(2)]))
    data_dir = str(conv_dir / "tfds")
    _, report = llava_conversations.build(data_dir, files={"train": str(train), "val": [str(val)]})
    assert report["examples"] == {"train": 6, "val": 2}
    src = loader.conversation_source(data_dir, "train")
    by_id = {src[i]["id"].decode(): src[i] for i in range(len(src))}
    ex = by_id["e1"]
    assert ex["image"].shape == (6, 8, 3) and ex["has_image"]
    # RGBA is composited over white, as CG4CTR does: opaque pixels keep their colour.
    np.testing.assert_array_equal(ex["image"][:, :4], 200)
    np.testing.assert_array_equal(ex["image"][:, 4:], round(200 * 200 / 255 + 255 * 55 / 255))
    assert [x.decode() for x in ex["conversations"]["from"]] == ["human", "gpt"]
    assert ex["conversations"]["value"][1].decode() == "answer 1"
    assert not by_id["e9"]["has_image"] and by_id["e9"]["image"].shape == (1, 1, 3)


@pytest.mark.parametrize(
    "mutate, reason, match",
    [
        (lambda e: e["conversations"].reverse(), "malformed_conversation", "turn 0 is from 'gpt'"),
        (lambda e: e["conversations"][0].update(value="no token"), "malformed_conversation", "exactly one <image>"),
        (lambda e: e.update(image="imgs/none.png"), "missing_image", "none.png.*does not exist"),
        (lambda e: e.update(id="e0"), "duplicate_id", "id 'e0' already used"),
    ],
)
def test_llava_conversations_bad_entries(conv_dir, mutate, reason, match):
    entries = [_conv(i) for i in range(3)]
    mutate(entries[2])
    path = conv_dir / "c.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(DataError, match=rf"c\.json: entry #2.*{match}"):
        llava_conversations.build(str(conv_dir / "a"), files={"train": str(path)})
    _, report = llava_conversations.build(str(conv_dir / "b"), files={"train": str(path)}, on_bad="skip")
    assert report["bad_data"]["skipped"] == {reason: 1} and report["examples"] == {"train": 2}


def _cutout(k):
    rgba = np.zeros((14, 16, 4), np.uint8)
    rgba[2:12, 3:13] = (k, 50, 60, 255)  # a 10x10 product: over data.product.MIN_CUTOUT_SIZE
    return rgba


def test_products_tiny_json_layout(tmp_path):
    (tmp_path / "images").mkdir()
    entries = []
    for k in range(4):
        Image.fromarray(_cutout(k), "RGBA").save(tmp_path / "images" / f"p{k}.png")
        entry = {"id": f"p{k}", "image": f"images/p{k}.png", "new_caption": f"title {k}"}
        if k % 2:
            entry.update(category="mug", attributes={"price": "9.99"}, split="test")
        entries.append(entry)
    source = tmp_path / "tiny.json"
    source.write_text(json.dumps(entries))
    data_dir = str(tmp_path / "tfds")
    _, report = products.build(data_dir, source=str(source))
    assert report["examples"] == {"train": 2, "test": 2}
    test = loader.product_source(data_dir, "test")
    ex = {test[i]["id"].decode(): test[i] for i in range(len(test))}["p3"]
    np.testing.assert_array_equal(ex["image"], _cutout(3))
    assert ex["caption"].decode() == "title 3" and ex["category"].decode() == "mug"
    assert json.loads(ex["attributes"]) == {"price": "9.99"}


def test_products_bad_images(tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(_cutout(0), "RGBA").save(tmp_path / "images" / "ok.png")
    Image.fromarray(_cutout(0)[..., :3]).save(tmp_path / "images" / "rgb.png")
    source = tmp_path / "tiny.json"
    source.write_text(json.dumps([
        {"id": "a", "image": "images/ok.png", "new_caption": "fine"},
        {"id": "b", "image": "images/rgb.png", "new_caption": "no alpha"},
    ]))
    with pytest.raises(DataError, match=r"tiny\.json: entry #1.*rgb\.png.*no alpha"):
        products.build(str(tmp_path / "x"), source=str(source))
    _, report = products.build(str(tmp_path / "y"), source=str(source), on_bad="skip")
    assert report["bad_data"]["skipped"] == {"bad_image": 1} and report["examples"] == {"train": 1}
    assert os.path.exists(os.path.join(tmp_path, "y", "products", "default", "1.0.0", "dataset_info.json"))
