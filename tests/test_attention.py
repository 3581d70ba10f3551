"""Every attention implementation against `xla` (float32, < 1e-4 relative max error, forward and gradients): causal
with left padding and GQA, no mask, cross-attention, a KV-cache decode step, a reward head's gathered rows;
`auto` resolved from a mesh's devices; `set_attention` over a model; splash under `shard_map` on sharded meshes
(outputs, gradients, and no collective in the compiled program). The model-level parity tests run with any
implementation via `CAIG_TEST_ATTENTION=<impl>` (conftest)."""

import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from caig_jax import parallel
from caig_jax.models import attention
from caig_jax.models.attention import Mask
from caig_jax.models.llama import LlamaConfig, LlamaForCausalLM

TOL = 1e-4


def _rel(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _case(name):
    """(q, k, v, mask) for one situation; sizes span several 8 x 8 blocks (see the `small_blocks` fixture)."""
    rng = np.random.default_rng(0)
    b, t, s, h, kvh, d = dict(
        causal_gqa_left_pad=(2, 70, 70, 4, 2, 8), no_mask=(2, 70, 70, 2, 2, 8), cross=(2, 40, 13, 2, 2, 8),
        decode_step=(2, 1, 90, 4, 1, 8), cached_chunk=(2, 20, 90, 4, 2, 8), query_rows=(2, 3, 70, 4, 2, 8),
    )[name]
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, s, kvh, d)), jnp.float32) for _ in range(2))
    valid = np.ones((b, s), bool)
    if name == "causal_gqa_left_pad":
        valid[1, :23] = False  # left padding: rows 0..22 of example 1 see no key at all
        return q, k, v, attention.causal_mask(t, jnp.asarray(valid))
    if name in ("no_mask", "cross"):
        return q, k, v, None
    # A cache of s slots: the t new queries sit at slots start..start+t-1, later slots are not written yet.
    start = 61
    valid[:, start + t:] = False
    valid[0, :5] = False
    positions = start + jnp.arange(t, dtype=jnp.int32)  # shared by the batch, as the LLM's decode passes them
    if name == "cached_chunk":  # per-example positions work too
        positions = jnp.broadcast_to(positions, (b, t))
    if name == "query_rows":  # a reward head: a few rows of a cache-free causal pass
        return q, k, v, attention.causal_mask(s).take_queries(jnp.asarray([[69, 3, 40], [10, 0, 65]], jnp.int32))
    return q, k, v, Mask(positions, jnp.asarray(valid))


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 8 queries x 8 keys, so tiny inputs run many blocks, padding and causal skipping (and score
    matrices of more than 64 entries take the blocked path at all)."""
    monkeypatch.setattr(attention, "BLOCK_Q", 8)
    monkeypatch.setattr(attention, "BLOCK_K", 8)


@pytest.fixture
def interpreted_splash(monkeypatch):
    """Splash's Pallas TPU kernel run by the Pallas interpreter, so it runs on the CPU devices."""
    monkeypatch.setattr(attention, "_splash", functools.partial(attention._splash, interpret=True))


CASES = ["causal_gqa_left_pad", "no_mask", "cross", "decode_step", "cached_chunk", "query_rows"]


def _forward_and_grads(impl, q, k, v, mask, **kw):
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((q.shape[0], q.shape[1], q.shape[2] * q.shape[3])),
                          jnp.float32)

    def loss(q, k, v):
        return jnp.sum(attention.attention(q, k, v, mask, impl=impl, **kw) * weights)

    out = jax.jit(lambda q, k, v: attention.attention(q, k, v, mask, impl=impl, **kw))(q, k, v)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("case", CASES)
def test_chunked_matches_xla(small_blocks, case):
    q, k, v, mask = _case(case)
    want, want_grads = _forward_and_grads("xla", q, k, v, mask)
    got, got_grads = _forward_and_grads("chunked", q, k, v, mask)
    assert got.shape == want.shape == (q.shape[0], q.shape[1], q.shape[2] * q.shape[3])
    assert _rel(got, want) < TOL
    for name, g, w in zip("qkv", got_grads, want_grads):
        assert _rel(g, w) < TOL, name


