"""Rematerialisation (`model.remat_policy`) and scanned layers (`model.scan_layers`) change memory and compile
time, not numbers: logits and gradients equal the unrolled model's without remat, under the same parameter names."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from caig_jax.models.layers import REMAT_POLICIES, scan_call
from caig_jax.models.llava import LlavaModel, layout_for, set_remat, set_scan
from caig_jax.models.reward import tiny_llava_config

TINY = types.SimpleNamespace(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                             rope_theta=30.0, vision_hidden_size=32, vision_layers=2, vision_heads=4,
                             vision_patch_size=8)


def _inputs(config, n=2):
    rng = np.random.default_rng(0)
    tokens = config.num_image_features((16, 32))
    ids = rng.integers(1, 60, size=(n, tokens + 5)).astype(np.int32)
    ids[:, 1:1 + tokens] = config.image_token_id
    return (jnp.asarray(ids), jnp.asarray(rng.normal(size=(n, config.max_patches, 3, 16, 16)), jnp.float32),
            jnp.ones(ids.shape, jnp.int32), jnp.asarray(layout_for(config, [(16, 32)] * n)))


def _loss_and_grads(policy, scan=False):
    config = tiny_llava_config(TINY, 16, vocab_size=64, image_token_id=63, pad_id=0)
    model = set_scan(set_remat(LlavaModel(config, rngs=nnx.Rngs(0)), policy), scan)
    ids, pixels, mask, layout = _inputs(config)
    graphdef, params = nnx.split(model)

    @jax.jit
    def loss(params):
        logits = nnx.merge(graphdef, params)(ids, pixels, attention_mask=mask, image_layout=layout)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

    value, grads = jax.value_and_grad(loss)(params)
    return value, {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}


@pytest.fixture(scope="module")
def no_remat():
    return _loss_and_grads("none")


@pytest.mark.parametrize(("policy", "scan"), [(p, False) for p in REMAT_POLICIES if p != "none"]
                         + [("none", True), ("dots_no_batch", True)])
def test_remat_policies_and_scan_match_no_remat(policy, scan, no_remat):
    ref_value, ref_grads = no_remat
    value, grads = _loss_and_grads(policy, scan)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    # Relative to the largest gradient of the model: some gradients are exactly zero in exact arithmetic (a key
    # bias shifts every score of a query alike, softmax ignores it) and hold only rounding noise, ~1e-9.
    scale = max(np.abs(g).max() for g in ref_grads.values())
    for name, g in ref_grads.items():
        assert np.abs(grads[name] - g).max() / scale < 1e-5, name


def test_unknown_policy_is_rejected():
    config = tiny_llava_config(TINY, 16, vocab_size=64, image_token_id=63, pad_id=0)
    with pytest.raises(ValueError, match="remat_policy='everything'"):
        set_remat(LlavaModel(config, rngs=nnx.Rngs(0)), "everything")


def test_scan_needs_layers_of_one_structure():
    different = [nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Linear(2, 2, use_bias=False, rngs=nnx.Rngs(0))]
    with pytest.raises(ValueError, match="differ in structure"):
        scan_call(different, "none", lambda layer, x: layer(x), jnp.ones((1, 2)))
