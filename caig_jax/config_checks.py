"""Config validation at load: types and ranges of every key a job reads, checked before any model or data is built.

Each job module's `validate(config)` runs first thing in its `run()` and uses the reusable checks here:

    checks = Checks(config)
    checks.integer("train.steps", min=1)                 # an int (not a bool) >= 1
    checks.number("market.on_brief", min=0, max=1)       # an int or float in [0, 1]
    checks.choice("dtype", ("float32", "bfloat16"))
    checks.mesh(devices=jax.device_count())             # sizes > 0 or one -1, and the device count fits
    checks.done()                                        # raises one ConfigError listing every problem

A problem reads `config.KEY=VALUE: expected WHAT`; several are joined on one line. `caig_jax.main` prints the
`ConfigError` (a `UserError`) as `error: ...` + `  fix: ...` and exits with status 2. Keys a config does not have
are skipped (configs made by other code may omit optional sections); `train_checks`, `mesh` and
`market_checks` are the sections several jobs share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from caig_jax.errors import UserError
from caig_jax.models.layers import REMAT_POLICIES

_MISSING = object()


class ConfigError(UserError, ValueError):
    """A config value has the wrong type or is out of range (names the key, the value and what is expected)."""


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_show(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def _bound(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return ""


class Checks:
    """Collects the problems of one config (see the module docstring); `done()` raises them together."""

    def __init__(self, config: Any, prefix: str = "config"):
        self.config = config
        self.prefix = prefix
        self.problems: list[tuple[str, str]] = []  # (key, message)

    # ---------------------------------------------------------------------------------------------------- access
    def get(self, key: str, default: Any = _MISSING) -> Any:
        """The value at dotted `key`, or `default` (`_MISSING`) when a part of the path is absent."""
        node = self.config
        for part in key.split("."):
            try:
                if hasattr(node, "get") and not isinstance(node, str):
                    node = node.get(part, _MISSING)
                else:
                    node = getattr(node, part, _MISSING)
            except (AttributeError, KeyError):
                node = _MISSING
            if node is _MISSING:
                return default
        return node

    def has(self, key: str) -> bool:
        return self.get(key) is not _MISSING

    def problem(self, key: str, expected: str, value: Any = _MISSING) -> None:
        """Records `config.KEY=VALUE: expected EXPECTED` (or `config.KEY: EXPECTED` with no value)."""
        value = self.get(key) if value is _MISSING else value
        where = f"{self.prefix}.{key}" + ("" if value is _MISSING else f"={_show(value)}")
        self.problems.append((key, f"{where}: expected {expected}"))

    def require(self, ok: bool, key: str, expected: str) -> None:
        """A cross-key rule: records a problem on `key` unless `ok`."""
        if not ok:
            self.problem(key, expected)

    # ---------------------------------------------------------------------------------------------------- checks
    def integer(self, key: str, *, min: int | None = None, max: int | None = None) -> int | None:
        """An int (bools are not) in [min, max]. Returns it when valid, else None."""
        value = self.get(key)
        if value is _MISSING:
            return None
        what = " ".join(x for x in ("an integer", _bound(min, max, False, False)) if x)
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(key, what)
            return None
        if (min is not None and value < min) or (max is not None and value > max):
            self.problem(key, what)
            return None
        return value

    def number(self, key: str, *, min: float | None = None, max: float | None = None, min_open: bool = False,
               max_open: bool = False) -> float | None:
        """A finite int or float (not a bool) in the given range (open ends with `min_open` / `max_open`)."""
        value = self.get(key)
        if value is _MISSING:
            return None
        what = " ".join(x for x in ("a number", _bound(min, max, min_open, max_open)) if x)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.problem(key, what)
            return None
        if min is not None and (value <= min if min_open else value < min):
            self.problem(key, what)
            return None
        if max is not None and (value >= max if max_open else value > max):
            self.problem(key, what)
            return None
        return float(value)

    def probability(self, key: str) -> float | None:
        return self.number(key, min=0.0, max=1.0)

    def boolean(self, key: str) -> bool | None:
        value = self.get(key)
        if value is _MISSING:
            return None
        if not isinstance(value, bool):
            self.problem(key, "True or False")
            return None
        return value

    def choice(self, key: str, options: Sequence[Any]) -> Any:
        value = self.get(key)
        if value is _MISSING:
            return None
        if value not in tuple(options):
            self.problem(key, "one of " + ", ".join(_show(o) for o in options))
            return None
        return value

    def string(self, key: str) -> str | None:
        value = self.get(key)
        if value is _MISSING:
            return None
        if not isinstance(value, str):
            self.problem(key, "a string")
            return None
        return value

    def subset(self, key: str, options: Sequence[str]) -> tuple | None:
        """A list/tuple whose items are all in `options`."""
        value = self.get(key)
        if value is _MISSING:
            return None
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or any(v not in options for v in value):
            self.problem(key, "a tuple of " + ", ".join(_show(o) for o in options))
            return None
        return tuple(value)

    def mesh(self, key: str = "mesh", *, devices: int | None = None) -> tuple[int, int, int] | None:
        """`config.mesh`: `data`, `fsdp`, `tensor` each an integer > 0 or -1 (at most one -1, it fills the rest);
        with `devices`, their product must be that device count. Returns the resolved (data, fsdp, tensor)."""
        mesh = self.get(key)
        if mesh is _MISSING:
            return None
        axes = ("data", "fsdp", "tensor")
        names = list(mesh.keys()) if hasattr(mesh, "keys") else []
        unknown = [n for n in names if n not in axes]
        if unknown:
            self.problem(f"{key}.{unknown[0]}", f"no such mesh axis (axes: {', '.join(axes)})")
            return None
        sizes = []
        for axis in axes:
            value = self.get(f"{key}.{axis}", 1)
            if isinstance(value, bool) or not isinstance(value, int) or not (value >= 1 or value == -1):
                self.problem(f"{key}.{axis}", "an integer >= 1, or -1 (fill the remaining devices)", value)
                return None
            sizes.append(value)
        if sizes.count(-1) > 1:
            self.problem(key, "at most one axis of -1", dict(zip(axes, sizes)))
            return None
        if devices is None:
            return None
        fixed = math.prod(s for s in sizes if s != -1)
        shown = dict(zip(axes, sizes))
        if -1 in sizes:
            if devices % fixed:
                self.problem(key, f"axis sizes whose product divides the {devices} devices", shown)
                return None
            sizes[sizes.index(-1)] = devices // fixed
        elif fixed != devices:
            self.problem(key, f"axis sizes whose product is the {devices} devices (or one axis -1)", shown)
            return None
        return tuple(sizes)  # type: ignore[return-value]

    # ---------------------------------------------------------------------------------------------------- result
    def done(self) -> None:
        """Raises one `ConfigError` listing every problem (on one line), or returns."""
        if not self.problems:
            return
        key = self.problems[0][0]
        if hasattr(self.get(key, None), "keys"):  # a section (the mesh): name its keys
            key += ".KEY"
        raise ConfigError(
            "; ".join(message for _, message in self.problems),
            fix=f"set a valid value on the command line (--{self.prefix}.{key}=...) or in the config file",
        )


# --------------------------------------------------------------------------------------------------------------
# Sections several jobs share.
# --------------------------------------------------------------------------------------------------------------


def common_checks(checks: Checks) -> None:
    """`seed` and `cpu_devices`."""
    checks.integer("seed", min=0)
    checks.integer("cpu_devices", min=0)


def layer_checks(checks: Checks) -> None:
    """`model.remat_policy` and `model.scan_layers`: how the model's layers run (`caig_jax.models.layers`)."""
    checks.choice("model.remat_policy", tuple(REMAT_POLICIES))
    checks.boolean("model.scan_layers")


