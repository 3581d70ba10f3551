"""ControlNetModel parity with diffusers 0.42, alone and driving the UNet (the inpainting step's pair of calls)."""

import jax
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet
from flax import nnx

from caig_jax.convert.diffusers import load_controlnet

from ._render_fixtures import TINY_CONTROLNET, TOL, jitted, nchw, nhwc, perturb, rel_err, tiny_unet


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory):
    torch.manual_seed(0)
    # perturb(): the zero convolutions of a fresh ControlNet would make every residual exactly zero.
    ref = perturb(TorchControlNet(**TINY_CONTROLNET), seed=4)
    folder = tmp_path_factory.mktemp("controlnet")
    ref.save_pretrained(folder)
    ours = load_controlnet(folder)
    return ref, ours, jitted(ours)


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 7, 32, generator=gen)
    cond = torch.rand(2, 3, 32, 32, generator=gen)  # control image in [0, 1] at 2x the latent size
    return sample, context, cond


@pytest.fixture(scope="module")
def scaled_outputs(controlnet):
    """Reference at conditioning_scale=0.7; ours with the scale given per example ([0.7, 0.7])."""
    ref, _, apply = controlnet
    sample, context, cond = _inputs()
    t = torch.tensor([999, 42])
    with torch.no_grad():
        down, mid = ref(sample, t, context, cond, conditioning_scale=0.7, return_dict=False)
    scale = np.array([0.7, 0.7], np.float32)
    got = apply(nhwc(sample), t.numpy(), context.numpy(), nhwc(cond), conditioning_scale=scale)
    return (down, mid), got


def test_residuals_match(scaled_outputs):
    (down, mid), (got_down, got_mid) = scaled_outputs
    assert len(got_down) == len(down) == 4
    for i, (g, r) in enumerate(zip(got_down, down)):
        assert g.shape == nhwc(r).shape and g.dtype == np.float32, i
        assert rel_err(nchw(g), r.numpy()) < TOL, i
    assert rel_err(nchw(got_mid), mid.numpy()) < TOL


def test_per_example_conditioning_scale(controlnet, scaled_outputs):
    _, _, apply = controlnet
    _, (down_07, mid_07) = scaled_outputs
    sample, context, cond = _inputs()
    down, mid = apply(nhwc(sample), np.array([999, 42]), context.numpy(), nhwc(cond),
                      conditioning_scale=np.array([1.0, 0.35], np.float32))
    np.testing.assert_allclose(np.asarray(mid)[0] * 0.7, np.asarray(mid_07)[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(mid)[1] * 2.0, np.asarray(mid_07)[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(down[2])[0] * 0.7, np.asarray(down_07[2])[0], rtol=1e-5, atol=1e-6)


def test_guess_mode(controlnet):
    ref, ours, _ = controlnet
    sample, context, cond = _inputs(seed=1)
    with torch.no_grad():
        down, mid = ref(sample, 500, context, cond, conditioning_scale=0.5, guess_mode=True, return_dict=False)
    graphdef, state = nnx.split(ours)
    # guess_mode is a Python bool (it picks the program), so it is closed over rather than traced.
    run = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args, conditioning_scale=0.5, guess_mode=True))
    got_down, got_mid = run(state, nhwc(sample), 500, context.numpy(), nhwc(cond))
    for g, r in zip(got_down, down):
        assert rel_err(nchw(g), r.numpy()) < TOL
    assert rel_err(nchw(got_mid), mid.numpy()) < TOL


def test_controlnet_drives_unet(controlnet, tmp_path_factory):
    """One ControlNet-guided denoiser call as the inpainting loop makes it, scale 0.8 given as a float."""
    ref_cn, _, apply_cn = controlnet
    ref_unet, _, _, apply_unet = tiny_unet(tmp_path_factory)
    sample, context, cond = _inputs(seed=2)
    t = torch.tensor([700, 700])
    with torch.no_grad():
        down, mid = ref_cn(sample, t, context, cond, conditioning_scale=0.8, return_dict=False)
        expected = ref_unet(sample, t, context, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample.numpy()
    got_down, got_mid = apply_cn(nhwc(sample), t.numpy(), context.numpy(), nhwc(cond), conditioning_scale=0.8)
    got = apply_unet(nhwc(sample), t.numpy(), context.numpy(), down_block_additional_residuals=got_down,
                     mid_block_additional_residual=got_mid)
    assert rel_err(nchw(got), expected) < TOL
