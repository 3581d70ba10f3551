"""Data: CTR logs -> CAIG reward pairs (TFDS, array_record, TF-free), LLaVA conversations, products,
grain batching (`loader`), and the synthetic marketplace with a known click model (`market`).

See caig_jax/data/README.md for the input layouts.
"""
