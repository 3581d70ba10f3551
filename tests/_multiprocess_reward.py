"""The tiny reward model's train step with an Orbax save and restore, run by `test_multiprocess.py` as two
`jax.distributed` processes (4 CPU devices each) and in the test process (8 devices), on one global batch.

    python -m tests._multiprocess_reward WORKDIR OUT.json     # under JAX_COORDINATOR_ADDRESS / JAX_PROCESS_ID / ...

Two steps, a forced save, the state zeroed and restored from that checkpoint, one more step: the three losses go
to OUT.json (process 0). Each process feeds only its own rows of the batch. One Trainer throughout, so the step
compiles once.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from caig_jax import parallel
from caig_jax.config_files import load_config
from caig_jax.models.llava import layout_for
from caig_jax.models.reward import tiny_llava_config
from caig_jax.trainers.reward import build_model, make_loss_fn
from caig_jax.trainers.trainer import Trainer

from ._smoke_utils import REPO

BATCH, MESH = 8, {"fsdp": 4, "tensor": 2}


def _config():
    config = load_config(f"{REPO}/configs/reward.py:tiny")
    config.unlock()
    config.train.batch_size = BATCH
    config.train.checkpoint_every = 1000
    config.model.remat_policy, config.model.scan_layers = "full", True  # the 7b presets' layer settings
    return config


def _global_batch(llava_config, image_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = llava_config.num_image_features((image_size, 2 * image_size))
    ids = rng.integers(1, 1000, size=(BATCH, tokens + 6)).astype(np.int32)
    ids[:, 1:1 + tokens] = llava_config.image_token_id
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "pixel_values": rng.normal(size=(BATCH, llava_config.max_patches, 3, image_size, image_size)
                                       ).astype(np.float32),
            "image_layout": np.asarray(layout_for(llava_config, [(image_size, 2 * image_size)] * BATCH)),
            "label": rng.integers(0, 2, BATCH).astype(np.int32), "ctr": rng.uniform(0, 0.1, (BATCH, 2)).astype(np.float32)}


def run(workdir: str) -> list[float]:
    """Losses of steps 1, 2 (then save) and 3 (after zeroing the state and restoring it) on an fsdp 4 x tensor 2
    mesh."""
    config = _config()
    mesh = parallel.make_mesh(MESH)
    llava_config = tiny_llava_config(config.model.tiny, config.data.image_size, vocab_size=1024, image_token_id=1023,
                                     pad_id=0)
    # This process's rows: the batch axis is split over fsdp, whose devices are the processes' in order.
    rows = BATCH // jax.process_count()
    local = jax.tree.map(lambda x: x[jax.process_index() * rows:(jax.process_index() + 1) * rows],
                         _global_batch(llava_config, config.data.image_size))
    losses = []
    trainer = Trainer(config, workdir, mesh, build_model(config, llava_config, mesh), make_loss_fn(0.5))
    for _ in range(2):
        trainer.state, metrics = trainer.step(trainer.state, parallel.global_batch(mesh, local))
        losses.append(float(metrics["loss"]))
    assert trainer.save(force=True)
    trainer.checkpointer.wait()
    trainer.state = jax.tree.map(jnp.zeros_like, trainer.state)  # only the restore can make step 3 match
    assert trainer.restore() == 2
    trainer.state, metrics = trainer.step(trainer.state, parallel.global_batch(mesh, local))
    losses.append(float(metrics["loss"]))
    trainer.close()
    return losses


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")  # as the test session (conftest.py)
    parallel.maybe_initialize_distributed()
    result = run(sys.argv[1])
    if jax.process_index() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(result, f)
