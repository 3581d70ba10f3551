"""Single-file SD checkpoints in the original LDM (CompVis) key layout.

The tiny diffusers UNet / VAE and transformers CLIP text encoder state dicts are renamed to the LDM layout by
the test's own inverse of diffusers' `loaders/single_file_utils.py` mapping; diffusers' converters must map the
file back to the original state dicts exactly (so the file really is in the LDM layout), and our loader must
give the same UNet outputs as the diffusers folder, the same VAE parameters as the VAE folder, and the
transformers text encoder's outputs.
"""

import re

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from flax import nnx
from safetensors.torch import save_file
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel

from caig_jax.convert.common import CheckpointMismatchError
from caig_jax.convert.diffusers import load_ldm_single_file, load_vae

from ._render_fixtures import TINY_CLIP_TEXT, TINY_UNET, TINY_VAE, TOL, nchw, nhwc, perturb, rel_err, tiny_unet

# ---------------------------------------------------------------------------------------------------------------
# diffusers names -> LDM names (the inverse of diffusers' convert_ldm_*_checkpoint), for 1 layer per block
# ---------------------------------------------------------------------------------------------------------------

LAYERS = TINY_UNET["layers_per_block"]
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest):
    head, tail = rest.split(".", 1)
    return f"{RESNET[head]}.{tail}"


def ldm_unet_name(key):
    module, leaf = key.rsplit(".", 1)
    if module in UNET_TOP:
        return f"model.diffusion_model.{UNET_TOP[module]}.{leaf}"
    if m := re.match(r"down_blocks\.(\d)\.resnets\.(\d)\.(.*)", key):
        name = f"input_blocks.{1 + int(m[1]) * (LAYERS + 1) + int(m[2])}.0.{_resnet(m[3])}"
    elif m := re.match(r"down_blocks\.(\d)\.attentions\.(\d)\.(.*)", key):
        name = f"input_blocks.{1 + int(m[1]) * (LAYERS + 1) + int(m[2])}.1.{m[3]}"
    elif m := re.match(r"down_blocks\.(\d)\.downsamplers\.0\.conv\.(.*)", key):
        name = f"input_blocks.{1 + int(m[1]) * (LAYERS + 1) + LAYERS}.0.op.{m[2]}"
    elif m := re.match(r"mid_block\.resnets\.(\d)\.(.*)", key):
        name = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        name = f"middle_block.1.{m[1]}"
    elif m := re.match(r"up_blocks\.(\d)\.resnets\.(\d)\.(.*)", key):
        name = f"output_blocks.{int(m[1]) * (LAYERS + 1) + int(m[2])}.0.{_resnet(m[3])}"
    elif m := re.match(r"up_blocks\.(\d)\.attentions\.(\d)\.(.*)", key):
        name = f"output_blocks.{int(m[1]) * (LAYERS + 1) + int(m[2])}.1.{m[3]}"
    elif m := re.match(r"up_blocks\.(\d)\.upsamplers\.0\.conv\.(.*)", key):
        slot = 2 if TINY_UNET["up_block_types"][int(m[1])] == "CrossAttnUpBlock2D" else 1
        name = f"output_blocks.{int(m[1]) * (LAYERS + 1) + LAYERS}.{slot}.conv.{m[2]}"
    else:
        raise KeyError(key)
    return "model.diffusion_model." + name


