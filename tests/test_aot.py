"""Ahead-of-time compile for TPU topologies (`python -m caig_jax.aot`), with libtpu, on this CPU host.

libtpu is an optional extra (requirements-tpu.txt), installed into its own folder so that it does not start a TPU
client in every test: `.ci/run` installs it and sets CAIG_LIBTPU_PATH to that folder.
"""

import os
import re
import subprocess
import sys

import pytest

from ._smoke_utils import REPO

LIBTPU = os.environ.get("CAIG_LIBTPU_PATH", "")


def _aot(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (LIBTPU, REPO) if p), TPU_SKIP_MDS_QUERY="1")
    env.pop("XLA_FLAGS", None)  # the test session's 8 emulated CPU devices are not the topology's
    return subprocess.run([sys.executable, "-m", "caig_jax.aot", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


needs_libtpu = pytest.mark.skipif(
    not LIBTPU and not os.environ.get("CI"), reason="libtpu not installed (set CAIG_LIBTPU_PATH; CI does)")


@pytest.mark.slow
@needs_libtpu
def test_tiny_reward_step_compiles_for_a_v5e_slice_and_reports_memory():
    out = _aot("--config=configs/reward.py:tiny", "--topology=v5e:2x2", "--config.mesh.data=2",
               "--config.mesh.fsdp=2", "--config.cpu_devices=0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "v5e:2x2: 4 x TPU v5 lite, mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in out.stdout
    assert "of 16.00 GiB HBM" in out.stdout and "step-time lower bound" in out.stdout and "fits" in out.stdout


def test_unknown_topology_is_one_line():
    out = _aot("--config=configs/reward.py:tiny", "--topology=v9-1")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: --topology='v9-1' is not a known slice name")


@pytest.mark.slow
def test_preference_7b_step_builds_abstractly_on_an_fsdp_tensor_mesh(devices):
    """The 7b preset's DPO + PCPO step (LLaVA-v1.6-Vicuna-7B shapes, LoRA r128 on every LLM linear, three
    sequences per example) lowers on an fsdp x tensor mesh without allocating a parameter."""
    from caig_jax import aot, parallel
    from caig_jax.config_files import load_config

    config = load_config(os.path.join(REPO, "configs", "preference.py:7b"))
    config.train.batch_size, config.generation.sequence_length = 8, 256
    mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
    program = aot.preference_program(config, mesh)
    text = program.lowered.as_text()
    assert "all-gather" in text or "all_gather" in text or "sharding" in text
    assert program.model_flops > 6 * 6.5e9 * 3 * 8 * 256  # 6ND over 6.7B LLM parameters at least


@pytest.mark.slow
def test_sft_7b_step_builds_abstractly_with_scanned_layers(devices):
    """The SFT 7b preset's step (LoRA r128, scanned layers with full remat) lowers on an fsdp x tensor mesh; the
    decoder's 32 layers are one while loop, not 32 copies."""
    from caig_jax import aot, parallel
    from caig_jax.config_files import load_config

    config = load_config(os.path.join(REPO, "configs", "sft.py:7b"))
    assert config.model.scan_layers and config.model.remat_policy == "full"
    config.train.batch_size = 8
    mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
    program = aot.sft_program(config, mesh)
    text = program.lowered.as_text()
    assert "stablehlo.while" in text
    assert program.model_flops > 6 * 6.5e9 * 8 * aot.SFT_SEQUENCE_LENGTH


def test_tiny_render_program_lowers_abstractly_over_data(devices):
    """The render job's whole sampling program (ControlNet inpainting, CFG, the preset's steps) lowers from abstract
    shapes with the batch over `data`; its FLOPs are steps x one unrolled ControlNet + UNet call on the CFG batch
    plus the text encoder and VAE, more than the loop body XLA's cost analysis sees once."""
    from caig_jax import aot, parallel
    from caig_jax.config_files import load_config

    config = load_config(os.path.join(REPO, "configs", "render.py:tiny"))
    mesh = parallel.make_mesh({"data": 8})
    program = aot.render_program(config, mesh)
    text = program.lowered.as_text()
    assert "stablehlo.while" in text  # the denoising loop is one loop, not `steps` copies
    assert f"{config.steps} steps x" in program.flops_note and "16 rows = 2 x batch for CFG" in program.flops_note
    loop_once = program.lowered.cost_analysis()
    loop_once = loop_once[0] if isinstance(loop_once, list) else loop_once
    assert program.model_flops > 2 * float(loop_once["flops"])


def test_tiny_generate_program_lowers_abstractly_with_bf16_params_over_tensor(devices):
    """LLaVA-NeXT generation (prefill + KV-cache decode loop) lowers from abstract shapes with bf16 parameters split
    over `tensor`; the memory bound reads the weights once per new token."""
    from caig_jax import aot, parallel
    from caig_jax.config_files import load_config

    config = load_config(os.path.join(REPO, "configs", "generate.py:tiny"))
    config.unlock()
    config.dtype = config.param_dtype = "bfloat16"
    config.generation.batch_size, config.generation.max_new_tokens = 8, 5
    mesh = parallel.make_mesh({"data": 2, "tensor": 4})
    program = aot.generate_program(config, mesh)
    text = program.lowered.as_text()
    assert "stablehlo.while" in text and "bf16" in text
    assert program.weight_reads == 5
    assert "x 8 x (" in program.flops_note and "+ 5 new) tokens" in program.flops_note


def test_inference_presets_default_to_bf16_and_a_mesh_that_fits():
    from caig_jax.config_files import load_config

    render = load_config(os.path.join(REPO, "configs", "render.py:sd15"))
    assert render.dtype == "bfloat16" and render.mesh.data == -1 and render.batch_size == 8
    generate = load_config(os.path.join(REPO, "configs", "generate.py:7b"))
    assert (generate.dtype, generate.param_dtype, generate.mesh.tensor) == ("bfloat16", "bfloat16", 4)
    assert generate.render.dtype == "bfloat16" and generate.aot_model == "7b"


_SPLASH_FOR_TPU = """
import re, jax, jax.numpy as jnp
from jax.sharding import NamedSharding
from caig_jax import aot, parallel
from caig_jax.models import attention
mesh = aot.topology_mesh(aot.topology_devices("v5e:2x2"), {"fsdp": 2, "tensor": 2})
def spec(shape, axes, dtype=jnp.bfloat16):
    sharding = NamedSharding(mesh, parallel.logical_to_mesh_spec(axes, mesh, shape=shape))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
q, k = spec((4, 256, 4, 128), ("batch", None, "heads", None)), spec((4, 256, 2, 128), ("batch", None, "kv_heads", None))
valid = spec((4, 256), ("batch", None), jnp.bool_)
def grads(q, k, v, valid):
    out = lambda q, k, v: attention.attention(q, k, v, attention.causal_mask(256, valid), impl="splash", mesh=mesh)
    return jax.grad(lambda *a: jnp.sum(out(*a).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)
with jax.set_mesh(mesh):
    text = jax.jit(grads).lower(q, k, k, valid).compile().as_text()
print("kernel" if "tpu_custom_call" in text else "no kernel",
      re.findall(r"\\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\\(", text))
"""


@pytest.mark.slow
@needs_libtpu
def test_tiny_render_and_generate_compile_for_a_v5e_slice():
    """With `attention=auto` (splash on TPU, under shard_map): the batch-sharded renderer and the tensor-parallel
    generator compile for a v5e slice, and the renderer's model FLOPs are the plain attention's (XLA does not see
    into the kernel; counted with it, one UNet step came out as 0 FLOPs)."""
    render = _aot("--config=configs/render.py:tiny", "--topology=v5e:2x2")
    assert render.returncode == 0, render.stderr[-3000:]
    assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1}" in render.stdout and "of 16.00 GiB HBM" in render.stdout
    plain = _aot("--config=configs/render.py:tiny", "--topology=v5e:2x2", "--config.attention=xla")
    assert plain.returncode == 0, plain.stderr[-3000:]
    model_flops = [re.search(r"model ([0-9.e+]+) \(", out.stdout).group(1) for out in (render, plain)]
    assert model_flops[0] == model_flops[1] and float(model_flops[0]) > 0
    generate = _aot("--config=configs/generate.py:tiny", "--topology=v5e:2x2", "--config.mesh.data=1",
                    "--config.mesh.tensor=4", "--config.cpu_devices=0", "--config.generation.batch_size=8")
    assert generate.returncode == 0, generate.stderr[-3000:]
    assert "memory-bandwidth lower bound" in generate.stdout and "fits" in generate.stdout


@pytest.mark.slow
@needs_libtpu
def test_splash_compiles_for_a_tpu_mesh_without_collectives():
    """libtpu refuses a Pallas kernel that GSPMD would have to partition ("Mosaic kernels cannot be automatically
    partitioned"); under shard_map, splash's forward and backward (causal, GQA, key padding) compile for an
    fsdp x tensor TPU mesh with the kernel in and no collective around it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (LIBTPU, REPO) if p), TPU_SKIP_MDS_QUERY="1")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", _SPLASH_FOR_TPU], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "kernel []"
