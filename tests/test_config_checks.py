"""Config validation at load (`caig_jax.config_checks` + each job's `validate`): bad values stop the job before
anything is built, with one line naming the key, the value and what is expected."""

import pytest
from ml_collections import ConfigDict

from caig_jax.config_checks import Checks, ConfigError, market_checks, train_checks
from caig_jax.config_files import load_config
from caig_jax.jobs import eval_sweep, market, render, reward, sft, smoke

from .test_errors import _main


def _problems(config, fill) -> list[str]:
    checks = Checks(config)
    fill(checks)
    return [m for _, m in checks.problems]


def test_checks_name_key_value_and_expectation():
    config = ConfigDict({"a": {"n": -5, "p": 1.5, "flag": 1, "kind": "x", "f": True}, "mesh": {"data": -1, "fsdp": -1}})

    def fill(c):
        c.integer("a.n", min=1)
        c.probability("a.p")
        c.boolean("a.flag")
        c.choice("a.kind", ("all", "lora"))
        c.number("a.f", min=0)  # a bool is not a number
        c.integer("a.absent", min=1)  # absent keys are skipped
        c.mesh(devices=8)

    assert _problems(config, fill) == [
        "config.a.n=-5: expected an integer >= 1",
        "config.a.p=1.5: expected a number in [0.0, 1.0]",
        "config.a.flag=1: expected True or False",
        "config.a.kind='x': expected one of 'all', 'lora'",
        "config.a.f=True: expected a number >= 0",
        "config.mesh={'data': -1, 'fsdp': -1, 'tensor': 1}: expected at most one axis of -1",
    ]
    with pytest.raises(ConfigError, match=r"^config\.a\.n=-5: expected an integer >= 1; config\.a\.p=1\.5") as info:
        checks = Checks(config)
        fill(checks)
        checks.done()
    assert info.value.fix.startswith("set a valid value on the command line (--config.a.n=...)")
    assert isinstance(info.value, ValueError)


def test_mesh_against_devices():
    assert Checks(ConfigDict({"mesh": {"data": -1, "fsdp": 2, "tensor": 1}})).mesh(devices=8) == (4, 2, 1)
    checks = Checks(ConfigDict({"mesh": {"data": 2, "fsdp": 2, "tensor": 1}}))
    assert checks.mesh(devices=8) is None
    assert checks.problems[0][1].endswith("expected axis sizes whose product is the 8 devices (or one axis -1)")
    checks = Checks(ConfigDict({"mesh": {"data": 0, "fsdp": 1, "tensor": 1}}))
    checks.mesh(devices=8)
    assert checks.problems[0][1] == "config.mesh.data=0: expected an integer >= 1, or -1 (fill the remaining devices)"


def test_train_section_cross_rules():
    base = load_config("configs/smoke.py:tiny")
    config = ConfigDict(base.to_dict())
    config.train.batch_size, config.train.grad_accum_steps = 12, 8
    config.train.warmup_steps = -1
    config.train.b2 = 1.0
    problems = _problems(config, lambda c: train_checks(c, batch_shards=1))
    assert problems == [
        "config.train.warmup_steps=-1: expected an integer >= 0",
        "config.train.b2=1.0: expected a number in [0, 1)",
        "config.train.batch_size=12: expected a multiple of grad_accum_steps=8 x the mesh's data*fsdp size 1 = 8",
    ]


def test_market_section():
    config = ConfigDict(load_config("configs/market.py:tiny").to_dict())
    config.market.min_creatives, config.market.max_creatives = 6, 4
    config.market.split_fractions.val = -0.1
    config.pairs.max_ratio = 1.01
    config.build.datasets = ("ctr_logs", "nope")
    problems = _problems(config, market_checks)
    assert problems[0] == "config.market.max_creatives=4: expected an integer >= market.min_creatives=6"
    assert problems[1].startswith("config.market.split_fractions={") and "'val': -0.1" in problems[1]
    assert problems[1].endswith("expected fractions >= 0 with a positive sum, e.g. train=0.7 val=0.1 test=0.2")
    assert problems[2] == "config.pairs.max_ratio=1.01: expected a number >= pairs.min_ratio=1.05"
    assert problems[3].startswith("config.build.datasets=('ctr_logs', 'nope'): expected a tuple of 'ctr_logs'")


@pytest.mark.parametrize("job,spec", [
    (smoke, "configs/smoke.py:tiny"), (reward, "configs/reward.py:tiny"), (render, "configs/render.py:tiny"),
    (market, "configs/market.py:tiny"), (market, "configs/market.py:reward"), (market, "configs/market.py:full"),
    (eval_sweep, "configs/eval_sweep.py:tiny"), (sft, "configs/sft.py:tiny"),
])
def test_shipped_presets_validate(job, spec, devices):
    job.validate(load_config(spec))


def test_reward_checks_the_nested_market_and_the_tiny_model(devices):
    config = load_config("configs/reward.py:tiny")
    config.unlock()
    config.data.market.market.on_brief = -0.5
    config.model.tiny.num_kv_heads = 3
    config.data.image_size = 30
    with pytest.raises(ConfigError) as info:
        reward.validate(config)
    message = str(info.value)
    assert "config.model.tiny.num_heads=4: expected a multiple of model.tiny.num_kv_heads=3" in message
    assert "config.data.image_size=30: expected a multiple of model.tiny.vision_patch_size=8" in message
    assert "config.data.market.market.on_brief=-0.5: expected a number in [0.0, 1.0]" in message


def test_smoke_negative_steps_through_main(tmp_path):
    workdir = tmp_path / "run"
    code, err = _main("--config=configs/smoke.py:tiny", f"--workdir={workdir}", "--config.train.steps=-5")
    assert code == 2, err
    assert err.splitlines() == [
        "error: config.train.steps=-5: expected an integer >= 1",
        "  fix: set a valid value on the command line (--config.train.steps=...) or in the config file",
    ]
    assert not workdir.exists()


def test_render_negative_steps_fails_before_the_model(tmp_path):
    workdir = tmp_path / "render"
    code, err = _main("--config=configs/render.py:tiny", f"--workdir={workdir}", "--config.steps=-3")
    assert code == 2, err
    assert err.splitlines()[0] == "error: config.steps=-3: expected an integer >= 1"
    assert "Traceback" not in err and len(err.splitlines()) == 2
    assert not workdir.exists(), "nothing (products, tiny weights) may be written before the config is checked"


def test_a_saved_config_refuses_changed_and_removed_keys_and_returns_added_ones():
    from caig_jax.config_files import check_saved_config
    from caig_jax.errors import UserError

    saved = {"train": {"lr": 1e-3, "steps": 10}, "old": 1}
    kwargs = dict(source="w/config.json", what="workdir w holds another run", fix="use a new --workdir")
    assert check_saved_config(saved, {"train": {"lr": 1e-3, "steps": 10}, "old": 1}, **kwargs) == {}
    added = check_saved_config(saved, {"train": {"lr": 1e-3, "steps": 10, "remat": "none"}, "old": 1,
                                       "model": {"attention": "auto"}}, **kwargs)
    assert added == {"train.remat": "none", "model": {"attention": "auto"}}
    with pytest.raises(UserError, match=r"workdir w holds another run \(differs in train.lr\)") as e:
        check_saved_config(saved, {"train": {"lr": 2e-3, "steps": 10, "remat": "none"}, "old": 1}, **kwargs)
    assert e.value.fix == "use a new --workdir"
    with pytest.raises(UserError, match=r"differs in old\)"):  # a key removed since is a change, not an addition
        check_saved_config(saved, {"train": {"lr": 1e-3, "steps": 10}}, **kwargs)
