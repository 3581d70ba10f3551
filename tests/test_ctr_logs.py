"""CTR logs -> TFDS `ctr_logs` reward pairs: layouts, CAIG's rule, bad data, reruns, TF-free reading."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tests._data_fixtures import write_caig_json, write_logs

from caig_jax.data import ctr_logs as logs_lib
from caig_jax.data import loader
from caig_jax.data.builders import ctr_logs
from caig_jax.data.ctr_logs import DataError
from caig_jax.data.pairs import build_pairs

SIZE = 16


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cr"))
    info = write_logs(root, items=12, creatives=5)
    data_dir = os.path.join(root, "tfds")
    path, report = ctr_logs.build(data_dir, name="t", layout="creative_ranking", source=root,
                                  side_file=os.path.join(root, "items.json"), image_size=SIZE, min_ratio=1.02,
                                  max_ratio=1.5)
    return {"root": root, "data_dir": data_dir, "path": path, "report": report, **info}


def _all(source):
    return [source[i] for i in range(len(source))]


def _pair_key(ex):
    return (ex["item_id"].decode(), ex["left_id"].decode(), ex["right_id"].decode())


def test_creative_ranking_pairs_follow_caig_rule(logs):
    for split in ("train", "val", "test"):
        examples = _all(loader.reward_pair_source(logs["data_dir"], split, "t"))
        expected = build_pairs(logs["records"][split], min_ratio=1.02, max_ratio=1.5, seed=0)
        want = {(p["item_id"], p["left"], p["right"]) for p in expected}
        want_unordered = {(i, frozenset((a, b))) for i, a, b in want}
        got_unordered = {(k[0], frozenset(k[1:])) for k in map(_pair_key, examples)}
        assert got_unordered == want_unordered and len(examples) == len(expected) > 0
        assert logs["report"]["splits"][split]["pairs_kept"] == len(expected)
        for ex in examples:
            assert ex["label"] == (0 if ex["ctr"][0] > ex["ctr"][1] else 1)
            assert ex["clicks"][0] / ex["impressions"][0] == pytest.approx(ex["ctr"][0], rel=1e-6)
            # Daily rows are summed: impressions are the two days together (> one day's max of 3000).
            assert ex["impressions"].min() >= 800


def test_pair_images_are_left_right_concatenated_resized(logs):
    ex = loader.reward_pair_source(logs["data_dir"], "train", "t")[0]
    img = ex["image"]
    assert img.shape == (SIZE, 2 * SIZE, 3) and img.dtype == np.uint8
    left, right = ex["left_id"].decode(), ex["right_id"].decode()
    np.testing.assert_allclose(img[:, :SIZE].reshape(-1, 3).mean(0), logs["colours"][left], atol=1.5)
    np.testing.assert_allclose(img[:, SIZE:].reshape(-1, 3).mean(0), logs["colours"][right], atol=1.5)


def test_side_file_and_split_by_item(logs):
    seen = {}
    for split in ("train", "val", "test"):
        for ex in _all(loader.reward_pair_source(logs["data_dir"], split, "t")):
            item = ex["item_id"].decode()
            assert seen.setdefault(item, split) == split  # no item in two splits
            assert ex["caption"].decode() == f"product {int(item[2:])}"
            assert ex["category"].decode() == f"cat{int(item[2:]) % 3}"
            assert json.loads(ex["attributes"]) == {"price": str(10 + int(item[2:]))}
            assert np.isnan(ex["true_ctr"]).all()  # real logs: no truth


def test_rerun_reuses_and_other_options_need_overwrite(logs):
    mtime = os.path.getmtime(os.path.join(logs["path"], "dataset_info.json"))
    path, report = ctr_logs.build(logs["data_dir"], name="t", layout="creative_ranking", source=logs["root"],
                                  side_file=os.path.join(logs["root"], "items.json"), image_size=SIZE,
                                  min_ratio=1.02, max_ratio=1.5)
    assert path == logs["path"] and report == logs["report"]
    assert os.path.getmtime(os.path.join(path, "dataset_info.json")) == mtime
    with pytest.raises(DataError, match="other options.*image_size: 16 -> 8"):
        ctr_logs.build(logs["data_dir"], name="t", layout="creative_ranking", source=logs["root"],
                       side_file=os.path.join(logs["root"], "items.json"), image_size=8, min_ratio=1.02, max_ratio=1.5)


def test_changed_inputs_stop_naming_the_file_or_rebuild_with_overwrite(tmp_path):
    """Input fingerprints: an edited CTR-log row is never reused silently; unchanged (even touched) files are."""
    root = str(tmp_path / "logs")
    write_logs(root, items=3, creatives=3)
    opts = dict(name="t", layout="creative_ranking", source=root, image_size=SIZE, min_ratio=1.0001, max_ratio=100.0)
    data_dir = str(tmp_path / "tfds")
    path, report = ctr_logs.build(data_dir, **opts)
    info = os.path.join(path, "dataset_info.json")
    mtime = os.path.getmtime(info)
    train_list = os.path.join(root, "list", "train_data_list.txt")
    os.utime(train_list)  # touched, same content: reused
    assert ctr_logs.build(data_dir, **opts) == (path, report) and os.path.getmtime(info) == mtime

    lines = open(train_list).read().splitlines()
    item, name, date, imp, clk = lines[0].split("\t")
    lines[0] = "\t".join([item, name, date, imp, str(int(clk) + 1)])  # same size when clicks keep their digits
    with open(train_list, "w") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{path} was built from input files that have changed since: "
                       rf"{train_list} \((content changed|size)") as e:
        ctr_logs.build(data_dir, **opts)
    assert "overwrite=True" in e.value.fix and os.path.getmtime(info) == mtime
    with pytest.raises(DataError) as e:
        ctr_logs.build(data_dir, overwrite_hint="--config.build.overwrite=True", **opts)
    assert e.value.fix.startswith("rebuild it from the current files with --config.build.overwrite=True")

    _, rebuilt = ctr_logs.build(data_dir, overwrite=True, **opts)  # rebuilt from the edited file
    assert rebuilt["splits"]["train"] != report["splits"]["train"] or os.path.getmtime(info) != mtime
    assert ctr_logs.build(data_dir, **opts)[1] == rebuilt  # and now reused

    os.remove(os.path.join(root, "images", "it001_2.png"))  # an input image deleted
    with pytest.raises(DataError, match=r"it001_2\.png \(deleted\)"):
        ctr_logs.build(data_dir, **opts)
    open(os.path.join(root, "list", "val_data_list.txt"), "w").close()  # and a rebuild reads the file anew
    lines[0] = "\t".join([item, name, date, imp, "not a number"])
    with open(train_list, "w") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{train_list}:1: .*whole numbers"):
        ctr_logs.build(data_dir, overwrite=True, **opts)


def test_interrupted_build_reruns_to_the_same_dataset(tmp_path, monkeypatch):
    root = str(tmp_path / "logs")
    write_logs(root, items=9, creatives=5, seed=3)
    opts = dict(layout="creative_ranking", source=root, image_size=SIZE, min_ratio=1.02, max_ratio=1.5)
    clean_path, _ = ctr_logs.build(str(tmp_path / "clean"), **opts)

    calls = {"n": 0}
    real = logs_lib.load_rgb

    def flaky(path):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt("simulated interruption half-way through the build")
        return real(path)

    monkeypatch.setattr(logs_lib, "load_rgb", flaky)
    data_dir = str(tmp_path / "again")
    with pytest.raises(KeyboardInterrupt):
        ctr_logs.build(data_dir, **opts)
    assert not os.path.exists(os.path.join(data_dir, "ctr_logs", "default", "1.0.0", "dataset_info.json"))
    monkeypatch.setattr(logs_lib, "load_rgb", real)
    path, _ = ctr_logs.build(data_dir, **opts)
    for split in ("train", "val", "test"):
        a = _all(loader.reward_pair_source(clean_path, split))
        b = _all(loader.reward_pair_source(path, split))
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for k in x:
                np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]))
    assert not [d for d in os.listdir(os.path.join(data_dir, "ctr_logs", "default")) if d.startswith("incomplete")]


def _append(path, text):
    with open(path, "a") as f:
        f.write(text)


@pytest.mark.parametrize(
    "row, reason, match",
    [
        ("it000\tit000_0.png\t20240103\t100\n", "malformed_row", "expected 5 tab-separated fields"),
        ("it000\tit000_0.png\t20240103\tmany\t3\n", "malformed_count", "whole numbers"),
        ("it000\tit000_0.png\t20240103\t-100\t3\n", "negative_count", ">= 0"),
        ("it000\tit000_0.png\t20240103\t100\t300\n", "clicks_gt_impressions", "clicks=300 > impressions=100"),
        ("it000\tnope.png\t20240103\t5000\t100\n", "missing_image", "nope.png.*does not exist"),
        ("it001\tit001_0.png\t20240103\t5000\t100\n", "item_in_two_splits", "also in split 'train'"),
    ],
)
def test_bad_rows_stop_with_file_and_line_or_are_skipped_and_counted(tmp_path, row, reason, match):
    root = str(tmp_path / "logs")
    write_logs(root, items=3, creatives=3)  # it000 -> train, it001 -> val, it002 -> test
    # Every bad row goes into train's list; it001 belongs to val, so its row there puts it in two splits.
    target = os.path.join(root, "list", "train_data_list.txt")
    _append(target, row)
    n_lines = sum(1 for _ in open(target))
    with pytest.raises(DataError, match=match) as e:
        logs_lib.read_creative_ranking(root)
    if reason == "item_in_two_splits":
        assert "val_data_list.txt" in str(e.value)
    else:
        assert f"{target}:{n_lines}" in str(e.value)
    bad = logs_lib.BadData("skip")
    by_split = logs_lib.read_creative_ranking(root, bad=bad)
    assert bad.counts == {reason: 1}
    # 3 items x 3 creatives; a two-split item stays in the split read first (train gets it001's extra row
    # as a creative of its own, val loses it001).
    assert sum(len(v) for v in by_split.values()) == (7 if reason == "item_in_two_splits" else 9)


def test_unreadable_image_names_the_file(tmp_path):
    root = str(tmp_path / "logs")
    write_logs(root, items=3, creatives=4)
    broken = os.path.join(root, "images", "it000_1.png")
    with open(broken, "wb") as f:
        f.write(b"\x89PNG broken")
    opts = dict(layout="creative_ranking", source=root, image_size=SIZE, min_ratio=1.0001, max_ratio=100.0)
    with pytest.raises(DataError, match=r"it000_1\.png.*cannot be read.*train_data_list\.txt:\d+"):
        ctr_logs.build(str(tmp_path / "a"), **opts)
    path, report = ctr_logs.build(str(tmp_path / "b"), on_bad="skip", **opts)
    assert report["bad_data"]["skipped"] == {"unreadable_image": 1}
    train = report["splits"]["train"]
    assert train["pairs_dropped_unreadable_image"] == 3  # it000_1 paired with its 3 siblings
    assert len(loader.reward_pair_source(path, "train")) == train["pairs_kept"] - 3 == train["pairs_written"]


def test_caig_json_layout_and_hash_split(tmp_path):
    path = str(tmp_path / "train.json")
    records = write_caig_json(path, str(tmp_path / "images"), items=20, creatives=4)
    creatives = logs_lib.read_caig_json(path, str(tmp_path / "images"))
    assert [(c.item_id, c.name, c.impressions, c.clicks) for c in creatives] == [
        (r["item_id"], r["image"], r["impressions"], r["clicks"]) for r in records]
    fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
    split = logs_lib.split_by_item(creatives, fractions, seed=0)
    owners = {c.item_id: s for s, cs in split.items() for c in cs}
    assert all(owners[c.item_id] == s for s, cs in split.items() for c in cs)
    assert {s: sorted({c.item_id for c in cs}) for s, cs in split.items()} == {
        s: sorted({c.item_id for c in cs}) for s, cs in logs_lib.split_by_item(creatives[::-1], fractions, 0).items()}
    assert all(len(v) > 0 for v in split.values())

    data_dir = str(tmp_path / "tfds")
    out, report = ctr_logs.build(data_dir, layout="caig_json", source=path, image_size=SIZE, min_ratio=1.01,
                                 max_ratio=2.0, split_fractions=fractions)
    total = sum(r["pairs_written"] for r in report["splits"].values())
    assert total == len(build_pairs(records, min_ratio=1.01, max_ratio=2.0)) > 0
    # One file per split works too, and an item in two files is bad data.
    other = str(tmp_path / "test.json")
    with open(path) as f:
        data = json.load(f)
    with open(other, "w") as f:
        json.dump({k: v for k, v in list(data.items())[:2]}, f)
    with pytest.raises(DataError, match="also in split"):
        ctr_logs.build(str(tmp_path / "tfds2"), layout="caig_json", json_files={"train": path, "test": other},
                       image_size=SIZE, images_dir=str(tmp_path / "images"))


def test_caig_json_bad_entries(tmp_path):
    images = tmp_path / "images"
    path = str(tmp_path / "x.json")
    write_caig_json(path, str(images), items=2, creatives=2)
    with open(path) as f:
        data = json.load(f)
    data["1000_sol"][1]["exp_click_cnt"] = 10**9
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(DataError, match=r"x\.json: key '1000_sol', creative #1: clicks=1000000000 > impressions"):
        logs_lib.read_caig_json(path, str(images))
    bad = logs_lib.BadData("skip")
    assert len(logs_lib.read_caig_json(path, str(images), bad=bad)) == 3 and bad.counts == {"clicks_gt_impressions": 1}


def test_reading_never_imports_tensorflow(logs):
    code = (
        "import sys\n"
        "from caig_jax.data import loader\n"
        f"src = loader.reward_pair_source({logs['data_dir']!r}, 'train', 't')\n"
        "b = next(loader.reward_batches(src, 2, shard_index=0, shard_count=1))\n"
        "assert b['image'].shape[0] == 2\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        "try:\n    import tensorflow\nexcept ImportError:\n    print('NO_TF')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "NO_TF" in out.stdout  # TensorFlow is not even installed in this environment
