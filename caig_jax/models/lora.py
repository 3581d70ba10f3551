"""LoRA adapters for `nnx.Linear` layers: `y = base(x) + (dropout(x) @ A @ B) * alpha / rank`.

`apply_lora` swaps selected Linear layers of a (possibly pretrained, already sharded) model for
`LoRALinear` wrappers. The adapters are `nnx.LoRAParam`s, so "train only LoRA" is the filter
`nnx.LoRAParam` and everything else stays frozen (no gradients, no optimizer state). `B` starts at zero, so
the adapted model computes exactly what the base model did until the first update. `merge_lora` folds the
adapters back into the base kernels (`W + A @ B * alpha / rank`) and unwraps them: the result is the plain model
(what an export to transformers writes).

Dropout on the adapter's input (PEFT's `lora_dropout`) is off unless a loss turns it on: `lora_train_mode(model,
rng)` switches every adapter's dropout to training mode with fresh keys from `rng` (call it on the model a jitted
loss function receives; the switch lives on that traced copy only), so evaluation and generation never drop.

Why not `nnx.LoRA(..., base_module=linear)` / `nnx.LoRALinear` (flax 0.12.8): they compute `x @ a @ b` with no
`alpha / rank` scale, which LoRA as CAIG trains it needs (rank 128, alpha 256: the update is scaled by 2, and the
scale sets the effective learning rate of the adapters), and `nnx.LoRALinear` builds a new Linear rather than
wrapping a pretrained one that already lives sharded on a mesh.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from caig_jax.parallel import logical_to_mesh_spec


class LoRALinear(nnx.Module):
    """Wraps a Linear `base` (kernel `[in, out]`) with a rank-`rank` adapter.

    Shapes: `lora_a float32[in, rank]` (axes `(in_axis, 'lora_rank')`), `lora_b float32[rank, out]`.
    """

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs, dropout: float = 0.0):
        self.base = base
        kernel = base.kernel
        in_features, out_features = kernel.get_value().shape
        axes = kernel.get_metadata().get("out_sharding") or (None, None)
        dtype = kernel.get_value().dtype
        self.lora_a = nnx.LoRAParam(
            nnx.initializers.he_uniform()(rngs.params(), (in_features, rank), dtype), out_sharding=(axes[0], "lora_rank")
        )
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), dtype), out_sharding=("lora_rank", axes[1]))
        self.scale = alpha / rank
        # Deterministic (no dropout) until `lora_train_mode`; its key stream is named 'lora_dropout'.
        self.dropout = (nnx.Dropout(dropout, deterministic=True, rng_collection="lora_dropout",
                                   rngs=nnx.Rngs(lora_dropout=0))
                        if dropout > 0 else None)
        sharding = getattr(kernel.get_value(), "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            # The base layer already lives on a mesh: put the adapters there too, by the same rules table.
            for var in (self.lora_a, self.lora_b):
                value = var.get_value()
                spec = logical_to_mesh_spec(var.get_metadata()["out_sharding"], sharding.mesh, shape=value.shape)
                var.set_value(jax.device_put(value, jax.sharding.NamedSharding(sharding.mesh, spec)))

    def __call__(self, x):
        dtype = self.base.dtype or x.dtype
        y = self.base(x)
        if self.dropout is not None:
            x = self.dropout(x)
        delta = (x.astype(dtype) @ self.lora_a.get_value().astype(dtype)) @ self.lora_b.get_value().astype(dtype)
        return y + delta * self.scale

    def merged_kernel(self) -> jax.Array:
        """`W + A @ B * scale` in the base kernel's dtype and sharding (the sum is taken in float32)."""
        kernel = self.base.kernel.get_value()
        delta = (self.lora_a.get_value().astype(jnp.float32) @ self.lora_b.get_value().astype(jnp.float32)) * self.scale
        merged = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
        sharding = getattr(kernel, "sharding", None)
        return jax.device_put(merged, sharding) if isinstance(sharding, jax.sharding.NamedSharding) else merged


def _path_name(path) -> str:
    return "/".join(str(p) for p in path)


def _replace_child(model: nnx.Module, path, new: nnx.Module) -> None:
    parent = model
    for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def apply_lora(
    model: nnx.Module, *, rank: int, alpha: float, target: str | Callable[[str], bool] = r".*", seed: int = 0,
    dropout: float = 0.0,
) -> list[str]:
    """Replaces every `nnx.Linear` whose '/'-joined path matches `target` (regex or predicate) in place.

    `dropout`: the rate applied to each adapter's input while training (`lora_train_mode`); 0 = none.
    Returns the list of adapted paths. Raises ValueError when nothing matched (a typo in `target` would
    otherwise silently train nothing).
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"apply_lora: dropout must be in [0, 1), got {dropout}")
    match = (lambda p: re.search(target, p) is not None) if isinstance(target, str) else target
    rngs = nnx.Rngs(seed)
    targets = [
        (path, module)
        for path, module in nnx.iter_graph(model)
        if isinstance(module, nnx.Linear) and match("/".join(str(p) for p in path))
    ]
    if not targets:
        raise ValueError(f"apply_lora: no nnx.Linear path matches target={target!r}")
    adapted = []
    for path, module in targets:
        _replace_child(model, path, LoRALinear(module, rank, alpha, rngs=rngs, dropout=dropout))
        adapted.append(_path_name(path))
    return adapted


def lora_layers(model: nnx.Module) -> list[tuple[str, LoRALinear]]:
    """`(path, LoRALinear)` of every adapter in `model`, in graph order."""
    return [(_path_name(path), m) for path, m in nnx.iter_graph(model) if isinstance(m, LoRALinear)]


def merge_lora(model: nnx.Module) -> list[str]:
    """Folds every adapter into its base kernel (`W <- W + A @ B * alpha / rank`) and puts the base Linear back
    in the wrapper's place, in place. Returns the merged paths (empty when the model has no adapters).

    The merged model computes what the adapted one did (up to float rounding of the sum, in float32 before the
    cast to the kernel's dtype), with the base model's parameter paths: what `caig_jax.convert.export` writes.
    """
    merged = []
    for path, module in [(path, m) for path, m in nnx.iter_graph(model) if isinstance(m, LoRALinear)]:
        module.base.kernel.set_value(module.merged_kernel())
        _replace_child(model, path, module.base)
        merged.append(_path_name(path))
    return merged


def lora_train_mode(model: nnx.Module, rng: jax.Array) -> None:
    """Turns on every adapter's dropout with keys drawn from `rng` (a different mask every call with another
    `rng`). Meant for the model copy a jitted loss function receives; models without dropout are unchanged."""
    layers = [m for _, m in lora_layers(model) if m.dropout is not None]
    for i, module in enumerate(layers):
        module.dropout.deterministic = False
        # A new key stream made inside the caller's trace (reseeding the stored one would mutate a variable
        # created outside it: an error under jit + grad).
        module.dropout.rngs = nnx.Rngs(lora_dropout=jax.random.fold_in(rng, i))["lora_dropout"]
