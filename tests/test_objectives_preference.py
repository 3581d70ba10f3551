"""caig_jax.objectives.preference: DPO and PCPO against numpy (values and gradients), extreme inputs, TRL's
metrics by hand, and sequence log-probs against torch's log-softmax gather."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from caig_jax.objectives.preference import dpo_loss, pcpo_loss, preference_loss, sequence_logps

RTOL, ATOL = 1e-5, 1e-7  # float32 against a float64 numpy reference: stated once, never loosened
TORCH_TOL = 1e-6  # float32 against torch's float32 log-softmax (rtol and atol)


def _log_sigmoid_loss_and_grads(z, dz):
    """numpy float64: mean(-log sigmoid(z)) and its gradient, given dz = d z / d input for each input."""
    loss = np.mean(np.logaddexp(0.0, -z))  # -log sigmoid(z) = softplus(-z)
    sigmoid = 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free sigmoid
    return loss, [-(1.0 - sigmoid) * d / z.size for d in dz]


def _np_dpo(pc, pr, rc, rr, beta):
    pc, pr, rc, rr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr))
    z = beta * ((pc - rc) - (pr - rr))
    return _log_sigmoid_loss_and_grads(z, [beta, -beta, -beta, beta])


def _np_pcpo(pc, pcor, rc, rcor, beta):
    pc, pcor, rc, rcor = (np.asarray(x, np.float64) for x in (pc, pcor, rc, rcor))
    z = beta * ((pc - pcor) - (rc - rcor))
    return _log_sigmoid_loss_and_grads(z, [beta, -beta, -beta, beta])


def _logps(seed, b=6, scale=20.0, offset=0.0):
    rng = np.random.default_rng(seed)
    return [(offset + scale * rng.normal(size=b)).astype(np.float32) for _ in range(4)]


def _check_against_numpy(loss_fn, np_fn, inputs, beta):
    jax_inputs = [jnp.asarray(x) for x in inputs]
    loss, grads = jax.value_and_grad(lambda *xs: loss_fn(*xs, beta=beta)[0], argnums=(0, 1, 2, 3))(*jax_inputs)
    want_loss, want_grads = np_fn(*inputs, beta)
    assert np.isfinite(float(loss)) and all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL, atol=ATOL)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("loss_fn, np_fn", [(dpo_loss, _np_dpo), (pcpo_loss, _np_pcpo)], ids=["dpo", "pcpo"])
@pytest.mark.parametrize("beta", [0.5, 0.1])
def test_matches_numpy_values_and_grads(loss_fn, np_fn, beta):
    _check_against_numpy(loss_fn, np_fn, _logps(0), beta)
    # Realistic sums of many token log-probs: large magnitudes, moderate differences.
    _check_against_numpy(loss_fn, np_fn, _logps(1, scale=3.0, offset=-1e4), beta)


@pytest.mark.parametrize("loss_fn, np_fn", [(dpo_loss, _np_dpo), (pcpo_loss, _np_pcpo)], ids=["dpo", "pcpo"])
def test_extreme_log_probs_stay_finite_and_exact(loss_fn, np_fn):
    # beta * margin = +-2e4 and +-1e4: log(sigmoid(.)) would be -inf here and its gradient NaN.
    big = np.float32(1e4)
    pc = np.array([big, -big, big, -big, 0.0], np.float32)
    p_other = np.array([-big, big, 0.0, 0.0, big], np.float32)
    rc = np.array([-big, big, 0.0, 0.0, 0.0], np.float32)
    r_other = np.array([big, -big, 0.0, 0.0, -big], np.float32)
    _check_against_numpy(loss_fn, np_fn, [pc, p_other, rc, r_other], 0.5)


@pytest.mark.parametrize("loss_fn", [dpo_loss, pcpo_loss], ids=["dpo", "pcpo"])
def test_ln2_when_policy_equals_reference(loss_fn):
    a, b, _, _ = _logps(2)
    loss, _ = loss_fn(a, b, a, b, beta=0.5)
    np.testing.assert_allclose(loss, np.log(2.0), rtol=RTOL)


def test_dpo_rewards_metrics_by_hand():
    # Per example (beta = 0.5): chosen rewards [0.5, 0, 0.5, 0], rejected [-0.5, 0.5, 0, 0]; the last is a tie.
    pc = np.array([-1.0, -2.0, -1.0, -1.0], np.float32)
    rc = np.array([-2.0, -2.0, -2.0, -1.0], np.float32)
    pr = np.array([-4.0, -1.0, -3.0, -5.0], np.float32)
    rr = np.array([-3.0, -2.0, -3.0, -5.0], np.float32)
    _, metrics = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert float(metrics["rewards/chosen"]) == 0.25
    assert float(metrics["rewards/rejected"]) == 0.0
    assert float(metrics["rewards/margins"]) == 0.25  # mean of [1, -0.5, 0.5, 0]
    assert float(metrics["rewards/accuracies"]) == 0.5  # [yes, no, yes, tie = no]
    assert float(metrics["logps/chosen"]) == -1.25 and float(metrics["logps/rejected"]) == -3.25


def test_dpo_tie_is_not_accurate():
    a, b, _, _ = _logps(3)
    _, metrics = dpo_loss(a, b, a, b, beta=0.5)
    assert float(metrics["rewards/accuracies"]) == 0.0
    assert float(metrics["rewards/margins"]) == 0.0


def test_pcpo_metrics_by_hand():
    # beta = 0.5: margins 0.5 * [(-1 + 3) - (-2 + 2), (-2 + 2) - (-2 + 1), (-1 + 1) - (-1 + 1)] = [1, 0.5, 0].
    pc = np.array([-1.0, -2.0, -1.0], np.float32)
    pcor = np.array([-3.0, -2.0, -1.0], np.float32)
    rc = np.array([-2.0, -2.0, -1.0], np.float32)
    rcor = np.array([-2.0, -1.0, -1.0], np.float32)
    loss, metrics = pcpo_loss(pc, pcor, rc, rcor, beta=0.5)
    assert float(metrics["pcpo/margin"]) == 0.5
    np.testing.assert_allclose(metrics["pcpo/accuracy"], 2 / 3, rtol=RTOL)  # the zero margin does not count
    np.testing.assert_allclose(loss, np.mean(np.logaddexp(0.0, -np.array([1.0, 0.5, 0.0]))), rtol=RTOL)
    assert float(metrics["pcpo/loss"]) == float(loss)


@pytest.mark.parametrize("weight", [0.0, 1.0, 0.3])
def test_preference_loss_combines_dpo_and_pcpo(weight):
    pc, pr, rc, rr = _logps(4)
    pcor, rcor, _, _ = _logps(5)
    args = [jnp.asarray(x) for x in (pc, pr, pcor, rc, rr, rcor)]
    loss, metrics = preference_loss(*args, pcpo_weight=weight)
    dpo, _ = dpo_loss(pc, pr, rc, rr)
    pcpo, _ = pcpo_loss(pc, pcor, rc, rcor)
    np.testing.assert_allclose(loss, dpo + weight * pcpo, rtol=RTOL)
    assert float(metrics["dpo/loss"]) == float(dpo) and float(metrics["pcpo/loss"]) == float(pcpo)
    if weight == 0.0:  # plain DPO, gradients included
        grads = jax.grad(lambda *xs: preference_loss(*xs, pcpo_weight=0.0)[0], argnums=(0, 1, 2, 3, 4, 5))(*args)
        dpo_grads = jax.grad(lambda *xs: dpo_loss(*xs)[0], argnums=(0, 1, 2, 3))(*(args[i] for i in (0, 1, 3, 4)))
        for got, want in zip((grads[i] for i in (0, 1, 3, 4)), dpo_grads):
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
        assert not np.any(grads[2]) and not np.any(grads[5])


def test_sequence_logps_matches_torch_log_softmax_gather():
    rng = np.random.default_rng(6)
    b, t, v = 3, 6, 11
    logits = (3 * rng.normal(size=(b, t, v))).astype(np.float32)
    mask = rng.random((b, t)) < 0.5
    mask[:, 0] = True
    mask[2] = False  # one sequence without response tokens sums to 0
    labels = np.where(mask, rng.integers(0, v, (b, t)), -100).astype(np.int32)
    log_probs = torch.log_softmax(torch.from_numpy(logits), dim=-1)
    picked = log_probs.gather(-1, torch.from_numpy(labels).long().clamp(min=0)[..., None])[..., 0]
    want = (picked * torch.from_numpy(mask)).sum(-1).numpy()
    got = sequence_logps(logits, labels, mask)
    assert got.shape == (b,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=TORCH_TOL, atol=TORCH_TOL)
    assert float(got[2]) == 0.0
