"""caig_jax: CTR-driven advertising image generation (CAIG, WWW 2025) in JAX/Flax NNX."""

from flax import config as _flax_config

# Parameters carry *logical* axis names; `caig_jax.parallel` maps them to mesh axes with one rules table
# and places them with `jax.jit(init, out_shardings=...)`. Flax's eager variable sharding would instead try
# to shard every variable at construction time with the raw logical names, so it is switched off.
_flax_config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
