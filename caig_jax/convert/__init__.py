"""Checkpoint converters: transformers / original-LLaVA / diffusers / LDM safetensors -> caig_jax params.

Every converter is a mapping table from checkpoint keys to our parameter paths plus a transform, fed to
`caig_jax.convert.common.load_state`, which streams tensors one by one onto the mesh.
"""
