"""Every config file instantiates with every preset; overrides are locked and misspellings are caught."""

import glob
import os
import subprocess
import sys

import ml_collections
import pytest

from caig_jax.main import JOBS, config_keys

from ._smoke_utils import REPO, load_config_file

CONFIG_FILES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "[!_]*.py")))


def _cases():
    for name in CONFIG_FILES:
        module, _ = load_config_file(name, None)
        assert hasattr(module, "PRESETS"), f"configs/{name}.py must list its presets in PRESETS"
        for preset in module.PRESETS:
            yield name, preset


@pytest.mark.parametrize("name,preset", list(_cases()))
def test_every_config_and_preset_instantiates(name, preset):
    module, config = load_config_file(name, preset)
    assert isinstance(config, ml_collections.ConfigDict)
    assert config.job in JOBS, f"configs/{name}.py:{preset} has job={config.job!r}"
    assert "mesh" in config and set(config.mesh.keys()) <= {"data", "fsdp", "tensor"}
    if config.job != "market":  # every job that uses devices can split a CPU host (caig_jax.main)
        assert isinstance(config.cpu_devices, int) and config.cpu_devices >= 0
    assert "python -m caig_jax.main --config=configs/" + name in (module.__doc__ or ""), "docstring gives the command"
    with pytest.raises(AttributeError):
        config.this_key_does_not_exist = 1  # locked
    assert "tiny" in module.PRESETS


def test_unknown_preset_is_an_error():
    module, _ = load_config_file("smoke", None)
    with pytest.raises(ValueError, match="unknown preset"):
        module.get_config("huge")


def test_misspelt_override_names_closest_keys(tmp_path):
    cmd = [sys.executable, "-m", "caig_jax.main", "--config=configs/smoke.py:tiny", f"--workdir={tmp_path}",
           "--config.train.learnin_rate=0.1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 2
    assert "--config.train.learnin_rate: no such key" in proc.stderr
    assert "train.learning_rate" in proc.stderr


def test_config_keys_flattens_nested():
    _, config = load_config_file("smoke", "tiny")
    keys = config_keys(config)
    assert "train.learning_rate" in keys and "mesh.data" in keys


def test_cpu_devices_key_splits_the_host(tmp_path):
    """`--config.cpu_devices=4` gives the job a 4-device mesh on a 1-device CPU host."""
    cmd = [sys.executable, "-m", "caig_jax.main", "--config=configs/smoke.py:tiny", f"--workdir={tmp_path}",
           "--config.cpu_devices=4", "--config.train.steps=2", "--config.train.eval_every=0"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mesh: {'data': 4, 'fsdp': 1, 'tensor': 1}" in proc.stderr
