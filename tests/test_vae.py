"""AutoencoderKL parity with diffusers 0.42: encode (mean / logvar), decode, sampling, scaling factor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from flax import nnx

from caig_jax.convert.diffusers import load_vae
from caig_jax.models.vae import DiagonalGaussianDistribution

from ._render_fixtures import TINY_VAE, TOL, nchw, nhwc, perturb, rel_err


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Reference and our outputs for one image batch and one latent batch, ours in one jitted program."""
    torch.manual_seed(0)
    ref = perturb(TorchVAE(**TINY_VAE, scaling_factor=0.13025), seed=3)
    folder = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    z = torch.randn(2, 4, 16, 16, generator=gen)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        expected = {"mean": dist.mean, "logvar": dist.logvar, "std": dist.std, "decoded": ref.decode(z).sample,
                    "forward": ref(x).sample}
    vae = load_vae(folder)
    graphdef, state = nnx.split(vae)

    @jax.jit
    def run(state, x, z, key):
        model = nnx.merge(graphdef, state)
        posterior = model.encode(x)
        return posterior, posterior.sample(key), model.decode(z)

    key = jax.random.key(7)
    posterior, sample, decoded = run(state, nhwc(x), nhwc(z), key)
    ours = {"posterior": posterior, "sample": sample, "decoded": decoded, "key": key, "x": nhwc(x)}
    return vae, {k: v.numpy() for k, v in expected.items()}, ours


def test_encode_mean_logvar(results):
    _, ref, ours = results
    posterior = ours["posterior"]
    assert isinstance(posterior, DiagonalGaussianDistribution)  # a pytree: returned from jit
    assert posterior.mean.shape == (2, 16, 16, 4)
    assert rel_err(nchw(posterior.mean), ref["mean"]) < TOL
    assert rel_err(nchw(posterior.logvar), ref["logvar"]) < TOL
    assert rel_err(nchw(posterior.std), ref["std"]) < TOL
    assert np.array_equal(np.asarray(posterior.mode()), np.asarray(posterior.mean))


def test_sample_is_mean_plus_std_noise(results):
    _, _, ours = results
    posterior, key = ours["posterior"], ours["key"]
    noise = jax.random.normal(key, posterior.mean.shape)
    np.testing.assert_allclose(ours["sample"], posterior.mean + jnp.exp(0.5 * posterior.logvar) * noise,
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(ours["sample"], posterior.sample(jax.random.key(8)))


def test_decode(results):
    _, ref, ours = results
    assert ours["decoded"].shape == (2, 32, 32, 3) and ours["decoded"].dtype == np.float32
    assert rel_err(nchw(ours["decoded"]), ref["decoded"]) < TOL


def test_forward_eager(results):
    """`vae(x)` = decode(encode(x).mode()) as diffusers' forward, called eagerly on a plain numpy array."""
    vae, ref, ours = results
    assert rel_err(nchw(vae(ours["x"])), ref["forward"]) < TOL


def test_scaling_factor(results):
    vae, _, _ = results
    assert vae.scaling_factor == pytest.approx(0.13025) and vae.shift_factor is None
