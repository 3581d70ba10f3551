"""Jobs that train (smoke, reward, sft, preference) on the generic trainer in `caig_jax.trainers.trainer`."""
