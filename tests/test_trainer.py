"""The generic trainer on the smoke job: meshes, accumulation, frozen subtrees, LoRA, NaN guard, logging."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from caig_jax import parallel
from caig_jax.data.regression import RegressionData
from caig_jax.jobs import smoke
from caig_jax.metrics import read_jsonl
from caig_jax.trainers.trainer import NonFiniteLossError, Trainer

from ._smoke_utils import losses, smoke_config, trained_params

STEPS = 25


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
    runs = {}
    for name, mesh in {
        "data": {"data": 8},
        "fsdp": {"fsdp": 8},
        "tensor": {"tensor": 8},
        "fsdp_tensor": {"fsdp": 4, "tensor": 2},
    }.items():
        workdir = str(tmp_path_factory.mktemp(f"mesh_{name}"))
        smoke.run(smoke_config(mesh, steps=STEPS, checkpoint_every=STEPS), workdir)
        runs[name] = workdir
    return runs


def test_loss_falls_on_every_mesh_and_curves_agree(mesh_runs):
    curves = {name: losses(workdir) for name, workdir in mesh_runs.items()}
    for name, curve in curves.items():
        assert len(curve) == STEPS, name
        assert curve[-5:].mean() < 0.5 * curve[:5].mean(), f"{name}: loss did not fall: {curve}"
    reference = curves["data"]
    for name, curve in curves.items():
        np.testing.assert_allclose(curve, reference, rtol=1e-5, atol=1e-6, err_msg=f"{name} vs data mesh")


def test_metrics_are_written_for_tensorboard_and_jsonl(mesh_runs):
    workdir = mesh_runs["data"]
    events = os.listdir(os.path.join(workdir, "tensorboard"))
    assert any(e.startswith("events.out.tfevents") for e in events)
    assert os.path.exists(os.path.join(workdir, "report.json"))


def test_gradient_accumulation_matches_full_batch(tmp_path, mesh_runs):
    workdir = str(tmp_path / "accum")
    smoke.run(smoke_config({"data": 8}, steps=STEPS, checkpoint_every=STEPS, grad_accum_steps=2), workdir)
    np.testing.assert_allclose(losses(workdir), losses(mesh_runs["data"]), rtol=1e-5, atol=1e-6)


def test_frozen_subtree_gets_no_updates_and_no_optimizer_state(tmp_path, devices):
    config = smoke_config({"data": 8}, steps=10, checkpoint_every=10, freeze=("hidden/0",))
    mesh = parallel.make_mesh(config.mesh.to_dict())
    initial = smoke.build_model(config, mesh)
    before = np.asarray(initial.hidden[0].kernel.get_value())
    trainer = Trainer(config, str(tmp_path), mesh, smoke.build_model(config, mesh), smoke.mse_loss)
    opt_paths = {"/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(trainer.state["opt_state"])[0]}
    assert not any("hidden" in p and "'0'" in p or "hidden/0" in p for p in opt_paths)
    assert not any(p[0] == "hidden" and p[1] == 0 for p, _ in nnx.to_flat_state(trainer.state["params"]))
    result = trainer.train(RegressionData(16, 4, config.train.batch_size, 0))
    trainer.close()
    np.testing.assert_array_equal(np.asarray(result.model.hidden[0].kernel.get_value()), before)
    assert not np.array_equal(np.asarray(result.model.hidden[1].kernel.get_value()), np.asarray(initial.hidden[1].kernel.get_value()))


def test_lora_only_training_leaves_base_weights(tmp_path, devices):
    config = smoke_config({"fsdp": 4, "tensor": 2}, steps=15, checkpoint_every=15, trainable="lora",
                          model_lora_rank=4, learning_rate=1e-2)
    mesh = parallel.make_mesh(config.mesh.to_dict())
    model = smoke.build_model(config, mesh)
    base_before = np.asarray(model.hidden[0].base.kernel.get_value())
    trainer = Trainer(config, str(tmp_path), mesh, model, smoke.mse_loss)
    trained = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(trainer.state["params"])}
    assert trained and all("lora_" in p for p in trained), trained
    result = trainer.train(RegressionData(16, 4, config.train.batch_size, 0))
    trainer.close()
    np.testing.assert_array_equal(np.asarray(result.model.hidden[0].base.kernel.get_value()), base_before)
    assert np.abs(np.asarray(result.model.hidden[0].lora_b.get_value())).max() > 0
    curve = losses(str(tmp_path))
    assert curve[-3:].mean() < curve[:3].mean()


class _PoisonedData(RegressionData):
    """Injects NaN inputs into batch `bad_index`."""

    bad_index = 7

    def __next__(self):
        batch = super().__next__()
        if self.index - 1 == self.bad_index:
            batch["x"] = np.full_like(batch["x"], np.nan)
        return batch


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, devices):
    config = smoke_config({"data": 8}, steps=20, checkpoint_every=5)
    mesh = parallel.make_mesh(config.mesh.to_dict())
    trainer = Trainer(config, str(tmp_path), mesh, smoke.build_model(config, mesh), smoke.mse_loss)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 8.*newest verified checkpoint is step 5"):
        trainer.train(_PoisonedData(16, 4, config.train.batch_size, 0))
    trainer.close()
    params, _, restored = trained_params(config, str(tmp_path), mesh)
    assert restored.current_step == 5
    assert all(np.isfinite(v).all() for v in params.values())


def test_eval_hook_runs_periodically(tmp_path, devices):
    config = smoke_config({"data": 8}, steps=12, checkpoint_every=12, eval_every=4)
    mesh = parallel.make_mesh(config.mesh.to_dict())
    calls = []
    trainer = Trainer(config, str(tmp_path), mesh, smoke.build_model(config, mesh), smoke.mse_loss)
    result = trainer.train(RegressionData(16, 4, 64, 0), eval_fn=lambda m, s: calls.append(s) or {"n": float(s)})
    trainer.close()
    assert calls == [4, 8, 12]
    assert result.metrics["eval/n"] == 12.0

    # Re-running the finished run evaluates again (its result carries the metrics) but keeps the one final row.
    trainer = Trainer(config, str(tmp_path), mesh, smoke.build_model(config, mesh), smoke.mse_loss)
    again = trainer.train(RegressionData(16, 4, 64, 0), eval_fn=lambda m, s: calls.append(s) or {"n": float(s)})
    trainer.close()
    assert calls == [4, 8, 12, 12] and again.metrics["eval/n"] == 12.0
    rows = read_jsonl(os.path.join(str(tmp_path), "metrics.jsonl"))
    assert [r["step"] for r in rows if "eval/n" in r] == [4, 8, 12]


def test_bad_batch_size_is_rejected(tmp_path, devices):
    config = smoke_config({"data": 8}, batch_size=12)
    mesh = parallel.make_mesh(config.mesh.to_dict())
    with pytest.raises(ValueError, match="batch_size=12 must divide"):
        Trainer(config, str(tmp_path), mesh, smoke.build_model(config, mesh), smoke.mse_loss)
