"""Llama decoder against transformers' LlamaForCausalLM (float32, tolerance `_llava_fixtures.TOL`): GQA,
untied / tied heads, default / linear / llama3 RoPE, left padding, and KV-cache decoding == full forward; the
cache-free parity tests run with the layers unrolled and scanned (`scan_layers`)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

from caig_jax.convert.llava import load_llama
from caig_jax.models.llama import positions_from_mask
from tests._llava_fixtures import TEXT, TOL, rel_err

CASES = {
    "gqa_untied": dict(),
    "tied_llama3_rope": dict(
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "linear_rope_mha": dict(num_key_value_heads=4, rope_scaling=dict(rope_type="linear", factor=4.0)),
}


def _save(tmp_path_factory, name, **overrides):
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**TEXT, **overrides})
    model = LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    return model, str(folder)


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 200, (2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding
    return ids, mask


def _with_scan(model, scan: bool):
    model.config = dataclasses.replace(model.config, scan_layers=scan)
    return model


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path_factory, case, scan):
    ref_model, folder = _save(tmp_path_factory, case, **CASES[case])
    ours = _with_scan(load_llama(folder), scan)
    assert (ours.lm_head is None) == bool(CASES[case].get("tie_word_embeddings"))
    assert ours.config.rope_type == CASES[case].get("rope_scaling", {}).get("rope_type", "default")
    ids, mask = _batch()
    # transformers' generate-style positions for left padding (its plain forward would count the pads).
    pos = np.asarray(positions_from_mask(jnp.asarray(mask)))
    with torch.no_grad():
        ref = ref_model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)
        ).logits.numpy()
    got = np.asarray(nnx.jit(lambda m, i, a: m(i, a))(ours, ids, mask))
    assert got.shape == (2, 12, 200) and got.dtype == np.float32
    assert rel_err(got, ref, mask) < TOL


def test_kv_cache_decoding_equals_full_forward(tmp_path_factory):
    _, folder = _save(tmp_path_factory, "cache")
    model = load_llama(folder)
    ids, mask = _batch()
    full = np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, ids, mask))

    prefix = 9
    pos = positions_from_mask(jnp.asarray(mask))

    @nnx.jit
    def prefill(m, ids, kv_mask):
        cache = m.init_cache(ids.shape[0], mask.shape[1])
        hidden, cache = m.decode(m.embed(ids), positions=pos[:, :prefix], kv_mask=kv_mask, cache=cache, cache_index=0)
        return m.logits(hidden), cache

    @nnx.jit
    def step(m, token, position, kv_mask, cache, index):
        hidden, cache = m.decode(m.embed(token), positions=position, kv_mask=kv_mask, cache=cache, cache_index=index)
        return m.logits(hidden), cache

    kv_mask = jnp.concatenate([mask[:, :prefix], np.zeros_like(mask[:, prefix:])], axis=1)
    logits, cache = prefill(model, jnp.asarray(ids[:, :prefix]), kv_mask)
    outs = [logits]
    for t in range(prefix, ids.shape[1]):  # one compiled step, reused
        kv_mask = kv_mask.at[:, t].set(1)
        logits, cache = step(model, jnp.asarray(ids[:, t : t + 1]), pos[:, t : t + 1], kv_mask, cache, jnp.int32(t))
        outs.append(logits)
    got = np.concatenate([np.asarray(o) for o in outs], axis=1)
    assert rel_err(got, full, mask) < TOL


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_query_index_computes_only_those_rows_of_the_last_layer(tmp_path_factory, scan):
    """decode(query_index=...) (what the reward head uses) equals the full decode read at those rows."""
    _, folder = _save(tmp_path_factory, f"rows_{scan}")
    model = _with_scan(load_llama(folder), scan)
    ids, mask = _batch()
    mask[0, 9:] = 0  # row 0 right padded, row 1 left padded
    pos = positions_from_mask(jnp.asarray(mask))
    rows = jnp.asarray([[8, 3], [11, 6]], jnp.int32)

    @nnx.jit
    def both(m, ids, mask, rows):
        full, _ = m.decode(m.embed(ids), positions=pos, kv_mask=mask)
        some, _ = m.decode(m.embed(ids), positions=pos, kv_mask=mask, query_index=rows)
        return full, some

    full, some = both(model, jnp.asarray(ids), jnp.asarray(mask), rows)
    assert some.shape == (2, 2, full.shape[-1])
    want = np.take_along_axis(np.asarray(full), np.asarray(rows)[:, :, None], axis=1)
    assert rel_err(np.asarray(some), want) < TOL
    with pytest.raises(ValueError, match="query_index"):
        model.decode(model.embed(ids), positions=pos, kv_mask=mask, query_index=rows, cache=model.init_cache(2, 12))


def test_bf16_compute_keeps_float32_params_and_logits(tmp_path_factory):
    _, folder = _save(tmp_path_factory, "bf16")
    model = load_llama(folder, dtype=jnp.bfloat16)
    assert model.layers[0].self_attn.q_proj.kernel.get_value().dtype == jnp.float32
    ids, mask = _batch()
    forward = nnx.jit(lambda m, i, a: m(i, a))
    logits = forward(model, ids, mask)
    assert logits.dtype == jnp.float32
    ref = np.asarray(forward(load_llama(folder), ids, mask))
    # bf16 has ~3 significant digits: a sanity bound, not a parity claim.
    assert rel_err(logits, ref, mask) < 5e-2
    assert bool(jnp.all(jnp.isfinite(logits)))