def train_checks(checks: Checks, *, batch_shards: int | None = None, processes: int = 1) -> None:
    """`config.train` (configs/_common.py:train_config; `caig_jax.trainers.trainer.Trainer` reads it).

    batch_shards: the mesh's data x fsdp size (the batch is split over it), when known.
    """
    t = "train."
    checks.integer(t + "steps", min=1)
    batch = checks.integer(t + "batch_size", min=1)
    accum = checks.integer(t + "grad_accum_steps", min=1)
    checks.number(t + "learning_rate", min=0, min_open=True)
    checks.integer(t + "warmup_steps", min=0)  # more than `steps` is clipped by the schedule
    checks.number(t + "end_lr_ratio", min=0, max=1)
    checks.number(t + "weight_decay", min=0)
    checks.number(t + "b1", min=0, max=1, max_open=True)
    checks.number(t + "b2", min=0, max=1, max_open=True)
    checks.number(t + "clip_grad_norm", min=0)
    checks.choice(t + "trainable", ("all", "lora"))
    checks.integer(t + "log_every", min=1)
    checks.integer(t + "eval_every", min=0)
    checks.integer(t + "checkpoint_every", min=1)
    checks.integer(t + "keep_checkpoints", min=1)
    checks.boolean(t + "async_checkpoints")
    if batch is not None and accum is not None:
        shards = batch_shards or 1
        if batch % (accum * shards):
            checks.problem(t + "batch_size", f"a multiple of grad_accum_steps={accum} x the mesh's data*fsdp size "
                           f"{shards} = {accum * shards}")
        elif batch % processes:
            checks.problem(t + "batch_size", f"a multiple of the {processes} processes")


