"""Small building blocks shared by every model: parameter-annotated Linear / Conv / norms / embeddings.

Each helper attaches logical axis names to its parameters (`out_sharding` metadata) so that
`caig_jax.parallel.LOGICAL_AXIS_RULES` can place them on any mesh. Kernels follow Flax conventions:
Linear `[in, out]`, Conv `[kh, kw, in, out]` (NHWC activations); converters transpose PyTorch tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]

# Activation names of transformers' ACT2FN and diffusers' `get_activation` that our configs can name.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "relu": jax.nn.relu,
}


# Rematerialisation policies (`model.remat_policy`): what a layer keeps for the backward pass. 'none' keeps every
# activation; 'full' keeps only the layer's input and recomputes the rest; 'dots' keeps matmul outputs;
# 'dots_no_batch' keeps only weight matmuls (no attention scores), MaxText's usual choice for long sequences.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat_policy(policy: str) -> str:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={policy!r}; known: {sorted(REMAT_POLICIES)}")
    return policy


def remat_call(module: nnx.Module, policy: str, *args):
    """`module(*args)`; under `nnx.remat` with `policy` unless it is 'none', so the backward pass recomputes the
    layer's activations instead of keeping them (same values, less memory, more compute)."""
    if policy == "none":
        return module(*args)
    # A pure function of the layer's state (not nnx.remat): nothing is written back into the module, so a layer
    # whose variables come from an outer trace (a model merged inside jit + grad, LoRA dropout streams) is fine.
    graphdef, state = nnx.split(module)
    return jax.checkpoint(lambda s, *a: nnx.merge(graphdef, s)(*a), policy=REMAT_POLICIES[policy])(state, *args)


def scan_call(modules: Sequence[nnx.Module], policy: str, fn: Callable, x, *, collect: bool = False):
    """`fn(module, x) -> x` for each of `modules` in turn, as one `jax.lax.scan` over their stacked states: XLA
    compiles one layer body instead of len(modules) copies (a 7B decoder's compile time and host memory scale with
    the body, not the depth). Each step is under `jax.checkpoint` with `policy` unless it is 'none' (remat composes).

    The modules must share one structure (same graphdef); their states are stacked on a new leading axis inside the
    traced function, so parameters stay one array per layer (transformers' layout: checkpoints, converters and LoRA
    are the same with or without scan) at the cost of one stacked copy of the layers' parameters per step.
    Like `remat_call`, nothing is written back into the modules. Returns (x, `[len(modules), *x.shape]` stacked
    per-layer outputs when `collect`, else None)."""
    if not modules:
        return x, (jnp.zeros((0, *x.shape), x.dtype) if collect else None)
    graphdef = nnx.graphdef(modules[0])
    if any(nnx.graphdef(m) != graphdef for m in modules[1:]):
        raise ValueError("scan_call: the layers differ in structure (LoRA on some layers only?); scan needs the "
                         "same modules in every layer (turn scan_layers off)")
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[nnx.state(m) for m in modules])

    def body(carry, state):
        y = fn(nnx.merge(graphdef, state), carry)
        return y, (y if collect else None)

    if policy != "none":
        # prevent_cse=False: inside a scan XLA cannot CSE the recomputation away (jax.checkpoint's documentation).
        body = jax.checkpoint(body, policy=REMAT_POLICIES[policy], prevent_cse=False)
    return jax.lax.scan(body, x, stacked)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation a config names (`hidden_act`, `act_fn`), exactly as transformers / diffusers compute it."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not implemented; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def linear(
    in_features: int,
    out_features: int,
    axes: Axes,
    *,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    kernel_init=nnx.initializers.lecun_normal(),
) -> nnx.Linear:
    """`nnx.Linear` with kernel `[in, out]` annotated `axes` and bias annotated `(axes[1],)`."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(kernel_init, axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


def conv2d(
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int],
    *,
    rngs: nnx.Rngs,
    strides: int = 1,
    padding: int | str = 0,
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    axes: Axes = ("conv_h", "conv_w", "conv_in", "conv_out"),
) -> nnx.Conv:
    """NHWC `nnx.Conv` with PyTorch-style symmetric integer padding; kernel `[kh, kw, in, out]`."""
    ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    pad = padding if isinstance(padding, str) else ((padding, padding), (padding, padding))
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=ks,
        strides=(strides, strides),
        padding=pad,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[-1],)),
        rngs=rngs,
    )


def layer_norm(
    features: int, *, rngs: nnx.Rngs, epsilon: float = 1e-5, dtype=jnp.float32, param_dtype=jnp.float32
) -> nnx.LayerNorm:
    """LayerNorm computed in float32 whatever the compute dtype (norms stay fp32 by convention)."""
    return nnx.LayerNorm(
        features,
        epsilon=epsilon,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
        rngs=rngs,
    )


def group_norm(
    features: int, num_groups: int, *, rngs: nnx.Rngs, epsilon: float = 1e-5, param_dtype=jnp.float32
) -> nnx.GroupNorm:
    """GroupNorm over NHWC channels, in float32."""
    return nnx.GroupNorm(
        features,
        num_groups=num_groups,
        epsilon=epsilon,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
        rngs=rngs,
    )


def embed(
    num_embeddings: int,
    features: int,
    axes: Axes,
    *,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
) -> nnx.Embed:
    """`nnx.Embed` with its table `[num, features]` annotated `axes`."""
    return nnx.Embed(
        num_embeddings,
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), axes),
        rngs=rngs,
    )


def param(rngs: nnx.Rngs, init, shape: Sequence[int], axes: Axes, dtype=jnp.float32) -> nnx.Param:
    """A free-standing parameter (class embedding, image_newline, ...) with logical axes."""
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=axes)
