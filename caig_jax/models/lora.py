"""LoRA adapters for `nnx.Linear` layers: `y = base(x) + (x @ A @ B) * alpha / rank`.

`apply_lora` swaps selected Linear layers of a (possibly pretrained, already sharded) model for
`LoRALinear` wrappers. The adapters are `nnx.LoRAParam`s, so "train only LoRA" is the filter
`nnx.LoRAParam` and everything else stays frozen (no gradients, no optimizer state). `B` starts at zero, so
the adapted model computes exactly what the base model did until the first update.

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

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
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
        sharding = getattr(kernel.get_value(), "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            # The base layer already lives on a mesh: put the adapters there too, by the same rules table.
            for var in (self.lora_a, self.lora_b):
                value = var.get_value()
                spec = logical_to_mesh_spec(var.get_metadata()["out_sharding"], sharding.mesh, shape=value.shape)
                var.set_value(jax.device_put(value, jax.sharding.NamedSharding(sharding.mesh, spec)))

    def __call__(self, x):
        dtype = self.base.dtype or x.dtype
        delta = (x.astype(dtype) @ self.lora_a.get_value().astype(dtype)) @ self.lora_b.get_value().astype(dtype)
        return self.base(x) + delta * self.scale


def apply_lora(
    model: nnx.Module, *, rank: int, alpha: float, target: str | Callable[[str], bool] = r".*", seed: int = 0
) -> list[str]:
    """Replaces every `nnx.Linear` whose '/'-joined path matches `target` (regex or predicate) in place.

    Returns the list of adapted paths. Raises ValueError when nothing matched (a typo in `target` would
    otherwise silently train nothing).
    """
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
        parent = model
        for p in path[:-1]:
            parent = parent[p] if isinstance(p, int) else getattr(parent, p)
        wrapped = LoRALinear(module, rank, alpha, rngs=rngs)
        if isinstance(path[-1], int):
            parent[path[-1]] = wrapped
        else:
            setattr(parent, path[-1], wrapped)
        adapted.append("/".join(str(p) for p in path))
    return adapted
