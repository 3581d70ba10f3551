"""`caig_jax.models.llava.generate`: greedy tokens equal transformers' `generate(do_sample=False)` (left-padded
prompts of different lengths, EOS then padding), sampling is deterministic per seed and per example, the batch
is padded to and sharded over the mesh, and same-shape calls reuse the compiled program."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from caig_jax import parallel
from caig_jax.models.llava import read_llava_config
from caig_jax.models import llava
from caig_jax.models.llama import sample_logits
from tests._llava_fixtures import NEXT_SIZES, llava_next_torch, llava_torch, next_pixel_values, prompt_batch

NEW = 6


@pytest.fixture(scope="module")
def next_case(tmp_path_factory):
    ref_model = llava_next_torch(seed=5)
    folder = tmp_path_factory.mktemp("gen_next")
    ref_model.save_pretrained(folder)
    ours = llava.from_pretrained(str(folder))
    counts = [ours.config.num_image_features(s) for s in NEXT_SIZES]
    ids, mask = prompt_batch(counts, extra_lengths=[4, 1], seed=5)
    inputs = dict(
        input_ids=ids,
        pixel_values=next_pixel_values(2, ours.config.max_patches, seed=5),
        image_sizes=NEXT_SIZES,
        attention_mask=mask,
    )
    return ref_model, str(folder), ours, inputs


def _hf_generate(model, inputs, *, eos, pad, new=NEW):
    kw = {k: torch.tensor(v) for k, v in inputs.items() if v is not None}
    with torch.no_grad():
        out = model.generate(**kw, max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    out = out[:, inputs["input_ids"].shape[1] :].numpy()
    # transformers stops once every row is done; we always return max_new_tokens columns.
    return np.pad(out, ((0, 0), (0, new - out.shape[1])), constant_values=pad)


def test_greedy_equals_transformers_with_left_padding(next_case):
    ref_model, _, ours, inputs = next_case
    got = np.asarray(llava.generate(ours, **inputs, max_new_tokens=NEW))
    assert got.shape == (2, NEW) and got.dtype == np.int32
    ref = _hf_generate(ref_model, inputs, eos=list(ours.config.eos_token_ids), pad=ours.config.pad_token_id)
    np.testing.assert_array_equal(got, ref)


def test_greedy_stops_at_eos_and_pads_like_transformers(next_case):
    ref_model, _, ours, inputs = next_case
    free = np.asarray(llava.generate(ours, **inputs, max_new_tokens=NEW))
    eos = int(free[0, 2])  # make row 0's third token an EOS
    assert eos not in free[1, :3], "pick a seed whose rows differ early"
    before = llava._generate_jit._cache_size()
    got = np.asarray(llava.generate(ours, **inputs, max_new_tokens=NEW, eos_token_ids=[eos, 2], pad_token_id=0))
    assert llava._generate_jit._cache_size() == before  # EOS / pad are data, not part of the program
    assert got[0, 2] == eos and (got[0, 3:] == 0).all()
    np.testing.assert_array_equal(got, _hf_generate(ref_model, inputs, eos=[eos, 2], pad=0))


def test_eos_and_pad_come_from_generation_config(next_case, tmp_path):
    _, folder, _, _ = next_case
    path = str(tmp_path / "eos")
    shutil.copytree(folder, path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [7, 2], "pad_token_id": 3, "bos_token_id": 1}, f)
    config, _ = read_llava_config(path)
    assert config.eos_token_ids == (7, 2) and config.pad_token_id == 3
    os.remove(os.path.join(path, "generation_config.json"))
    config, _ = read_llava_config(path)
    # No pad id anywhere: transformers' generate pads with the (first) EOS id.
    assert config.eos_token_ids == (2,) and config.pad_token_id == 2


def test_llava_15_greedy_equals_transformers(tmp_path):
    ref_model = llava_torch(seed=6)
    ref_model.save_pretrained(tmp_path)
    ours = llava.from_pretrained(str(tmp_path))
    ids, mask = prompt_batch([4, 4, 4], extra_lengths=[3, 0, 6], seed=6)
    pixels = np.random.default_rng(6).standard_normal((3, 3, 28, 28)).astype(np.float32)
    inputs = dict(input_ids=ids, pixel_values=pixels, attention_mask=mask)
    got = np.asarray(llava.generate(ours, **inputs, max_new_tokens=NEW))
    ref = _hf_generate(ref_model, inputs, eos=list(ours.config.eos_token_ids), pad=ours.config.pad_token_id)
    np.testing.assert_array_equal(got, ref)


def test_sampling_is_deterministic_per_seed_and_mesh_independent(next_case):
    _, folder, ours, inputs = next_case
    kw = dict(max_new_tokens=NEW, temperature=1.5, top_p=0.95)
    a = np.asarray(llava.generate(ours, **inputs, seed=1, **kw))
    b = np.asarray(llava.generate(ours, **inputs, seed=1, **kw))
    c = np.asarray(llava.generate(ours, **inputs, seed=2, **kw))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    # A tiny nucleus keeps only the most likely token: sampling degenerates to greedy.
    greedy = np.asarray(llava.generate(ours, **inputs, max_new_tokens=NEW))
    nucleus = np.asarray(llava.generate(ours, **inputs, max_new_tokens=NEW, temperature=1.0, top_p=1e-6, seed=3))
    np.testing.assert_array_equal(nucleus, greedy)
    # Batch of 3 on an 8-way batch mesh (padded internally), parameters sharded fsdp x tensor elsewhere.
    triple = {k: np.concatenate([v, v[:1]]) for k, v in inputs.items()}
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = llava.from_pretrained(folder, mesh=mesh)
    out = llava.generate(sharded, **triple, seed=1, **kw)
    assert out.shape == (3, NEW)
    out = np.asarray(out)
    np.testing.assert_array_equal(out[:2], a)  # per-example streams: rows 0-1 unchanged by the extra row
    # Row 2 repeats row 0's prompt but is example 2: its own stream.
    greedy3 = np.asarray(llava.generate(sharded, **triple, max_new_tokens=NEW))
    np.testing.assert_array_equal(greedy3[:2], greedy)
    np.testing.assert_array_equal(greedy3[2], greedy[0])


def test_same_shapes_do_not_recompile(next_case):
    _, _, ours, inputs = next_case
    llava.generate(ours, **inputs, max_new_tokens=NEW, seed=0)
    before = llava._generate_jit._cache_size()
    other = dict(inputs, input_ids=np.where(inputs["input_ids"] == 5, 6, inputs["input_ids"]))
    llava.generate(ours, **other, max_new_tokens=NEW, seed=7, temperature=0.7, top_p=0.5)
    assert llava._generate_jit._cache_size() == before


def test_sample_logits_distribution_and_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    keys = jax.random.split(jax.random.key(0), 4000)

    @jax.jit
    def frequencies(temperature, top_p):
        draw = jax.vmap(lambda k: sample_logits(logits, k[None], temperature=temperature, top_p=top_p)[0])(keys)
        return jnp.bincount(draw, length=4) / keys.shape[0]

    np.testing.assert_allclose(frequencies(1.0, 1.0), [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # top_p 0.7: the nucleus is {0, 1} (0.5 + 0.3 >= 0.7), renormalised to 5/8, 3/8.
    freq = np.asarray(frequencies(1.0, 0.7))
    assert freq[2] == freq[3] == 0
    np.testing.assert_allclose(freq[:2], [0.625, 0.375], atol=0.03)
    # Temperature 0 is greedy whatever the nucleus.
    np.testing.assert_array_equal(frequencies(0.0, 0.1), [1.0, 0.0, 0.0, 0.0])
