"""Stable Diffusion sampling programs: text-to-image and ControlNet inpainting, each ONE jitted program.

The ControlNet-inpainting path follows diffusers 0.42's `StableDiffusionControlNetInpaintPipeline` with a plain
4-channel UNet (what CAIG runs, SD-1.5 + ControlNet v1.1 canny):

    init image in [-1, 1]; mask binarised at 0.5 (1 = paint); control image in [0, 1]
    image_latents = scaling_factor * VAE.encode(init).sample()        (diffusers samples the posterior)
    latents = noise * init_noise_sigma        (strength = 1; otherwise add_noise(image_latents, noise, t_start))
    for each step:
        x2 = [x, x]  (CFG batch: unconditional and conditional text)
        down, mid = ControlNet(scale_model_input(x2), t, text2, control, conditioning_scale)
        eps = UNet(scale_model_input(x2), t, text2, down, mid);  eps = eps_u + g (eps_c - eps_u)
        x = scheduler.step(eps, x)
        x = (1 - mask) * add_noise(image_latents, noise, t_next) + mask * x      (mask at latent size, nearest)
    image = VAE.decode(x / scaling_factor) -> uint8

CAIG's product handling wraps it (`Renderer.inpaint_product`, via `caig_jax.data.product`): the cut-out is
cropped to its alpha box, fitted to 0.78 of the canvas and centred; mask = inverted alpha dilated 20x20;
control = Canny(100, 200) of the product alone; the original product pixels are pasted back with the undilated
alpha at the end.

Batching and compilation: the batch is padded up to a multiple of the mesh's ('data', 'fsdp') size (the
"bucket"), sharded over those axes, and the padding is dropped at the end. Prompts, seeds, guidance and
ControlNet scales are runtime inputs, so a new batch of the same bucket size reuses the compiled program
(`Renderer.num_compiles` counts traces). The CFG batch is built by interleaving (example b's unconditional and
conditional rows are adjacent), so each device doubles its own shard without any cross-device traffic.

Randomness: example b of a call with `seed` draws its initial noise, its VAE posterior noise and its per-step
ancestral noise from `fold_in(PRNGKey(seed), b)`, so an image does not depend on the padding or the bucket.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from caig_jax import parallel
from caig_jax.data import product as product_lib
from caig_jax.diffusion import schedulers as sched_lib

# ---------------------------------------------------------------------------------------------------------------
# Static description of one sampling program (everything that changes the traced graph).
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """The static part of a sampling call; one compiled program per distinct spec and input shapes."""

    scheduler: sched_lib.SchedulerConfig
    num_steps: int
    latent_hw: tuple[int, int]
    begin_index: int  # > 0 when strength < 1
    inpaint: bool  # ControlNet-inpaint blending with image latents
    use_controlnet: bool
    cfg: bool  # classifier-free guidance (guidance_scale > 1, as diffusers)


def _batch_spec(ndim: int) -> P:
    return P(parallel.BATCH_AXES, *([None] * (ndim - 1)))


def _constrain(x, mesh):
    """Keeps batch-major activations sharded over ('data', 'fsdp') (a no-op without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, _batch_spec(x.ndim)))


def _interleave(a, b):
    """[B, ...] x 2 -> [2B, ...] with rows (a_0, b_0, a_1, b_1, ...): each shard doubles in place."""
    return jnp.stack([a, b], axis=1).reshape((a.shape[0] * 2,) + a.shape[1:])