def ldm_vae_name(key, tensor):
    """Returns (name, tensor): the LDM VAE stores its attention projections as 1x1 convolutions."""
    levels = len(TINY_VAE["block_out_channels"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    name = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    if m := re.match(r"encoder\.down_blocks\.(\d)\.resnets\.(.*)", name):
        name = f"encoder.down.{m[1]}.block.{m[2]}"
    elif m := re.match(r"encoder\.down_blocks\.(\d)\.downsamplers\.0\.(.*)", name):
        name = f"encoder.down.{m[1]}.downsample.{m[2]}"
    elif m := re.match(r"decoder\.up_blocks\.(\d)\.resnets\.(.*)", name):
        name = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}"
    elif m := re.match(r"decoder\.up_blocks\.(\d)\.upsamplers\.0\.(.*)", name):
        name = f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
    elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", name):
        name = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)",
                       name):
        name = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
        if m[2] != "group_norm" and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
    return "first_stage_model." + name, tensor


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(path of the LDM single file, its tensors, the models it came from)."""
    unet = tiny_unet(tmp_path_factory)
    torch.manual_seed(0)
    vae = perturb(TorchVAE(**TINY_VAE), seed=6)
    vae_dir = tmp_path_factory.mktemp("ldm_vae")
    vae.save_pretrained(vae_dir)
    text = perturb(HFCLIPTextModel(HFCLIPTextConfig(**TINY_CLIP_TEXT)), std=0.02, seed=7)

    tensors = {ldm_unet_name(k): v for k, v in unet.ref.state_dict().items()}
    for k, v in vae.state_dict().items():
        name, v = ldm_vae_name(k, v)
        tensors[name] = v
    for k, v in text.state_dict().items():
        # Real SD-1.5 files keep transformers 4's `text_model.` level; transformers 5 state dicts lack it.
        tensors["cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k] = v
    # What real files also carry and loaders must skip: a position_ids buffer, EMA and scheduler tensors.
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors["alphas_cumprod"] = torch.linspace(1, 0.01, 1000)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    path = tmp_path_factory.mktemp("ldm") / "tiny_sd.safetensors"
    save_file(tensors, str(path))
    return str(path), tensors, {"unet": unet, "vae": vae, "vae_dir": str(vae_dir), "text": text}


@pytest.fixture(scope="module")
def loaded(checkpoint):
    path, _, _ = checkpoint
    return load_ldm_single_file(path, unet_config=TINY_UNET, vae_config=TINY_VAE, text_encoder_config=TINY_CLIP_TEXT)


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------


def test_file_is_in_the_ldm_layout(checkpoint):
    """diffusers' own single-file converters turn the file back into the original state dicts."""
    _, tensors, models = checkpoint
    unet_sd = convert_ldm_unet_checkpoint(tensors, dict(TINY_UNET))
    original = models["unet"].ref.state_dict()
    assert set(unet_sd) == set(original)
    assert all(torch.equal(unet_sd[k], original[k]) for k in original)

    vae_sd = convert_ldm_vae_checkpoint(tensors, dict(TINY_VAE))
    original = models["vae"].state_dict()
    assert set(vae_sd) == set(original)
    assert all(torch.equal(vae_sd[k], original[k]) for k in original)

    text_sd = convert_ldm_clip_checkpoint(tensors)
    assert {k.removeprefix("text_model.") for k in text_sd} - {"embeddings.position_ids"} == set(
        models["text"].state_dict()
    )


def test_unet_matches_diffusers_folder(checkpoint, loaded):
    _, _, models = checkpoint
    unet = models["unet"]
    gen = torch.Generator().manual_seed(11)
    sample, context = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 32, generator=gen)
    t = np.array([999, 10])
    from_folder = unet.apply(nhwc(sample), t, context.numpy())
    from_file = unet.apply(nhwc(sample), t, context.numpy(), params=nnx.state(loaded["unet"]))
    np.testing.assert_array_equal(np.asarray(from_file), np.asarray(from_folder))
    with torch.no_grad():
        expected = unet.ref(sample, torch.from_numpy(t), context).sample.numpy()
    assert rel_err(nchw(from_file), expected) < TOL


def test_vae_matches_diffusers_folder(checkpoint, loaded):
    _, _, models = checkpoint
    from_folder = nnx.to_flat_state(nnx.state(load_vae(models["vae_dir"])))
    from_file = dict(nnx.to_flat_state(nnx.state(loaded["vae"])))
    assert len(from_file) == len(from_folder)
    for path, var in from_folder:
        np.testing.assert_array_equal(np.asarray(from_file[path].get_value()), np.asarray(var.get_value()),
                                      err_msg=str(path))
    assert loaded["vae"].scaling_factor == pytest.approx(0.18215)


