"""Diffusion samplers as pure functions over an explicit state: Euler-ancestral, Euler, DDIM, DPM-Solver++ 2M.

Each scheduler reproduces its diffusers 0.42 counterpart (`EulerAncestralDiscreteScheduler`,
`EulerDiscreteScheduler`, `DDIMScheduler`, `DPMSolverMultistepScheduler` with `solver_order=2`) when built from
the same `scheduler_config.json`, the way `XScheduler.from_config(pipe.scheduler.config)` does it: keys the target
class knows are read, missing keys take *that class's* defaults (for example SD-1.5's PNDM config has no
`timestep_spacing`, so Euler-ancestral uses its own default "linspace" while DDIM uses "leading").

Usage (everything after `set_timesteps` is jittable; the loop below can sit inside `lax.fori_loop`):

    config = scheduler_config_from_dict("euler_ancestral", json.load(open(".../scheduler/scheduler_config.json")))
    state = set_timesteps(config, num_inference_steps=30, sample_shape=latents.shape)
    latents = latents * state.init_noise_sigma
    for _ in range(state.num_steps):
        t = current_timestep(state)                                  # float32[] for the UNet
        eps = unet(scale_model_input(state, latents), t, text)
        latents, state = step(state, eps, latents, noise=jax.random.normal(key_i, latents.shape))

The schedule tables (timesteps, sigmas, DDIM alphas) are computed once on the host in numpy, mirroring the
dtype flow of diffusers (torch float32 tensors, cumprod accumulated in float64 as torch does on CPU), then live in
the state as arrays: a new seed or prompt never changes the jitted program, only a new step count does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from caig_jax.errors import MissingPathError

# runwayml/stable-diffusion-v1-5 `scheduler/scheduler_config.json`: used for single-file checkpoints, which ship
# no scheduler config.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

SCHEDULERS = ("euler_ancestral", "euler", "ddim", "dpmpp_2m")

# Per-class defaults of the diffusers constructors (diffusers 0.42.1). `from_config` fills missing keys from the
# *target* class, so the defaults must be kept per class.
_COMMON_DEFAULTS = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    prediction_type="epsilon",
    timestep_spacing="linspace",
    steps_offset=0,
    rescale_betas_zero_snr=False,
)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "euler_ancestral": dict(_COMMON_DEFAULTS),
    "euler": dict(
        _COMMON_DEFAULTS,
        interpolation_type="linear",
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        sigma_min=None,
        sigma_max=None,
        timestep_type="discrete",
        final_sigmas_type="zero",
    ),
    "ddim": dict(
        _COMMON_DEFAULTS,
        clip_sample=True,
        set_alpha_to_one=True,
        thresholding=False,
        dynamic_thresholding_ratio=0.995,
        clip_sample_range=1.0,
        sample_max_value=1.0,
        timestep_spacing="leading",
    ),
    "dpmpp_2m": dict(
        _COMMON_DEFAULTS,
        solver_order=2,
        thresholding=False,
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        use_lu_lambdas=False,
        use_flow_sigmas=False,
        final_sigmas_type="zero",
        lambda_min_clipped=-float("inf"),
        variance_type=None,
    ),
}

# diffusers class names, for error messages and for `scheduler_config_from_dict(kind=None, ...)`.
DIFFUSERS_CLASS = {
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Hashable scheduler settings (a static part of the jitted program). Build with `scheduler_config_from_dict`."""

    kind: str
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    # Euler
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_type: str = "discrete"
    final_sigmas_type: str = "zero"
    # DDIM
    clip_sample: bool = False
    set_alpha_to_one: bool = True
    clip_sample_range: float = 1.0
    eta: float = 0.0  # a `step()` argument in diffusers (pipelines pass eta=0.0); fixed per sampler here
    # DDIM / DPM thresholding
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    # DPM-Solver++
    solver_order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    lambda_min_clipped: float = -float("inf")


