"""Config values checked before anything is built: each a one-line ConfigError naming the key.

Two layers:
- `check_loop_config(cfg)`: the keys the loop itself reads (LOOP_KEYS: type, whether null is
  documented, range), and that no number anywhere in the config is NaN or infinite.
- `check_override_types(cfg, defaults, overrides)`: every `key=value` given on the command line
  against the type its default has in the yaml files (a number stays a number, an integer an
  integer, a bool a bool, a list a list). The command line calls it with the config composed
  without value overrides; null is accepted where the default is null or where NULL_ALLOWED
  documents it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from projbench.errors import ConfigError, raised_user_error

# Keys whose yaml default is a value but whose documentation also accepts null.
NULL_ALLOWED = {
    "trainer.max_steps", "trainer.max_epochs", "trainer.eval_every", "trainer.log_every",
    "trainer.ckpt_every", "trainer.diagnostics_every", "trainer.grad_clip",
    "task.data.num_workers", "task.num_classes", "task.data.cache_dir", "task.model.adaptive_cutoffs",
    "task.data.eval_chunks",  # DCASE: null evaluates each clip in one pass (MTAT refuses it: a ConfigError)
}


@dataclass(frozen=True)
class Rule:
    kind: type | tuple  # int, float (any real number), bool, str; or (type, literal, ...)
    nullable: bool = False
    minimum: float | None = None  # value >= minimum
    positive: bool = False        # value > 0


LOOP_KEYS: dict[str, Rule] = {
    "seed": Rule(int, minimum=0),
    "resume": Rule((bool, "auto")),
    "overwrite": Rule(bool),
    "trainer.max_steps": Rule(int, nullable=True, positive=True),
    "trainer.max_epochs": Rule(int, nullable=True, positive=True),
    "trainer.eval_every": Rule(int, nullable=True, positive=True),
    "trainer.log_every": Rule(int, nullable=True, positive=True),
    "trainer.ckpt_every": Rule(int, nullable=True, positive=True),
    "trainer.diagnostics_every": Rule(int, nullable=True, positive=True),
    "trainer.grad_clip": Rule(float, nullable=True, positive=True),
    "trainer.channels_last": Rule(bool),
    "trainer.compile": Rule(bool),
    "trainer.progress": Rule(bool),
    "optim.lr": Rule(float, positive=True),
    "optim.weight_decay": Rule(float, minimum=0),
    "task.data.batch_size": Rule(int, positive=True),
    "task.data.num_workers": Rule(int, nullable=True, minimum=0),
    "task.data.fixture": Rule(bool),
}

_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}


def _is(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


_MISSING = object()


def _select(cfg: DictConfig, key: str) -> Any:
    """The resolved value at `key` (missing: a sentinel); a failing interpolation is a ConfigError."""
    try:
        value = OmegaConf.select(cfg, key, default=_MISSING)
    except Exception as exc:  # noqa: BLE001 - OmegaConf resolution errors
        raise ConfigError(key, str(exc).strip().splitlines()[0]) from None
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return value


def check_rule(key: str, value: Any, rule: Rule) -> None:
    if isinstance(rule.kind, tuple):  # a choice of a type and literal values
        kind, *choices = rule.kind
        if not (_is(value, kind) or value in choices):
            names = " or ".join([*map(str, choices), _KIND_NAMES[kind]])
            raise ConfigError(key, f"must be {names}, got {_show(value)}")
        return
    if value is None:
        if not rule.nullable:
            raise ConfigError(key, f"must be {_KIND_NAMES[rule.kind]}, got null")
        return
    if not _is(value, rule.kind):
        raise ConfigError(key, f"must be {_KIND_NAMES[rule.kind]}, got {_show(value)}")
    if rule.positive and not value > 0:
        raise ConfigError(key, f"must be > 0{' (or null)' if rule.nullable else ''}, got {value}")
    if rule.minimum is not None and not value >= rule.minimum:
        raise ConfigError(key, f"must be >= {rule.minimum:g}, got {value}")


def check_finite(cfg: DictConfig) -> None:
    """No NaN or infinite number anywhere in the config (a typo such as optim.lr=nan or inf)."""
    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{prefix}[{i}]")
        elif isinstance(node, float) and not math.isfinite(node):
            raise ConfigError(prefix, f"must be a finite number, got {node}")

    try:
        walk(OmegaConf.to_container(cfg, resolve=True), "")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - an interpolation that cannot be resolved
        inner = raised_user_error(exc)  # a config resolver's own error names its key itself
        if inner is not None:
            raise inner from None
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(key, str(exc).strip().splitlines()[0]) from None


def check_loop_config(cfg: DictConfig) -> None:
    """The loop's own keys (LOOP_KEYS) and finite numbers everywhere."""
    check_finite(cfg)
    for key, rule in LOOP_KEYS.items():
        value = _select(cfg, key)
        if value is not _MISSING:
            check_rule(key, value, rule)


def _show(value: Any) -> str:
    """A value as it is written in a yaml file or on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else repr(value)


def _expected_kind(default: Any) -> type | None:
    for kind in (bool, int, float, list):
        if _is(default, kind):
            return kind
    return None


def check_override_types(cfg: DictConfig, defaults: DictConfig, keys: list[str]) -> None:
    """Each command-line key keeps the type of its default (an int default also refuses 1.5; a
    float default accepts an int). Keys that are new (+key=...) or whose default is null or a
    string are left to the code that reads them."""
    for key in keys:
        default = _select(defaults, key)
        if default is _MISSING or isinstance(default, dict):
            continue
        value = _select(cfg, key)
        if value is None:
            if default is not None and key not in NULL_ALLOWED:
                raise ConfigError(key, f"must not be null (its default is {_show(default)})")
            continue
        _check_kind(key, value, default)


def _check_kind(key: str, value: Any, default: Any) -> None:
    kind = _expected_kind(default)
    if kind is not None and not _is(value, kind):
        raise ConfigError(key, f"must be {_KIND_NAMES[kind]} like its default {_show(default)}, got {_show(value)}")
    if kind is list:
        for i, (v, d) in enumerate(zip(value, default)):
            if v is not None and d is not None:
                _check_kind(f"{key}[{i}]", v, d)
