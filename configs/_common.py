"""Config sections shared by the job configs (configs may import each other; library code never reads configs/)."""

import ml_collections


def train_config() -> ml_collections.ConfigDict:
    """The `config.train` section every training job has (`caig_jax.trainers.trainer.Trainer` reads it); jobs
    override values, not keys."""
    c = ml_collections.ConfigDict()
    c.steps = 100
    c.batch_size = 8  # global batch (all hosts); must divide by the mesh's data*fsdp size and grad_accum_steps
    c.grad_accum_steps = 1
    c.learning_rate = 1e-3
    c.warmup_steps = 10
    c.end_lr_ratio = 0.0  # cosine decays to learning_rate * end_lr_ratio
    c.weight_decay = 0.0
    c.b1 = 0.9
    c.b2 = 0.999
    c.clip_grad_norm = 1.0  # 0 disables clipping
    c.trainable = "all"  # 'all' | 'lora'
    c.extra_trainable = ()  # regexes of params trained whatever `trainable` says (e.g. new heads with LoRA)
    c.freeze = ()  # regexes over '/'-joined parameter paths: matching params get no grads, no optimizer state
    c.log_every = 10
    c.eval_every = 0  # 0: only at the end
    c.checkpoint_every = 50
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    return c
