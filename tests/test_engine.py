"""The open training engine: a job-owned outer loop, preemption inside it, device-resident batches, sharded
optimizer moments and parameters-only restores onto another mesh."""

import os
import signal
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from caig_jax import parallel
from caig_jax.checkpoint import restore_params
from caig_jax.jobs import smoke
from caig_jax.models.llava import LlavaConfig, layout_for
from caig_jax.models.reward import RewardModel, predict_batch, tiny_llava_config
from caig_jax.trainers.reward import make_loss_fn
from caig_jax.trainers.trainer import Preempted, Trainer

from ._smoke_utils import smoke_config

ROUNDS, STEPS_PER_ROUND, BATCH = 3, 4, 16


def _round_data(trainer: Trainer, round_index: int, workdir: str) -> dict[str, jax.Array]:
    """A round's batches, made on device from the *live* policy (its predictions on fresh inputs), saved once:
    a resumed round reads them back instead of sampling again from a policy that has moved on."""
    path = os.path.join(workdir, "rounds", f"{round_index}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            return {k: jax.device_put(f[k], parallel.batch_sharding(trainer.mesh, f[k].ndim)) for k in f.files}
    x = jax.random.normal(jax.random.key(round_index), (STEPS_PER_ROUND * BATCH, 16))
    y = jnp.tanh(trainer.model()(x)) + 0.1 * jnp.sin(3.0 * x[:, :4])  # targets read off the current policy
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, x=np.asarray(x), y=np.asarray(y))
    return {"x": x, "y": y}


def _outer_loop(workdir: str, sigterm_at_step: int | None = None) -> dict[str, np.ndarray]:
    """ROUNDS x STEPS_PER_ROUND steps of the engine driven by a job's own loop; returns the final params."""
    config = smoke_config({"data": 8}, steps=ROUNDS * STEPS_PER_ROUND, checkpoint_every=100, batch_size=BATCH)
    mesh = parallel.make_mesh(config.mesh.to_dict())
    trainer = Trainer(config, workdir, mesh, smoke.build_model(config, mesh), smoke.mse_loss)
    trainer.restore()
    total = ROUNDS * STEPS_PER_ROUND
    try:
        with trainer.session(total) as session:
            data = None
            while trainer.current_step < total:
                round_index, k = divmod(trainer.current_step, STEPS_PER_ROUND)
                if data is None or trainer.job_state.get("round") != round_index:
                    data = _round_data(trainer, round_index, workdir)
                    trainer.job_state["round"] = round_index
                batch = {name: v[k * BATCH:(k + 1) * BATCH] for name, v in data.items()}  # stays on device
                if trainer.current_step == sigterm_at_step:
                    os.kill(os.getpid(), signal.SIGTERM)  # the flag is read after this step
                session.run_step(batch)
        return {"/".join(map(str, p)): np.asarray(v.get_value())
                for p, v in nnx.to_flat_state(trainer.state["params"])}
    finally:
        trainer.close()


def test_outer_loop_resumes_after_sigterm_at_the_same_round_and_step(tmp_path, devices):
    reference = _outer_loop(str(tmp_path / "uninterrupted"))
    workdir = str(tmp_path / "preempted")
    sigterm_at = STEPS_PER_ROUND + 1  # inside round 2 (round index 1), one step in
    with pytest.raises(Preempted) as stop:
        _outer_loop(workdir, sigterm_at_step=sigterm_at)
    assert stop.value.step == sigterm_at + 1 and stop.value.code == 143
    sampled = sorted(os.listdir(os.path.join(workdir, "rounds")))
    assert sampled == ["0.npz", "1.npz"]
    round_1 = np.load(os.path.join(workdir, "rounds", "1.npz"))["y"].copy()

    config = smoke_config({"data": 8}, steps=ROUNDS * STEPS_PER_ROUND, batch_size=BATCH)
    mesh = parallel.make_mesh(config.mesh.to_dict())
    probe = Trainer(config, workdir, mesh, smoke.build_model(config, mesh), smoke.mse_loss)
    assert probe.restore() == sigterm_at + 1 and probe.job_state == {"round": 1}
    probe.close()

    resumed = _outer_loop(workdir)
    np.testing.assert_array_equal(np.load(os.path.join(workdir, "rounds", "1.npz"))["y"], round_1)  # not re-sampled
    assert resumed.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)


