"""One attention switch for the LLM, the CLIP towers and the renderer.

    attention(q, k, v, mask, impl=...) -> [B, T, H * Dh]

q `[B, T, H, Dh]`, k and v `[B, S, KVH, Dh]` with `H % KVH == 0` (grouped-query attention; plain multi-head when
equal). Which keys a query sees is a `Mask`: a causal rule on key slots (`q_positions`, the slot of each query,
which also covers a KV cache's offset and a reward head's gathered rows) and key padding (`kv_valid`). Keeping
the mask structured, not a dense `[B, T, S]` array, is what lets the blocked kernels skip whole blocks.

Implementations (`impl`), all with float32 scores and softmax whatever the compute dtype:
  * `xla`: the plain form, scores `[B, H, T, S]` materialised. The reference every other one is tested against.
  * `chunked`: memory-efficient attention in plain XLA for CPU: queries and keys in blocks, an online softmax
    over the key blocks, key blocks a query block cannot see (causal) skipped, and a custom VJP that recomputes
    each block's probabilities from the saved log-sum-exp instead of storing `[B, H, T, S]`.
  * `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` (GPU flash attention; fp16/bf16 only).
  * `splash`: JAX's Pallas splash attention kernel for TPU (`interpret=True` runs it on CPU in tests). On a mesh
    of more than one device it runs under `jax.shard_map` (examples over the batch axes, heads over `tensor`): a
    Pallas kernel is an opaque custom call that GSPMD cannot partition (libtpu refuses to compile it unwrapped).
`auto` is resolved by `resolve(name, devices, dtype)` from the devices of the mesh a program is compiled for,
never from the host's default backend, so an ahead-of-time compile for a TPU topology on a CPU host gets TPU
kernels.

A query that may see no key at all (a left-padding row) gets the mean of every value in all implementations:
that is what the `xla` form's softmax over equal masked scores gives, and keeping it keeps every output equal.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from caig_jax import parallel

IMPLEMENTATIONS = ("xla", "chunked", "splash", "cudnn")
CHOICES = IMPLEMENTATIONS + ("auto",)

# Large negative logit for masked entries of the `xla` form. Finite (not -inf) so that a query row with no visible
# key (a left-pad position) yields a finite, ignored output instead of NaN.
_MASK_VALUE = float(np.finfo(np.float32).min)

# `chunked` block sizes (queries x keys), chosen by measurement on XLA:CPU (2 cores): big enough that each
# block's two dots run at matmul speed, small enough that a block's scores stay in cache-sized buffers.
BLOCK_Q = 128
BLOCK_K = 256


class Mask(NamedTuple):
    """Which keys each query may attend to; None fields impose nothing.

    q_positions: `int32[T]` (the same for every example) or `int32[B, T]`, the key slot of each query: key `s` is
      visible iff `s <= q_positions[(b,) t]` (causal; a KV cache's queries sit at `cache_index + t`). None: no
      causal rule. Shared positions keep the blocked kernels' block counts free of a reduction over a sharded
      batch (a collective per block).
    kv_valid: `bool[B, S]`, False for padding keys (and cache slots not yet written).
    """

    q_positions: jax.Array | None = None
    kv_valid: jax.Array | None = None

    def take_queries(self, index: jax.Array) -> "Mask":
        """The mask of the queries `index` (`int32[B, Q]`) only, keys unchanged."""
        if self.q_positions is None:
            return self
        positions = jnp.broadcast_to(self.q_positions, (index.shape[0], self.q_positions.shape[-1]))
        return self._replace(q_positions=jnp.take_along_axis(positions, index, axis=1))

    def dense(self, batch: int, q_len: int, kv_len: int) -> jax.Array | None:
        """bool `[B, T, S]` (True = may attend), or None when nothing is masked."""
        mask = None
        if self.q_positions is not None:
            keys = jnp.arange(kv_len, dtype=jnp.int32)
            mask = keys <= self.q_positions[..., None]
        if self.kv_valid is not None:
            valid = self.kv_valid.astype(jnp.bool_)[:, None, :]
            mask = valid if mask is None else mask & valid
        return None if mask is None else jnp.broadcast_to(mask, (batch, q_len, kv_len))


def causal_mask(length: int, kv_valid: jax.Array | None = None) -> Mask:
    """Causal mask for `length` queries at slots `0..length-1` (no cache), with optional key padding."""
    return Mask(jnp.arange(length, dtype=jnp.int32), None if kv_valid is None else jnp.asarray(kv_valid).astype(jnp.bool_))


def check(name: str, what: str = "attention") -> str:
    """`name` if it is one of `CHOICES`, else ValueError naming the setting."""
    if name not in CHOICES:
        raise ValueError(f"{what} = {name!r}: expected one of {', '.join(CHOICES)}")
    return name


def resolve(name: str, devices: Sequence[jax.Device], dtype=jnp.float32) -> str:
    """The implementation `name` means on `devices` (a mesh's devices): `auto` -> a concrete one.

    TPU: `splash`. GPU: `cudnn` for fp16/bf16 compute (cuDNN's fused kernels take no float32), else `xla`.
    CPU: `chunked` (measured faster than `xla` in the real jobs; README benchmarks). Mixed platforms: ValueError.
    """
    check(name)
    if name != "auto":
        return name
    platforms = {d.platform for d in devices}
    if len(platforms) != 1:
        raise ValueError(f"attention=auto: the mesh mixes device platforms {sorted(platforms)}")
    platform = platforms.pop()
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda", "rocm"):
        return "cudnn" if jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else "xla"
    return "chunked"


def set_attention(model: nnx.Module, impl: str, mesh: Mesh | None = None) -> nnx.Module:
    """Sets every attention layer of `model` (LLM, CLIP tower, UNet, ControlNet, VAE) to `impl`, a concrete
    implementation (`resolve` turns `auto` into one first), on `mesh` (the mesh the model's programs are compiled
    for; `splash` runs under `shard_map` over it, the other implementations ignore it). Split the model into
    graphdef and state after this: both are part of the graphdef, so a jitted step traces what they name."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"set_attention: {impl!r} is not one of {', '.join(IMPLEMENTATIONS)} (resolve 'auto' first)")
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "attention_impl"):
            module.attention_impl = impl
            module.attention_mesh = mesh
    return model


def configure(model: nnx.Module, name: str, mesh: Mesh | None, dtype=jnp.float32) -> nnx.Module:
    """`set_attention(model, resolve(name, ...), mesh)` for a model that runs on `mesh` (None: the default device)
    in compute dtype `dtype`: what the jobs call with their `attention` setting."""
    devices = jax.devices()[:1] if mesh is None else list(mesh.devices.flat)
    return set_attention(model, resolve(name, devices, dtype), mesh)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask | None = None, *, impl: str = "xla",
    scale: float | None = None, mesh: Mesh | None = None,
) -> jax.Array:
    """Softmax attention, q `[B, T, H, Dh]`, k, v `[B, S, KVH, Dh]` -> `[B, T, H * Dh]` in q's dtype. `mesh`: the
    mesh the program runs on (`splash` partitions its kernel over it; see `_splash`)."""
    batch, q_len, heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else float(scale)
    mask = Mask() if mask is None else mask
    if impl == "chunked" and q_len * k.shape[1] <= BLOCK_Q * BLOCK_K:
        # Scores no bigger than one block (decode steps, short inputs): nothing to block, the plain form is it.
        impl = "xla"
    if impl == "xla":
        return _xla(q, k, v, mask.dense(batch, q_len, k.shape[1]), scale)
    if impl == "chunked":
        out = _chunked(q, k, v, mask.q_positions, mask.kv_valid, scale)
        return out.reshape(batch, q_len, heads * head_dim)
    if impl == "cudnn":
        return _cudnn(q, k, v, mask, scale)
    if impl == "splash":
        return _splash(q, k, v, mask, scale, mesh=mesh)
    raise ValueError(f"attention impl {impl!r}: expected one of {', '.join(IMPLEMENTATIONS)} ('auto' is resolved "
                     f"before tracing, see `resolve`)")


# ------------------------------------------------------------------------------------------------ xla


def _xla(q, k, v, mask, scale):
    """The plain form; mask bool `[B, T, S]` or None."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, q_len, heads * head_dim)


# ------------------------------------------------------------------------------------------------ chunked
#
# Layout inside: q `[B, KVH, G, T, Dh]` (the G query heads sharing a key head side by side), k, v `[B, KVH, S,
# Dh]`. Queries are padded to a multiple of the query block (padded rows see no key and are sliced off), keys to
# a multiple of the key block (padded keys are invalid). Query block i runs a `while_loop` over key blocks
# 0 .. last(i), where last(i) is the last block holding a key that some query of block i may see under the
# causal rule: with a causal mask about half of the blocks are never computed, and a decode step at slot p of a
# long cache reads only blocks up to p.


def _blocks(length: int, block: int) -> tuple[int, int]:
    """(block size, padded length): one block when `length <= block`."""
    if length <= block:
        return length, length
    return block, math.ceil(length / block) * block


def _key_loop(n_blocks, nk, body, init):
    """`body` over key blocks 0 .. n_blocks - 1; a single key block (cross-attention to 77 text tokens) runs
    straight, without a loop."""
    if nk == 1:
        return body(0, init)
    return jax.lax.fori_loop(0, n_blocks, body, init)


def _layout(q, k, v, q_positions, kv_valid):
    """Transposed, padded operands and the static sizes (see the comment above)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    bq, tq = _blocks(q_len, BLOCK_Q)
    bk, tk = _blocks(kv_len, BLOCK_K)
    qt = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    qt = jnp.pad(qt, ((0, 0),) * 3 + ((0, tq - q_len), (0, 0)))
    kt = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, tk - kv_len), (0, 0)))
    vt = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, tk - kv_len), (0, 0)))
    big = np.iinfo(np.int32).max
    pos = jnp.full((q_len,), big, jnp.int32) if q_positions is None else q_positions.astype(jnp.int32)
    pos = jnp.pad(pos, ((0, 0),) * (pos.ndim - 1) + ((0, tq - q_len),), constant_values=-1)  # padded: see nothing
    valid = jnp.ones((batch, kv_len), jnp.bool_) if kv_valid is None else kv_valid.astype(jnp.bool_)
    valid = jnp.pad(valid, ((0, 0), (0, tk - kv_len)))
    return qt, kt, vt, pos, valid, (bq, bk, tq // bq, tk // bk)


def _block_mask(pos_i, valid_j, j, bk):
    """bool `[B, 1, 1, bq, bk]`: query rows `pos_i` (`[bq]` or `[B, bq]`) against key block j (`valid_j[B, bk]`)."""
    keys = j * bk + jnp.arange(bk, dtype=jnp.int32)
    m = (keys <= pos_i[..., None]) & valid_j[:, None, :]
    return m[:, None, None]


def _key_blocks(pos_i, valid, bk, nk):
    """Number of key blocks query block i needs: through the block of its largest visible slot."""
    last = jnp.max(pos_i)
    return jnp.clip(last // bk + 1, 0, nk).astype(jnp.int32)


def _forward(qt, kt, vt, pos, valid, sizes, scale):
    """Blocked forward: out `[B, KVH, G, Tq, Dh]` (float32) and log-sum-exp `[B, KVH, G, Tq]` (float32;
    -inf for rows that see no key)."""
    bq, bk, nq, nk = sizes
    batch, kv_heads, groups, _, head_dim = qt.shape

    def query_block(i):
        q_i = jax.lax.dynamic_slice_in_dim(qt, i * bq, bq, axis=3)
        pos_i = jax.lax.dynamic_slice_in_dim(pos, i * bq, bq, axis=pos.ndim - 1)

        def key_block(j, carry):
            m, total, acc = carry
            k_j = jax.lax.dynamic_slice_in_dim(kt, j * bk, bk, axis=2)
            v_j = jax.lax.dynamic_slice_in_dim(vt, j * bk, bk, axis=2)
            valid_j = jax.lax.dynamic_slice_in_dim(valid, j * bk, bk, axis=1)
            s = jnp.einsum("bkgtd,bksd->bkgts", q_i, k_j, preferred_element_type=jnp.float32) * scale
            visible = _block_mask(pos_i, valid_j, j, bk)
            s = jnp.where(visible, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            # Rows that have seen no key yet keep m = -inf; shifting by 0 there keeps exp() finite (it is 0).
            shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - shift[..., None])
            correction = jnp.exp(m - shift)
            total = total * correction + p.sum(axis=-1)
            acc = acc * correction[..., None] + jnp.einsum(
                "bkgts,bksd->bkgtd", p.astype(vt.dtype), v_j, preferred_element_type=jnp.float32)
            return m_new, total, acc

        init = (
            jnp.full((batch, kv_heads, groups, bq), -jnp.inf, jnp.float32),
            jnp.zeros((batch, kv_heads, groups, bq), jnp.float32),
            jnp.zeros((batch, kv_heads, groups, bq, head_dim), jnp.float32),
        )
        m, total, acc = _key_loop(_key_blocks(pos_i, valid, bk, nk), nk, key_block, init)
        seen = total > 0
        out = acc / jnp.where(seen, total, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
        return out, lse

    out, lse = jax.lax.map(query_block, jnp.arange(nq))
    # [nq, B, KVH, G, bq, ...] -> [B, KVH, G, nq * bq, ...]
    out = jnp.moveaxis(out, 0, 3).reshape(batch, kv_heads, groups, nq * bq, head_dim)
    lse = jnp.moveaxis(lse, 0, 3).reshape(batch, kv_heads, groups, nq * bq)
    return out, lse


def _backward(qt, kt, vt, pos, valid, out, lse, d_out, sizes, scale):
    """Blocked backward from the saved log-sum-exp: (dq, dk, dv) in the padded inside layout, float32."""
    bq, bk, nq, nk = sizes
    delta = jnp.sum(d_out * out, axis=-1)  # [B, KVH, G, Tq]: rowsum(dO * O) = sum_s P dP

    def query_block(i, carry):
        dq, dk, dv = carry
        sl = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=i * bq, slice_size=bq, axis=3)
        q_i, do_i, lse_i, delta_i = sl(qt), sl(d_out), sl(lse[..., None])[..., 0], sl(delta[..., None])[..., 0]
        pos_i = jax.lax.dynamic_slice_in_dim(pos, i * bq, bq, axis=pos.ndim - 1)

        def key_block(j, inner):
            dq_i, dk, dv = inner
            k_j = jax.lax.dynamic_slice_in_dim(kt, j * bk, bk, axis=2)
            v_j = jax.lax.dynamic_slice_in_dim(vt, j * bk, bk, axis=2)
            valid_j = jax.lax.dynamic_slice_in_dim(valid, j * bk, bk, axis=1)
            s = jnp.einsum("bkgtd,bksd->bkgts", q_i, k_j, preferred_element_type=jnp.float32) * scale
            visible = _block_mask(pos_i, valid_j, j, bk)
            p = jnp.where(visible, jnp.exp(s - lse_i[..., None]), 0.0)
            dv_j = jnp.einsum("bkgts,bkgtd->bksd", p, do_i, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgtd,bksd->bkgts", do_i, v_j, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None]) * scale
            dq_i = dq_i + jnp.einsum("bkgts,bksd->bkgtd", ds, k_j, preferred_element_type=jnp.float32)
            dk_j = jnp.einsum("bkgts,bkgtd->bksd", ds, q_i, preferred_element_type=jnp.float32)
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, jax.lax.dynamic_slice_in_dim(dk, j * bk, bk, axis=2) + dk_j, j * bk, axis=2)
            dv = jax.lax.dynamic_update_slice_in_dim(
                dv, jax.lax.dynamic_slice_in_dim(dv, j * bk, bk, axis=2) + dv_j, j * bk, axis=2)
            return dq_i, dk, dv

        dq_i = jnp.zeros(q_i.shape, jnp.float32)
        dq_i, dk, dv = _key_loop(_key_blocks(pos_i, valid, bk, nk), nk, key_block, (dq_i, dk, dv))
        dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * bq, axis=3)
        return dq, dk, dv

    init = (jnp.zeros(qt.shape, jnp.float32), jnp.zeros(kt.shape, jnp.float32), jnp.zeros(vt.shape, jnp.float32))
    return jax.lax.fori_loop(0, nq, query_block, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _chunked_core(q, k, v, q_positions, kv_valid, scale):
    return _chunked_fwd(q, k, v, q_positions, kv_valid, scale)[0]


def _chunked_fwd(q, k, v, q_positions, kv_valid, scale):
    """Output `[B, T, H, Dh]` in q's dtype, and what the backward recomputes from (no `[T, S]` array)."""
    batch, q_len, heads, head_dim = q.shape
    qt, kt, vt, pos, valid, sizes = _layout(q, k, v, q_positions, kv_valid)
    out, lse = _forward(qt, kt, vt, pos, valid, sizes, scale)
    seen = jnp.isfinite(lse)[..., None]
    # A row that sees no key: the mean of all (unpadded) values, as the `xla` form's uniform softmax gives.
    mean_v = jnp.mean(v.astype(jnp.float32), axis=1)[:, :, None, None, :]  # [B, KVH, 1, 1, Dh]
    out = jnp.where(seen, out, mean_v)
    result = out[:, :, :, :q_len].transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim).astype(q.dtype)
    return result, (q, k, v, q_positions, kv_valid, out, lse)


def _chunked_bwd(scale, residuals, d_result):
    q, k, v, q_positions, kv_valid, out, lse = residuals
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    qt, kt, vt, pos, valid, sizes = _layout(q, k, v, q_positions, kv_valid)
    d_out = d_result.astype(jnp.float32).reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    d_out = jnp.pad(d_out.transpose(0, 2, 3, 1, 4), ((0, 0),) * 3 + ((0, qt.shape[3] - q_len), (0, 0)))
    seen = jnp.isfinite(lse)
    dq, dk, dv = _backward(qt, kt, vt, pos, valid, out, lse, jnp.where(seen[..., None], d_out, 0.0), sizes, scale)
    # Rows that see no key output mean(v): each key's value gets 1/S of their output gradient.
    blind = jnp.sum(jnp.where(seen[..., None], 0.0, d_out), axis=(2, 3)) / kv_len  # [B, KVH, Dh]
    dv = dv[:, :, :kv_len] + blind[:, :, None, :]
    dq = dq[:, :, :, :q_len].transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype)
    dk = dk[:, :, :kv_len].transpose(0, 2, 1, 3).astype(k.dtype)
    dv = dv.transpose(0, 2, 1, 3).astype(v.dtype)
    zero = lambda x: None if x is None else np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731 (integer inputs)
    return dq, dk, dv, zero(q_positions), zero(kv_valid)


