"""Ahead-of-time compile of a job's real step for a TPU topology, on this (CPU) host: does it fit, how fast can it be.

    pip install --target /opt/libtpu -r requirements-tpu.txt        # once; libtpu compiles for TPUs on any host
    PYTHONPATH=/opt/libtpu python -m caig_jax.aot --config=configs/reward.py:7b --topology=v5p-128

The job's jitted step is built from abstract shapes exactly as the job builds it (the reward job: the engine's
train step on the RewardModel, the preset's batch and sequence length), placed on a mesh of the topology's devices
with the project's logical-axis rules, lowered and compiled by libtpu, and the compiled program's numbers are
printed per chip: argument, output, temporary and total memory against the chip's HBM, FLOPs (the model count
6ND + attention, and XLA's count) and the step-time lower bound at the chip's peak. It exits 1 with a message when
the program does not fit.

`--topology` takes a slice name (`v5p-128`, `v5e-256`, `v4-64`: cores for v4/v5p, chips for v5e, as Cloud TPU
names them) or a libtpu topology (`v5p:4x4x4`, `v5e:2x2`). The config's `mesh` must multiply to the chip count
(`-1` fills it). Presets whose `model.pretrained` folder does not exist on this host use the architecture of
LLaVA-v1.6-Vicuna-7B (`caig_jax.models.llava.llava_next_vicuna_7b`) for `7b` presets and the tiny model otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax.experimental import topologies
from jax.sharding import AxisType, Mesh
from ml_collections import config_flags

from caig_jax import parallel
from caig_jax.config_files import add_config_root
from caig_jax.errors import UserError
from caig_jax.models import attention as attention_lib
from caig_jax.models.llava import LlavaModel, layout_for, llava_next_vicuna_7b, read_llava_config
from caig_jax.models.lora import apply_lora
from caig_jax.models.reward import RewardModel, tiny_llava_config
from caig_jax.trainers.preference import make_loss_fn as make_preference_loss
from caig_jax.trainers.reward import make_loss_fn
from caig_jax.trainers.sft import make_loss_fn as make_sft_loss
from caig_jax.trainers.trainer import Trainer

# Cloud TPU slice names -> libtpu topologies. v4 / v5p names count TensorCores (2 per chip), v5e names chips.
SLICES = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4", "v4-64": "v4:2x4x4", "v4-128": "v4:4x4x4",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4",
    "v5p-128": "v5p:4x4x4", "v5p-256": "v5p:4x4x8",
    "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-32": "v5e:4x8", "v5e-64": "v5e:8x8",
    "v5e-128": "v5e:8x16", "v5e-256": "v5e:16x16",
}


# The SFT step's sequence length: its longest length bucket at LLaVA-NeXT-7B's largest anyres image (a 2x2 grid of
# 336 px tiles: 576 + 48 x (48 + 1) = 2928 image tokens) plus its text, padded to the 7b preset's bucket multiple.
SFT_SEQUENCE_LENGTH = 3072


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: int
    peak_bf16_flops: float  # per chip, dense


# By libtpu's device_kind. Public Cloud TPU figures.
CHIPS = {
    "TPU v4": Chip(32 * 2**30, 275e12),
    "TPU v5": Chip(95 * 2**30, 459e12),  # v5p
    "TPU v5 lite": Chip(16 * 2**30, 197e12),  # v5e
}


def topology_devices(name: str) -> list:
    """The devices of a TPU topology (`SLICES` name or libtpu form), from libtpu, without any TPU attached."""
    libtpu_name = SLICES.get(name, name)
    if ":" not in libtpu_name:
        raise UserError(f"--topology={name!r} is not a known slice name ({', '.join(SLICES)}) nor a libtpu "
                        "topology such as v5p:4x4x4", fix="pass one of those")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    try:
        return list(topologies.get_topology_desc(libtpu_name, "tpu").devices)
    except Exception as e:  # noqa: BLE001  (no libtpu, or a name libtpu rejects: both one message)
        raise UserError(f"cannot describe TPU topology {libtpu_name!r}: {str(e).splitlines()[0][:200]}",
                        fix="pip install --target DIR -r requirements-tpu.txt; PYTHONPATH=DIR") from None


def topology_mesh(devices: list, sizes: dict) -> Mesh:
    shape = parallel.resolve_mesh_shape(sizes, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


@dataclasses.dataclass
class Program:
    """A job's step ready to lower: `fn(*args)` with abstract `args` (ShapeDtypeStructs carrying shardings)."""

    lowered: Any
    model_flops: float  # per step, whole slice
    flops_note: str


