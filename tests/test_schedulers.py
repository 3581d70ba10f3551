"""Scheduler parity with diffusers 0.42.1: same model outputs -> same trajectories (< 1e-5 relative)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from caig_jax.diffusion import schedulers as S
from caig_jax.diffusion.schedulers import SD15_SCHEDULER_CONFIG

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5
SD15 = SD15_SCHEDULER_CONFIG  # SD-1.5's scheduler/scheduler_config.json (PNDM: no timestep_spacing key)
CLASSES = {
    "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "ddim": diffusers.DDIMScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
}
SHAPE = (2, 4, 5, 3)  # NCHW for torch; ours gets the NHWC transpose


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(np.asarray(b))), 1e-12))


def model_fn(eps_k, sample):
    """A stand-in for the UNet that depends on the sample (float32, identical in numpy and jax)."""
    return eps_k + np.float32(0.1) * sample


def nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def run_reference(kind, cfg, steps, x_init, eps, noises, begin=0):
    sched = CLASSES[kind].from_config(cfg)
    sched.set_timesteps(steps)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(begin)
    x = torch.from_numpy(nchw(x_init)).clone()
    traj, inputs = [], []
    for k, t in enumerate(sched.timesteps[begin:]):
        inp = sched.scale_model_input(x, t)
        inputs.append(nhwc(inp.numpy()))
        out = torch.from_numpy(model_fn(nchw(eps[k]), inp.numpy()))
        kwargs = {}
        if kind == "euler_ancestral":
            # Inject the exact noise: a generator whose next draw is noises[k].
            gen = _GeneratorFeeding(torch.from_numpy(nchw(noises[k])))
            kwargs["generator"] = gen
        x = sched.step(out, t, x, **kwargs).prev_sample
        traj.append(nhwc(x.numpy()))
    return sched, np.stack(traj), np.stack(inputs)


class _GeneratorFeeding:
    """Not a torch.Generator: `randn_tensor` is patched in the test to return the queued tensor."""

    def __init__(self, value):
        self.value = value


@pytest.fixture
def feed_noise(monkeypatch):
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as mod

    real = mod.randn_tensor

    def fake(shape, generator=None, **kw):
        if isinstance(generator, _GeneratorFeeding):
            assert tuple(generator.value.shape) == tuple(shape)
            return generator.value.clone()
        return real(shape, generator=generator, **kw)

    monkeypatch.setattr(mod, "randn_tensor", fake)


def run_ours(kind, cfg, steps, x_init, eps, noises, begin=0):
    config = S.scheduler_config_from_dict(kind, cfg)
    state = S.set_timesteps(config, steps, x_init.shape, begin_index=begin)

    @jax.jit
    def loop(state, x, eps, noises):
        def body(k, carry):
            state, x, traj, inputs = carry
            inp = S.scale_model_input(state, x)
            out = model_fn(eps[k], inp)
            x, state = S.step(state, out, x, noise=noises[k])
            return state, x, traj.at[k].set(x), inputs.at[k].set(inp)

        n = eps.shape[0]
        traj = jnp.zeros((n,) + x.shape, jnp.float32)
        return jax.lax.fori_loop(0, n, body, (state, x, traj, traj))

    state, _, traj, inputs = loop(state, jnp.asarray(x_init), jnp.asarray(eps), jnp.asarray(noises))
    return config, state, np.asarray(traj), np.asarray(inputs)


CASES = [
    # (kind, config, steps)
    ("euler_ancestral", SD15, 30),
    ("euler_ancestral", dict(SD15, timestep_spacing="leading"), 7),
    ("euler_ancestral", dict(SD15, timestep_spacing="trailing", prediction_type="v_prediction"), 6),
    ("euler", SD15, 30),
    ("euler", dict(SD15, timestep_spacing="leading"), 9),
    ("euler", dict(SD15, timestep_spacing="trailing", prediction_type="v_prediction"), 8),
    ("euler", dict(SD15, use_karras_sigmas=True), 10),
    ("euler", {"beta_schedule": "squaredcos_cap_v2"}, 5),
    ("ddim", SD15, 30),
    ("ddim", dict(SD15, set_alpha_to_one=True, timestep_spacing="trailing"), 7),
    ("ddim", dict(SD15, timestep_spacing="linspace", prediction_type="v_prediction"), 6),
    ("ddim", {"beta_schedule": "linear", "clip_sample": True}, 5),
    ("dpmpp_2m", SD15, 20),
    ("dpmpp_2m", dict(SD15, timestep_spacing="leading"), 6),
    ("dpmpp_2m", dict(SD15, timestep_spacing="trailing", prediction_type="v_prediction"), 16),
    ("dpmpp_2m", dict(SD15, use_karras_sigmas=True, solver_type="heun"), 8),
    ("dpmpp_2m", {"beta_schedule": "squaredcos_cap_v2", "final_sigmas_type": "sigma_min"}, 5),
]


@pytest.mark.parametrize("kind,cfg,steps", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_trajectory_matches_diffusers(kind, cfg, steps, feed_noise):
    rng = np.random.default_rng(steps)
    b, c, h, w = SHAPE
    x_init = rng.standard_normal((b, h, w, c)).astype(np.float32)
    eps = rng.standard_normal((steps, b, h, w, c)).astype(np.float32)
    noises = rng.standard_normal((steps, b, h, w, c)).astype(np.float32)
    ref_sched, ref_traj, ref_inputs = run_reference(kind, cfg, steps, x_init, eps, noises)
    config, state, traj, inputs = run_ours(kind, cfg, steps, x_init, eps, noises)

    ours_state = S.set_timesteps(config, steps, x_init.shape)
    # Spaced timesteps are exact; Karras timesteps are interpolated from log-sigmas (torch's float32 sqrt can
    # differ from a correctly rounded one by 1 ulp), hence rtol instead of equality.
    np.testing.assert_allclose(
        np.asarray(ours_state.timesteps), ref_sched.timesteps.numpy().astype(np.float32), rtol=1e-6, atol=0
    )
    if kind in ("euler_ancestral", "euler"):
        np.testing.assert_allclose(float(ours_state.init_noise_sigma), float(ref_sched.init_noise_sigma), rtol=1e-6)
    else:
        assert float(ours_state.init_noise_sigma) == float(ref_sched.init_noise_sigma) == 1.0
    assert rel(inputs, ref_inputs) < TOL, f"scale_model_input differs: {rel(inputs, ref_inputs)}"
    for k in range(steps):
        err = rel(traj[k], ref_traj[k])
        assert err < TOL, f"{kind} step {k}: max rel err {err:.3g} >= {TOL}"
    assert int(state.step_index) == steps


@pytest.mark.parametrize("kind", S.SCHEDULERS)
def test_strength_begin_index_and_add_noise(kind, feed_noise):
    """img2img / inpaint `strength`: start mid-schedule, noise with add_noise at begin and at each next step."""
    steps, strength = 10, 0.6
    begin = S.begin_index_for_strength(steps, strength)
    assert begin == 4
    rng = np.random.default_rng(0)
    b, c, h, w = SHAPE
    x0 = rng.standard_normal((b, h, w, c)).astype(np.float32)
    noise = rng.standard_normal((b, h, w, c)).astype(np.float32)

    ref = CLASSES[kind].from_config(SD15)
    ref.set_timesteps(steps)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(begin)
    timesteps = ref.timesteps[begin:]
    ref_start = ref.add_noise(torch.from_numpy(nchw(x0)), torch.from_numpy(nchw(noise)), timesteps[:1].repeat(b))

    config = S.scheduler_config_from_dict(kind, SD15)
    state = S.set_timesteps(config, steps, x0.shape, begin_index=begin)
    ours_start = S.add_noise(state, jnp.asarray(x0), jnp.asarray(noise), begin)
    assert rel(ours_start, nhwc(ref_start.numpy())) < TOL

    eps = rng.standard_normal((steps - begin, b, h, w, c)).astype(np.float32)
    noises = rng.standard_normal((steps - begin, b, h, w, c)).astype(np.float32)
    start = nhwc(ref_start.numpy())
    _, ref_traj, _ = run_reference(kind, SD15, steps, start, eps, noises, begin=begin)
    _, state_end, traj, _ = run_ours(kind, SD15, steps, start, eps, noises, begin=begin)
    for k in range(steps - begin):
        assert rel(traj[k], ref_traj[k]) < TOL, (k, rel(traj[k], ref_traj[k]))

    # The inpaint re-blend: after step i the known region is noised to timesteps[i + 1] (diffusers' step_index).
    ref2 = CLASSES[kind].from_config(SD15)
    ref2.set_timesteps(steps)
    if hasattr(ref2, "set_begin_index"):
        ref2.set_begin_index(begin)
        ref2._step_index = begin + 1  # as after the first step
    ref_blend = ref2.add_noise(torch.from_numpy(nchw(x0)), torch.from_numpy(nchw(noise)), timesteps[1:2])
    ours_blend = S.add_noise(state, jnp.asarray(x0), jnp.asarray(noise), begin + 1)
    assert rel(ours_blend, nhwc(ref_blend.numpy())) < TOL


def test_config_defaults_follow_the_target_class():
    """from_config semantics: SD-1.5's PNDM json has no timestep_spacing -> class defaults differ per sampler."""
    assert S.scheduler_config_from_dict("euler_ancestral", SD15).timestep_spacing == "linspace"
    assert S.scheduler_config_from_dict("ddim", SD15).timestep_spacing == "leading"
    assert S.scheduler_config_from_dict("ddim", {}).clip_sample is True
    assert S.scheduler_config_from_dict("ddim", SD15).clip_sample is False
    for kind, cls in CLASSES.items():
        ref = cls.from_config(SD15)
        ours = S.scheduler_config_from_dict(kind, SD15)
        for key in ("timestep_spacing", "prediction_type", "steps_offset", "beta_schedule"):
            assert getattr(ours, key) == ref.config[key], (kind, key)


def test_alphas_cumprod_tables_match_torch():
    for cfg in (SD15, {"beta_schedule": "linear"}, {"beta_schedule": "squaredcos_cap_v2"}):
        ref = diffusers.DDIMScheduler.from_config(cfg).alphas_cumprod.numpy()
        ours = S.alphas_cumprod(S.scheduler_config_from_dict("ddim", cfg))
        np.testing.assert_array_equal(ours, ref)


def test_bad_config_fails_with_the_key():
    with pytest.raises(ValueError, match="timestep_spacing"):
        S.scheduler_config_from_dict("euler", {"timestep_spacing": "sideways"})
    with pytest.raises(ValueError, match="algorithm_type"):
        S.scheduler_config_from_dict("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"})
    with pytest.raises(ValueError, match="unknown scheduler"):
        S.scheduler_config_from_dict("pndm", SD15)
    with pytest.raises(ValueError, match="needs `noise`"):
        state = S.set_timesteps(S.scheduler_config_from_dict("euler_ancestral", SD15), 3, (1, 2, 2, 4))
        S.step(state, jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 2, 2, 4)))
