"""Device mesh, logical-axis sharding rules, sharded initialisation and global batches.

Every parameter in caig_jax carries *logical* axis names in its `out_sharding` metadata (for example a
Llama MLP up-projection kernel is `('embed', 'mlp')`). `LOGICAL_AXIS_RULES` is the one table that maps
those names onto the mesh axes `('data', 'fsdp', 'tensor')`:

- `data`:   pure data parallelism (parameters replicated, batch split).
- `fsdp`:   the batch is split *and* parameters/optimizer state are sharded (ZeRO-3 style); XLA inserts the
            all-gathers.
- `tensor`: Megatron-style tensor parallelism over heads / MLP width / vocab.

The mesh uses `AxisType.Auto` axes: models are written once with logical annotations and GSPMD propagates
shardings through every contraction. With `Explicit` axes (the default of `jax.make_mesh` in the pinned
JAX) every einsum whose contraction dimension is sharded would need an `out_sharding` annotation in model
code, which couples models to the mesh; Auto keeps models mesh-agnostic and is what MaxText uses.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax._src.interpreters import partial_eval as pe  # see _tracer_errors_without_origin
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# Mesh axes that split the batch dimension.
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated).
# The first matching rule whose mesh axes are still free for this array wins (MaxText semantics), so a
# parameter never uses one mesh axis twice.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),  # model width: FSDP-sharded
    ("mlp", "tensor"),  # MLP hidden width
    ("heads", "tensor"),  # attention heads (q heads)
    ("kv_heads", "tensor"),  # key/value heads (GQA)
    ("kv", None),  # per-head dimension
    ("vocab", "tensor"),
    ("vision_embed", "fsdp"),  # CLIP tower width
    ("conv_in", "fsdp"),  # conv kernels: input channels
    ("conv_out", "tensor"),  # conv kernels: output channels
    ("conv_h", None),
    ("conv_w", None),
    ("norm", None),  # norm scales / biases
    ("positions", None),
    ("classes", None),  # small heads (reward logits)
    ("lora_rank", None),
    ("layers", None),
    ("length", None),
    ("embed_no_fsdp", None),
)


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Resolves `{'data': d, 'fsdp': f, 'tensor': t}` (one entry may be -1) to concrete sizes.

    Raises a ValueError naming the sizes and the device count when they do not multiply out.
    """
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; valid axes are {MESH_AXES}")
    shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    if shape.count(-1) > 1:
        raise ValueError(f"config.mesh={dict(sizes)}: at most one axis may be -1 (fill the remaining devices)")
    fixed = int(np.prod([s for s in shape if s != -1]))
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"config.mesh={dict(sizes)}: axis sizes must be positive or -1")
    if -1 in shape:
        if num_devices % fixed:
            raise ValueError(
                f"config.mesh={dict(sizes)}: {num_devices} devices are not divisible by the fixed axes' product {fixed}"
            )
        shape[shape.index(-1)] = num_devices // fixed
    if int(np.prod(shape)) != num_devices:
        raise ValueError(
            f"config.mesh={dict(sizes)} asks for {int(np.prod(shape))} devices but {num_devices} are available"
        )
    return tuple(shape)  # type: ignore[return-value]


