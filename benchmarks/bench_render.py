"""Renderer speed on this machine's CPU: one denoising step of SD-1.5 UNet + ControlNet (CFG batch 2), float32.

Command (from the repository root):
    /work/venv/bin/python benchmarks/bench_render.py [--sizes 256,512] [--steps 2] [--repeats 2] [--json out.json]

What it does: builds SD-1.5-sized models with random weights (UNet2DConditionModel 860M parameters: 320/640/1280/
1280 channels, 8 heads, 768-d text; ControlNetModel 361M, canny conditioning embedding 16/32/96/256), ours in
Flax NNX (`caig_jax.models.unet` / `controlnet`, initialised under jit) and diffusers' in PyTorch, and times the
denoising loop the renderer runs at CAIG's settings (Euler-ancestral, CFG, control scale 1.0):

    x2 = [x, x] (CFG batch 2);  down, mid = ControlNet(x2, t, text[2, 77, 768], control[2, H, W, 3])
    eps = UNet(x2, t, text, down, mid);  eps = eps_u + 7.5 (eps_c - eps_u);  x = scheduler.step(eps, x)

Ours: `--steps` steps as ONE jitted `lax.fori_loop` program (compilation timed separately, excluded); theirs:
the same Python loop in eager PyTorch under `torch.no_grad()` with diffusers' `EulerAncestralDiscreteScheduler`.
Seconds per step = median over `--repeats` runs of the whole loop / steps, after one untimed warm-up run on each
side. Each framework and size runs in its own
subprocess, so peak RSS (`ru_maxrss`: weights ~4.9 GB in float32, plus activations and, for JAX, the compiled
program's buffers) is measured per framework: over the whole process (model building included: ours initialises
the random weights in one jitted program whose temporaries peak near 8.7 GB for the UNet alone) and over the
sampling loops only (`sampling peak`: glibc's free heap pages handed back and the kernel's high-water mark reset
after building and, for ours, compiling; Linux only). Ratio = torch s/step / ours s/step (> 1: ours faster).

Threads: torch.set_num_threads(cores) and XLA's CPU client both use every core of the process's affinity. The
machine is shared: the load average before and after each measurement is printed; compare numbers taken at
similar load only. On 2 cores a 256x256 step takes seconds and a 512x512 step tens of seconds.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDANCE = 7.5
TEXT_LEN, TEXT_DIM = 77, 768


def sd15_controlnet_config() -> dict:
    """SD-1.5's ControlNet (lllyasviel/sd-controlnet-canny): the UNet's encoder half plus the conditioning embedding."""
    from caig_jax.convert.diffusers import SD15_UNET_CONFIG

    unet_only = ("center_input_sample", "out_channels", "sample_size", "up_block_types")
    encoder = {k: v for k, v in SD15_UNET_CONFIG.items() if k not in unet_only}
    return encoder | {"conditioning_embedding_out_channels": [16, 32, 96, 256],
                      "controlnet_conditioning_channel_order": "rgb"}


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def _proc_status_gb(field: str) -> float | None:
    """A memory field of /proc/self/status (`VmRSS`, `VmHWM`) in GB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":")) / 1024**2
    except (OSError, StopIteration):
        return None


def rss_gb() -> float | None:
    """The process's resident memory now (VmRSS), or None off Linux."""
    return _proc_status_gb("VmRSS")


def start_sampling_peak() -> float:
    """Starts the sampling-phase peak (`sampling_peak_gb`) and returns the process's peak RSS so far (GB): hands
    the heap's free pages back to the OS (`malloc_trim`: both frameworks' model building leaves freed memory in
    glibc's heap) and resets the kernel's resident high-water mark (`/proc/self/clear_refs`, Linux; this also
    resets `ru_maxrss`, hence the returned value). Elsewhere the sampling peak is not measured."""
    building_peak = peak_rss_gb()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return building_peak


def sampling_peak_gb() -> float | None:
    """The resident high-water mark (VmHWM) since `start_sampling_peak`, or None off Linux."""
    return _proc_status_gb("VmHWM")


