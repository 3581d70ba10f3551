"""A small MLP with logical axis names: the smoke job's model (and the engine's tests')."""

from __future__ import annotations

import jax
from flax import nnx

from caig_jax.models import layers


class MLP(nnx.Module):
    """`float32[B, d_in] -> float32[B, d_out]`: Linear -> GELU -> (Linear -> GELU)* -> Linear."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, num_layers: int, *, rngs: nnx.Rngs):
        self.inp = layers.linear(d_in, d_hidden, ("embed_no_fsdp", "mlp"), rngs=rngs)
        self.hidden = nnx.List(
            [layers.linear(d_hidden, d_hidden, ("mlp", "embed"), rngs=rngs) for _ in range(num_layers)]
        )
        self.out = layers.linear(d_hidden, d_out, ("mlp", "embed_no_fsdp"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.inp(x))
        for layer in self.hidden:
            h = jax.nn.gelu(layer(h))
        return self.out(h)