@pytest.mark.parametrize("case", ["causal_gqa_left_pad", "no_mask", "decode_step"])
def test_splash_in_interpret_mode_matches_xla(interpreted_splash, case):
    """The Pallas TPU kernel run by the Pallas interpreter on CPU, at one 128 x 128 block (splash's tile); the
    decode step is the case splash cannot express and hands to `xla`."""
    q, k, v, mask = _case(case)
    if case != "decode_step":  # splash tiles 128 positions: stretch the case to one tile (padding rows kept)
        q, k, v = (jnp.concatenate([x] * 2, axis=1)[:, :128] for x in (q, k, v))
        if mask is not None:
            mask = attention.causal_mask(128, jnp.concatenate([mask.kv_valid] * 2, axis=1)[:, :128])
    want, want_grads = _forward_and_grads("xla", q, k, v, mask)
    got, got_grads = _forward_and_grads("splash", q, k, v, mask)
    assert _rel(got, want) < TOL
    for name, g, w in zip("qkv", got_grads, want_grads):
        assert _rel(g, w) < TOL, name


@pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="cuDNN's fused attention runs on a GPU only")
@pytest.mark.parametrize("case", ["causal_gqa_left_pad", "no_mask"])
def test_cudnn_matches_xla_in_bf16(case):
    """cuDNN takes fp16/bf16 only: compared at bf16 output rounding, not the float32 tolerance."""
    q, k, v, mask = _case(case)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    want = attention.attention(q, k, v, mask, impl="xla").astype(jnp.float32)
    got = jax.jit(lambda q, k, v: attention.attention(q, k, v, mask, impl="cudnn"))(q, k, v)
    assert _rel(got.astype(jnp.float32), want) < 2e-2


def test_chunked_never_reads_fully_masked_key_blocks(small_blocks):
    """20 queries at cache slots 0..19 of a 90-slot cache read key blocks 0..2 (slots 0..23) only: values from
    slot 24 on may be NaN (never written) and the output stays finite and equal to xla's on clean values."""
    q, k, v, _ = _case("cached_chunk")
    mask = Mask(jnp.arange(q.shape[1], dtype=jnp.int32), jnp.broadcast_to(jnp.arange(k.shape[1]) < q.shape[1], k.shape[:2]))
    got = attention.attention(q, k, v.at[:, 24:].set(jnp.nan), mask, impl="chunked")
    assert bool(jnp.all(jnp.isfinite(got)))
    assert _rel(got, attention.attention(q, k, v, mask, impl="xla")) < TOL


def test_chunked_keeps_bf16_inputs_in_their_dtype(small_blocks):
    q, k, v, mask = (x.astype(jnp.bfloat16) if x is not None and not isinstance(x, Mask) else x
                     for x in _case("causal_gqa_left_pad"))
    got = attention.attention(q, k, v, mask, impl="chunked")
    want = attention.attention(q, k, v, mask, impl="xla")
    assert got.dtype == jnp.bfloat16
    assert _rel(got.astype(jnp.float32), want.astype(jnp.float32)) < 2e-2  # bf16 rounding of the output


def _devices(platform, n=2):
    return [types.SimpleNamespace(platform=platform, id=i) for i in range(n)]


def test_auto_resolves_from_the_mesh_devices_not_the_host():
    assert jax.default_backend() == "cpu"
    assert attention.resolve("auto", _devices("tpu")) == "splash"
    assert attention.resolve("auto", _devices("gpu"), jnp.bfloat16) == "cudnn"
    assert attention.resolve("auto", _devices("gpu"), jnp.float32) == "xla"  # cuDNN's kernels take no float32
    assert attention.resolve("auto", jax.devices()) == "chunked"
    assert attention.resolve("xla", _devices("tpu")) == "xla"
    with pytest.raises(ValueError, match="mixes"):
        attention.resolve("auto", _devices("tpu") + _devices("cpu"))
    with pytest.raises(ValueError, match="flash"):
        attention.resolve("flash", jax.devices())


def test_set_attention_reaches_every_attention_layer():
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2)
    model = attention.set_attention(LlamaForCausalLM(config, rngs=nnx.Rngs(0)), "chunked")
    impls = [m.attention_impl for _, m in nnx.iter_modules(model) if hasattr(m, "attention_impl")]
    assert impls == ["chunked", "chunked"]
    with pytest.raises(ValueError, match="resolve"):
        attention.set_attention(model, "auto")


def _splash_case(batch, heads, kv_heads, length=128, head_dim=8):
    """Causal, GQA and left padding (example 1's first 23 keys are padding, so its first rows see no key), at one
    128-position splash tile."""
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((batch, length, kv_heads, head_dim)), jnp.float32) for _ in range(2))
    valid = np.ones((batch, length), bool)
    valid[1, :23] = False
    valid[-1, :70] = False
    return q, k, v, attention.causal_mask(length, jnp.asarray(valid))


