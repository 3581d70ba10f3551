"""Background renderer: SD-1.5 + ControlNet(canny) inpainting around an untouched product cut-out.

    import caig_jax.render as render
    renderer = render.from_pretrained("/ckpt/stable-diffusion-v1-5",
                                      controlnet_path="/ckpt/control_v11p_sd15_canny", mesh=mesh)
    ads = renderer.inpaint_product(product_rgba, prompts)          # uint8[B, 512, 512, 3]

Modules (all NHWC, callable eagerly or under jit, argument names as their diffusers counterparts):
  renderer.unet(sample [B,h,w,4], timestep (scalar or [B]), encoder_hidden_states [B,77,768],
                down_block_additional_residuals=None, mid_block_additional_residual=None) -> [B,h,w,4]
  renderer.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond [B,8h,8w,3] in [0,1],
                      conditioning_scale=1.0) -> (tuple of down residuals, mid residual)
  renderer.vae.encode(x [B,H,W,3] in [-1,1]) -> posterior with .mode() / .sample(key) / .mean / .std;
  renderer.vae.decode(z [B,h,w,4]) -> [B,H,W,3];  renderer.vae.scaling_factor
  renderer.text_encoder(input_ids [B,77]) -> (last_hidden_state [B,77,768], pooler_output)
  renderer.tokenizer: transformers CLIPTokenizer;  renderer.scheduler_config: the scheduler_config.json dict
See `caig_jax.diffusion.pipeline.Renderer` for the sampling entry points, `caig_jax.diffusion.schedulers` for the
samplers, `caig_jax.models.{unet,vae,controlnet}` for the networks and `caig_jax.convert.diffusers` for the
checkpoint layouts. This module is only the loading entry point.
"""

from __future__ import annotations

import logging
import os

import jax.numpy as jnp
from transformers import CLIPTokenizer

from caig_jax.errors import MissingPathError
from caig_jax.convert.clip import load_clip_text_model
from caig_jax.convert.diffusers import load_controlnet, load_ldm_single_file, load_unet, load_vae
from caig_jax.diffusion.pipeline import Renderer
from caig_jax.diffusion.schedulers import SD15_SCHEDULER_CONFIG, load_scheduler_config
from caig_jax.models import attention as attention_lib

__all__ = ["Renderer", "from_pretrained"]


def _load_tokenizer(folder: str):

    if not os.path.isdir(folder):
        raise MissingPathError(f"tokenizer folder {folder!r} does not exist (expected vocab.json and merges.txt)")
    try:
        return CLIPTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001  (transformers raises many kinds; name the folder)
        raise ValueError(f"cannot load a CLIP tokenizer from {folder!r}: {e}") from e


def from_pretrained(sd_path, *, controlnet_path=None, dtype=jnp.float32, mesh=None, attention="auto") -> Renderer:
    """Loads a Stable Diffusion renderer (and optionally a ControlNet), parameters streamed onto `mesh`.

    Args:
      sd_path: a diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`), or a
        single-file SD-1.x `.safetensors` in the original LDM layout; the latter ships no tokenizer, so a
        `tokenizer/` folder must sit next to the file (and `scheduler/` is optional: SD-1.5's config otherwise).
      controlnet_path: a diffusers `ControlNetModel` folder (e.g. `lllyasviel/control_v11p_sd15_canny`), or None.
      dtype: compute dtype of the modules (parameters are stored in the same dtype).
      mesh: a `('data', 'fsdp', 'tensor')` mesh: parameters are sharded by their logical axes and sampling
        batches are split over ('data', 'fsdp'). None: everything on the default device.
      attention: the attention implementation of every module (`caig_jax.models.attention`; `auto` is resolved
        from `mesh`'s devices).

    Returns:
      A `Renderer` with `unet`, `vae`, `text_encoder`, `controlnet` (None without one), `tokenizer`,
      `scheduler_config` and `inpaint_product(...)` / `text_to_image(...)`.
    """
    sd_path = os.fspath(sd_path)
    if not os.path.exists(sd_path):
        raise MissingPathError(f"Stable Diffusion checkpoint {sd_path!r} does not exist")
    if os.path.isdir(sd_path):
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if not os.path.isdir(os.path.join(sd_path, sub)):
                raise MissingPathError(
                    f"{sd_path!r} has no {sub}/ folder: expected a diffusers Stable Diffusion pipeline folder "
                    "(unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
                )
        unet = load_unet(os.path.join(sd_path, "unet"), dtype=dtype, mesh=mesh)
        vae = load_vae(os.path.join(sd_path, "vae"), dtype=dtype, mesh=mesh)
        text_encoder = load_clip_text_model(
            os.path.join(sd_path, "text_encoder"), dtype=dtype, mesh=mesh, param_dtype=dtype
        )
        tokenizer = _load_tokenizer(os.path.join(sd_path, "tokenizer"))
        scheduler_config = load_scheduler_config(os.path.join(sd_path, "scheduler"))
    else:
        parent = os.path.dirname(os.path.abspath(sd_path))
        tokenizer_dir = os.path.join(parent, "tokenizer")
        if not os.path.isdir(tokenizer_dir):
            raise MissingPathError(
                f"{sd_path!r} is a single-file checkpoint, which ships no tokenizer: put SD-1.5's tokenizer/ folder "
                f"(vocab.json, merges.txt) at {tokenizer_dir!r}"
            )
        parts = load_ldm_single_file(sd_path, dtype=dtype, mesh=mesh)
        unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
        tokenizer = _load_tokenizer(tokenizer_dir)
        scheduler_dir = os.path.join(parent, "scheduler")
        if os.path.isdir(scheduler_dir):
            scheduler_config = load_scheduler_config(scheduler_dir)
        else:
            logging.info("%s: no scheduler/ folder next to it; using SD-1.5's scheduler config", sd_path)
            scheduler_config = dict(SD15_SCHEDULER_CONFIG)
    controlnet = None
    if controlnet_path:
        controlnet = load_controlnet(os.fspath(controlnet_path), dtype=dtype, mesh=mesh)
    for module in (unet, vae, text_encoder, controlnet):
        if module is not None:
            attention_lib.configure(module, attention, mesh, dtype)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    sample_size = unet.config.sample_size
    if isinstance(sample_size, (tuple, list)):
        sample_size = sample_size[0]
    resolution = int(sample_size or 64) * vae_scale
    return Renderer(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        controlnet=controlnet,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        resolution=resolution,
        mesh=mesh,
        dtype=dtype,
    )