def _llava_config(config):
    """The job's LLaVA architecture: its `model.pretrained` folder's, LLaVA-v1.6-Vicuna-7B's for a 7b preset whose
    folder is not on this host, else the tiny model."""
    pretrained = config.model.pretrained
    if pretrained and os.path.isdir(pretrained):
        return read_llava_config(pretrained)[0]
    if config.model.dtype == "bfloat16" or config.data.image_size >= 336:  # the 7b preset without its folder
        return llava_next_vicuna_7b()
    return tiny_llava_config(config.model.tiny, config.data.image_size, vocab_size=1024, image_token_id=1023,
                             pad_id=0)


def _layer_settings(llava_config, model_config):
    """`llava_config` with the job's `model.remat_policy` and `model.scan_layers` (what `set_remat` / `set_scan`
    do to a built model)."""
    settings = dict(remat_policy=model_config.remat_policy, scan_layers=model_config.scan_layers)
    return dataclasses.replace(llava_config, text_config=dataclasses.replace(llava_config.text_config, **settings),
                               vision_config=dataclasses.replace(llava_config.vision_config, **settings))


def _batch_spec(mesh: Mesh):
    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(mesh, len(shape)))
    return spec


def _param_count(module) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def reward_program(config, mesh: Mesh) -> Program:
    """The reward job's train step (`caig_jax.trainers.reward` + the engine), abstract, on `mesh`."""
    llava_config = _layer_settings(_llava_config(config), config.model)
    dtype = jnp.dtype(config.model.dtype)
    graphdef, state = parallel.abstract_with_shardings(
        lambda: RewardModel(llava_config, rngs=nnx.Rngs(0), dtype=dtype), mesh)
    # `auto` from the target topology's devices: a TPU step compiled on a CPU host gets splash attention.
    model = attention_lib.configure(nnx.merge(graphdef, state), config.model.get("attention", "auto"), mesh, dtype)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir, mesh, model, make_loss_fn(config.loss.point_weight))
        trainer.close()
    b, t, s = config.train.batch_size, config.model.max_text_len, config.data.image_size
    patches = int(layout_for(llava_config, [(s, 2 * s)])[0, 0]) if llava_config.anyres else 1
    tile = llava_config.vision_config.image_size
    spec = _batch_spec(mesh)
    batch = {
        "input_ids": spec((b, t), jnp.int32), "attention_mask": spec((b, t), jnp.int32),
        "pixel_values": spec((b, patches, 3, tile, tile), jnp.float32),
        "image_layout": spec((b, 7), jnp.int32), "label": spec((b,), jnp.int32), "ctr": spec((b, 2), jnp.float32),
    }
    lowered = trainer.lower_step(batch)
    text = llava_config.text_config
    n_llm, n_tower = _param_count(model.backbone.language_model), _param_count(model.backbone.vision_tower)
    tokens = b * t
    attention = 12 * text.num_hidden_layers * b * t * t * text.hidden_size  # fwd+bwd of QK^T and PV
    tower_tokens = b * patches * (llava_config.vision_config.num_patches + 1)
    flops = 6 * n_llm * tokens + attention + 2 * n_tower * tower_tokens
    return Program(lowered, flops, f"6*N*T ({n_llm / 1e9:.2f}B LLM params x {tokens} tokens) + attention "
                                   f"12*L*B*T^2*d + 2*N_tower*tokens (tower forward only: frozen); remat adds "
                                   "a recomputed forward that is not counted")


