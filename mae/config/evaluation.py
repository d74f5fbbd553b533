"""Evaluation run configuration (``finetune.py``: linear probe, kNN, fine-tuning): the schema
and its loader.

Loaded the same way as the pretraining config (``mae.config``): defaults <- recipe file
(``configs/eval/``) <- ``dotted.key=value`` overrides, then validated and frozen. The
``finetune`` section holds the training settings pretraining's ``train`` holds
(``mae.config.training``), with their checks and ``mae.config.derive_schedule``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from mae.config.checks import Check, crop_scale_check, raise_first_invalid, size_hw
from mae.config.loader import ConfigError, load_raw
from mae.config.training import TrainingSettings, training_checks

__all__ = ["EvalConfig", "EvalDataConfig", "FinetuneConfig", "ProbeConfig", "load_eval_config"]


@dataclass(frozen=True)
class EvalDataConfig:
    """Which images to evaluate on. Input size, channels and normalisation come from the encoder."""

    dataset: str = "sample"  # as data.dataset of pretraining
    split: str = "train"  # the split the probe is fitted on
    # default: test, else validation, else a seeded holdout of `split` (mae.data.holdout)
    eval_split: str | None = None
    holdout_fraction: float = 0.1  # only when there is no evaluation split
    image_column: str | None = None
    label_column: str | None = None  # default: the first ClassLabel feature (labels are required)
    num_workers: int = 2
    # an image that cannot be decoded is skipped (not scored; a training image is replaced by the
    # next one) and listed in OUTPUT/bad_images.jsonl; more distinct bad images than this stop the
    # run (0: stop at the first), as pretraining's data.max_bad_images
    max_bad_images: int = 100


@dataclass(frozen=True)
class ProbeConfig:
    # default: the pooling the encoder was made for
    features: Literal["default", "cls", "avg"] = "default"
    batch_size: int = 1024  # linear probe (MAE: 16384 on ImageNet)
    epochs: int = 90
    # lr = blr x batch_size / 256, LARS (MAE: 0.1 at batch 16384; measured on CIFAR-10 features)
    blr: float = 10.0
    weight_decay: float = 0.0
    warmup_epochs: int = 10
    k: int = 20  # kNN neighbours
    temperature: float = 0.07  # kNN vote weight exp(similarity / temperature)
    # the features kNN takes the cosine of: raw; centred, less the training features' mean
    # (SimpleShot's "CL2N"); standardised, also divided by their std per dimension, as the linear
    # probe's BatchNorm head sees them. Codes that share a large common offset (sigmoid codes: every
    # pair at cosine ~0.97) are otherwise told apart by what little is left of their angle
    knn_features: Literal["raw", "centred", "standardised"] = "raw"
    # true: fit on features extracted once (fast; no augmentation). false: the paper's protocol,
    # each epoch's images freshly cropped/flipped through the frozen encoder (an encoder pass per
    # image per epoch)
    cached: bool = True
    extract_batch_size: int = 256
    # features under bf16 autocast (auto: where the device computes bf16 natively, as for training;
    # the official linear probe also runs under autocast) or fp32 (no)
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    # features of the last N transformer blocks concatenated (each pooled, through the final norm),
    # as DINO/iBOT probe; 1: the encoder's output only (the MAE paper's protocol)
    blocks: int = 1
    # the linear probe's head: bn, BatchNorm1d(affine=False) + Linear (the MAE paper's: it
    # normalises each feature with the training set's statistics); linear, a plain Linear on the raw
    # features
    head: Literal["bn", "linear"] = "bn"
    # features extracted once per (encoder, data, transform)
    cache_dir: str = "~/.cache/mae/features"


@dataclass(frozen=True)
class FinetuneConfig(TrainingSettings):
    """Whole-network fine-tuning: the shared training settings (``mae.config.training``) with the
    MAE paper's ViT-B recipe as defaults (its batch 1024 is batch_size x accum_steps x
    processes), and what only fine-tuning has."""

    SECTION: ClassVar[str] = "finetune"

    epochs: int = 100
    blr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    # lr scale decay per block from the head down (1.0: none); ViT-L: 0.75
    layer_decay: float = 0.65
    drop_path: float = 0.1  # stochastic depth rate of the last block
    # avg: mean of patch tokens + a trained fc_norm (the paper's)
    global_pool: Literal["avg", "token"] = "avg"
    # default: the encoder's; another size (one side, or [H, W]) resamples the position embeddings
    image_size: int | tuple[int, int] | None = None
    # augmentation (timm): RandomResizedCrop(crop_scale) + flip + RandAugment + random erasing,
    # mixup/cutmix
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # a timm auto-augment spec; null disables it
    reprob: float = 0.25  # random erasing probability
    mixup: float = 0.8  # mixup alpha (0 disables)
    cutmix: float = 1.0  # cutmix alpha (0 disables)
    mixup_prob: float = 1.0  # probability of mixing a batch
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    smoothing: float = 0.1  # label smoothing
    # epochs between evaluations (each also writes a checkpoint); the last epoch always
    eval_every: int = 1
    # ... and at least this many optimizer steps between them: a small dataset, whose epoch is a
    # step or two, is not evaluated and checkpointed after every step
    eval_min_steps: int = 100


@dataclass(frozen=True)
class EvalConfig:
    # export dir | run dir | weights file or checkpoint folder (official MAE .pth, .safetensors) |
    # Hugging Face ViTMAE folder | hf-hub:ORG/NAME (a ViTMAE repository, mae.hub) | timm:NAME.TAG
    # (timm's pretrained weights, mae.hub) | timm:NAME (random init) | random:SOURCE | pixels:SIZE
    encoder: str | None = None
    init: str | None = None  # the same as encoder= (the key pretrain.py uses for starting weights)
    # heads per block of a weights-file encoder: files do not record it (default: its preset's, else
    # 64 channels per head)
    num_heads: int | None = None
    mode: Literal["linear", "knn", "finetune"] = "linear"
    output_dir: str = "runs/eval"
    seed: int = 0
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


ENCODER_FORMS = (
    "an export dir, a run dir, a weights file, hf-hub:ORG/NAME, timm:NAME[.TAG], random:SOURCE "
    "or pixels:SIZE"
)


def load_eval_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> EvalConfig:
    cfg = load_raw(path, overrides, EvalConfig)
    if cfg.init is not None:
        if cfg.encoder is not None and cfg.encoder != cfg.init:
            raise ConfigError(
                f"encoder={cfg.encoder!r} and init={cfg.init!r} name two encoders; give one of them"
            )
        cfg = dataclasses.replace(cfg, encoder=cfg.init)
    raise_first_invalid(
        _top_checks(cfg) + _probe_checks(cfg.probe) + _finetune_checks(cfg.finetune)
    )
    f = cfg.finetune
    mixing = (f.mixup > 0 or f.cutmix > 0) and f.mixup_prob > 0
    if cfg.mode == "finetune" and mixing and f.batch_size % 2:
        raise ConfigError(
            f"finetune.batch_size={f.batch_size} must be even for mixup/cutmix (they pair images "
            "within a batch); choose an even batch size or set finetune.mixup=0 finetune.cutmix=0"
        )
    return cfg


def _top_checks(cfg: EvalConfig) -> list[Check]:
    """The encoder, the data and the seed."""
    d = cfg.data
    return [
        (cfg.encoder is not None, "encoder", cfg.encoder, ENCODER_FORMS),
        (
            d.eval_split != d.split,
            "data.eval_split",
            d.eval_split,
            f"another split than data.split={d.split!r}",
        ),
        (
            0 < d.holdout_fraction < 1,
            "data.holdout_fraction",
            d.holdout_fraction,
            "a fraction in (0, 1)",
        ),
        (d.num_workers >= 0, "data.num_workers", d.num_workers, "0 or more"),
        (d.max_bad_images >= 0, "data.max_bad_images", d.max_bad_images, "0 or more"),
        (
            cfg.num_heads is None or cfg.num_heads > 0,
            "num_heads",
            cfg.num_heads,
            "a positive integer or null",
        ),
        (0 <= cfg.seed < 2**31, "seed", cfg.seed, "an integer in [0, 2**31)"),
    ]


def _probe_checks(p: ProbeConfig) -> list[Check]:
    return [
        (p.batch_size > 0, "probe.batch_size", p.batch_size, "a positive integer"),
        (p.epochs > 0, "probe.epochs", p.epochs, "a positive integer"),
        (p.blr > 0, "probe.blr", p.blr, "a positive number"),
        (p.weight_decay >= 0, "probe.weight_decay", p.weight_decay, "0 or more"),
        (
            0 <= p.warmup_epochs < p.epochs,
            "probe.warmup_epochs",
            p.warmup_epochs,
            "in [0, probe.epochs)",
        ),
        (p.k > 0, "probe.k", p.k, "a positive integer"),
        (p.blocks > 0, "probe.blocks", p.blocks, "a positive integer"),
        (p.temperature > 0, "probe.temperature", p.temperature, "a positive number"),
        (
            p.extract_batch_size > 0,
            "probe.extract_batch_size",
            p.extract_batch_size,
            "a positive integer",
        ),
    ]


def _finetune_checks(f: FinetuneConfig) -> list[Check]:
    probability = "a probability in [0, 1]"
    return [
        *training_checks(f),
        (0 < f.layer_decay <= 1, "finetune.layer_decay", f.layer_decay, "in (0, 1]; 1 disables it"),
        (0 <= f.drop_path < 1, "finetune.drop_path", f.drop_path, "in [0, 1)"),
        (
            f.image_size is None or min(size_hw(f.image_size)) > 0,
            "finetune.image_size",
            f.image_size,
            "a positive integer, [H, W] or null",
        ),
        crop_scale_check(f.crop_scale, "finetune.crop_scale"),
        (0 <= f.reprob <= 1, "finetune.reprob", f.reprob, probability),
        (f.mixup >= 0, "finetune.mixup", f.mixup, "0 (off) or a positive alpha"),
        (f.cutmix >= 0, "finetune.cutmix", f.cutmix, "0 (off) or a positive alpha"),
        (0 <= f.mixup_prob <= 1, "finetune.mixup_prob", f.mixup_prob, probability),
        (
            0 <= f.mixup_switch_prob <= 1,
            "finetune.mixup_switch_prob",
            f.mixup_switch_prob,
            probability,
        ),
        (0 <= f.smoothing < 1, "finetune.smoothing", f.smoothing, "in [0, 1)"),
        (f.eval_every > 0, "finetune.eval_every", f.eval_every, "a positive integer"),
        (f.eval_min_steps >= 0, "finetune.eval_min_steps", f.eval_min_steps, "0 or more"),
    ]
