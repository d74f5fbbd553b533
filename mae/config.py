"""Typed run configuration: dataclass schema + YAML recipes + dotted command-line overrides.

A recipe file holds only what differs from the defaults below; ``key=value`` arguments
override it (values are parsed as YAML, so ``train.max_steps=30`` is an int and
``data.crop_scale=[0.3,1.0]`` a list). Unknown keys, wrong types and invalid values raise
``ConfigError`` naming the key and what is allowed, before any work starts. The resolved
config is frozen. The evaluation schema (``finetune.py``) is in ``mae.eval_config``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mae.config_checks import (
    Schedule,
    crop_scale_check,
    raise_first_invalid,
    schedule_checks,
    size_hw,
    stats_checks,
)
from mae.config_loader import ConfigError, build, load_raw, read_yaml, to_dict
from mae.family_defaults import FAMILY_DEFAULTS
from mae.presets import DEFAULT_PRESET, PRESET_KEYS, PRESETS

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "derive",
    "derive_schedule",
    "from_dict",
    "load_config",
    "read_yaml",
    "to_dict",
]


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    # model family in the registry (mae.models.MODELS): mae, or a classic autoencoder:
    # ae (vanilla), dae (denoising), sparse_ae, cae (contractive), vae (variational), stacked_ae
    name: Literal["mae", "ae", "dae", "sparse_ae", "cae", "vae", "stacked_ae"] = "mae"
    # fills the architecture keys below that are left unset (mae.presets; default vit_tiny_patch4; with
    # init=, pretraining fills them from the checkpoint instead: mae.interop.load_pretrain_config)
    preset: str | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    decoder_embed_dim: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    mlp_ratio: float | None = (
        None  # MLP hidden size / width (default 4; with init=, the checkpoint's)
    )
    mask_ratio: float = 0.75
    # mae: the paper's decoder (self-attention over every patch); cross: CrossMAE's (each predicted patch a query
    # cross-attending to the encoder's tokens; mae.models.crossmae)
    decoder: Literal["mae", "cross"] = "mae"
    # the fraction of all patches the decoder predicts and the loss scores, a subset of the masked ones drawn
    # from the mask's noise (0 < r <= mask_ratio; default mask_ratio, the only value for decoder=mae)
    reconstruct_ratio: float | None = None
    decoder_self_attn: bool = False  # cross: self-attention among the queries too (CrossMAE: off)
    decoder_features: Literal["last", "weighted"] = (
        "last"  # cross: the encoder's output, or a mix per block
    )
    norm_pix_loss: bool = True  # regress per-patch normalised pixels (the paper's best setting)
    # --- classic autoencoders (ae, dae, sparse_ae, cae, vae)
    arch: Literal["conv", "mlp"] = (
        "conv"  # conv: stride-2 conv stages; mlp: for small grayscale data
    )
    # conv channels per stride-2 stage, or mlp hidden sizes; default conv (32, 64, 128), mlp (512, 256)
    widths: tuple[int, ...] | None = None
    latent_dim: int = 128  # the code (bottleneck) size: what encode() returns
    loss: Literal["mse", "bce"] = (
        "mse"  # reconstruction; bce compares sigmoid outputs with pixels in [0, 1]
    )
    corruption: Literal["gaussian", "masking", "salt_pepper"] = (
        "gaussian"  # dae: applied to the input only
    )
    noise_level: float = (
        0.3  # dae: Gaussian std (in [0, 1] pixel units) or the fraction of pixels/patches hit
    )
    corruption_patch: int = 1  # dae masking: side of the zeroed squares (1: single pixels)
    sparsity: Literal["l1", "kl"] = (
        "kl"  # sparse_ae: L1 on a ReLU code, or KL toward rho on a sigmoid code
    )
    sparsity_weight: float = 1e-3
    sparsity_target: float = 0.05  # rho, for sparsity=kl
    contractive_weight: float = 0.1  # cae: weight of the squared Frobenius norm of d code / d input
    contractive_projections: int = (
        1  # cae (deep encoders): random projections per step of the estimate
    )
    likelihood: Literal["gaussian", "bernoulli"] = "gaussian"  # vae decoder
    beta: float = 1.0  # vae: KL weight
    beta_warmup_steps: int = 0  # vae: KL weight ramps linearly from 0 over these optimizer steps
    stage_steps: int = (
        100  # stacked_ae: optimizer steps per greedy layer stage; the rest trains end to end
    )
    stack_denoising: bool = (
        False  # stacked_ae: each layer a denoising autoencoder (model.corruption, noise_level)
    )


@dataclass(frozen=True)
class DataConfig:
    dataset: str = (
        "sample"  # Hugging Face hub id | local folder (image folder or parquet shards) | sample
    )
    split: str = "train"
    image_column: str | None = None  # default: the dataset's first Image feature
    label_column: str | None = None  # default: the dataset's first ClassLabel feature
    image_size: int | tuple[int, int] = 32  # one side (square), or [H, W]
    # 1 (grayscale), 3 (RGB), 4 (RGBA) for images; any count for arrays (a column of arrays or a folder of .npy)
    channels: int = 3
    # crop: RandomResizedCrop(crop_scale) + flip (hflip), MAE's; flip: the whole image, flipped half the time;
    # none: the whole image. Default per model family (mae.family_defaults)
    augment: Literal["crop", "flip", "none"] | None = None
    crop_scale: tuple[float, float] = (
        0.2,
        1.0,
    )  # RandomResizedCrop scale range (data.augment=crop)
    hflip: bool = True  # data.augment=crop: flip half the crops
    # per channel, of pixels scaled to [0, 1] (arrays: uint8 / 255, uint16 / 65535, floats as they are); default:
    # ImageNet statistics for 3 channels, 0.5 otherwise; auto: measured on a sample of the training split
    # (mae.data.stats) and recorded in config.yaml, derived.json and the export
    mean: tuple[float, ...] | Literal["auto"] | None = None
    std: tuple[float, ...] | Literal["auto"] | None = None  # auto with mean=auto
    grid_channels: tuple[int, ...] | None = (
        None  # the channels reconstruction grids show; default the first 3
    )
    num_workers: int = 2  # DataLoader worker processes per training process
    classes: tuple[int, ...] | None = (
        None  # train on images of these label ids only (e.g. anomaly detection)
    )
    # pretraining replaces an image that cannot be decoded by the next one and lists it in
    # RUN/bad_images.jsonl; more distinct bad images than this stop the run (0: stop at the first)
    max_bad_images: int = 100
    # pretraining reads the split as a stream (datasets streaming mode: never stored whole; mae.data.streamed)
    streaming: bool = False
    shuffle_buffer: int = 10_000  # streaming: examples shuffled together (files are shuffled too)
    stream_size: int | None = (
        None  # streaming: images per epoch, when the dataset's metadata does not say
    )
    # pretraining: decode the split once into one uint8 tensor on the training device and augment there,
    # with no loader workers (mae.data.on_device). For CIFAR-scale data: every image the same size, at most
    # image_size. Same crop, flip and mask distributions as the worker loader, from another generator
    on_device: bool = False
    # how the worker loader decodes: pillow, whole images; pillow_draft, JPEGs at 1/2, 1/4 or 1/8 of their size
    # where the crop keeps at least data.image_size's pixels (mae.data.draft: the same crops, pixels within a few
    # levels; faster only where crops are 2x the output or more: docs/data.md); dali, NVIDIA DALI decodes, crops
    # and normalises (nvJPEG on a GPU; the same crops, flips and masks; pip install -e ".[dali]": mae.data.dali)
    decoder: Literal["pillow", "pillow_draft", "dali"] = "pillow"

    @property
    def hw(self) -> tuple[int, int]:
        """``image_size`` as (height, width)."""
        return size_hw(self.image_size)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    max_steps: int | None = None  # stop after this many optimizer steps; overrides epochs
    batch_size: int = 128  # per process, per micro-batch
    accum_steps: int = 1  # gradient accumulation micro-batches per optimizer step
    # base lr; lr = blr * effective batch / 256. Swept for the default run (20 epochs of the 3,000-image
    # sample, docs/sweep_mae_sample.md); the paper's 1.5e-4 is for 800 epochs (configs/mae_vit_*.yaml)
    blr: float | None = None  # default per model family (mae.family_defaults): MAE 1e-3
    min_lr: float = 0.0
    warmup_epochs: float | None = None  # default per model family: MAE 1
    weight_decay: float | None = None  # default per model family: MAE 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = None  # max global grad norm; None disables clipping
    # auto: bf16 autocast where the device computes bf16 natively (CUDA with bf16, a CPU with
    # AVX512-BF16/AMX), else fp32 (no); see mae.hardware
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # the attention core: fused (torch SDPA; flash on GPU) or math (written out, fp32 softmax);
    # auto: math on CPU under bf16, where it is faster, else fused
    attention: Literal["auto", "fused", "math"] = "auto"
    # torch.compile the training forward (and so its backward). Pays on a GPU: ViT-B/16, bf16, batch 512 on
    # an H200 1.32x the eager step (bench/vs_hf.py --compile); on a CPU it only adds minutes of compiling.
    # Checkpoints are the same either way, so a run can be resumed with it switched
    compile: bool = False
    seed: int = 0
    # torch threads per process on CPU; default: this machine's cores / processes on it
    # (`accelerate launch` sets OMP_NUM_THREADS=1 on a machine without GPUs, which this replaces)
    cpu_threads: int | None = None
    # seconds a collective waits for the other processes before the run stops with an error naming this key
    # (a process or machine that died); a failed collective stops it at once
    dist_timeout: int = 300
    # Accelerate's experiment trackers (mae.config_checks.TRACKERS); [] logs to metrics.jsonl alone
    log_with: tuple[str, ...] = ("tensorboard",)
    log_every: int = 10  # optimizer steps between metric lines
    checkpoint_every: int = (
        100  # optimizer steps between checkpoints (one is always written at the end)
    )
    keep_checkpoints: int = 2  # newest complete checkpoints kept
    recon_every: int = (
        100  # optimizer steps between reconstruction grids (one is always written at the end)
    )
    recon_images: int = 8
    online_probe: bool = (
        False  # train a linear head on each step's detached features (needs labels)
    )


@dataclass(frozen=True)
class Config:
    output_dir: str = "runs/mae"
    # start from these weights (model.name=mae): an official MAE .pth ({"model": ...}, encoder-only or
    # _full), a timm ViT export folder or .safetensors, or a checkpoint folder (see mae.interop)
    init: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Defaults <- recipe file <- ``dotted.key=value`` overrides; then resolved and validated.

    ``init=`` is only a path here: the architecture keys come from the recipe and its preset. Reading
    them off the checkpoint needs torch and the weights formats, which sit above the config:
    ``mae.interop.load_pretrain_config`` does that, then resolves through ``resolve`` below."""
    return resolve(load_raw(path, overrides, Config))


