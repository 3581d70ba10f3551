"""ControlNet-inpaint pipeline parity with diffusers' StableDiffusionControlNetInpaintPipeline (tiny random SD).

One tiny random SD + ControlNet is written with diffusers' `save_pretrained` (`write_tiny_sd_with_diffusers`, the
render job's tiny shapes),
loaded by diffusers and by `caig_jax.render.from_pretrained`, and both pipelines run with DDIM (deterministic),
the same initial latents and the same VAE-posterior noise: the uint8 images must agree to < 1 grey level on
average. The renderer runs on a 4x2x1 mesh (batch over data x fsdp = 8, parameters sharded over fsdp) with a batch
of 3 (padded to 8 inside).
"""

import numpy as np
import pytest
import torch
from PIL import Image

import caig_jax.render as render
from caig_jax import parallel
from caig_jax.data import product as product_lib

from ._render_fixtures import write_tiny_sd_with_diffusers

PROMPTS = ["a red mug on a wooden table", "blue sky, soft light", "marble kitchen counter"]
NEGATIVE = ["blurry", "", "low quality, text"]
STEPS = 3
GUIDANCE = 2.5
CN_SCALE = 0.8


def toy_products(batch: int, size: int = 48, seed: int = 0) -> np.ndarray:
    """uint8[B, size, size, 4] procedurally drawn cut-outs: a rectangle + a disc with a soft edge each."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((batch, size, size, 4), np.uint8)
    for b in range(batch):
        top, left = rng.integers(2, 10, 2)
        h, w = rng.integers(size // 3, size - 12, 2)
        body = (yy >= top) & (yy < top + h) & (xx >= left) & (xx < left + w)
        cy, cx, r = rng.integers(10, size - 10), rng.integers(10, size - 10), rng.integers(5, 10)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        alpha = (body | disc).astype(np.uint8) * 255
        rgb = np.where(body[..., None], rng.integers(0, 256, 3), rng.integers(0, 256, 3))
        rgb = np.clip(rgb + (xx[..., None] * 3 % 40), 0, 255)  # some texture for Canny to find
        out[b, ..., :3] = rgb.astype(np.uint8)
        out[b, ..., 3] = alpha
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny_sd"))
    sd_path, controlnet_path = write_tiny_sd_with_diffusers(folder, seed=0)
    return sd_path, controlnet_path


@pytest.fixture(scope="module")
def mesh(devices):
    # Batch over data x fsdp = 8, parameters sharded over fsdp (a tensor axis adds SPMD compile time, not coverage
    # of this pipeline's code).
    return parallel.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})


@pytest.fixture(scope="module")
def renderer(tiny, mesh):
    sd_path, controlnet_path = tiny
    return render.from_pretrained(sd_path, controlnet_path=controlnet_path, mesh=mesh)


@pytest.fixture(scope="module")
def reference(tiny):
    """diffusers' pipeline on the same folder, switched to DDIM as one does with `from_config`."""
    from diffusers import DDIMScheduler, StableDiffusionControlNetInpaintPipeline

    sd_path, _ = tiny
    pipe = StableDiffusionControlNetInpaintPipeline.from_pretrained(sd_path)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_renderer_attributes(renderer):
    assert renderer.resolution == 64  # sample_size 16 x VAE scale factor 4
    assert renderer.controlnet is not None and renderer.unet is not None and renderer.vae is not None
    assert renderer.text_encoder is not None and renderer.tokenizer is not None
    assert renderer.scheduler_config["beta_schedule"] == "scaled_linear"
    assert renderer.batch_multiple == 8