def make_mesh(sizes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the `('data', 'fsdp', 'tensor')` mesh with Auto axis types (see module docstring)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(dict(sizes or {"data": -1}), len(devices))
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_mesh_spec(
    logical_axes: Sequence[str | None] | None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
    shape: Sequence[int] | None = None,
) -> P:
    """Maps logical axis names to a PartitionSpec over mesh axes.

    A mesh axis is used at most once per array. When `mesh` and `shape` are given, a dimension that does not
    divide by its mesh axes' size is left replicated (e.g. 2 KV heads on a 4-way tensor axis) rather than
    failing: that is what a user wants for small heads on big meshes.
    """
    if logical_axes is None:
        return P()
    table = {}
    for name, target in rules:
        table.setdefault(name, []).append(target)
    used: set[str] = set()
    spec: list[Any] = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES; known: {sorted(table)}")
        chosen = None
        for target in table[name]:
            axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
            if mesh is not None:
                axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if any(a in used for a in axes):
                continue
            if mesh is not None and shape is not None and axes:
                size = int(np.prod([mesh.shape[a] for a in axes]))
                if shape[dim] % size:
                    continue
            chosen = axes
            break
        if not chosen:
            spec.append(None)
            continue
        used.update(chosen)
        spec.append(chosen[0] if len(chosen) == 1 else chosen)
    return P(*spec)


def state_shardings(state: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for every Variable in an (abstract or concrete) `nnx.State`."""

    def one(v):
        value = v.get_value() if hasattr(v, "get_value") else v.value
        spec = logical_to_mesh_spec(v.get_metadata().get("out_sharding"), mesh, rules, getattr(value, "shape", None))
        return v.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def partition_specs(state: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> dict[str, P]:
    """`{'path/to/param': PartitionSpec}` for a state: what golden files pin."""
    out = {}
    for path, v in nnx.to_flat_state(state):
        value = v.get_value() if hasattr(v, "get_value") else v.value
        name = "/".join(str(p) for p in path)
        out[name] = logical_to_mesh_spec(v.get_metadata().get("out_sharding"), mesh, rules, value.shape)
    return out


@contextlib.contextmanager
def _tracer_errors_without_origin():
    """Skips JAX's trace scan when a tracer's missing `.sharding` attribute is probed.

    Flax NNX bumps an RNG counter for every parameter it creates and, doing so, probes `tracer.sharding`;
    JAX answers with an AttributeError whose message names the value's origin by scanning the whole trace.
    Flax discards the message, but building it is linear in the trace, so abstract construction is
    quadratic in the number of parameters (minutes for a 7B LLaVA on a busy CPU, seconds when skipped).
    """
    original = pe.DynamicJaxprTracer._origin_msg
    pe.DynamicJaxprTracer._origin_msg = lambda self: ""
    try:
        yield
    finally:
        pe.DynamicJaxprTracer._origin_msg = original


def abstract_module(make_module: Callable[[], nnx.Module]) -> nnx.Module:
    """`nnx.eval_shape(make_module)`: the module with `jax.ShapeDtypeStruct` leaves, nothing allocated."""
    with _tracer_errors_without_origin():
        return nnx.eval_shape(make_module)


def sharded_init(make_module: Callable[[], nnx.Module], mesh: Mesh, rules=LOGICAL_AXIS_RULES, *,
                 compiler_options: dict | None = None):
    """Creates a module with every parameter born sharded on `mesh`.

    The module is first traced abstractly (`nnx.eval_shape`), its logical axes are mapped to shardings, and
    the real initialiser runs under `jax.jit(..., out_shardings=...)`: no parameter is ever materialised
    whole on one device. `compiler_options` go to that one-off program's compilation (e.g.
    `{"xla_backend_optimization_level": 0}`: the init of a tiny LLaVA compiles in half the CPU time).

    Returns the module (its Variables hold sharded `jax.Array`s).
    """
    graphdef, abstract_state = nnx.split(abstract_module(make_module))
    shardings = state_shardings(abstract_state, mesh, rules)

    def init():
        return nnx.state(make_module())

    with jax.set_mesh(mesh), _tracer_errors_without_origin():
        state = jax.jit(init, out_shardings=shardings, compiler_options=compiler_options)()
    return nnx.merge(graphdef, state)


def abstract_with_shardings(make_module: Callable[[], nnx.Module], mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """(graphdef, abstract state of `jax.ShapeDtypeStruct`s carrying their NamedShardings)."""
    graphdef, abstract_state = nnx.split(abstract_module(make_module))
    shardings = state_shardings(abstract_state, mesh, rules)
    abstract_state = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s.get_value())),
        abstract_state,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return graphdef, abstract_state


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a batch-major array: dim 0 over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def num_batch_shards(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def global_batch(mesh: Mesh, batch: Any) -> Any:
    """Global `jax.Array`s, dim 0 split over the mesh's batch axes, from a tree of host or device arrays.

    - numpy (or anything array-like) leaves are *this process's* share of the global batch (its leading
      dimension is the local batch; on one host, the whole batch): `jax.make_array_from_process_local_data`,
      correct on multi-host pods.
    - `jax.Array` leaves are already *global* arrays (e.g. rollouts a sampler left on the mesh): they stay on
      device and are only resharded when their sharding differs (no host round-trip; works for arrays that
      are not fully addressable on a multi-host run).
    """

    def one(x):
        if isinstance(x, jax.Array):
            sharding = batch_sharding(mesh, x.ndim)
            return x if x.sharding.is_equivalent_to(sharding, x.ndim) else jax.device_put(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(one, batch)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global `jax.Array`, in the order of its local input data.

    The inverse of `parallel.global_batch` for outputs: what a predict function returns (replicas across
    the tensor axis are read once; no cross-host communication).
    """
    parts, seen = [], set()
    for shard in sorted(x.addressable_shards, key=lambda s: (s.index[0].start or 0) if s.index else 0):
        start = (shard.index[0].start or 0) if shard.index else 0
        if start not in seen:
            seen.add(start)
            parts.append(np.asarray(shard.data))
    return np.concatenate(parts, axis=0)


