"""Smoke job: a small MLP regression trained through the full foundation (mesh, trainer, checkpoints).

Run (CPU, ~20 s):
    python -m caig_jax.main --config=configs/smoke.py:tiny --workdir=/tmp/smoke

Expect a progress bar with steps/s and examples/s, the train loss falling from ~1 to ~0.1, and a final
report printing `eval/mse` well below the first steps' loss. Metrics: `<workdir>/metrics.jsonl` and
TensorBoard (`tensorboard --logdir <workdir>/tensorboard`). Re-running the command on the same workdir
resumes from the last checkpoint (and does nothing more once `train.steps` is reached).

Presets (`:ARG`): `tiny` (CPU, any device count) and `large` (a wider MLP sharded fsdp x tensor, e.g. for a
TPU v4-8: `--config.mesh.fsdp=4 --config.mesh.tensor=2`). Add `--config.model.lora_rank=8
--config.train.trainable=lora` to train LoRA adapters only.
"""

import ml_collections

from configs._common import train_config

PRESETS = ("tiny", "large")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    c = ml_collections.ConfigDict()
    c.job = "smoke"
    c.seed = 0
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.cpu_devices = 0  # on a CPU host: split it into this many XLA devices (see configs/reward.py); 0: one
    c.model = ml_collections.ConfigDict()
    c.model.d_in = 16
    c.model.d_out = 4
    c.model.d_hidden = 64
    c.model.num_layers = 2
    c.model.lora_rank = 0  # >0 wraps Linear layers matching lora_target with LoRA adapters
    c.model.lora_alpha = 16.0
    c.model.lora_target = "hidden"
    c.train = train_config()
    c.train.steps = 200
    c.train.batch_size = 64
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 20
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.checkpoint_every = 50
    if preset == "tiny":
        pass
    elif preset == "large":
        c.model.d_in, c.model.d_hidden, c.model.num_layers = 256, 4096, 8
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 4, 2
        c.train.batch_size = 512
        c.train.steps = 2000
        c.train.checkpoint_every = 500
    else:
        raise ValueError(f"configs/smoke.py: unknown preset {preset!r}; choose 'tiny' or 'large'")
    c.lock()
    return c