_chunked_core.defvjp(_chunked_fwd, _chunked_bwd)


def _chunked(q, k, v, q_positions, kv_valid, scale):
    return _chunked_core(q, k, v, q_positions, kv_valid, scale)


# ------------------------------------------------------------------------------------------------ cudnn


def _cudnn(q, k, v, mask, scale):
    """cuDNN flash attention (GPU, fp16/bf16) via `jax.nn.dot_product_attention`; the mask goes in dense
    `[B, 1, T, S]`, and rows that see no key get the `xla` form's mean of the values."""
    batch, q_len, heads, head_dim = q.shape
    dense = mask.dense(batch, q_len, k.shape[1])
    out = jax.nn.dot_product_attention(
        q, k, v, mask=None if dense is None else dense[:, None], scale=scale, implementation="cudnn")
    return _blind_rows_mean(out, v, mask).reshape(batch, q_len, heads * head_dim)


# ------------------------------------------------------------------------------------------------ splash


def _sees_any_key(mask: Mask, batch: int, q_len: int, kv_len: int) -> jax.Array | None:
    """bool `[B, T]`: whether query t may see at least one key (None: all may)."""
    if mask.kv_valid is None:
        return None if mask.q_positions is None else jnp.broadcast_to(mask.q_positions >= 0, (batch, q_len))
    if mask.q_positions is None:
        return jnp.broadcast_to(jnp.any(mask.kv_valid, axis=1)[:, None], (batch, q_len))
    positions = jnp.broadcast_to(mask.q_positions, (batch, q_len))
    seen = jnp.cumsum(mask.kv_valid.astype(jnp.int32), axis=1)  # [B, S]: valid keys at slots <= s
    return jnp.take_along_axis(seen, jnp.clip(positions, 0, kv_len - 1), axis=1) * (positions >= 0) > 0