@pytest.mark.parametrize("mesh_shape, heads, kv_heads", [
    ({"fsdp": 4, "tensor": 2}, 4, 2),  # examples over fsdp, query and key heads over tensor
    ({"data": 2, "fsdp": 2, "tensor": 2}, 4, 1),  # one key head for 2 tensor shards: repeated to 4, then split
    ({"fsdp": 2, "tensor": 4}, 2, 2),  # 2 heads on 4 tensor shards: heads stay whole, examples still split
])
def test_splash_under_shard_map_matches_xla(devices, interpreted_splash, mesh_shape, heads, kv_heads):
    """Splash on a sharded mesh runs once per device under `shard_map` (Pallas interpreter on the 8 CPU devices) and
    gives xla's outputs and gradients."""
    mesh = parallel.make_mesh(mesh_shape)
    q, k, v, mask = _splash_case(4, heads, kv_heads)
    spec = attention._splash_specs(mesh, q, k, v)
    assert spec[0][0] is not None  # the examples are split in every case
    want, want_grads = _forward_and_grads("xla", q, k, v, mask)
    with jax.set_mesh(mesh):
        got, got_grads = _forward_and_grads("splash", q, k, v, mask, mesh=mesh)
    assert _rel(got, want) < TOL
    for name, g, w in zip("qkv", got_grads, want_grads):
        assert _rel(g, w) < TOL, name


def _collectives(hlo: str) -> list[str]:
    return re.findall(r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(", hlo)


def test_sharded_splash_moves_no_data(devices):
    """On an fsdp x tensor mesh with q, k, v where the rules table puts them (examples over fsdp, heads over tensor),
    the compiled forward and backward of splash hold no collective: each device runs the kernel on its own block.
    Left to GSPMD (no mesh given), the same call gathers its operands."""
    mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
    q, k, v, mask = _splash_case(4, 4, 2)
    q_spec, kv_spec, _, _ = attention._splash_specs(mesh, q, k, v)
    # data has size 1 but is named (see _splash_specs)
    assert (q_spec, kv_spec) == (P(("data", "fsdp"), None, "tensor", None),) * 2
    q, k, v = (jax.device_put(x, NamedSharding(mesh, s)) for x, s in ((q, q_spec), (k, kv_spec), (v, kv_spec)))

    def compiled(mesh_arg):
        def run(q, k, v):
            return attention._splash(q, k, v, mask, 8**-0.5, mesh=mesh_arg, interpret=True)

        def grads(q, k, v):
            return jax.grad(lambda *a: jnp.sum(run(*a) ** 2), argnums=(0, 1, 2))(q, k, v)

        with jax.set_mesh(mesh):
            return [jax.jit(f).lower(q, k, v).compile().as_text() for f in (run, grads)]

    forward, backward = compiled(mesh)
    assert _collectives(forward) == [] and _collectives(backward) == []
    assert "all-gather" in _collectives(compiled(None)[0])


def test_scanned_llama_with_sharded_splash_matches_xla(devices, interpreted_splash, monkeypatch):
    """A tiny Llama (GQA, left padding, 128 tokens) born sharded on fsdp x tensor, its layers scanned with full remat:
    `configure(..., 'splash', mesh)` reaches every layer and the scanned, rematerialised, sharded step gives xla's
    logits and gradients."""
    kernel_shapes = []  # what the kernel saw on one device: the model's call took the splash path, sharded
    kernel = attention._splash_local
    monkeypatch.setattr(attention, "_splash_local",
                        lambda q, *a, **kw: kernel_shapes.append(q.shape) or kernel(q, *a, **kw))
    mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, remat_policy="full", scan_layers=True)
    model = parallel.sharded_init(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)), mesh)
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(1, 64, (4, 128)), jnp.int32)
    padding = jnp.asarray(np.arange(128)[None] >= np.asarray([[0], [23], [0], [70]]), jnp.int32)  # left padding

    def logits_and_grads(impl):
        attention.configure(model, impl, mesh)
        graphdef, params = nnx.split(model)

        def loss(params):
            logits = nnx.merge(graphdef, params)(ids, padding)
            return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * padding), logits

        with jax.set_mesh(mesh):
            (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return logits, jax.tree.leaves(grads)

    want, want_grads = logits_and_grads("xla")
    got, got_grads = logits_and_grads("splash")
    assert set(kernel_shapes) == {(1, 128, 2, 8)}  # [B / fsdp, T, H / tensor, Dh]
    meshes = {m.attention_mesh for _, m in nnx.iter_modules(model) if hasattr(m, "attention_impl")}
    assert meshes == {mesh}
    assert _rel(got, want) < TOL
    for g, w in zip(got_grads, want_grads):
        assert _rel(g, w) < TOL