def scheduler_config_from_dict(kind: str, config: Mapping[str, Any] | None = None, **overrides) -> SchedulerConfig:
    """`SchedulerConfig` for `kind` from a diffusers scheduler config dict (any scheduler class's json).

    Mirrors `diffusers.<Class>.from_config(config)`: unknown keys are ignored, missing keys take the target class's
    defaults. Options this module does not implement raise a ValueError naming the key.
    """
    if kind not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {kind!r}; expected one of {SCHEDULERS}")
    defaults = _DEFAULTS[kind]
    given = {k: v for k, v in dict(config or {}).items() if not k.startswith("_")}
    given.update(overrides)
    values = {k: given.get(k, d) for k, d in defaults.items()}

    def unsupported(key, why):
        raise ValueError(f"scheduler config key {key}={values[key]!r} is not supported for {kind} ({why})")

    schedules = ("linear", "scaled_linear", "squaredcos_cap_v2")
    if values["beta_schedule"] not in schedules and values["trained_betas"] is None:
        unsupported("beta_schedule", "use linear, scaled_linear or squaredcos_cap_v2")
    if values["timestep_spacing"] not in ("linspace", "leading", "trailing"):
        unsupported("timestep_spacing", "use linspace, leading or trailing")
    # diffusers' Euler-ancestral raises NotImplementedError for prediction_type="sample".
    allowed_pred = ("epsilon", "v_prediction") + (() if kind == "euler_ancestral" else ("sample",))
    if values["prediction_type"] not in allowed_pred:
        unsupported("prediction_type", f"use one of {allowed_pred}")
    for key in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"):
        if values.get(key):
            unsupported(key, "only the default and Karras sigma schedules are implemented")
    if kind == "euler" and values["interpolation_type"] != "linear":
        unsupported("interpolation_type", "only 'linear' is implemented")
    if kind == "dpmpp_2m":
        if values["algorithm_type"] != "dpmsolver++":
            unsupported("algorithm_type", "this is DPM-Solver++ 2M; use algorithm_type='dpmsolver++'")
        if values["solver_order"] not in (1, 2):
            unsupported("solver_order", "DPM-Solver++ 2M implements orders 1 and 2")
        if values["solver_type"] not in ("midpoint", "heun"):
            unsupported("solver_type", "use midpoint or heun")
        if values["variance_type"] is not None:
            unsupported("variance_type", "learned variances are not used by SD")
    if values.get("final_sigmas_type", "zero") not in ("zero", "sigma_min"):
        unsupported("final_sigmas_type", "use zero or sigma_min")

    trained = values["trained_betas"]
    fields = {f.name for f in dataclasses.fields(SchedulerConfig)}
    kwargs = {k: v for k, v in values.items() if k in fields}
    kwargs["trained_betas"] = None if trained is None else tuple(float(b) for b in trained)
    if "eta" in overrides:
        kwargs["eta"] = float(overrides["eta"])
    return SchedulerConfig(kind=kind, **kwargs)


