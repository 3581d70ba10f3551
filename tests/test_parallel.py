"""Mesh construction, the logical-axis rules table (golden PartitionSpecs), sharded init, global batches."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from caig_jax import parallel
from caig_jax.models.mlp import MLP

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "smoke_mlp_partition_specs.json")
MESHES = {
    "data8": {"data": 8},
    "fsdp4_tensor2": {"data": 1, "fsdp": 4, "tensor": 2},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
}


def _make_mlp():
    return MLP(16, 64, 4, 2, rngs=nnx.Rngs(0))


def _specs_json(mesh):
    _, abstract = nnx.split(nnx.eval_shape(_make_mlp))
    return {k: str(v) for k, v in sorted(parallel.partition_specs(abstract, mesh).items())}


def test_rules_table_golden_partition_specs(devices):
    """Regenerate with CAIG_UPDATE_GOLDEN=1 after an intended change to LOGICAL_AXIS_RULES."""
    got = {name: _specs_json(parallel.make_mesh(sizes)) for name, sizes in MESHES.items()}
    if os.environ.get("CAIG_UPDATE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            json.dump(got, f, indent=2, sort_keys=True)
    with open(GOLDEN) as f:
        assert got == json.load(f)


def test_logical_to_mesh_spec_rules(devices):
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert parallel.logical_to_mesh_spec(("embed", "mlp"), mesh) == P("fsdp", "tensor")
    assert parallel.logical_to_mesh_spec(("batch", None), mesh) == P(("data", "fsdp"), None)
    # one mesh axis is used at most once per array
    assert parallel.logical_to_mesh_spec(("heads", "mlp"), mesh) == P("tensor", None)
    # indivisible dimensions stay replicated instead of failing
    assert parallel.logical_to_mesh_spec(("kv_heads",), mesh, shape=(3,)) == P(None)
    # axes of size 1 are dropped
    mesh1 = parallel.make_mesh({"data": 8})
    assert parallel.logical_to_mesh_spec(("embed", "mlp"), mesh1) == P(None, None)
    with pytest.raises(KeyError, match="no rule"):
        parallel.logical_to_mesh_spec(("not_an_axis",), mesh)


def test_resolve_mesh_shape(devices):
    assert parallel.resolve_mesh_shape({"data": -1, "tensor": 2}, 8) == (4, 1, 2)
    assert parallel.resolve_mesh_shape({"fsdp": 4, "tensor": 2}, 8) == (1, 4, 2)
    with pytest.raises(ValueError, match="asks for 16 devices but 8"):
        parallel.resolve_mesh_shape({"data": 8, "tensor": 2}, 8)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        parallel.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="unknown axes"):
        parallel.resolve_mesh_shape({"model": 2}, 8)
    mesh4 = parallel.make_mesh({"data": 2, "tensor": 2}, devices=jax.devices()[:4])
    assert dict(mesh4.shape) == {"data": 2, "fsdp": 1, "tensor": 2}


def test_sharded_init_places_params_without_materialising(devices):
    mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
    model = parallel.sharded_init(_make_mlp, mesh)
    kernel = model.hidden[0].kernel.get_value()
    assert kernel.sharding.spec == P("tensor", "fsdp")
    # every device holds only its shard
    assert {s.data.shape for s in kernel.addressable_shards} == {(64 // 2, 64 // 4)}
    # same values as a plain unsharded init
    plain = _make_mlp()
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(plain.hidden[0].kernel.get_value()))


def test_global_batch_is_sharded_over_data_axes(devices):
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    local = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "y": np.arange(16)}
    batch = parallel.global_batch(mesh, local)
    assert batch["x"].sharding.spec == P(("data", "fsdp"), None)
    assert {s.data.shape for s in batch["x"].addressable_shards} == {(4, 3)}
    np.testing.assert_array_equal(np.asarray(batch["y"]), local["y"])


def test_pad_to_multiple():
    padded, n = parallel.pad_to_multiple({"a": np.arange(5)}, 4)
    assert n == 5 and padded["a"].tolist() == [0, 1, 2, 3, 4, 4, 4, 4]


def test_distributed_not_initialised_without_environment(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "CAIG_DISTRIBUTED"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.maybe_initialize_distributed() is False


def test_set_cpu_devices_splits_the_host_before_first_use():
    """`cpu_devices` in a job config becomes that many CPU devices; too late (backend in use) is one clear error."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import jax, jax.numpy as jnp\n"
        "from caig_jax import parallel\n"
        "parallel.set_cpu_devices(3)\n"
        "print('devices', jax.device_count(), dict(parallel.make_mesh({'data': -1}).shape)['data'])\n"
        "try:\n"
        "    parallel.set_cpu_devices(2)\n"
        "except RuntimeError as e:\n"
        "    print('error', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120,
                         env={**env, "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "devices 3 3" in out.stdout
    assert "error cpu_devices=2: JAX's CPU backend was already initialised" in out.stdout