def test_public_step_takes_device_arrays_and_donates_the_state(tmp_path, devices):
    config = smoke_config({"data": 4, "fsdp": 2}, steps=3, batch_size=BATCH)
    mesh = parallel.make_mesh(config.mesh.to_dict())
    trainer = Trainer(config, str(tmp_path), mesh, smoke.build_model(config, mesh), smoke.mse_loss)
    x = jax.device_put(jnp.ones((BATCH, 16)), jax.devices()[0])  # on one device: resharded, not copied to host
    batch = parallel.global_batch(mesh, {"x": x, "y": jnp.zeros((BATCH, 4))})
    assert batch["x"].sharding.is_equivalent_to(parallel.batch_sharding(mesh, 2), 2)
    again = parallel.global_batch(mesh, batch)
    assert again["x"] is batch["x"]  # already on the mesh: passed through
    old = trainer.state
    state, metrics = trainer.step(trainer.state, batch)
    assert int(state["step"]) == 1 and np.isfinite(float(metrics["loss"]))
    assert jax.tree.leaves(old["params"])[0].is_deleted()  # donated
    trainer.close()


def test_optimizer_moments_are_sharded_like_their_parameters(tmp_path, devices):
    config = smoke_config({"fsdp": 4, "tensor": 2}, model_d_hidden=64)
    mesh = parallel.make_mesh(config.mesh.to_dict())
    trainer = Trainer(config, str(tmp_path), mesh, smoke.build_model(config, mesh), smoke.mse_loss)
    params = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(trainer.state["params"])}
    adam = trainer.state["opt_state"][-1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
    checked = 0
    for moments in (adam.mu, adam.nu):
        for path, value in nnx.to_flat_state(moments):
            name = "/".join(map(str, path))
            assert value.get_value().sharding == params[name].sharding, name
            checked += 1
    assert checked == 2 * len(params)
    assert any(not p.sharding.is_fully_replicated for p in params.values())  # the check is not vacuous
    trainer.close()


def _tiny_reward_config() -> LlavaConfig:
    tiny = types.SimpleNamespace(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                 rope_theta=30.0, vision_hidden_size=32, vision_layers=2, vision_heads=4,
                                 vision_patch_size=8)
    return tiny_llava_config(tiny, 16, vocab_size=64, image_token_id=63, pad_id=0)


def _reward_batch(config: LlavaConfig, n: int) -> dict[str, np.ndarray]:
    """n left|right pairs of 16x32 images, right-padded text around the image tokens."""
    rng = np.random.default_rng(0)
    tokens = config.num_image_features((16, 32))
    ids = rng.integers(1, 60, size=(n, tokens + 6)).astype(np.int32)
    ids[:, 1:1 + tokens] = config.image_token_id
    mask = np.ones_like(ids)
    mask[: n // 2, -2:] = 0  # some right padding
    return {
        "input_ids": np.where(mask > 0, ids, 0), "attention_mask": mask,
        "pixel_values": rng.normal(size=(n, config.max_patches, 3, 16, 16)).astype(np.float32),
        "image_layout": layout_for(config, [(16, 32)] * n).astype(np.int32),
        "label": rng.integers(0, 2, size=(n,)).astype(np.int32), "ctr": rng.uniform(0, 0.1, (n, 2)).astype(np.float32),
    }


def test_restore_params_reads_a_reward_checkpoint_onto_another_mesh(tmp_path, devices):
    llava_config = _tiny_reward_config()
    config = smoke_config({"data": 8}, steps=2, checkpoint_every=2, batch_size=8, freeze=("^backbone/vision_tower/",))
    mesh = parallel.make_mesh(config.mesh.to_dict())
    model = parallel.sharded_init(lambda: RewardModel(llava_config, rngs=nnx.Rngs(0)), mesh)
    trainer = Trainer(config, str(tmp_path), mesh, model, make_loss_fn(0.5))
    batch = _reward_batch(llava_config, 8)
    with trainer.session(2) as session:
        for _ in range(2):
            session.run_step(batch)
    trained = trainer.model()
    expected = predict_batch(trained, batch, mesh)
    trainer.close()

    other = parallel.make_mesh({"fsdp": 4, "tensor": 2})
    fresh = parallel.sharded_init(lambda: RewardModel(llava_config, rngs=nnx.Rngs(0)), other)  # same frozen tower
    restored, step = restore_params(str(tmp_path), fresh, other, trainable=trainer.filter)
    assert step == 2
    kernel = restored.backbone.language_model.layers[0].mlp.up_proj.kernel.get_value()
    assert kernel.sharding.mesh.shape == other.shape and not kernel.sharding.is_fully_replicated
    got = predict_batch(restored, batch, other)
    for key in ("cls_logits", "ctr_pred"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    untrained = predict_batch(parallel.sharded_init(lambda: RewardModel(llava_config, rngs=nnx.Rngs(0)), other),
                              batch, other)
    assert not np.allclose(untrained["cls_logits"], expected["cls_logits"])  # the restore did something