def fmt_gb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def count(tree) -> int:
    import jax

    return sum(int(x.size) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------------------------
# Workers (one subprocess each).
# ---------------------------------------------------------------------------------------------------------------


def run_jax(size: int, steps: int, repeats: int, attention: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from caig_jax import parallel
    from caig_jax.convert.diffusers import SD15_UNET_CONFIG
    from caig_jax.diffusion import schedulers
    from caig_jax.models import attention as attention_lib
    from caig_jax.models.controlnet import ControlNetModel
    from caig_jax.models.unet import UNet2DConditionModel

    t0 = time.perf_counter()
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    runtime_rss = rss_gb()  # the framework and the model code imported, the CPU client started, nothing built
    unet = parallel.sharded_init(lambda: UNet2DConditionModel(SD15_UNET_CONFIG, rngs=nnx.Rngs(0)), mesh)
    controlnet = parallel.sharded_init(lambda: ControlNetModel(sd15_controlnet_config(), rngs=nnx.Rngs(1)), mesh)
    for module in (unet, controlnet):  # before the split: the implementation is part of the graphdef
        attention_lib.configure(module, attention, mesh)
    unet_def, unet_state = nnx.split(unet)
    cn_def, cn_state = nnx.split(controlnet)
    build_s = time.perf_counter() - t0
    params = count(unet_state) + count(cn_state)

    config = schedulers.scheduler_config_from_dict("euler_ancestral", {
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1})
    latent = size // 8

    @jax.jit
    def loop(unet_state, cn_state, x, context, control, key):
        unet = nnx.merge(unet_def, unet_state)
        controlnet = nnx.merge(cn_def, cn_state)
        state = schedulers.set_timesteps(config, steps, ())

        def body(i, carry):
            x, state = carry
            x2 = schedulers.scale_model_input(state, jnp.concatenate([x, x]))
            t = schedulers.current_timestep(state)
            down, mid = controlnet(x2, t, context, control, conditioning_scale=1.0)
            eps = unet(x2, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid)
            eps_u, eps_c = jnp.split(eps, 2)
            eps = eps_u + GUIDANCE * (eps_c - eps_u)
            noise = jax.random.normal(jax.random.fold_in(key, i), x.shape)
            return schedulers.step(state, eps, x, noise=noise)

        x = x * state.init_noise_sigma
        x, _ = jax.lax.fori_loop(0, steps, body, (x, state))
        return x

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, latent, latent, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2, TEXT_LEN, TEXT_DIM)), jnp.float32)
    control = jnp.asarray(rng.random((2, size, size, 3)) > 0.9, jnp.float32)
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    compiled = loop.lower(unet_state, cn_state, x, context, control, key).compile()
    compile_s = time.perf_counter() - t0
    building_peak = start_sampling_peak()
    times, loads = [], [load()]
    # Warm-up, as torch gets: the first run of a program pays for its first-touch page faults (malloc_trim above
    # has just handed the heap's free pages back), which a --repeats 1 timing would otherwise count for ours only.
    compiled(unet_state, cn_state, x, context, control, key).block_until_ready()
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = compiled(unet_state, cn_state, x, context, control, key)
        out.block_until_ready()
        times.append(time.perf_counter() - t0)
    loads.append(load())
    finite = bool(np.isfinite(np.asarray(out)).all())
    return dict(framework=f"caig_jax (jit, attention={attention_lib.resolve(attention, mesh.devices.flat)})",
                size=size, params_m=params / 1e6, build_s=build_s, compile_s=compile_s,
                s_per_step=statistics.median(times) / steps, runs_s=times,
                peak_rss_gb=max(building_peak, peak_rss_gb()), sampling_peak_gb=sampling_peak_gb(),
                runtime_rss_gb=runtime_rss, load=loads, finite=finite)