def test_text_encoder_matches_transformers(checkpoint, loaded):
    _, _, models = checkpoint
    ids = torch.tensor([[0, 5, 17, 300, 2, 1, 1], [0, 999, 42, 7, 8, 9, 2]])
    with torch.no_grad():
        expected = models["text"](ids).last_hidden_state.numpy()
    graphdef, state = nnx.split(loaded["text_encoder"])
    got = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).last_hidden_state)(state, ids.numpy())
    assert rel_err(got, expected) < TOL


def test_mismatches_are_listed_together(checkpoint, tmp_path):
    _, tensors, _ = checkpoint
    bad = dict(tensors)
    del bad["model.diffusion_model.out.2.bias"]
    bad["model.diffusion_model.input_blocks.9.0.in_layers.0.weight"] = torch.zeros(3)
    bad["model.diffusion_model.middle_block.1.proj_in.weight"] = torch.zeros(64, 48, 1, 1)
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path))
    with pytest.raises(CheckpointMismatchError) as err:
        load_ldm_single_file(path, unet_config=TINY_UNET, vae_config=TINY_VAE, load_text_encoder=False)
    message = str(err.value)
    assert "bad.safetensors" in message
    assert "missing" in message and "model.diffusion_model.out.2.bias" in message
    assert "unexpected" in message and "model.diffusion_model.input_blocks.9.0.in_layers.0.weight" in message
    assert "shape mismatches" in message and "model.diffusion_model.middle_block.1.proj_in.weight" in message


def test_not_an_ldm_file(checkpoint, tmp_path):
    _, _, models = checkpoint
    path = tmp_path / "diffusers_unet.safetensors"
    save_file({k: v.contiguous() for k, v in models["unet"].ref.state_dict().items()}, str(path))
    with pytest.raises(CheckpointMismatchError, match="model.diffusion_model"):
        load_ldm_single_file(path, unet_config=TINY_UNET)


def test_sd15_sized_names_round_trip_through_diffusers():
    """At the real SD-1.5 layout (4 levels, 2 layers per block, input/output block numbers past 10) our LDM names
    are the ones diffusers' converters read: meta-device models, no memory or compute."""
    from diffusers import UNet2DConditionModel as TorchUNet

    from caig_jax.convert.diffusers import (
        LDM_UNET_PREFIX,
        SD15_UNET_CONFIG,
        SD15_VAE_CONFIG,
        ldm_unet_key,
        ldm_vae_key,
    )
    from caig_jax.models.unet import UNet2DConditionConfig
    from caig_jax.models.vae import AutoencoderKLConfig

    with torch.device("meta"):
        unet_sd = TorchUNet(**SD15_UNET_CONFIG).state_dict()
        vae_sd = TorchVAE(**SD15_VAE_CONFIG).state_dict()
    assert sum(v.numel() for v in unet_sd.values()) == 859_520_964  # SD-1.5's UNet
    cfg = UNet2DConditionConfig.from_dict(SD15_UNET_CONFIG)
    ldm = {LDM_UNET_PREFIX + ldm_unet_key(k, cfg): v for k, v in unet_sd.items()}
    assert "model.diffusion_model.output_blocks.11.1.proj_out.weight" in ldm
    assert "model.diffusion_model.output_blocks.8.2.conv.weight" in ldm
    back = convert_ldm_unet_checkpoint(ldm, dict(SD15_UNET_CONFIG))
    assert set(back) == set(unet_sd) and all(back[k] is unet_sd[k] for k in unet_sd)

    vae_cfg = AutoencoderKLConfig.from_dict(SD15_VAE_CONFIG)
    ldm = {"first_stage_model." + ldm_vae_key(k, vae_cfg): v for k, v in vae_sd.items()}
    back = convert_ldm_vae_checkpoint(ldm, dict(SD15_VAE_CONFIG))
    assert set(back) == set(vae_sd) and all(back[k] is vae_sd[k] for k in vae_sd)
