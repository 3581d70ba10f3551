"""UNet2DConditionModel parity with diffusers 0.42 (tiny random model saved with save_pretrained, float32)."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from caig_jax import parallel
from caig_jax.convert.common import CheckpointMismatchError
from caig_jax.convert.diffusers import load_unet
from caig_jax.models.unet import UNet2DConditionConfig, UNet2DConditionModel

from ._render_fixtures import TINY_UNET, TOL, jitted, nchw, nhwc, perturb, rel_err, tiny_unet


@pytest.fixture(scope="module")
def unet_pair(tmp_path_factory):
    return tiny_unet(tmp_path_factory)


def _inputs(batch=2, size=(16, 16), seed=0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, *size, generator=gen)
    context = torch.randn(batch, 7, 32, generator=gen)
    return sample, context


def _residual_shapes(size=(16, 16)):
    h, w = size
    # conv_in, block0 resnet, block0 downsampler, block1 resnet; mid.
    down = [(32, h, w), (32, h, w), (32, h // 2, w // 2), (64, h // 2, w // 2)]
    return down, (64, h // 2, w // 2)


def test_per_example_timesteps(unet_pair):
    ref, _, _, apply = unet_pair
    sample, context = _inputs()
    t = torch.tensor([999, 10])
    with torch.no_grad():
        expected = ref(sample, t, context).sample.numpy()
    got = apply(nhwc(sample), t.numpy(), context.numpy())
    assert got.dtype == np.float32 and got.shape == (2, 16, 16, 4)
    assert rel_err(nchw(got), expected) < TOL


def test_controlnet_residuals(unet_pair):
    ref, _, _, apply = unet_pair
    sample, context = _inputs(seed=2)
    gen = torch.Generator().manual_seed(3)
    down_shapes, mid_shape = _residual_shapes()
    down = [torch.randn(2, *s, generator=gen) for s in down_shapes]
    mid = torch.randn(2, *mid_shape, generator=gen)
    t = torch.tensor([250, 750])
    with torch.no_grad():
        expected = ref(sample, t, context, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample.numpy()
        plain = ref(sample, t, context).sample.numpy()
    got = apply(
        nhwc(sample), t.numpy(), context.numpy(),
        down_block_additional_residuals=tuple(nhwc(d) for d in down), mid_block_additional_residual=nhwc(mid),
    )
    assert rel_err(nchw(got), expected) < TOL
    assert rel_err(plain, expected) > 1e-2  # the residuals do change the output


def test_residual_count_is_checked(unet_pair):
    _, _, _, apply = unet_pair
    sample, context = _inputs()
    down_shapes, mid_shape = _residual_shapes()
    down = tuple(np.zeros((2, s[1], s[2], s[0]), np.float32) for s in down_shapes[:-1])
    with pytest.raises(ValueError, match="down_block_additional_residuals"):
        apply(nhwc(sample), 1, context.numpy(), down_block_additional_residuals=down,
             mid_block_additional_residual=np.zeros((2, 8, 8, 64), np.float32))
    with pytest.raises(ValueError, match="both"):
        apply(nhwc(sample), 1, context.numpy(), down_block_additional_residuals=down)


def test_scalar_timestep_odd_latent_size(unet_pair):
    """A Python scalar timestep (broadcast over the batch) and latents not divisible by 2**levels (the upsampler
    is forced to the skip's size), as diffusers does both."""
    ref, _, _, apply = unet_pair
    sample, context = _inputs(size=(9, 11), seed=4)
    with torch.no_grad():
        expected = ref(sample, 321, context).sample.numpy()
    got = apply(nhwc(sample), 321, context.numpy())
    assert rel_err(nchw(got), expected) < TOL


def test_sharded_mesh_forward(unet_pair, devices):
    """Parameters loaded sharded on a data=2, fsdp=2, tensor=2 mesh, batch split: same numbers."""
    ref, _, folder, _ = unet_pair
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = load_unet(folder, mesh=mesh)
    specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(nnx.state(sharded))}
    assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs), specs
    sample, context = _inputs(batch=4, seed=5)
    t = torch.tensor([1, 300, 600, 999])
    with torch.no_grad():
        expected = ref(sample, t, context).sample.numpy()
    args = parallel.global_batch(mesh, (nhwc(sample), t.numpy(), context.numpy()))
    with jax.set_mesh(mesh):
        got = jitted(sharded)(*args)
    assert rel_err(nchw(np.asarray(got)), expected) < TOL


def test_config_variant(tmp_path):
    """Other config options diffusers honours: SD-2 style linear proj_in/out, an int head count, two transformer
    layers, only-cross-attention, time-embedding options, mid-block scale, 1x1 conv_in/conv_out."""
    torch.manual_seed(0)
    kwargs = dict(TINY_UNET, attention_head_dim=4, use_linear_projection=True, transformer_layers_per_block=2,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), only_cross_attention=(False, True),
                  flip_sin_to_cos=False, freq_shift=1, time_embedding_dim=96, mid_block_scale_factor=1.5,
                  norm_eps=1e-6, conv_in_kernel=1, conv_out_kernel=1, center_input_sample=True)
    ref = perturb(TorchUNet(**kwargs), seed=2)
    ref.save_pretrained(tmp_path)
    ours = load_unet(tmp_path)
    sample, context = _inputs(seed=6)
    with torch.no_grad():
        expected = ref(sample, torch.tensor([5, 905]), context).sample.numpy()
    got = jitted(ours)(nhwc(sample), np.array([5, 905]), context.numpy())
    assert rel_err(nchw(got), expected) < TOL


def test_checkpoint_mismatch_lists_everything(unet_pair, tmp_path):
    """A config that disagrees with the weights: every shape mismatch is named with its checkpoint key."""
    _, _, folder, _ = unet_pair
    bad = tmp_path / "unet"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    config["cross_attention_dim"] = 48
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError) as err:
        load_unet(bad)
    message = str(err.value)
    assert "shape mismatches" in message
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in message
    assert "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v.weight" in message
    # Shapes in the file's (PyTorch [out, in]) layout: the file's, and the model's transposed into it.
    expected = r"attn2\.to_k\.weight -> \S+: file shape \((\d+), \d+\), model expects \(\1, 48\) in the file's layout"
    assert re.search(expected, message)


def test_unsupported_config_is_named():
    config = dict(TINY_UNET, class_embed_type="timestep")
    with pytest.raises(ValueError, match="class_embed_type"):
        UNet2DConditionConfig.from_dict(config)
    with pytest.raises(ValueError, match="AttnDownBlock2D"):
        UNet2DConditionModel(dict(TINY_UNET, down_block_types=("AttnDownBlock2D", "DownBlock2D")),
                             rngs=nnx.Rngs(0))


def test_missing_weights_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_UNET))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_unet(tmp_path)
    assert os.path.exists(tmp_path / "config.json")