def _split_interleaved(x):
    x = x.reshape((x.shape[0] // 2, 2) + x.shape[1:])
    return x[:, 0], x[:, 1]


# fold_in streams of an example's key: initial noise, VAE-posterior noise, per-step ancestral noise.
_STREAM_INIT, _STREAM_IMAGE, _STREAM_STEP = 0, 1, 2


def _example_keys(seed, batch: int):
    """uint32[B, 2]: one independent key per example (fold_in of the example index)."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(batch, dtype=jnp.uint32))


def _normal_per_example(keys, stream: int, shape, index=None):
    """float32[B, *shape] with example b drawn from fold_in(keys[b], stream[, index])."""

    def one(key):
        key = jax.random.fold_in(key, stream)
        if index is not None:
            key = jax.random.fold_in(key, index)
        return jax.random.normal(key, shape, jnp.float32)

    return jax.vmap(one)(keys)


@functools.partial(jax.jit, static_argnames=("batch", "latent_shape", "with_image_noise"))
def _seeded_noise(seed, *, batch: int, latent_shape: tuple[int, ...], with_image_noise: bool):
    """(keys uint32[B, 2], initial noise float32[B, h, w, c], VAE-posterior noise or None) for a seed.

    A separate small program: caller-given and seeded noise then feed the same sampling program.
    """
    keys = _example_keys(seed, batch)
    noise = _normal_per_example(keys, _STREAM_INIT, latent_shape)
    image_noise = _normal_per_example(keys, _STREAM_IMAGE, latent_shape) if with_image_noise else None
    return keys, noise, image_noise


# (spec, graphdefs, mesh) -> (jitted program, [trace count]). Module level, so two renderers loaded from the same
# checkpoint architecture on the same mesh share compiled programs (parameters are arguments, not constants).
_PROGRAMS: dict[tuple, tuple[Any, list[int]]] = {}


def _get_program(spec: "ProgramSpec", graphdefs, mesh):
    key = (spec, graphdefs, mesh)
    if key not in _PROGRAMS:
        counter = [0]
        fn = functools.partial(_sample_program, spec, graphdefs, mesh, counter)
        _PROGRAMS[key] = (jax.jit(fn), counter)
    return _PROGRAMS[key]


def _sample_program(spec: ProgramSpec, graphdefs, mesh, counter, states, inputs):
    """The whole sampling run for one (padded) batch. Traced once per spec and shapes.

    states: (unet, vae, text_encoder, controlnet-or-None) nnx states.
    inputs: dict of batch-major arrays (see `Renderer._run`) and scalars.
    """
    counter[0] += 1  # runs at trace time only: counts compilations
    unet_def, vae_def, text_def, cn_def = graphdefs
    unet = nnx.merge(unet_def, states[0])
    vae = nnx.merge(vae_def, states[1])
    text_encoder = nnx.merge(text_def, states[2])
    controlnet = nnx.merge(cn_def, states[3]) if spec.use_controlnet else None

    ids = _constrain(inputs["input_ids"], mesh)
    latent_h, latent_w = spec.latent_hw
    latent_c = unet.config.in_channels
    sf = vae.scaling_factor
    shift = vae.shift_factor or 0.0
    keys = inputs["keys"]

    # ---- text: [B, T, D], and the CFG batch interleaved with the negative prompts.
    if spec.cfg:
        # One text-encoder pass over the interleaved (negative, positive) rows: the CFG batch layout.
        neg = _constrain(inputs["negative_input_ids"], mesh)
        context = text_encoder(_constrain(_interleave(neg, ids), mesh))[0]
    else:
        context = text_encoder(ids)[0]
    context = _constrain(context, mesh)

    # ---- initial noise and (for inpainting) image latents.
    latent_shape = (latent_h, latent_w, latent_c)
    noise = _constrain(inputs["noise"].astype(jnp.float32), mesh)

    # The schedule tables depend only on the static spec: they are compile-time constants.
    state = sched_lib.set_timesteps(spec.scheduler, spec.num_steps, (), begin_index=spec.begin_index)
    if spec.scheduler.kind == "dpmpp_2m":
        state = state.replace(prev_model_output=jnp.zeros_like(noise))

    if spec.inpaint:
        init = _constrain(inputs["image"], mesh).astype(jnp.float32) / 255.0
        init = 2.0 * init - 1.0
        posterior = vae.encode(init)
        image_noise = _constrain(inputs["image_noise"].astype(jnp.float32), mesh)
        image_latents = (posterior.mean + posterior.std * image_noise - shift) * sf
        # diffusers: binarise at 0.5, then F.interpolate(mode="nearest") to the latent size.
        mask = (_constrain(inputs["mask"], mesh) >= 0.5).astype(jnp.float32)[..., None]
        factor = mask.shape[1] // latent_h
        mask_latent = mask[:, ::factor, ::factor][:, :latent_h, :latent_w]
        if spec.begin_index == 0:
            latents = noise * state.init_noise_sigma
        else:
            latents = sched_lib.add_noise(state, image_latents, noise, spec.begin_index)
    else:
        latents = noise * state.init_noise_sigma

    if spec.use_controlnet:
        control = _constrain(inputs["control"], mesh).astype(jnp.float32) / 255.0
        control = _constrain(_interleave(control, control), mesh) if spec.cfg else control
    guidance = inputs["guidance_scale"]
    cn_scale = inputs["controlnet_scale"]
    num_loop = spec.num_steps - spec.begin_index

    def body(i, carry):
        latents, state = carry
        x = _constrain(_interleave(latents, latents), mesh) if spec.cfg else latents
        x = sched_lib.scale_model_input(state, x)
        t = sched_lib.current_timestep(state)
        if spec.use_controlnet:
            down, mid = controlnet(x, t, context, control, conditioning_scale=cn_scale)
            eps = unet(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        else:
            eps = unet(x, t, context)
        if spec.cfg:
            eps_uncond, eps_text = _split_interleaved(eps)
            eps = eps_uncond + guidance * (eps_text - eps_uncond)
        step_noise = None
        if spec.scheduler.kind == "euler_ancestral" or (spec.scheduler.kind == "ddim" and spec.scheduler.eta > 0):
            step_noise = _normal_per_example(keys, _STREAM_STEP, latent_shape, index=i)
        latents, state = sched_lib.step(state, eps, latents, noise=step_noise)
        if spec.inpaint:
            # Re-blend the known region with the original noised to the *next* step's level (clean at the end).
            noised = sched_lib.add_noise(state, image_latents, noise, state.step_index)
            proper = jnp.where(i < num_loop - 1, noised, image_latents)
            latents = (1 - mask_latent) * proper + mask_latent * latents
        return _constrain(latents, mesh), state

    latents, _ = jax.lax.fori_loop(0, num_loop, body, (latents, state))
    image = vae.decode(latents / sf + shift)
    image = jnp.clip(image * 0.5 + 0.5, 0.0, 1.0)
    return _constrain(jnp.round(image * 255.0).astype(jnp.uint8), mesh)


# ---------------------------------------------------------------------------------------------------------------
# The renderer.
# ---------------------------------------------------------------------------------------------------------------


def _as_prompt_list(prompts, name: str) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name} must be a list of strings, got {[type(p).__name__ for p in prompts]}")
    return prompts


@dataclasses.dataclass(eq=False)
class Renderer:
    """SD-1.5 (+ ControlNet) sampler. Build with `caig_jax.render.from_pretrained`.

    Attributes:
      unet: `UNet2DConditionModel`, called `unet(sample [B,h,w,4], timestep, encoder_hidden_states [B,77,768],
        down_block_additional_residuals=None, mid_block_additional_residual=None) -> [B,h,w,4]`.
      vae: `AutoencoderKL`: `vae.encode(x [B,H,W,3] in [-1,1])` -> posterior (`.mode()`, `.sample(key)`),
        `vae.decode(z [B,h,w,4]) -> [B,H,W,3]`, `vae.scaling_factor`.
      text_encoder: `CLIPTextModel`: `text_encoder(input_ids [B,77]) -> (last_hidden_state [B,77,768], pooled)`.
      controlnet: `ControlNetModel` or None: `controlnet(sample, timestep, encoder_hidden_states,
        controlnet_cond [B,H,W,3] in [0,1], conditioning_scale=1.0) -> (down residuals, mid residual)`.
      tokenizer: the transformers `CLIPTokenizer` of the checkpoint.
      scheduler_config: the checkpoint's `scheduler/scheduler_config.json` dict (diffusers keys).
      resolution: the canvas size (UNet `sample_size` x VAE scale factor: 512 for SD-1.5).
      mesh: the device mesh the parameters live on (None: the default device).
    """

    unet: Any
    vae: Any
    text_encoder: Any
    controlnet: Any
    tokenizer: Any
    scheduler_config: dict
    resolution: int
    mesh: Any = None
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.unet.config.in_channels != self.vae.config.latent_channels:
            raise ValueError(
                f"the UNet takes {self.unet.config.in_channels} input channels but the VAE has "
                f"{self.vae.config.latent_channels} latent channels: only plain (4-channel) UNets are supported; "
                "SD inpainting UNets (9 channels) are not"
            )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        modules = (self.unet, self.vae, self.text_encoder, self.controlnet)
        split = [nnx.split(m) if m is not None else (None, None) for m in modules]
        self._graphdefs = tuple(g for g, _ in split)
        self._states = tuple(s for _, s in split)
        self._used_programs: set[tuple] = set()
        self.max_length = int(getattr(self.tokenizer, "model_max_length", 77))
        if self.max_length > self.text_encoder.config.max_position_embeddings:
            self.max_length = int(self.text_encoder.config.max_position_embeddings)

    # -- bookkeeping -------------------------------------------------------------------------------------------

    @property
    def num_compiles(self) -> int:
        """How many times the sampling programs this renderer ran were traced (each trace compiles)."""
        return sum(_PROGRAMS[key][1][0] for key in self._used_programs)

    @property
    def batch_multiple(self) -> int:
        """Batches are padded to a multiple of this (the mesh's data x fsdp size)."""
        return 1 if self.mesh is None else parallel.num_batch_shards(self.mesh)

    def bucket_size(self, batch: int) -> int:
        m = self.batch_multiple
        return -(-batch // m) * m

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """int32[B, max_length]: padded/truncated ids as diffusers' `encode_prompt`."""
        out = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="np"
        )
        return np.asarray(out["input_ids"], np.int32)

    def _program(self, spec: ProgramSpec):
        self._used_programs.add((spec, self._graphdefs, self.mesh))
        return _get_program(spec, self._graphdefs, self.mesh)[0]

    def _scheduler_config(self, scheduler: str, eta: float = 0.0) -> sched_lib.SchedulerConfig:
        overrides = {"eta": eta} if scheduler == "ddim" else {}
        return sched_lib.scheduler_config_from_dict(scheduler, self.scheduler_config, **overrides)

    # -- the core call -----------------------------------------------------------------------------------------

    def _run(
        self,
        *,
        prompts: list[str],
        negative_prompts,
        height: int,
        width: int,
        steps: int,
        guidance_scale: float,
        scheduler: str,
        seed: int,
        latents,
        image=None,
        mask=None,
        control=None,
        image_noise=None,
        strength: float = 1.0,
        controlnet_scale: float = 1.0,
        eta: float = 0.0,
    ) -> np.ndarray:
        batch = len(prompts)
        if batch == 0:
            raise ValueError("prompts is empty")
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of the VAE scale factor {f}, got {height}x{width}")
        latent_hw = (height // f, width // f)
        latent_c = self.unet.config.in_channels
        cfg = guidance_scale > 1.0
        if negative_prompts is None:
            negative_prompts = [""] * batch
        else:
            negative_prompts = _as_prompt_list(negative_prompts, "negative_prompts")
            if len(negative_prompts) == 1 and batch > 1:
                negative_prompts = negative_prompts * batch
            if len(negative_prompts) != batch:
                raise ValueError(f"negative_prompts has {len(negative_prompts)} entries for {batch} prompts")
        use_controlnet = control is not None
        if use_controlnet and self.controlnet is None:
            raise ValueError("a control image was given but this renderer has no ControlNet (controlnet_path=None)")
        inpaint = image is not None
        config = self._scheduler_config(scheduler, eta)
        begin = sched_lib.begin_index_for_strength(steps, strength) if inpaint else 0
        if begin >= steps:
            raise ValueError(f"strength={strength} with {steps} steps leaves no denoising step")

        host: dict[str, Any] = {"input_ids": self.tokenize(prompts)}
        if cfg:
            host["negative_input_ids"] = self.tokenize(negative_prompts)
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            want = (batch,) + latent_hw + (latent_c,)
            if latents.shape != want:
                raise ValueError(f"latents must be float32{list(want)} (NHWC), got shape {list(latents.shape)}")
            host["noise"] = latents
        if inpaint:
            host["image"] = np.asarray(image, np.uint8)
            host["mask"] = np.asarray(mask, np.float32)
            if image_noise is not None:
                image_noise = np.asarray(image_noise, np.float32)
                want = (batch,) + latent_hw + (self.vae.config.latent_channels,)
                if image_noise.shape != want:
                    raise ValueError(f"image_noise must be float32{list(want)} (NHWC), got {list(image_noise.shape)}")
                host["image_noise"] = image_noise
        if use_controlnet:
            host["control"] = np.asarray(control, np.uint8)
        for name, x in host.items():
            if x.shape[0] != batch:
                raise ValueError(f"{name} has {x.shape[0]} rows for {batch} prompts")

        padded, _ = parallel.pad_to_multiple(host, self.batch_multiple)
        bucket = self.bucket_size(batch)
        keys, noise, seeded_image_noise = _seeded_noise(
            jnp.asarray(seed, jnp.uint32), batch=bucket, latent_shape=latent_hw + (latent_c,),
            with_image_noise=inpaint and "image_noise" not in padded,
        )
        padded["keys"] = keys
        padded.setdefault("noise", noise)
        if inpaint:
            padded.setdefault("image_noise", seeded_image_noise)
        if self.mesh is not None:
            padded = {k: jax.device_put(v, parallel.batch_sharding(self.mesh, v.ndim)) for k, v in padded.items()}
        inputs = dict(
            padded,
            guidance_scale=jnp.asarray(guidance_scale, jnp.float32),
            controlnet_scale=jnp.asarray(controlnet_scale, jnp.float32),
        )
        spec = ProgramSpec(
            scheduler=config,
            num_steps=steps,
            latent_hw=latent_hw,
            begin_index=begin,
            inpaint=inpaint,
            use_controlnet=use_controlnet,
            cfg=cfg,
        )
        program = self._program(spec)
        if self.mesh is not None:
            with jax.set_mesh(self.mesh):
                out = program(self._states, inputs)
        else:
            out = program(self._states, inputs)
        return _fetch(out)[:batch]

    # -- public entry points ------------------------------------------------------------------------------------

    def text_to_image(
        self,
        prompts: Sequence[str],
        *,
        steps: int = 30,
        guidance_scale: float = 7.5,
        scheduler: str = "euler_ancestral",
        seed: int = 0,
        latents=None,
        negative_prompts=None,
        height: int | None = None,
        width: int | None = None,
        control_image=None,
        controlnet_scale: float = 1.0,
    ) -> np.ndarray:
        """Text-to-image (optionally ControlNet-conditioned on `control_image` uint8[B, H, W, 3]).

        Returns uint8[B, height, width, 3] (default: the renderer's resolution).
        """
        prompts = _as_prompt_list(prompts, "prompts")
        height = height or self.resolution
        width = width or self.resolution
        if control_image is not None:
            control_image = np.asarray(control_image)
            if control_image.shape != (len(prompts), height, width, 3):
                raise ValueError(
                    f"control_image must be uint8[{len(prompts)}, {height}, {width}, 3], got {control_image.shape}"
                )
        return self._run(
            prompts=prompts, negative_prompts=negative_prompts, height=height, width=width, steps=steps,
            guidance_scale=guidance_scale, scheduler=scheduler, seed=seed, latents=latents, control=control_image,
            controlnet_scale=controlnet_scale,
        )

    def controlnet_inpaint(
        self,
        image,
        mask,
        control_image,
        prompts: Sequence[str],
        *,
        steps: int = 30,
        guidance_scale: float = 7.5,
        scheduler: str = "euler_ancestral",
        seed: int = 0,
        latents=None,
        negative_prompts=None,
        controlnet_scale: float = 1.0,
        strength: float = 1.0,
        image_noise=None,
    ) -> np.ndarray:
        """diffusers' `StableDiffusionControlNetInpaintPipeline(image, mask_image, control_image, ...)`.

        Args:
          image: uint8[B, H, W, 3] init images.
          mask: float32[B, H, W] in [0, 1] (1 = paint; binarised at 0.5) or uint8 0/255 (divided by 255).
          control_image: uint8[B, H, W, 3] ControlNet conditioning (e.g. Canny edges), or None for no ControlNet.
          latents: float32[B, H/f, W/f, 4] NHWC, replaces the initial noise (diffusers' `latents`). Unlike
            diffusers, which ignores `strength` when latents are given, it is the noise of the strength start.
          image_noise: float32[B, H/f, W/f, 4]: the noise of the VAE posterior sample of the init image (diffusers
            draws it from its generator); default: drawn from `seed`.
          strength: 1.0 starts from pure noise; < 1 starts from the noised init image.
        Returns:
          uint8[B, H, W, 3] (the raw pipeline output; no product paste-back).
        """
        prompts = _as_prompt_list(prompts, "prompts")
        image = np.asarray(image)
        if image.ndim != 4 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be uint8[B, H, W, 3], got {image.dtype}{list(image.shape)}")
        mask = np.asarray(mask)
        if mask.dtype == np.uint8:
            mask = mask.astype(np.float32) / 255.0
        if mask.ndim == 4 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if mask.shape != image.shape[:3]:
            raise ValueError(f"mask must be [B, H, W] = {list(image.shape[:3])}, got {list(mask.shape)}")
        if control_image is not None:
            control_image = np.asarray(control_image)
            if control_image.shape != image.shape or control_image.dtype != np.uint8:
                raise ValueError(
                    f"control_image must be uint8{list(image.shape)}, "
                    f"got {control_image.dtype}{list(control_image.shape)}"
                )
        _, height, width, _ = image.shape
        return self._run(
            prompts=prompts, negative_prompts=negative_prompts, height=height, width=width, steps=steps,
            guidance_scale=guidance_scale, scheduler=scheduler, seed=seed, latents=latents, image=image, mask=mask,
            control=control_image, image_noise=image_noise, strength=strength, controlnet_scale=controlnet_scale,
        )

    def prepare_products(self, product_rgba) -> dict[str, np.ndarray]:
        """CAIG's product handling for a batch of cut-outs (uint8[B, H, W, 4] or a list of uint8[H_i, W_i, 4]).

        Returns {"placed": uint8[B, R, R, 4], "image": uint8[B, R, R, 3], "mask": float32[B, R, R],
        "control": uint8[B, R, R, 3]} with R = `resolution`.
        """
        if isinstance(product_rgba, np.ndarray):
            if product_rgba.ndim != 4 or product_rgba.shape[-1] != 4:
                raise ValueError(f"product_rgba must be uint8[B, H, W, 4], got shape {list(product_rgba.shape)}")
            items = list(product_rgba)
        else:
            items = [np.asarray(p) for p in product_rgba]
        placed, masks, controls = [], [], []
        for b, rgba in enumerate(items):
            if rgba.ndim != 3 or rgba.shape[-1] != 4 or rgba.dtype != np.uint8:
                raise ValueError(f"product_rgba[{b}] must be uint8[H, W, 4], got {rgba.dtype}{list(rgba.shape)}")
            if not np.any(rgba[..., 3]):
                raise ValueError(f"product_rgba[{b}] has an empty alpha channel: nothing marks the product")
            p = product_lib.place_product(rgba, size=self.resolution)
            placed.append(p)
            masks.append(product_lib.inpaint_mask(p[..., 3]))
            controls.append(product_lib.control_image(p))
        placed = np.stack(placed)
        return {
            "placed": placed,
            "image": placed[..., :3].copy(),
            "mask": np.stack(masks),
            "control": np.stack(controls),
        }

    def inpaint_product(
        self,
        product_rgba,
        prompts: Sequence[str],
        *,
        steps: int = 30,
        guidance_scale: float = 7.5,
        scheduler: str = "euler_ancestral",
        seed: int = 0,
        latents=None,
        negative_prompts=None,
        controlnet_scale: float = 1.0,
        image_noise=None,
    ) -> np.ndarray:
        """Paints a background for each product cut-out, CAIG style. Returns uint8[B, R, R, 3], R = `resolution`.

        Args:
          product_rgba: uint8[B, H, W, 4] cut-outs (alpha marks the product), or a list of uint8[H_i, W_i, 4].
          prompts: B background prompts.
          steps / guidance_scale / scheduler ("euler_ancestral", "euler", "ddim", "dpmpp_2m") / seed: sampling.
          latents: optional float32[B, R/8, R/8, 4] NHWC replacing the initial noise.
          negative_prompts: None (empty strings), one string, or B strings.
          controlnet_scale: ControlNet conditioning scale (ignored without a ControlNet).
          image_noise: optional VAE-posterior noise (see `controlnet_inpaint`).
        """
        prompts = _as_prompt_list(prompts, "prompts")
        prepared = self.prepare_products(product_rgba)
        if len(prepared["placed"]) != len(prompts):
            raise ValueError(f"{len(prepared['placed'])} products but {len(prompts)} prompts")
        raw = self.controlnet_inpaint(
            prepared["image"], prepared["mask"], prepared["control"] if self.controlnet is not None else None,
            prompts, steps=steps, guidance_scale=guidance_scale, scheduler=scheduler, seed=seed, latents=latents,
            negative_prompts=negative_prompts, controlnet_scale=controlnet_scale, image_noise=image_noise,
        )
        return np.stack([product_lib.paste_product(img, placed) for img, placed in zip(raw, prepared["placed"])])


def _fetch(x) -> np.ndarray:
    """Brings a (possibly multi-host sharded) result to this host as numpy."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