def _blind_rows_mean(out, v, mask: Mask):
    """`out` `[B, T, H, Dh]` with rows that see no key replaced by the mean of all values (as `xla` gives)."""
    batch, q_len, heads, head_dim = out.shape
    sees = _sees_any_key(mask, batch, q_len, v.shape[1])
    if sees is None:
        return out
    mean_v = jnp.repeat(jnp.mean(v.astype(jnp.float32), axis=1), heads // v.shape[2], axis=1)  # [B, H, Dh]
    return jnp.where(sees[:, :, None, None], out, mean_v[:, None].astype(out.dtype))


def _splash(q, k, v, mask, scale, *, mesh: Mesh | None = None, interpret: bool = False):
    """Pallas splash attention (TPU; `interpret=True` runs the same kernel on CPU). A causal rule with positions
    shared by the batch and T == S means queries at slots 0..T-1 in every caller (`causal_mask`, the LLM's
    cache-free passes); it maps to splash's static causal block mask, so fully masked blocks are skipped; key
    padding goes in as segment ids (padding keys in segment 0, every query in segment 1). What splash cannot express
    or tile (a KV cache's offset queries, a reward head's gathered rows, lengths that are not multiples of its
    128-wide blocks) runs the `xla` form.

    On a `mesh` of more than one device the kernel runs under `jax.shard_map`, once per device on its block of
    examples and heads (`_splash_specs`), with no communication: GSPMD cannot partition a Pallas custom call (libtpu
    rejects it: "Mosaic kernels cannot be automatically partitioned"), and gathering q, k, v whole onto every chip
    would cost the memory the mesh is there to split."""
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    causal = mask.q_positions is not None
    if (causal and (q_len != kv_len or mask.q_positions.ndim != 1)) or q_len % 128 or kv_len % 128:
        return _xla(q, k, v, mask.dense(batch, q_len, kv_len), scale)
    local = functools.partial(_splash_local, scale=scale, interpret=interpret)
    if mesh is None or mesh.size == 1:
        return local(q, k, v, mask)
    q_spec, kv_spec, k, v = _splash_specs(mesh, q, k, v)
    mask_spec = Mask(q_positions=P(), kv_valid=P(q_spec[0], None))  # positions: shared by the batch
    # check_vma=False: the Pallas TPU kernel's primitives carry no varying-manual-axes rules; the specs say which
    # axes each operand varies over, and the output varies over exactly those of q.
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, mask_spec),
                            out_specs=P(q_spec[0], None, q_spec[2]), check_vma=False)
    return sharded(q, k, v, mask)