def process_allgather_int(n: int) -> np.ndarray:
    """int[P]: `n` of every process (no communication on one process)."""
    if jax.process_count() == 1:
        return np.asarray([n])
    return np.asarray(multihost_utils.process_allgather(np.asarray([n], np.int32), tiled=True)).reshape(-1)


def pad_to_multiple(batch: Any, multiple: int) -> tuple[Any, int]:
    """Pads every leaf's leading dimension up to a multiple (repeating the last row). Returns (padded, n)."""
    leaves = jax.tree.leaves(batch)
    n = int(np.asarray(leaves[0]).shape[0])
    target = -(-n // multiple) * multiple
    if target == n:
        return batch, n

    def pad(x):
        x = np.asarray(x)
        return np.concatenate([x, np.repeat(x[-1:], target - n, axis=0)], axis=0)

    return jax.tree.map(pad, batch), n


def set_cpu_devices(count: int) -> None:
    """Splits the host CPU into `count` XLA devices (0 or 1: leave it as one), before any device is used.

    Why: XLA's CPU backend runs most fused elementwise and reduction ops (softmax, masks, norms) on one
    thread, so one CPU device leaves cores idle; with the batch sharded over several CPU devices (the mesh's
    `data` axis) their programs run side by side (measured: the README's benchmark section). Only the CPU
    backend is affected: on TPU/GPU hosts the mesh is built from the accelerators and this does nothing.
    """
    if count is None or int(count) <= 1:
        return
    try:
        jax.config.update("jax_num_cpu_devices", int(count))
    except RuntimeError as e:
        raise RuntimeError(f"cpu_devices={count}: JAX's CPU backend was already initialised ({e}); set it before "
                           "any JAX computation, e.g. through the job config's `cpu_devices`") from None


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when this process is one of several.

    Guarded by the environment so that a plain single-process run never blocks waiting for peers:
    - on Cloud TPU pod slices `TPU_WORKER_HOSTNAMES` lists more than one worker (set by the TPU runtime);
    - for local or GPU multi-process runs set `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and
      `JAX_PROCESS_ID` (see launch/local_multiprocess.sh);
    - `CAIG_DISTRIBUTED=1` forces it (e.g. SLURM, where JAX auto-detects the cluster).
    Returns True when it initialised.
    """
    env = os.environ
    if env.get("CAIG_CPU_COLLECTIVES"):
        # Multi-process CPU runs need a cross-process collectives backend (gloo ships with jaxlib).
        jax.config.update("jax_cpu_collectives_implementation", env["CAIG_CPU_COLLECTIVES"])
    tpu_workers = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if env.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    elif len(tpu_workers) > 1 or env.get("CAIG_DISTRIBUTED") == "1":
        jax.distributed.initialize()
    else:
        return False
    logging.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())
    return True
