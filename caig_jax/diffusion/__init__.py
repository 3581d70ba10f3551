"""Diffusion sampling: noise schedulers (`schedulers.py`) and the SD-1.5 + ControlNet inpainting sampler
(`pipeline.py`). The networks live in `caig_jax.models` (unet, vae, controlnet); loading in `caig_jax.render`."""
