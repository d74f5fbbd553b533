"""What the run configurations' checks share: the rule type, raising the first broken rule, and
the checks of keys that more than one section has."""

from __future__ import annotations

from typing import Any

from mae.config.loader import ConfigError

Check = tuple[bool, str, Any, str]  # (valid?, key, value, what is allowed)


def size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """An image size as (height, width): one side is a square."""
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def raise_first_invalid(checks: list[Check]) -> None:
    for ok, key, value, allowed in checks:
        if not ok:
            raise ConfigError(f"{key}={value!r} is invalid; it must be {allowed}")


def crop_scale_check(scale: tuple[float, float], key: str) -> Check:
    return (0.0 < scale[0] <= scale[1] <= 1.0, key, scale, "[lo, hi] with 0 < lo <= hi <= 1")
