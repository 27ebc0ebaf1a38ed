"""The start-up checks of a config, as data: each section declares its rules beside its defaults.

A bad value should stop a run at start-up, not be clipped (`loss.cls.p_target=1.5` used to behave as
1.0) or fail hours later deep in a trace. Each module that owns a config section lists its rules next
to its `default_*_config()` (`data/config.py`'s `DATA_RULES`, `losses.LOSS_RULES`, ...), and
`config.validate_config` applies them all through `check_section`: the sections hold no validation
code, and a rule reads as the sentence it prints. Every failure raises ConfigError, a ValueError, so
the entry points print it as one line naming key, value and the allowed range.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterable


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    """`keys` (dotted below the section, e.g. "cls.p_target") must each satisfy `ok`; else `allowed` is said."""
    keys: tuple[str, ...]
    ok: Callable[[Any], bool]
    allowed: str


def require(key: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed; allowed: {allowed}")


def check_section(section, prefix: str, rules: Iterable[Rule]) -> None:
    """Applies `rules` to a config section; raises ConfigError on the first value that breaks one."""
    for rule in rules:
        for key in rule.keys:
            value = section
            for part in key.split("."):
                value = value[part]
            require(f"{prefix}.{key}" if prefix else key, value, rule.ok(value), rule.allowed)


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive(*keys: str) -> Rule:
    return Rule(keys, lambda v: _number(v) and v > 0, "a number > 0")


def non_negative(*keys: str) -> Rule:
    return Rule(keys, lambda v: _number(v) and v >= 0, "a number >= 0")


def probability(*keys: str) -> Rule:
    return Rule(keys, lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")


def in_range(*keys: str, lo: float, hi: float, closed_lo: bool = True, closed_hi: bool = True) -> Rule:
    """lo <= v <= hi, with either end open when asked (b1 of Adam is in [0, 1))."""
    def ok(v):
        return _number(v) and (lo <= v if closed_lo else lo < v) and (v <= hi if closed_hi else v < hi)
    return Rule(keys, ok, f"a number in {'[' if closed_lo else '('}{lo}, {hi}{']' if closed_hi else ')'}")


def one_of(key: str, choices) -> Rule:
    return Rule((key,), lambda v: v in choices, f"one of {sorted(choices)}")


def ordered_pair(key: str, lo: float, hi: float) -> Rule:
    """(a, b) with lo <= a <= b <= hi."""
    def ok(v):
        return (isinstance(v, (tuple, list)) and len(v) == 2 and all(_number(x) for x in v)
                and lo <= v[0] <= v[1] <= hi)
    return Rule((key,), ok, f"a pair (a, b) with {lo} <= a <= b <= {hi}")
