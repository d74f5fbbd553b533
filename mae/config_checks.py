"""The checks the run configurations share: the rule type, raising the first broken one, and those of a
training section (``train`` of pretraining, ``finetune`` of ``mae.eval_config``)."""

from __future__ import annotations

from typing import Any, Protocol

from mae.config_loader import ConfigError

Check = tuple[bool, str, Any, str]  # (valid?, key, value, what is allowed)


class Schedule(Protocol):
    """A training section: ``train`` of ``mae.config``, ``finetune`` of ``mae.eval_config``; what the checks below
    and ``mae.config.derive_schedule`` read of it (read-only: the sections are frozen)."""

    @property
    def epochs(self) -> int: ...
    @property
    def max_steps(self) -> int | None: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def accum_steps(self) -> int: ...
    @property
    def blr(self) -> float: ...
    @property
    def min_lr(self) -> float: ...
    @property
    def warmup_epochs(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def betas(self) -> tuple[float, float]: ...
    @property
    def clip_grad(self) -> float | None: ...
    @property
    def cpu_threads(self) -> int | None: ...
    @property
    def dist_timeout(self) -> int: ...
    @property
    def log_with(self) -> tuple[str, ...]: ...
    @property
    def log_every(self) -> int: ...
    @property
    def keep_checkpoints(self) -> int: ...


# Accelerate's trackers (accelerate.tracking.LOGGER_TYPE_TO_CLASS), each with the module it needs
TRACKERS = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}


def size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """An image size as (height, width): one side is a square."""
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def raise_first_invalid(checks: list[Check]) -> None:
    for ok, key, value, allowed in checks:
        if not ok:
            raise ConfigError(f"{key}={value!r} is invalid; it must be {allowed}")


def schedule_checks(t: Schedule, key: str) -> list[Check]:
    """The checks a training section (``train`` or ``finetune``) shares: length, batch, lr, optimizer."""
    return [
        (t.epochs > 0, f"{key}.epochs", t.epochs, "a positive integer"),
        (
            t.max_steps is None or t.max_steps > 0,
            f"{key}.max_steps",
            t.max_steps,
            "a positive integer or null",
        ),
        (t.batch_size > 0, f"{key}.batch_size", t.batch_size, "a positive integer"),
        (t.accum_steps > 0, f"{key}.accum_steps", t.accum_steps, "a positive integer"),
        (t.blr > 0, f"{key}.blr", t.blr, "a positive number"),
        (t.min_lr >= 0, f"{key}.min_lr", t.min_lr, "0 or more"),
        (t.warmup_epochs >= 0, f"{key}.warmup_epochs", t.warmup_epochs, "0 or more"),
        (t.weight_decay >= 0, f"{key}.weight_decay", t.weight_decay, "0 or more"),
        (all(0 <= b < 1 for b in t.betas), f"{key}.betas", t.betas, "two values in [0, 1)"),
        (
            t.clip_grad is None or t.clip_grad > 0,
            f"{key}.clip_grad",
            t.clip_grad,
            "a positive number or null",
        ),
        (
            t.cpu_threads is None or t.cpu_threads > 0,
            f"{key}.cpu_threads",
            t.cpu_threads,
            "a positive integer or null",
        ),
        (t.dist_timeout > 0, f"{key}.dist_timeout", t.dist_timeout, "a positive number of seconds"),
        (
            set(t.log_with) <= set(TRACKERS),
            f"{key}.log_with",
            list(t.log_with),
            f"a list of {', '.join(TRACKERS)}",
        ),
        (t.log_every > 0, f"{key}.log_every", t.log_every, "a positive integer"),
        (
            t.keep_checkpoints > 0,
            f"{key}.keep_checkpoints",
            t.keep_checkpoints,
            "a positive integer",
        ),
    ]


def crop_scale_check(scale: tuple[float, float], key: str) -> Check:
    return (0.0 < scale[0] <= scale[1] <= 1.0, key, scale, "[lo, hi] with 0 < lo <= hi <= 1")


def stats_checks(d: Any) -> list[Check]:
    """``data.mean`` / ``data.std`` (``auto``, or one value per channel) and ``data.grid_channels``."""
    auto, own_std = d.mean == "auto", d.std != "auto"
    shown = d.grid_channels
    return [
        (not auto or not own_std, "data.std", d.std, "unset or auto with data.mean=auto"),
        (
            auto or own_std,
            "data.std",
            d.std,
            "values of your own with a data.mean of your own; or set data.mean=auto",
        ),
        (
            auto or len(d.mean) == d.channels,
            "data.mean",
            d.mean,
            f"one value per channel ({d.channels}), or auto",
        ),
        (
            not own_std or (len(d.std) == d.channels and all(v > 0 for v in d.std)),
            "data.std",
            d.std,
            f"{d.channels} positive values, or auto",
        ),
        (
            shown is None or (len(shown) in (1, 3) and all(0 <= c < d.channels for c in shown)),
            "data.grid_channels",
            shown,
            f"1 or 3 channel indices in [0, {d.channels})",
        ),
    ]