def load_scheduler_config(path: str) -> dict[str, Any]:
    """Reads `scheduler_config.json` (a file or the `scheduler/` folder holding it)."""
    file = os.path.join(path, "scheduler_config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise MissingPathError(f"scheduler config not found: {file} (expected a diffusers scheduler_config.json)")
    with open(file) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: invalid JSON: {e}") from e


# ----------------------------------------------------------------------------------------------------------------
# Host-side schedule tables (numpy, mirroring the dtype flow of the torch implementation).
# ----------------------------------------------------------------------------------------------------------------


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=float32)` bit for bit (float32 step, fused multiply-add halves)."""
    f32 = np.float32
    start32, end32 = f32(start), f32(end)
    if steps == 1:
        return np.array([start32], f32)
    step = f32((end32 - start32) / f32(steps - 1))
    i = np.arange(steps)
    lo = np.float64(start32) + np.float64(step) * i
    hi = np.float64(end32) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, lo, hi).astype(f32)


def _betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps), max_beta)
        for i in range(num_diffusion_timesteps)
    ]
    return np.asarray(betas, np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    alphas_cumprod = np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32)
    sqrt_ab = np.sqrt(alphas_cumprod)
    first, last = sqrt_ab[0].copy(), sqrt_ab[-1].copy()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_bar = sqrt_ab**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """float32[num_train_timesteps]: the training noise schedule's cumulative alpha products."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, np.float32)
    elif config.beta_schedule == "linear":
        betas = _torch_linspace_f32(config.beta_start, config.beta_end, n)
    elif config.beta_schedule == "scaled_linear":
        betas = _torch_linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
    elif config.beta_schedule == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(n)
    else:
        raise ValueError(f"unknown beta_schedule {config.beta_schedule!r}")
    if config.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    # torch accumulates float32 cumprod in float64 on CPU.
    ac = np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)
    if config.rescale_betas_zero_snr and config.kind != "ddim":
        ac[-1] = 2.0**-24  # diffusers: "close to 0 without being 0 so first sigma is not inf"
    return ac


def _spaced_timesteps(config: SchedulerConfig, steps: int) -> np.ndarray:
    """Euler-family timestep spacing (float32 for Euler/Euler-a, as diffusers)."""
    n = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    if config.timestep_spacing == "leading":
        ratio = n // steps
        t = (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.float32)
        return t + config.steps_offset
    ratio = n / steps
    return np.arange(n, 0, -ratio).round().copy().astype(np.float32) - 1


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def _karras(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0, 1, steps)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def _tables(config: SchedulerConfig, steps: int) -> dict[str, np.ndarray]:
    """Per-kind schedule tables for `steps` inference steps (all numpy)."""
    if steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
    n = config.num_train_timesteps
    if steps > n:
        raise ValueError(f"num_inference_steps={steps} cannot exceed num_train_timesteps={n}")
    ac = alphas_cumprod(config)
    base_sigmas = np.sqrt((np.float32(1) - ac) / ac).astype(np.float32)
    out: dict[str, np.ndarray] = {}
    if config.kind in ("euler_ancestral", "euler"):
        timesteps = _spaced_timesteps(config, steps)
        sigmas = np.interp(timesteps, np.arange(0, len(base_sigmas)), base_sigmas)
        if config.kind == "euler" and config.use_karras_sigmas:
            log_sigmas = np.log(base_sigmas)
            lo = config.sigma_min if config.sigma_min is not None else float(sigmas[-1])
            hi = config.sigma_max if config.sigma_max is not None else float(sigmas[0])
            sigmas = _karras(lo, hi, steps)
            timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        last = 0.0
        if config.kind == "euler" and config.final_sigmas_type == "sigma_min":
            last = float(np.sqrt((np.float32(1) - ac[0]) / ac[0]))
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        if config.kind == "euler" and config.timestep_type == "continuous" and config.prediction_type == "v_prediction":
            timesteps = (0.25 * np.log(sigmas[:-1].astype(np.float32))).astype(np.float32)
        timesteps = timesteps.astype(np.float32)
        max_sigma = sigmas.max()
        if config.timestep_spacing in ("linspace", "trailing"):
            init = max_sigma
        else:
            init = np.sqrt(np.float32(max_sigma) ** 2 + np.float32(1))
        out.update(timesteps=timesteps, sigmas=sigmas, init_noise_sigma=np.float32(init))
    elif config.kind == "ddim":
        if config.timestep_spacing == "linspace":
            timesteps = np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
        elif config.timestep_spacing == "leading":
            ratio = n // steps
            timesteps = (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.int64) + config.steps_offset
        else:
            timesteps = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        final = np.float32(1.0) if config.set_alpha_to_one else ac[0]
        prev = timesteps - n // steps
        alpha_t = ac[timesteps]
        alpha_prev = np.where(prev >= 0, ac[np.clip(prev, 0, n - 1)], final).astype(np.float32)
        # `sigmas` is unused by DDIM; a zero column keeps the state's shape uniform across kinds.
        out.update(
            timesteps=timesteps.astype(np.float32),
            sigmas=np.zeros(steps + 1, np.float32),
            alpha_t=alpha_t.astype(np.float32),
            alpha_prev=alpha_prev,
            init_noise_sigma=np.float32(1.0),
        )
    else:  # dpmpp_2m
        alpha = np.sqrt(ac)
        sigma = np.sqrt(np.float32(1) - ac)
        lambda_t = (np.log(alpha) - np.log(sigma)).astype(np.float32)
        clipped_idx = int(np.searchsorted(lambda_t[::-1], config.lambda_min_clipped))
        last_t = n - clipped_idx
        if config.timestep_spacing == "linspace":
            timesteps = np.linspace(0, last_t - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif config.timestep_spacing == "leading":
            ratio = last_t // (steps + 1)
            timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            timesteps = timesteps + config.steps_offset
        else:
            timesteps = np.arange(last_t, 0, -n / steps).round().copy().astype(np.int64) - 1
        log_sigmas = np.log(base_sigmas)
        if config.use_karras_sigmas:
            flipped = np.flip(base_sigmas).copy()
            sigmas = _karras(float(flipped[-1]), float(flipped[0]), steps)
            timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
            if config.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
            timesteps = timesteps.astype(np.int64)
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(base_sigmas)), base_sigmas)
        last = 0.0 if config.final_sigmas_type == "zero" else float(np.sqrt((np.float32(1) - ac[0]) / ac[0]))
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        out.update(timesteps=timesteps.astype(np.float32), sigmas=sigmas, init_noise_sigma=np.float32(1.0))
    return out


# ----------------------------------------------------------------------------------------------------------------
# State and pure step functions.
# ----------------------------------------------------------------------------------------------------------------


@struct.dataclass
class SchedulerState:
    """Everything a sampler needs between steps; a pytree (the config is static).

    timesteps:        float32[S]   the model's timestep for each inference step
    sigmas:           float32[S+1] Euler/DPM noise levels (zeros for DDIM)
    alpha_t/alpha_prev: float32[S] DDIM's alphas_cumprod at t and at t - T/S (ones otherwise)
    init_noise_sigma: float32[]    scale of the initial noise
    step_index:       int32[]      absolute index of the next step (starts at `begin_index`)
    lower_order_nums: int32[]      DPM-Solver++: how many steps were taken (capped at the solver order)
    prev_model_output: float32[sample_shape] DPM-Solver++: the previous step's data prediction x0
    """

    timesteps: jax.Array
    sigmas: jax.Array
    alpha_t: jax.Array
    alpha_prev: jax.Array
    init_noise_sigma: jax.Array
    step_index: jax.Array
    lower_order_nums: jax.Array
    prev_model_output: jax.Array
    config: SchedulerConfig = struct.field(pytree_node=False)

    @property
    def num_steps(self) -> int:
        """Total inference steps S of the schedule (a static shape)."""
        return int(self.timesteps.shape[0])


def begin_index_for_strength(num_inference_steps: int, strength: float) -> int:
    """First step index when denoising from a partially noised image (diffusers' `get_timesteps`)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    return max(num_inference_steps - init_timestep, 0)


def set_timesteps(
    config: SchedulerConfig,
    num_inference_steps: int,
    sample_shape: tuple[int, ...] = (),
    *,
    begin_index: int = 0,
) -> SchedulerState:
    """Builds the state for `num_inference_steps` steps starting at step `begin_index` (host side, not jitted).

    `sample_shape` is the latent shape (only DPM-Solver++ keeps a sample-shaped history; other kinds store a
    scalar placeholder).
    """
    t = _tables(config, num_inference_steps)
    steps = num_inference_steps
    if not 0 <= begin_index <= steps:
        raise ValueError(f"begin_index={begin_index} must be within [0, {steps}]")
    history_shape = tuple(sample_shape) if config.kind == "dpmpp_2m" else ()
    return SchedulerState(
        timesteps=jnp.asarray(t["timesteps"]),
        sigmas=jnp.asarray(t["sigmas"]),
        alpha_t=jnp.asarray(t.get("alpha_t", np.ones(steps, np.float32))),
        alpha_prev=jnp.asarray(t.get("alpha_prev", np.ones(steps, np.float32))),
        init_noise_sigma=jnp.asarray(t["init_noise_sigma"], jnp.float32),
        step_index=jnp.asarray(begin_index, jnp.int32),
        lower_order_nums=jnp.asarray(0, jnp.int32),
        prev_model_output=jnp.zeros(history_shape, jnp.float32),
        config=config,
    )


def current_timestep(state: SchedulerState) -> jax.Array:
    """float32[]: the timestep to give the model at the current step."""
    return state.timesteps[state.step_index]


def scale_model_input(state: SchedulerState, sample: jax.Array) -> jax.Array:
    """Euler-family samplers feed the model `x / sqrt(sigma^2 + 1)`; DDIM and DPM-Solver feed `x` unchanged."""
    if state.config.kind in ("euler_ancestral", "euler"):
        sigma = state.sigmas[state.step_index]
        return sample / ((sigma**2 + 1) ** 0.5)
    return sample


def add_noise(state: SchedulerState, original: jax.Array, noise: jax.Array, step_index: jax.Array | int) -> jax.Array:
    """Noises `original` to the level of schedule step `step_index` (absolute index, as diffusers' begin/step index).

    Inpainting calls it with the *next* step's index after every step to re-blend the known region; img2img calls
    it with `begin_index` for the starting latents.
    """
    cfg = state.config
    idx = jnp.asarray(step_index, jnp.int32)
    if cfg.kind in ("euler_ancestral", "euler"):
        return original + noise * state.sigmas[idx].astype(original.dtype)
    if cfg.kind == "ddim":
        a = state.alpha_t[jnp.minimum(idx, state.num_steps - 1)].astype(original.dtype)
        return (a**0.5) * original + ((1 - a) ** 0.5) * noise
    alpha_t, sigma_t = _alpha_sigma(state.sigmas[idx].astype(original.dtype))
    return alpha_t * original + sigma_t * noise


def _alpha_sigma(sigma):
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def _threshold_sample(sample: jax.Array, ratio: float, max_value: float) -> jax.Array:
    """Dynamic thresholding (Imagen): per example, clip at the `ratio` quantile of |x| (>= 1) and rescale."""
    b = sample.shape[0]
    flat = sample.reshape(b, -1).astype(jnp.float32)
    s = jnp.quantile(jnp.abs(flat), ratio, axis=1)
    s = jnp.clip(s, 1.0, max_value)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(sample.shape).astype(sample.dtype)


def step(
    state: SchedulerState,
    model_output: jax.Array,
    sample: jax.Array,
    *,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, SchedulerState]:
    """One sampler step x_t -> x_{t-1}. Returns (prev_sample float32, advanced state).

    `noise` (same shape as `sample`) is required by Euler-ancestral (and DDIM with eta > 0): the caller draws it,
    which is how tests inject diffusers' exact noise and how the pipeline keeps per-example random streams.
    """
    cfg = state.config
    i = state.step_index
    sample = sample.astype(jnp.float32)
    model_output = model_output.astype(jnp.float32)
    new_state = state.replace(step_index=i + 1)
    if cfg.kind == "euler_ancestral":
        if noise is None:
            raise ValueError("euler_ancestral.step needs `noise` (float32 like sample)")
        sigma_from = state.sigmas[i]
        sigma_to = state.sigmas[i + 1]
        if cfg.prediction_type == "epsilon":
            x0 = sample - sigma_from * model_output
        else:  # v_prediction
            x0 = model_output * (-sigma_from / (sigma_from**2 + 1) ** 0.5) + (sample / (sigma_from**2 + 1))
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        derivative = (sample - x0) / sigma_from
        prev = sample + derivative * (sigma_down - sigma_from)
        prev = prev + noise.astype(jnp.float32) * sigma_up
        return prev, new_state

    if cfg.kind == "euler":
        sigma = state.sigmas[i]
        if cfg.prediction_type == "sample":
            x0 = model_output
        elif cfg.prediction_type == "epsilon":
            x0 = sample - sigma * model_output
        else:
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        derivative = (sample - x0) / sigma
        prev = sample + derivative * (state.sigmas[i + 1] - sigma)
        return prev, new_state

    if cfg.kind == "ddim":
        alpha_prod_t = state.alpha_t[i]
        alpha_prod_prev = state.alpha_prev[i]
        beta_prod_t = 1 - alpha_prod_t
        if cfg.prediction_type == "epsilon":
            x0 = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
            eps = model_output
        elif cfg.prediction_type == "sample":
            x0 = model_output
            eps = (sample - alpha_prod_t**0.5 * x0) / beta_prod_t**0.5
        else:
            x0 = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
            eps = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
        if cfg.thresholding:
            x0 = _threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        elif cfg.clip_sample:
            x0 = jnp.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
        beta_prod_prev = 1 - alpha_prod_prev
        variance = (beta_prod_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)
        std_dev_t = cfg.eta * variance**0.5
        direction = (1 - alpha_prod_prev - std_dev_t**2) ** 0.5 * eps
        prev = alpha_prod_prev**0.5 * x0 + direction
        if cfg.eta > 0:
            if noise is None:
                raise ValueError("ddim.step with eta > 0 needs `noise`")
            prev = prev + std_dev_t * noise.astype(jnp.float32)
        return prev, new_state

    # DPM-Solver++ (2M): data-prediction multistep solver.
    s = state.num_steps
    sigma_s0 = state.sigmas[i]
    alpha_s0, sigma_s0_t = _alpha_sigma(sigma_s0)
    if cfg.prediction_type == "epsilon":
        x0 = (sample - sigma_s0_t * model_output) / alpha_s0
    elif cfg.prediction_type == "sample":
        x0 = model_output
    else:
        x0 = alpha_s0 * sample - sigma_s0_t * model_output
    if cfg.thresholding:
        x0 = _threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)

    alpha_t, sigma_t = _alpha_sigma(state.sigmas[i + 1])
    alpha_s1, sigma_s1 = _alpha_sigma(state.sigmas[jnp.maximum(i - 1, 0)])
    lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)
    lambda_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0_t)
    lambda_s1 = jnp.log(alpha_s1) - jnp.log(sigma_s1)
    h = lambda_t - lambda_s0
    first = (sigma_t / sigma_s0_t) * sample - (alpha_t * (jnp.exp(-h) - 1.0)) * x0

    m0, m1 = x0, state.prev_model_output
    h_0 = lambda_s0 - lambda_s1
    r0 = h_0 / h
    d1 = (1.0 / r0) * (m0 - m1)
    if cfg.solver_type == "midpoint":
        second = (sigma_t / sigma_s0_t) * sample - (alpha_t * (jnp.exp(-h) - 1.0)) * m0 - 0.5 * (
            alpha_t * (jnp.exp(-h) - 1.0)
        ) * d1
    else:  # heun
        second = (
            (sigma_t / sigma_s0_t) * sample
            - (alpha_t * (jnp.exp(-h) - 1.0)) * m0
            + (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * d1
        )
    lower_order_final = (i == s - 1) & (
        cfg.euler_at_final or (cfg.lower_order_final and s < 15) or cfg.final_sigmas_type == "zero"
    )
    use_first = (cfg.solver_order == 1) | (state.lower_order_nums < 1) | lower_order_final
    prev = jnp.where(use_first, first, second)
    new_state = new_state.replace(
        prev_model_output=x0,
        lower_order_nums=jnp.minimum(state.lower_order_nums + 1, cfg.solver_order),
    )
    return prev, new_state