def test_controlnet_inpaint_matches_diffusers(renderer, reference):
    batch, res = len(PROMPTS), renderer.resolution
    prepared = renderer.prepare_products(toy_products(batch))
    latent = res // renderer.vae_scale_factor
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((batch, latent, latent, 4)).astype(np.float32)
    # diffusers samples the init image's VAE posterior with the generator's first draw.
    generator = torch.Generator().manual_seed(7)
    image_noise = torch.randn((batch, 4, latent, latent), generator=torch.Generator().manual_seed(7)).numpy()

    with torch.no_grad():
        ref = reference(
            prompt=PROMPTS,
            negative_prompt=NEGATIVE,
            image=[Image.fromarray(x) for x in prepared["image"]],
            mask_image=[Image.fromarray((m * 255).round().astype(np.uint8), mode="L") for m in prepared["mask"]],
            control_image=[Image.fromarray(c) for c in prepared["control"]],
            height=res,
            width=res,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            controlnet_conditioning_scale=CN_SCALE,
            latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
            generator=generator,
            output_type="np",
        ).images
    ref_uint8 = (ref * 255).round().astype(np.uint8)  # what diffusers' numpy_to_pil does

    ours = renderer.controlnet_inpaint(
        prepared["image"], prepared["mask"], prepared["control"], PROMPTS, steps=STEPS, guidance_scale=GUIDANCE,
        scheduler="ddim", latents=latents, negative_prompts=NEGATIVE, controlnet_scale=CN_SCALE,
        image_noise=image_noise.transpose(0, 2, 3, 1),
    )
    assert ours.shape == (batch, res, res, 3) and ours.dtype == np.uint8
    # The comparison means something only if the images are not saturated or flat.
    interior = np.mean((ref_uint8 > 0) & (ref_uint8 < 255))
    assert interior > 0.5 and ref_uint8.std() > 10, (interior, ref_uint8.std())
    diff = np.abs(ours.astype(np.int32) - ref_uint8.astype(np.int32))
    assert diff.mean() < 1.0, f"mean abs difference {diff.mean():.3f} grey levels (max {diff.max()})"
    # Both sides compute in float32: beyond the bound, only rounding-boundary pixels may differ (by 1).
    # (A wrong VAE-posterior noise still gives a mean difference below 1 on this tiny model, but moves about
    # 17% of the pixels by more than 1 level: this check is what catches such a bug.)
    assert np.mean(diff <= 1) >= 0.999, f"{np.mean(diff > 1):.4%} of pixels differ by more than 1 grey level"
    compiles = renderer.num_compiles
    wrong = renderer.controlnet_inpaint(
        prepared["image"], prepared["mask"], prepared["control"], PROMPTS, steps=STEPS, guidance_scale=GUIDANCE,
        scheduler="ddim", latents=latents, negative_prompts=NEGATIVE, controlnet_scale=CN_SCALE,
    )  # seeded posterior noise instead of diffusers': the check above must be able to fail
    assert np.mean(np.abs(wrong.astype(np.int32) - ref_uint8.astype(np.int32)) <= 1) < 0.99

    # The public API: product handling + paste-back, same program (no recompilation).
    ads = renderer.inpaint_product(
        toy_products(batch), PROMPTS, steps=STEPS, guidance_scale=GUIDANCE, scheduler="ddim", latents=latents,
        negative_prompts=NEGATIVE, controlnet_scale=CN_SCALE, image_noise=image_noise.transpose(0, 2, 3, 1),
    )
    expected = np.stack([product_lib.paste_product(r, p) for r, p in zip(ref_uint8, prepared["placed"])])
    diff = np.abs(ads.astype(np.int32) - expected.astype(np.int32))
    assert diff.mean() < 1.0, f"inpaint_product: mean abs difference {diff.mean():.3f}"
    alpha = prepared["placed"][..., 3] == 255
    np.testing.assert_array_equal(ads[alpha], prepared["placed"][..., :3][alpha])  # product pixels untouched
    assert renderer.num_compiles == compiles


def test_new_prompts_same_bucket_do_not_recompile(renderer):
    """Batch 2 and batch 4 share bucket 8 on this mesh; prompts, seeds (or given latents), guidance and ControlNet
    scales are runtime inputs, so the parity test's program is reused as is.

    (tests/test_render_job.py's tiny run uses these sampling settings too and reuses the program as well.)"""
    kw = dict(steps=STEPS, guidance_scale=3.0, scheduler="ddim")
    before = renderer.num_compiles
    first = renderer.inpaint_product(toy_products(2, seed=3), ["wooden desk", "beach"], seed=0, **kw)
    again = renderer.inpaint_product(toy_products(2, seed=3), ["wooden desk", "beach"], seed=0, **kw)
    np.testing.assert_array_equal(first, again)  # deterministic in the seed
    other = renderer.inpaint_product(
        toy_products(4, seed=4), ["night sky", "neon city street", "garden", "cafe"], seed=5,
        negative_prompts="ugly", controlnet_scale=0.5, **{**kw, "guidance_scale": 5.0},
    )
    assert other.shape == (4, 64, 64, 3)
    assert renderer.num_compiles == before, "a new batch of the same bucket size recompiled"
    # Per-example noise streams: example 0 of a batch does not depend on the rest of the batch or the padding.
    solo = renderer.inpaint_product(toy_products(2, seed=3)[:1], ["wooden desk"], seed=0, **kw)
    np.testing.assert_array_equal(solo[0], first[0])
    assert not np.array_equal(first[0], first[1])
    reseeded = renderer.inpaint_product(toy_products(2, seed=3), ["wooden desk", "beach"], seed=1, **kw)
    assert not np.array_equal(reseeded, first)


