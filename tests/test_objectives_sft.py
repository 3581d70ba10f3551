"""caig_jax.objectives.sft: masked token-mean NLL by hand, against torch's cross-entropy, empty masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from caig_jax.objectives.sft import sft_loss, token_logps

RTOL = 1e-6  # float32 parity with torch: stated once, never loosened


def _random_batch(seed, b=3, t=5, v=7):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, t, v)).astype(np.float32) * 3
    mask = rng.random((b, t)) < 0.6
    mask[0, 0] = True  # at least one token counts
    labels = np.where(mask, rng.integers(0, v, (b, t)), -100).astype(np.int32)
    return logits, labels, mask


def test_by_hand():
    # Two positions over a 3-word vocabulary; the second position is masked out and its label is -100.
    logits = np.array([[[0.0, 0.0, np.log(2.0)], [5.0, -1.0, 0.0]]], np.float32)
    labels = np.array([[2, -100]], np.int32)
    mask = np.array([[1.0, 0.0]], np.float32)
    loss, metrics = sft_loss(logits, labels, mask)
    # softmax([0, 0, ln 2]) = [1/4, 1/4, 1/2]: the label's NLL is ln 2, and the argmax is the label.
    np.testing.assert_allclose(loss, np.log(2.0), rtol=RTOL)
    np.testing.assert_allclose(metrics["nll_sum"], np.log(2.0), rtol=RTOL)
    assert float(metrics["tokens"]) == 1.0
    assert float(metrics["token_accuracy"]) == 1.0
    np.testing.assert_allclose(token_logps(logits, labels, mask), [[-np.log(2.0), 0.0]], rtol=RTOL)


def test_token_mean_over_the_whole_batch():
    # Row 0 has 1 token with NLL ln 2, row 1 has 3 tokens with NLL ln 3: the mean is over 4 tokens, not rows.
    v = 3
    logits = np.zeros((2, 3, v), np.float32)
    logits[0, 0] = [0.0, 0.0, np.log(2.0)]
    labels = np.array([[2, 0, 0], [0, 1, 2]], np.int32)
    mask = np.array([[True, False, False], [True, True, True]])
    loss, metrics = sft_loss(logits, labels, mask)
    np.testing.assert_allclose(loss, (np.log(2.0) + 3 * np.log(3.0)) / 4, rtol=RTOL)
    assert float(metrics["tokens"]) == 4.0


def test_token_accuracy_by_hand():
    logits = np.zeros((1, 4, 3), np.float32)
    logits[0, np.arange(4), [0, 1, 2, 0]] = 1.0  # argmax per position: 0, 1, 2, 0
    labels = np.array([[0, 2, 2, -100]], np.int32)  # right, wrong, right, masked out
    mask = np.array([[1, 1, 1, 0]], np.float32)
    _, metrics = sft_loss(logits, labels, mask)
    np.testing.assert_allclose(metrics["token_accuracy"], 2 / 3, rtol=RTOL)
    assert float(metrics["tokens"]) == 3.0


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_torch_cross_entropy_with_ignore_index(seed):
    logits, labels, mask = _random_batch(seed)
    v = logits.shape[-1]
    want = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).reshape(-1, v), torch.from_numpy(labels).long().reshape(-1), ignore_index=-100)
    loss, metrics = sft_loss(logits, labels, mask)
    np.testing.assert_allclose(loss, want.item(), rtol=RTOL)
    assert float(metrics["tokens"]) == mask.sum()


def test_masked_labels_are_never_read():
    logits, labels, mask = _random_batch(2)
    junk = np.resize(np.array([-100, 10**6, -(10**6)], np.int32), labels.shape)  # -100 and out-of-range ids
    other = np.where(mask, labels, junk)
    want, want_metrics = sft_loss(logits, labels, mask)
    got, got_metrics = sft_loss(logits, other, mask)
    assert float(got) == float(want)
    for name in want_metrics:
        assert float(got_metrics[name]) == float(want_metrics[name]), name
    grad_want = jax.grad(lambda x: sft_loss(x, labels, mask)[0])(jnp.asarray(logits))
    grad_got = jax.grad(lambda x: sft_loss(x, other, mask)[0])(jnp.asarray(logits))
    np.testing.assert_array_equal(grad_got, grad_want)


def test_bool_and_float_masks_agree():
    logits, labels, mask = _random_batch(3)
    loss_bool, metrics_bool = sft_loss(logits, labels, mask)
    loss_float, metrics_float = sft_loss(logits, labels, mask.astype(np.float32))
    assert float(loss_bool) == float(loss_float)
    for name in metrics_bool:
        assert float(metrics_bool[name]) == float(metrics_float[name]), name


def test_all_zero_mask_gives_zero_loss_and_zero_grads():
    logits, labels, _ = _random_batch(4)
    labels = np.full_like(labels, -100)
    mask = np.zeros(labels.shape, np.float32)
    (loss, metrics), grads = jax.value_and_grad(sft_loss, has_aux=True)(jnp.asarray(logits), labels, mask)
    assert float(loss) == 0.0
    assert float(metrics["tokens"]) == 0.0 and float(metrics["token_accuracy"]) == 0.0
    assert np.all(np.isfinite(grads)) and not np.any(grads)


def test_bfloat16_logits_are_reduced_in_float32():
    logits, labels, mask = _random_batch(5)
    loss, _ = sft_loss(jnp.asarray(logits, jnp.bfloat16), labels, mask)
    want, _ = sft_loss(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)), labels, mask)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, want, rtol=RTOL)