MARKET_DATASETS = ("ctr_logs", "llava_conversations", "products")


def market_checks(checks: Checks, prefix: str = "") -> None:
    """A `configs/market.py` config (the market job's own, or the reward job's `data.market`), under `prefix`."""
    m, p = prefix + "market.", prefix + "pairs."
    checks.integer(m + "num_products", min=1)
    lo = checks.integer(m + "min_creatives", min=2)
    hi = checks.integer(m + "max_creatives", min=2)
    if lo is not None and hi is not None and hi < lo:
        checks.problem(m + "max_creatives", f"an integer >= market.min_creatives={lo}")
    checks.integer(m + "image_size", min=8)
    checks.integer(m + "product_size", min=32)  # products drawn smaller can fall under MIN_CUTOUT_SIZE
    checks.probability(m + "on_brief")
    checks.number(m + "impressions_median", min=1)
    checks.number(m + "impressions_sigma", min=0)
    checks.probability(m + "low_impression_fraction")
    checks.number(m + "item_offset_sd", min=0)
    checks.integer(m + "max_days", min=1, max=27)  # the simulated month has 28 days
    fractions = checks.get(m + "split_fractions")
    if fractions is not _MISSING:
        items = dict(fractions.items()) if hasattr(fractions, "items") else {}
        bad = [k for k, v in items.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0]
        if not items or bad or sum(items.values()) <= 0:
            checks.problem(m + "split_fractions", "fractions >= 0 with a positive sum, e.g. train=0.7 val=0.1 "
                           "test=0.2", dict(items))
    checks.integer(m + "contact_sheet_products", min=0)
    checks.integer(m + "num_workers", min=0)
    checks.integer(p + "min_impressions", min=0)
    ratio = checks.number(p + "min_ratio", min=1)
    top = checks.number(p + "max_ratio", min=1)
    if ratio is not None and top is not None and top < ratio:
        checks.problem(p + "max_ratio", f"a number >= pairs.min_ratio={ratio}")
    checks.integer(p + "image_size", min=8)
    checks.choice(p + "image_format", ("png", "jpeg"))
    checks.integer(p + "seed", min=0)
    w = prefix + "train_pairs."
    checks.boolean(w + "enabled")
    ratio = checks.number(w + "min_ratio", min=1)
    top = checks.number(w + "max_ratio", min=1)
    if ratio is not None and top is not None and top < ratio:
        checks.problem(w + "max_ratio", f"a number >= train_pairs.min_ratio={ratio}")
    b = prefix + "build."
    checks.choice(b + "on_bad", ("raise", "skip"))
    checks.boolean(b + "overwrite")
    checks.subset(b + "datasets", MARKET_DATASETS)
