"""Flax NNX models. Every parameter carries logical axis names (see `caig_jax.parallel`)."""