def run_torch(size: int, steps: int, repeats: int) -> dict:
    import torch
    from diffusers import ControlNetModel, EulerAncestralDiscreteScheduler, UNet2DConditionModel

    from caig_jax.convert.diffusers import SD15_UNET_CONFIG

    torch.set_num_threads(cores())
    torch.manual_seed(0)
    runtime_rss = rss_gb()  # the framework and the model code imported, nothing built
    t0 = time.perf_counter()
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
    controlnet = ControlNetModel(**sd15_controlnet_config()).eval()
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in controlnet.parameters())
    scheduler = EulerAncestralDiscreteScheduler.from_config({
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1})
    latent = size // 8
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn((1, 4, latent, latent), generator=gen)
    context = torch.randn((2, TEXT_LEN, TEXT_DIM), generator=gen)
    control = (torch.rand((2, 3, size, size), generator=gen) > 0.9).float()

    def loop():
        scheduler.set_timesteps(steps)
        x = x0 * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x2 = scheduler.scale_model_input(torch.cat([x, x]), t)
            down, mid = controlnet(x2, t, encoder_hidden_states=context, controlnet_cond=control,
                                   conditioning_scale=1.0, return_dict=False)
            eps = unet(x2, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid, return_dict=False)[0]
            eps_u, eps_c = eps.chunk(2)
            x = scheduler.step(eps_u + GUIDANCE * (eps_c - eps_u), t, x, generator=gen).prev_sample
        return x

    times, loads = [], [load()]
    building_peak = start_sampling_peak()
    with torch.no_grad():
        loop()  # warm-up (allocator, oneDNN primitive caches)
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = loop()
            times.append(time.perf_counter() - t0)
    loads.append(load())
    return dict(framework="diffusers (torch eager)", size=size, params_m=params / 1e6, build_s=build_s,
                compile_s=0.0, s_per_step=statistics.median(times) / steps, runs_s=times,
                peak_rss_gb=max(building_peak, peak_rss_gb()), sampling_peak_gb=sampling_peak_gb(),
                runtime_rss_gb=runtime_rss, load=loads, finite=bool(torch.isfinite(out).all()))


# ---------------------------------------------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,512", help="image sizes (latents are size/8)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per timed loop")
    parser.add_argument("--repeats", type=int, default=2, help="timed loops (median)")
    parser.add_argument("--frameworks", default="jax,torch")
    parser.add_argument("--attention", default="auto",
                        help="ours: attention implementation(s), comma-separated, each in its own process")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = (run_jax(args.size, args.steps, args.repeats, args.attention) if args.worker == "jax"
                  else run_torch(args.size, args.steps, args.repeats))
        print("RESULT " + json.dumps(result), flush=True)
        return

    cpu = platform.processor() or platform.machine()
    print(f"# bench_render: {cpu}, {cores()} cores, python {sys.version.split()[0]}")
    print(f"# load average before: {load()}")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    results = []
    for size in [int(s) for s in args.sizes.split(",") if s]:
        runs = [(fw, impl) for fw in args.frameworks.split(",") if fw
                for impl in (args.attention.split(",") if fw == "jax" else ["-"])]
        for fw, impl in runs:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", fw, "--size", str(size),
                   "--steps", str(args.steps), "--repeats", str(args.repeats), "--attention", impl]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"# {fw} @ {size}: FAILED (rc={proc.returncode})\n{proc.stderr[-3000:]}")
                continue
            result = json.loads(lines[-1][len("RESULT "):])
            result["wall_s"] = time.perf_counter() - t0
            results.append(result)
            print(f"# {result['framework']} @ {size}: {result['s_per_step']:.3f} s/step, "
                  f"peak RSS {result['peak_rss_gb']:.2f} GB "
                  f"(sampling {fmt_gb(result['sampling_peak_gb'])} GB, runtime {fmt_gb(result['runtime_rss_gb'])} GB), "
                  f"load {result['load'][0]} -> {result['load'][1]}", flush=True)

    print()
    print("| image | latents | framework | params (M) | compile (s) | s / step (CFG batch 2) | peak RSS (GB) | "
          "sampling peak RSS (GB) | runtime RSS (GB) | load avg (1 min) | ratio torch/ours |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in sorted({r["size"] for r in results}):
        rows = [r for r in results if r["size"] == size]
        theirs = next((r for r in rows if r["framework"].startswith("diffusers")), None)
        for r in rows:
            ratio = ""
            if r["framework"].startswith("caig_jax") and theirs:
                ratio = f"{theirs['s_per_step'] / r['s_per_step']:.2f}x"
            loads = f"{r['load'][0].split()[0]} -> {r['load'][1].split()[0]}"
            print(f"| {size}x{size} | {size // 8}x{size // 8} | {r['framework']} | {r['params_m']:.0f} | "
                  f"{r['compile_s']:.1f} | {r['s_per_step']:.3f} | {r['peak_rss_gb']:.2f} | "
                  f"{fmt_gb(r['sampling_peak_gb'])} | {fmt_gb(r['runtime_rss_gb'])} | {loads} | {ratio} |")
    print(f"\n# load average after: {load()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
