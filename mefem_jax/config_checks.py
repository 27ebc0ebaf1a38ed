"""The checks each module's `validate_*_config` is written with: one line naming key, value and range.

A bad value should stop a run at start-up, not be clipped (`loss.cls.p_target=1.5` used to behave as
1.0) or fail hours later deep in a trace. Every check raises ConfigError, a ValueError, so the entry
points print it as one line.
"""
from __future__ import annotations

import numbers


class ConfigError(ValueError):
    pass


def require(key: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed; allowed: {allowed}")


def _key(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def probability(cfg, prefix: str, *keys: str) -> None:
    for k in keys:
        v = cfg[k]
        require(_key(prefix, k), v, _number(v) and 0 <= v <= 1, "a number in [0, 1]")


def positive(cfg, prefix: str, *keys: str) -> None:
    for k in keys:
        v = cfg[k]
        require(_key(prefix, k), v, _number(v) and v > 0, "a number > 0")


def non_negative(cfg, prefix: str, *keys: str) -> None:
    for k in keys:
        v = cfg[k]
        require(_key(prefix, k), v, _number(v) and v >= 0, "a number >= 0")


def one_of(cfg, prefix: str, key: str, choices) -> None:
    require(_key(prefix, key), cfg[key], cfg[key] in choices, f"one of {sorted(choices)}")


def ordered_pair(cfg, prefix: str, key: str, lo: float, hi: float) -> None:
    """(a, b) with lo <= a <= b <= hi."""
    v = cfg[key]
    ok = (isinstance(v, (tuple, list)) and len(v) == 2 and all(_number(x) for x in v)
          and lo <= v[0] <= v[1] <= hi)
    require(_key(prefix, key), v, ok, f"a pair (a, b) with {lo} <= a <= b <= {hi}")