def preset_values(name: str) -> dict[str, int]:
    """``model.*`` architecture keys of preset ``name`` (an unknown name is a ConfigError)."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset={name!r} is unknown; choose one of {sorted(PRESETS)}")
    return dataclasses.asdict(PRESETS[name])


def resolve(cfg: Config) -> Config:
    """Fill preset and data-dependent defaults, then validate. Idempotent."""
    model = cfg.model
    if model.name == "mae":  # classic autoencoders bring their own keys
        name = model.preset or DEFAULT_PRESET
        values = preset_values(name)
        if any(getattr(model, k) is None for k in PRESET_KEYS):
            filled = {k: v for k, v in values.items() if getattr(model, k) is None}
            whole = len(filled) == len(PRESET_KEYS)  # a label only where the preset gave every key
            model = dataclasses.replace(model, preset=name if whole else model.preset, **filled)
    if model.mlp_ratio is None:
        model = dataclasses.replace(model, mlp_ratio=4.0)
    if model.reconstruct_ratio is None:
        model = dataclasses.replace(model, reconstruct_ratio=model.mask_ratio)
    if model.widths is None:
        model = dataclasses.replace(
            model, widths=(32, 64, 128) if model.arch == "conv" else (512, 256)
        )
    family = FAMILY_DEFAULTS[model.name]
    data = (
        cfg.data
        if cfg.data.augment is not None
        else dataclasses.replace(cfg.data, augment=family["augment"])
    )
    unset = {
        k: family[k]
        for k in ("blr", "weight_decay", "warmup_epochs")
        if getattr(cfg.train, k) is None
    }
    train = dataclasses.replace(cfg.train, **unset)
    if data.mean == "auto" and data.std is None:
        data = dataclasses.replace(data, std="auto")
    if data.mean is None or data.std is None:
        imagenet = data.channels == 3
        data = dataclasses.replace(
            data,
            mean=data.mean
            if data.mean is not None
            else (IMAGENET_MEAN if imagenet else (0.5,) * data.channels),
            std=data.std
            if data.std is not None
            else (IMAGENET_STD if imagenet else (0.5,) * data.channels),
        )
    cfg = dataclasses.replace(cfg, model=model, data=data, train=train)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    m, d, t = cfg.model, cfg.data, cfg.train
    checks = [
        (
            0.0 < m.mask_ratio < 1.0,
            "model.mask_ratio",
            m.mask_ratio,
            "a fraction strictly between 0 and 1",
        ),
        (m.mlp_ratio > 0, "model.mlp_ratio", m.mlp_ratio, "a positive number"),
        (min(d.hw) > 0, "data.image_size", d.image_size, "a positive integer or [H, W]"),
        (d.channels > 0, "data.channels", d.channels, "a positive integer"),
        crop_scale_check(d.crop_scale, "data.crop_scale"),
        *stats_checks(d),
        (d.num_workers >= 0, "data.num_workers", d.num_workers, "0 or more"),
        (d.max_bad_images >= 0, "data.max_bad_images", d.max_bad_images, "0 or more"),
        (d.shuffle_buffer > 0, "data.shuffle_buffer", d.shuffle_buffer, "a positive integer"),
        (
            d.stream_size is None or d.stream_size > 0,
            "data.stream_size",
            d.stream_size,
            "a positive integer or null",
        ),
        *schedule_checks(t, "train"),
        (0 <= t.seed < 2**31, "train.seed", t.seed, "an integer in [0, 2**31)"),
        (
            t.checkpoint_every > 0,
            "train.checkpoint_every",
            t.checkpoint_every,
            "a positive integer",
        ),
        (t.recon_every > 0, "train.recon_every", t.recon_every, "a positive integer"),
        (t.recon_images > 0, "train.recon_images", t.recon_images, "a positive integer"),
    ]
    raise_first_invalid(checks)
    if m.name == "mae":
        for key in PRESET_KEYS:
            if getattr(m, key) <= 0:
                raise ConfigError(
                    f"model.{key}={getattr(m, key)!r} is invalid; it must be a positive integer"
                )
        patches = (d.hw[0] // m.patch_size) * (d.hw[1] // m.patch_size)
        if not 0 < int(patches * (1 - m.mask_ratio)) < patches:
            raise ConfigError(
                f"model.mask_ratio={m.mask_ratio} leaves {int(patches * (1 - m.mask_ratio))} of {patches} patches "
                "visible; choose a ratio that keeps at least one patch visible and hides at least one"
            )
        if d.hw[0] % m.patch_size or d.hw[1] % m.patch_size:
            raise ConfigError(
                f"data.image_size={list(d.hw) if d.hw[0] != d.hw[1] else d.hw[0]} is not divisible by "
                f"model.patch_size={m.patch_size}; choose a height and width that are multiples of {m.patch_size}"
            )
        for dim, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
            if getattr(m, dim) % 4:
                raise ConfigError(
                    f"model.{dim}={getattr(m, dim)} must be divisible by 4 (2-D sin-cos position embeddings)"
                )
            if getattr(m, dim) % getattr(m, heads):
                raise ConfigError(
                    f"model.{dim}={getattr(m, dim)} is not divisible by model.{heads}={getattr(m, heads)}"
                )
        _validate_decoder(m, patches)
    else:
        _validate_classic(m, d)
    if cfg.init is not None and m.name != "mae":
        raise ConfigError(
            f"init={cfg.init!r} loads MAE / ViT weights; it needs model.name=mae, not {m.name!r}"
        )
    if t.compile and m.name in ("vae", "stacked_ae"):
        raise ConfigError(
            f"train.compile=true does not work with model.name={m.name}: its forward follows the training step "
            "(KL warm-up, greedy stages), which torch.compile would recompile for at every step; set "
            "train.compile=false"
        )
    if d.on_device and d.streaming:
        raise ConfigError(
            "data.on_device=true holds the whole split on the device and data.streaming=true never holds it; "
            "choose one of them"
        )
    if d.decoder != "pillow" and (d.on_device or d.streaming):
        raise ConfigError(
            f"data.decoder={d.decoder} is for the loaded split; data.on_device and data.streaming decode as usual: "
            "set data.decoder=pillow, or data.on_device=false and data.streaming=false"
        )
    if t.online_probe and m.name == "stacked_ae":
        raise ConfigError(
            "train.online_probe=true does not work with model.name=stacked_ae (its greedy stages compute no "
            "code of the whole stack); set train.online_probe=false"
        )
    if d.decoder != "pillow" and d.augment != "crop":
        raise ConfigError(
            f"data.decoder={d.decoder} decodes the crops of data.augment=crop; with data.augment={d.augment} use "
            "data.decoder=pillow"
        )


def _validate_decoder(m: ModelConfig, patches: int) -> None:
    r = m.reconstruct_ratio
    if m.decoder == "mae" and (
        r != m.mask_ratio or m.decoder_self_attn or m.decoder_features != "last"
    ):
        raise ConfigError(
            "model.reconstruct_ratio, model.decoder_self_attn and model.decoder_features=weighted need "
            "model.decoder=cross (the paper's decoder predicts every masked patch with self-attention); "
            "set model.decoder=cross or leave them out"
        )
    if not (0 < r <= m.mask_ratio and int(patches * r) > 0):
        raise ConfigError(
            f"model.reconstruct_ratio={r} is invalid; it must be in (0, model.mask_ratio={m.mask_ratio}] and "
            f"predict at least one of the {patches} patches"
        )


def _validate_classic(m: ModelConfig, d: DataConfig) -> None:
    fraction = m.corruption in ("masking", "salt_pepper")
    checks = [
        (all(w > 0 for w in m.widths), "model.widths", m.widths, "positive integers"),
        (
            m.arch == "mlp" or len(m.widths) > 0,
            "model.widths",
            m.widths,
            "at least one conv stage for arch=conv",
        ),
        (m.latent_dim > 0, "model.latent_dim", m.latent_dim, "a positive integer"),
        (
            m.noise_level >= 0 and (m.noise_level <= 1 or not fraction),
            "model.noise_level",
            m.noise_level,
            "a fraction in [0, 1] for masking/salt_pepper, a std >= 0 for gaussian",
        ),
        (
            m.corruption_patch > 0,
            "model.corruption_patch",
            m.corruption_patch,
            "a positive integer",
        ),
        (m.sparsity_weight >= 0, "model.sparsity_weight", m.sparsity_weight, "0 or more"),
        (0 < m.sparsity_target < 1, "model.sparsity_target", m.sparsity_target, "in (0, 1)"),
        (m.contractive_weight >= 0, "model.contractive_weight", m.contractive_weight, "0 or more"),
        (
            m.contractive_projections > 0,
            "model.contractive_projections",
            m.contractive_projections,
            "1 or more",
        ),
        (m.beta >= 0, "model.beta", m.beta, "0 or more"),
        (m.beta_warmup_steps >= 0, "model.beta_warmup_steps", m.beta_warmup_steps, "0 or more"),
        (m.stage_steps > 0, "model.stage_steps", m.stage_steps, "a positive integer"),
    ]
    raise_first_invalid(checks)
    if m.name == "stacked_ae" and m.stack_denoising and m.noise_level > 1:
        raise ConfigError(
            f"model.noise_level={m.noise_level} is invalid with model.stack_denoising=true: above the first layer it "
            "is the fraction of code units zeroed; choose a value in [0, 1]"
        )
    stride = 2 ** len(m.widths)
    if m.arch == "conv" and (d.hw[0] % stride or d.hw[1] % stride):
        raise ConfigError(
            f"data.image_size={d.image_size} is not divisible by {stride} (model.widths has {len(m.widths)} stride-2 "
            f"stages); choose a multiple of {stride} or fewer model.widths"
        )


@dataclass(frozen=True)
class Derived:
    """Quantities computed once from the config, the data size and the process count."""

    num_processes: int
    dataset_size: int
    effective_batch: int  # images per optimizer step: batch_size x accum_steps x processes
    lr: float  # blr x effective_batch / 256
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def derive(cfg: Config, dataset_size: int, num_processes: int) -> Derived:
    return derive_schedule(cfg.train, dataset_size, num_processes, "train")


def derive_schedule(t: Schedule, dataset_size: int, num_processes: int, key: str) -> Derived:
    """Batch, lr and step counts of a training section (``key`` names it in errors)."""
    effective = t.batch_size * t.accum_steps * num_processes
    per_epoch = dataset_size // effective
    if per_epoch == 0:
        raise ConfigError(
            f"the dataset has {dataset_size} images, fewer than one optimizer step needs ({effective} = "
            f"{key}.batch_size x {key}.accum_steps x processes); lower {key}.batch_size or {key}.accum_steps"
        )
    total = t.max_steps if t.max_steps is not None else t.epochs * per_epoch
    warmup = min(round(t.warmup_epochs * per_epoch), total - 1)
    lr = t.blr * effective / 256
    if t.min_lr > lr:
        raise ConfigError(
            f"{key}.min_lr={t.min_lr:g} is above the peak lr {lr:g} (blr x {effective} / 256); lower it"
        )
    return Derived(num_processes, dataset_size, effective, lr, per_epoch, total, warmup)


def from_dict(raw: dict[str, Any]) -> Config:
    """Inverse of ``to_dict`` for a resolved config (e.g. a run directory's config.yaml)."""
    return resolve(build(Config, raw))