def _splash_specs(mesh: Mesh, q, k, v):
    """(q spec, k/v spec, k, v) for running splash under `shard_map` on `mesh`.

    Examples split over the batch axes and heads over the heads axis of the rules table
    (`parallel.LOGICAL_AXIS_RULES`: `batch` -> `data`, `fsdp`; `heads`, `kv_heads` -> `tensor`), where the
    activations around the call already are; the sequence is not split (the kernel's mask is static over the whole
    length). A dimension that does not divide by its axes' size stays whole on them (the rules table does the same;
    every shard then computes it). Axes of size 1 are named in the specs too: an axis a spec leaves out gets a psum
    of the gradient in shard_map's transpose (an empty one, but a collective in the program).

    Query head h reads key head h // G; contiguous blocks of H / t query heads and KVH / t key heads keep that
    pairing inside each tensor shard. When the query heads divide by the tensor size but the key heads do not
    (fewer KV heads than tensor shards), k and v are repeated to one head per query head (what GQA means; each
    shard then holds H / t of them, as a sharded multi-head layer would) so that the heads still split; their
    gradients are summed back over the tensor shards by the repeat's transpose."""
    rules = dict(parallel.LOGICAL_AXIS_RULES)

    def axes(logical: str, size: int) -> tuple[str, ...] | None:
        named = rules[logical]
        named = tuple(a for a in ((named,) if isinstance(named, str) else named) if a in mesh.shape)
        if size % math.prod(mesh.shape[a] for a in named):
            named = tuple(a for a in named if mesh.shape[a] == 1)
        return named or None

    batch, heads, kv_heads = axes("batch", q.shape[0]), axes("heads", q.shape[2]), axes("kv_heads", k.shape[2])
    if heads != kv_heads:
        if heads is not None and any(mesh.shape[a] > 1 for a in heads):
            k, v = (jnp.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v))
        kv_heads = heads
    return P(batch, None, heads, None), P(batch, None, kv_heads, None), k, v


def _splash_local(q, k, v, mask, *, scale, interpret):
    """The splash kernel on one device's operands: q `[b, T, h, Dh]`, k, v `[b, S, kvh, Dh]` -> `[b, T, h * Dh]`."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    base = splash_mask.CausalMask((q_len, kv_len)) if mask.q_positions is not None else splash_mask.FullMask(
        (q_len, kv_len))
    kernel = splash.make_splash_mqa_single_device(splash_mask.MultiHeadMask([base] * groups), interpret=interpret)
    valid = jnp.ones((batch, kv_len), jnp.int32) if mask.kv_valid is None else mask.kv_valid.astype(jnp.int32)
    segments = splash.SegmentIds(q=jnp.ones((batch, q_len), jnp.int32), kv=valid)
    # [B, KVH, G, T, Dh] queries against [B, KVH, S, Dh] keys: the MQA kernel per (example, key head).
    qt = (q * scale).reshape(batch, q_len, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_head, in_axes=(0, 0, 0, 0))(qt, kt, vt, segments)  # [B, KVH, G, T, Dh]
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim)
    return _blind_rows_mean(out, v, mask).reshape(batch, q_len, heads * head_dim)