def sft_program(config, mesh: Mesh) -> Program:
    """The SFT job's train step (`caig_jax.trainers.sft` + the engine: LoRA on the LLM when the preset has it),
    abstract, on `mesh`, at the longest bucket a LLaVA-NeXT conversation can need (`SFT_SEQUENCE_LENGTH`)."""
    llava_config = _layer_settings(_llava_config(config), config.model)
    dtype = jnp.dtype(config.model.dtype)

    def make():
        model = LlavaModel(llava_config, rngs=nnx.Rngs(0), dtype=dtype)
        if config.model.lora_rank:
            apply_lora(model.language_model, rank=config.model.lora_rank, alpha=config.model.lora_alpha,
                       target=config.model.lora_target, seed=config.seed, dropout=config.model.lora_dropout)
        return model

    graphdef, state = parallel.abstract_with_shardings(make, mesh)
    model = attention_lib.configure(nnx.merge(graphdef, state), config.model.get("attention", "auto"), mesh, dtype)
    accum = config.train.grad_accum_steps
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir, mesh, model, make_sft_loss(accum))
        trainer.close()
    b, t = config.train.batch_size, SFT_SEQUENCE_LENGTH
    tile = llava_config.vision_config.image_size
    spec = _batch_spec(mesh)
    batch = {"input_ids": spec((b, t), jnp.int32), "attention_mask": spec((b, t), jnp.int32),
             "loss_mask": spec((b, t), jnp.int32),
             "pixel_values": spec((b, llava_config.max_patches, 3, tile, tile), jnp.float32),
             "image_layout": spec((b, 7), jnp.int32)}
    if accum > 1:
        batch["loss_weight"] = spec((b,), jnp.float32)
    lowered = trainer.lower_step(batch)
    text = llava_config.text_config
    n_llm, n_tower = _param_count(model.language_model), _param_count(model.vision_tower)
    tower_tokens = b * llava_config.max_patches * (llava_config.vision_config.num_patches + 1)
    flops = 6 * n_llm * b * t + 12 * text.num_hidden_layers * b * t * t * text.hidden_size + 2 * n_tower * tower_tokens
    return Program(lowered, flops, f"6*N*T ({n_llm / 1e9:.2f}B LLM params x {b * t} tokens; LoRA: the frozen "
                                   "weights still take the full backward through activations) + attention "
                                   "12*L*B*T^2*d + 2*N_tower*tokens (tower forward only: frozen)")


def preference_program(config, mesh: Mesh) -> Program:
    """The preference job's train step (LoRA on the PM, three sequences per example), abstract, on `mesh`. The PM
    has LLaVA-v1.6-Vicuna-7B's shapes (CAIG's PM; the SFT workdir is not read), bf16 compute."""
    llava_config = _layer_settings(llava_next_vicuna_7b(), config.model)
    dtype = jnp.bfloat16

    def make():
        model = LlavaModel(llava_config, rngs=nnx.Rngs(0), dtype=dtype)
        apply_lora(model.language_model, rank=config.lora.rank, alpha=config.lora.alpha, target=config.lora.target,
                   seed=config.seed, dropout=config.lora.dropout)
        return model

    graphdef, state = parallel.abstract_with_shardings(make, mesh)
    model = attention_lib.configure(nnx.merge(graphdef, state), config.model.get("attention", "auto"), mesh, dtype)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir, mesh, model, make_preference_loss(config))
        trainer.close()
    b, t = config.train.batch_size, config.generation.sequence_length
    tile = llava_config.vision_config.image_size
    spec = _batch_spec(mesh)
    batch = {}
    for prefix in ("chosen", "rejected", "corrupt"):
        batch.update({f"{prefix}_input_ids": spec((b, t), jnp.int32),
                      f"{prefix}_attention_mask": spec((b, t), jnp.int32),
                      f"{prefix}_loss_mask": spec((b, t), jnp.int32),
                      f"{prefix}_pixel_values": spec((b, llava_config.max_patches, 3, tile, tile), jnp.float32),
                      f"{prefix}_image_layout": spec((b, 7), jnp.int32)})
        batch[f"ref_{prefix}"] = spec((b,), jnp.float32)
    lowered = trainer.lower_step(batch)
    text = llava_config.text_config
    n_llm = _param_count(model.language_model)
    tokens = 3 * b * t
    flops = 6 * n_llm * tokens + 12 * text.num_hidden_layers * 3 * b * t * t * text.hidden_size
    return Program(lowered, flops, f"6*N*T over the 3 sequences ({n_llm / 1e9:.2f}B params x {tokens} tokens; "
                                   "LoRA: the frozen weights still take the full backward through activations) "
                                   "+ attention; tower forward not counted")