@pytest.mark.slow
def test_text_to_image_euler_ancestral(renderer):
    """Text-to-image (no ControlNet) with CAIG's ancestral sampler: per-example step noise inside the loop."""
    prompts = ["a plain studio backdrop", "a beach", "a forest"]
    out = renderer.text_to_image(prompts, steps=2, guidance_scale=4.0, scheduler="euler_ancestral", seed=3)
    assert out.shape == (3, 64, 64, 3) and out.dtype == np.uint8
    again = renderer.text_to_image(prompts[:1], steps=2, guidance_scale=4.0, scheduler="euler_ancestral", seed=3)
    np.testing.assert_array_equal(again[0], out[0])
    assert not np.array_equal(out[0], out[1])


def test_bad_inputs_fail_clearly(renderer):
    with pytest.raises(ValueError, match="empty alpha"):
        renderer.inpaint_product(np.zeros((1, 8, 8, 4), np.uint8), ["x"], steps=1)
    with pytest.raises(ValueError, match=r"uint8\[B, H, W, 4\]"):
        renderer.inpaint_product(np.zeros((1, 8, 8, 3), np.uint8), ["x"], steps=1)
    with pytest.raises(ValueError, match="latents must be"):
        renderer.inpaint_product(toy_products(1), ["x"], steps=1, latents=np.zeros((1, 8, 8, 4), np.float32))
    with pytest.raises(ValueError, match="unknown scheduler"):
        renderer.inpaint_product(toy_products(1), ["x"], steps=1, scheduler="pndm")
    with pytest.raises(ValueError, match="1 products but 2 prompts"):
        renderer.inpaint_product(toy_products(1), ["x", "y"], steps=1)


def test_from_pretrained_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        render.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"has no vae/ folder"):
        render.from_pretrained(str(tmp_path / "sd"))


def test_render_job_tiny_weights_load_in_diffusers(tmp_path):
    """The render job's tiny weights (our modules, written by `convert.diffusers.save_pipeline`, no PyTorch) form a
    diffusers pipeline folder: diffusers and transformers load every model with no missing, unexpected or
    mismatched key, holding exactly the file's tensors. (Our loaders read them back unchanged:
    tests/test_render_job.py; and they compute what diffusers computes from the same keys: the parity tests.)"""
    from diffusers import StableDiffusionControlNetInpaintPipeline
    from safetensors.numpy import load_file

    from caig_jax.jobs import render as render_job

    sd_path, controlnet_path = render_job.write_tiny_sd(str(tmp_path / "sd"), seed=0)
    pipe = StableDiffusionControlNetInpaintPipeline.from_pretrained(sd_path)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.tokenizer("a mug").input_ids[0] == 0
    for name in ("unet", "vae", "controlnet", "text_encoder"):
        model = getattr(pipe, name)
        cls = type(model)
        _, info = cls.from_pretrained(f"{sd_path}/{name}", output_loading_info=True)
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (name, info)
        file = "model.safetensors" if name == "text_encoder" else "diffusion_pytorch_model.safetensors"
        tensors = load_file(f"{sd_path}/{name}/{file}")
        state = {k: v.numpy() for k, v in model.state_dict().items()}
        assert set(tensors) <= set(state), (name, sorted(set(tensors) - set(state))[:5])
        for key, value in tensors.items():
            np.testing.assert_array_equal(state[key], value, err_msg=f"{name}: {key}")
    assert controlnet_path == f"{sd_path}/controlnet"
