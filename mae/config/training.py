"""The training settings every training section shares, written once.

Pretraining's ``train`` section (``mae.config.TrainConfig``) and fine-tuning's ``finetune``
section (``mae.config.evaluation.FinetuneConfig``) both extend ``TrainingSettings``: the schedule,
the optimizer's common keys, precision, attention, clipping, threads, timeouts, trackers, logging
and checkpoints. A section states only its own defaults and keys; ``SECTION`` names it, so that
every message about a setting names the key the user can set (``train.blr`` or
``finetune.blr``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from mae.config.checks import Check

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


@dataclass(frozen=True)
class TrainingSettings:
    """How a model is trained, whatever it is trained for. Defaults are pretraining's; a section
    redeclares a field only to give it another default."""

    SECTION: ClassVar[str] = "train"  # the config key the section is read from

    epochs: int = 20
    max_steps: int | None = None  # stop after this many optimizer steps; overrides epochs
    batch_size: int = 128  # per process, per micro-batch
    accum_steps: int = 1  # gradient accumulation micro-batches per optimizer step
    # base lr: lr = blr x effective batch / 256, the effective batch being
    # batch_size x accum_steps x processes (pretraining: null, the model family's, as for
    # warmup_epochs and weight_decay: mae/config/families.py)
    blr: float | None = None
    min_lr: float = 0.0  # the cosine schedule's floor
    warmup_epochs: float | None = None  # linear warm-up from 0, in epochs of the section's data
    # the warm-up never takes more than this fraction of the run's steps, so a run shortened by
    # max_steps keeps the shape of its schedule (every recipe here warms up for 5-11%)
    warmup_cap: float = 0.2
    weight_decay: float | None = None  # AdamW's
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW's
    clip_grad: float | None = None  # max global grad norm; None disables clipping
    # auto: bf16 autocast where the device computes bf16 natively (CUDA with bf16, a CPU with
    # AVX512-BF16/AMX), else fp32 (no); see mae.run.hardware
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # the attention core: fused (torch SDPA; flash on GPU) or math (written out, fp32 softmax);
    # auto: math on CPU under bf16, where it is faster, else fused
    attention: Literal["auto", "fused", "math"] = "auto"
    # torch threads per process on CPU; default: this machine's cores / processes on it
    # (`accelerate launch` sets OMP_NUM_THREADS=1 on a machine without GPUs, which this replaces)
    cpu_threads: int | None = None
    # seconds a collective waits for the other processes before the run stops with an error
    # naming this key (a process or machine that died); a failed collective stops it at once
    dist_timeout: int = 300
    # Accelerate's experiment trackers (TRACKERS above); [] logs to metrics.jsonl alone
    log_with: tuple[str, ...] = ("tensorboard",)
    log_every: int = 10  # optimizer steps between metric lines
    keep_checkpoints: int = 2  # newest complete checkpoints kept
    # minutes between checkpoints by the clock, besides the section's own cadence: the most work
    # a process killed before it can save (SIGKILL, a launcher's short grace, a crash) loses;
    # null: none (docs/pretraining.md, "Stopping and resuming")
    checkpoint_minutes: float | None = 30.0

    def key(self, name: str) -> str:
        """The dotted config key of this section's setting ``name``, for messages."""
        return f"{self.SECTION}.{name}"


def training_checks(t: TrainingSettings) -> list[Check]:
    """The checks of the shared settings: length, batch, lr, optimizer, logging."""
    k = t.key
    return [
        (t.epochs > 0, k("epochs"), t.epochs, "a positive integer"),
        (
            t.max_steps is None or t.max_steps > 0,
            k("max_steps"),
            t.max_steps,
            "a positive integer or null",
        ),
        (t.batch_size > 0, k("batch_size"), t.batch_size, "a positive integer"),
        (t.accum_steps > 0, k("accum_steps"), t.accum_steps, "a positive integer"),
        (t.blr > 0, k("blr"), t.blr, "a positive number"),
        (t.min_lr >= 0, k("min_lr"), t.min_lr, "0 or more"),
        (t.warmup_epochs >= 0, k("warmup_epochs"), t.warmup_epochs, "0 or more"),
        (t.weight_decay >= 0, k("weight_decay"), t.weight_decay, "0 or more"),
        (all(0 <= b < 1 for b in t.betas), k("betas"), t.betas, "two values in [0, 1)"),
        (
            t.clip_grad is None or t.clip_grad > 0,
            k("clip_grad"),
            t.clip_grad,
            "a positive number or null",
        ),
        (
            t.cpu_threads is None or t.cpu_threads > 0,
            k("cpu_threads"),
            t.cpu_threads,
            "a positive integer or null",
        ),
        (t.dist_timeout > 0, k("dist_timeout"), t.dist_timeout, "a positive number of seconds"),
        (
            set(t.log_with) <= set(TRACKERS),
            k("log_with"),
            list(t.log_with),
            f"a list of {', '.join(TRACKERS)}",
        ),
        (t.log_every > 0, k("log_every"), t.log_every, "a positive integer"),
        (t.keep_checkpoints > 0, k("keep_checkpoints"), t.keep_checkpoints, "a positive integer"),
        (0 < t.warmup_cap <= 1, k("warmup_cap"), t.warmup_cap, "a fraction in (0, 1]"),
        (
            t.checkpoint_minutes is None or t.checkpoint_minutes > 0,
            k("checkpoint_minutes"),
            t.checkpoint_minutes,
            "a positive number of minutes or null",
        ),
    ]