PROGRAMS: dict[str, Callable[[Any, Mesh], Program]] = {"reward": reward_program, "sft": sft_program,
                                                        "preference": preference_program}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def analyse(config, topology: str) -> dict[str, Any]:
    """Compiles `config`'s step for `topology`; returns the per-chip figures (raises UserError when unsupported)."""
    if config.job not in PROGRAMS:
        raise UserError(f"config.job={config.job!r}: the AOT tool builds {sorted(PROGRAMS)}",
                        fix="add the job's step builder to caig_jax.aot.PROGRAMS")
    devices = topology_devices(topology)
    mesh = topology_mesh(devices, config.mesh.to_dict())
    chip = CHIPS.get(devices[0].device_kind)
    program = PROGRAMS[config.job](config, mesh)
    result: dict[str, Any] = {"topology": topology, "chips": len(devices), "device_kind": devices[0].device_kind,
                              "mesh": dict(mesh.shape)}
    try:
        compiled = program.lowered.compile()
    except Exception as e:  # noqa: BLE001  (XLA reports an HBM overflow as a compile error)
        message = str(e).splitlines()[0][:400]
        result.update(fits=False, error=message)
        return result
    memory = compiled.memory_analysis()
    arg, out, temp = memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.temp_size_in_bytes
    total = arg + out + temp - memory.alias_size_in_bytes
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    per_chip_flops = program.model_flops / len(devices)
    result.update(
        fits=chip is None or total <= chip.hbm_bytes,
        argument_bytes=arg, output_bytes=out, temp_bytes=temp, alias_bytes=memory.alias_size_in_bytes,
        total_bytes=total, hbm_bytes=None if chip is None else chip.hbm_bytes,
        hbm_fraction=None if chip is None else total / chip.hbm_bytes,
        model_flops_per_chip=per_chip_flops, xla_flops_per_chip=float(cost.get("flops", float("nan"))),
        step_lower_bound_s=None if chip is None else per_chip_flops / chip.peak_bf16_flops,
        flops_note=program.flops_note,
    )
    return result


def report(result: dict[str, Any]) -> str:
    lines = [f"{result['topology']}: {result['chips']} x {result['device_kind']}, mesh {result['mesh']}"]
    if "error" in result:
        lines.append(f"does not compile: {result['error']}")
        return "\n".join(lines)
    hbm = result["hbm_bytes"]
    lines += [
        f"per chip: arguments {_gib(result['argument_bytes'])}, outputs {_gib(result['output_bytes'])}, "
        f"temporaries {_gib(result['temp_bytes'])}, total {_gib(result['total_bytes'])}"
        + ("" if hbm is None else f" of {_gib(hbm)} HBM ({100 * result['hbm_fraction']:.1f}%)"),
        f"FLOPs per chip and step: model {result['model_flops_per_chip']:.3e} ({result['flops_note']}); "
        f"XLA's count {result['xla_flops_per_chip']:.3e}",
    ]
    if result["step_lower_bound_s"] is not None:
        lines.append(f"step-time lower bound at peak: {result['step_lower_bound_s']:.3f} s")
    lines.append("fits" if result["fits"] else "DOES NOT FIT")
    return "\n".join(lines)


_FLAGS: dict = {}


def _define_flags() -> None:
    """The command line's flags, defined only when run as a program: `caig_jax.main` defines `--config` too, and
    both modules may be imported into one process (tests, notebooks)."""
    _FLAGS["config"] = config_flags.DEFINE_config_file("config", None, "Job config, `configs/NAME.py[:PRESET]`.",
                                                       lock_config=True)
    _FLAGS["topology"] = flags.DEFINE_string("topology", "v5p-128", "TPU slice name or libtpu topology.")


def _parse_flags(argv: list[str]) -> list[str]:
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec:
        add_config_root(spec.partition(":")[0])
    return flags.FLAGS(argv)


def main(argv) -> None:
    del argv
    try:
        result = analyse(_FLAGS["config"].value, _FLAGS["topology"].value)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    print(report(result))
    if not result["fits"]:
        sys.exit(1)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=_parse_flags)
