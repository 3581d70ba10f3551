"""One module per job, each with `run(config, workdir)`: thin wiring of library pieces (`caig_jax.main.JOBS`)."""
