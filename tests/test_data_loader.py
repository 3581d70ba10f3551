"""caig_jax.data.loader: grain batches of reward pairs; determinism, checkpointable position, shards."""

import os

import numpy as np
import pytest

from caig_jax.data import loader
from caig_jax.data.builders import ctr_logs
from tests._data_fixtures import write_logs

SIZE = 16


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("loader"))
    write_logs(root, items=18, creatives=5, splits=("train",))
    data_dir = os.path.join(root, "tfds")
    ctr_logs.build(data_dir, layout="creative_ranking", source=root, image_size=SIZE, min_ratio=1.0001,
                   max_ratio=100.0)
    src = loader.reward_pair_source(data_dir, "train")
    assert len(src) >= 100
    return src


def _batches(src, n, **kw):
    it = loader.reward_batches(src, **{"batch_size": 8, "shard_index": 0, "shard_count": 1, **kw})
    return [next(it) for _ in range(n)]


def test_batch_keys_shapes_dtypes(source):
    (b,) = _batches(source, 1, image_size=12)
    assert b["image"].shape == (8, 12, 24, 3) and b["image"].dtype == np.uint8
    assert b["label"].shape == (8,) and b["label"].dtype == np.int32
    assert b["ctr"].shape == (8, 2) and b["ctr"].dtype == np.float32
    assert b["true_ctr"].shape == (8, 2) and b["impressions"].shape == (8, 2)
    for key in ("item_id", "caption", "category", "attributes", "left_id", "right_id"):
        assert isinstance(b[key], list) and len(b[key]) == 8 and all(isinstance(x, str) for x in b[key])
    np.testing.assert_array_equal(b["label"], (b["ctr"][:, 1] > b["ctr"][:, 0]).astype(np.int32))
    # Each half is the stored half resized on its own (the left image never bleeds into the right).
    for row, index in enumerate(b["index"]):
        stored = source[int(index)]["image"]
        np.testing.assert_allclose(b["image"][row, :, :12].mean((0, 1)), stored[:, :SIZE].mean((0, 1)), atol=1.0)
        np.testing.assert_allclose(b["image"][row, :, 12:].mean((0, 1)), stored[:, SIZE:].mean((0, 1)), atol=1.0)
    (full,) = _batches(source, 1)
    assert full["image"].shape == (8, SIZE, 2 * SIZE, 3)


def test_in_memory_source_gives_the_same_batches_and_reads_each_example_once(source):
    """Batches from `InMemoryPairSource` equal the plain source's (resize, flips, labels); a second pass over it
    (another epoch, another run) reads nothing from the dataset; cached arrays cannot be modified."""

    class Counting:
        def __init__(self, src):
            self.src, self.reads = src, 0

        def __len__(self):
            return len(self.src)

        def __getitem__(self, i):
            self.reads += 1
            return self.src[i]

    counting = Counting(source)
    cached = loader.InMemoryPairSource(counting, image_size=12)
    n = -(-len(source) // 8)  # one epoch
    for plain, mem in zip(_batches(source, n, image_size=12, random_flip=True, seed=4),
                          _batches(cached, n, image_size=12, random_flip=True, seed=4)):
        for key in plain:
            np.testing.assert_array_equal(np.asarray(plain[key]), np.asarray(mem[key]), err_msg=key)
    first = counting.reads
    assert len(source) <= first
    _batches(cached, n, image_size=12, random_flip=True, seed=5)
    assert counting.reads == first
    with pytest.raises(ValueError, match="read-only"):
        cached[0]["image"][0, 0, 0] = 0


def test_deterministic_and_seeded(source):
    a, b, c = _batches(source, 3, seed=1), _batches(source, 3, seed=1), _batches(source, 3, seed=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        assert x["item_id"] == y["item_id"]
    assert not all(np.array_equal(x["index"], z["index"]) for x, z in zip(a, c))


def test_state_save_and_restore_resumes_exactly(source):
    it = loader.reward_batches(source, 8, seed=3, shard_index=0, shard_count=1)
    for _ in range(5):
        next(it)
    state = it.get_state()
    assert state == {"position": 5, "seed": 3, "batch_size": 8, "shard_index": 0, "shard_count": 1}
    expected = [next(it) for _ in range(4)]
    fresh = loader.reward_batches(source, 8, seed=3, shard_index=0, shard_count=1)
    fresh.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(fresh)["index"], e["index"])
    # start_index is the same as restoring a position.
    started = loader.reward_batches(source, 8, seed=3, start_index=5, shard_index=0, shard_count=1)
    np.testing.assert_array_equal(next(started)["index"], expected[0]["index"])
    with pytest.raises(ValueError, match="seed=3"):
        loader.reward_batches(source, 8, seed=4, shard_index=0, shard_count=1).set_state(state)


def test_epochs_cover_everything_and_reshuffle(source):
    n = len(source)
    it = loader.reward_batches(source, 1, seed=0, num_epochs=2, drop_remainder=False, shard_index=0, shard_count=1)
    order = [int(b["index"][0]) for b in it]
    assert len(order) == 2 * n
    assert sorted(order[:n]) == list(range(n)) == sorted(order[n:])
    assert order[:n] != order[n:]
    unshuffled = loader.reward_batches(source, 7, shuffle=False, num_epochs=1, drop_remainder=False,
                                       shard_index=0, shard_count=1)
    assert np.concatenate([b["index"] for b in unshuffled]).tolist() == list(range(n))


def test_process_shards_are_disjoint(source):
    n = len(source)
    # Training: equal shards (same number of steps on every host), disjoint.
    train = [loader.reward_batches(source, 4, num_epochs=1, shard_index=i, shard_count=3) for i in range(3)]
    seen = [set(np.concatenate([b["index"] for b in it]).tolist()) for it in train]
    assert len({it.shard_size for it in train}) == 1 and train[0].shard_size == n // 3
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    # Evaluation: strided shards cover every example exactly once.
    ev = [loader.reward_batches(source, 4, shuffle=False, num_epochs=1, drop_remainder=False, shard_index=i,
                                shard_count=3) for i in range(3)]
    indices = [np.concatenate([b["index"] for b in it]) for it in ev]
    assert sorted(np.concatenate(indices).tolist()) == list(range(n))


def test_random_flip_swaps_halves_label_and_ctrs_consistently(source):
    (plain,) = _batches(source, 1, seed=5)
    (flipped,) = _batches(source, 1, seed=5, random_flip=True)
    np.testing.assert_array_equal(plain["index"], flipped["index"])
    swapped = plain["label"] != flipped["label"]
    assert swapped.any() and not swapped.all()
    for r in range(8):
        if swapped[r]:
            np.testing.assert_array_equal(flipped["image"][r, :, :SIZE], plain["image"][r, :, SIZE:])
            np.testing.assert_array_equal(flipped["ctr"][r], plain["ctr"][r, ::-1])
            assert flipped["left_id"][r] == plain["right_id"][r]
        else:
            np.testing.assert_array_equal(flipped["image"][r], plain["image"][r])
    np.testing.assert_array_equal(flipped["label"], (flipped["ctr"][:, 1] > flipped["ctr"][:, 0]).astype(np.int32))
