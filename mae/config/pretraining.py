"""Typed run configuration: dataclass schema + YAML recipes + dotted command-line overrides.

A recipe file holds only what differs from the defaults below; ``key=value`` arguments
override it (values are parsed as YAML, so ``train.max_steps=30`` is an int and
``data.crop_scale=[0.3,1.0]`` a list). Unknown keys, wrong types and invalid values raise
``ConfigError`` naming the key and what is allowed, before any work starts. The resolved
config is frozen. The evaluation schema (``finetune.py``) is in ``mae.config.evaluation``; the
training settings both share are in ``mae.config.training``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from mae.config.checks import Check, crop_scale_check, raise_first_invalid, size_hw
from mae.config.families import FAMILY_DEFAULTS
from mae.config.loader import ConfigError, build, load_raw
from mae.config.presets import DEFAULT_PRESET, PRESET_KEYS, PRESETS
from mae.config.training import TrainingSettings, training_checks

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    # model family in the registry (mae.models.MODELS; mae.config.families lists the names): mae,
    # or a classic autoencoder: ae (vanilla), dae (denoising), sparse_ae, cae (contractive), vae
    # (variational), stacked_ae; or a family registered with mae.models.register
    name: str = "mae"
    # fills the architecture keys below that are left unset (mae.config.presets; default
    # vit_tiny_patch4; with init=, pretraining fills them from the checkpoint instead:
    # mae.interop.load_pretrain_config)
    preset: str | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    decoder_embed_dim: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    # MLP hidden size / width (default 4; with init=, the checkpoint's)
    mlp_ratio: float | None = None
    mask_ratio: float = 0.75
    # mae: the paper's decoder (self-attention over every patch); cross: CrossMAE's (each
    # predicted patch a query cross-attending to the encoder's tokens; mae.models.crossmae)
    decoder: Literal["mae", "cross"] = "mae"
    # the fraction of all patches the decoder predicts and the loss scores, a subset of the masked
    # ones drawn from the mask's noise (0 < r <= mask_ratio; default mask_ratio, the only value
    # for decoder=mae)
    reconstruct_ratio: float | None = None
    decoder_self_attn: bool = False  # cross: self-attention among the queries too (CrossMAE: off)
    # cross: the encoder's output, or a mix per block
    decoder_features: Literal["last", "weighted"] = "last"
    norm_pix_loss: bool = True  # regress per-patch normalised pixels (the paper's best setting)
    # what the decoder predicts at the hidden patches: their pixels, or an EMA teacher's features
    # of the whole image (data2vec 2.0; mae.models.teacher)
    target: Literal["pixels", "teacher"] = "pixels"
    teacher_layers: int = 10  # teacher: the top blocks averaged (at most model.depth)
    # teacher: EMA decay, annealed linearly from ema_decay to ema_end_decay over ema_anneal_steps
    # optimizer steps (data2vec 2.0 on ImageNet: 0.9998 -> 0.99999 over 100,000; the defaults
    # suit a run of a few thousand steps)
    ema_decay: float = 0.999
    ema_end_decay: float = 0.9999
    ema_anneal_steps: int = 2000
    # --- classic autoencoders (ae, dae, sparse_ae, cae, vae)
    # conv: stride-2 conv stages; mlp: for small grayscale data
    arch: Literal["conv", "mlp"] = "conv"
    # conv channels per stride-2 stage, or mlp hidden sizes; default conv (32, 64, 128),
    # mlp (512, 256)
    widths: tuple[int, ...] | None = None
    latent_dim: int = 128  # the code (bottleneck) size: what encode() returns
    # reconstruction; bce compares sigmoid outputs with pixels in [0, 1]
    loss: Literal["mse", "bce"] = "mse"
    # dae: applied to the input only
    corruption: Literal["gaussian", "masking", "salt_pepper"] = "gaussian"
    # dae: Gaussian std (in [0, 1] pixel units) or the fraction of pixels/patches hit
    noise_level: float = 0.3
    corruption_patch: int = 1  # dae masking: side of the zeroed squares (1: single pixels)
    # sparse_ae: L1 on a ReLU code, or KL toward rho on a sigmoid code
    sparsity: Literal["l1", "kl"] = "kl"
    sparsity_weight: float = 1e-3
    sparsity_target: float = 0.05  # rho, for sparsity=kl
    contractive_weight: float = 0.1  # cae: weight of the squared Frobenius norm of d code / d input
    # cae (deep encoders): random projections per step of the estimate
    contractive_projections: int = 1
    likelihood: Literal["gaussian", "bernoulli"] = "gaussian"  # vae decoder
    beta: float = 1.0  # vae: KL weight
    beta_warmup_steps: int = 0  # vae: KL weight ramps linearly from 0 over these optimizer steps
    # stacked_ae: optimizer steps per greedy layer stage; the rest trains end to end
    stage_steps: int = 100
    # stacked_ae: each layer a denoising autoencoder (model.corruption, noise_level)
    stack_denoising: bool = False


@dataclass(frozen=True)
class Columns:
    """Which columns of a dataset hold the images and the labels, and the channels images are
    read in: what the data functions take, from a pretraining config or any other caller."""

    image: str | None = None  # None: the dataset's first Image feature (or column of arrays)
    label: str | None = None  # None: the dataset's first ClassLabel feature, if any
    channels: int = 3


@dataclass(frozen=True)
class DataConfig:
    # Hugging Face hub id | local folder (image folder or parquet shards) | sample
    dataset: str = "sample"
    split: str = "train"
    image_column: str | None = None  # default: the dataset's first Image feature
    label_column: str | None = None  # default: the dataset's first ClassLabel feature
    image_size: int | tuple[int, int] = 32  # one side (square), or [H, W]
    # 1 (grayscale), 3 (RGB), 4 (RGBA) for images; any count for arrays (a column of arrays or a
    # folder of .npy)
    channels: int = 3
    # crop: RandomResizedCrop(crop_scale) + flip (hflip), MAE's; flip: the whole image, flipped
    # half the time; none: the whole image. Default per model family (mae.config.families)
    augment: Literal["crop", "flip", "none"] | None = None
    # RandomResizedCrop scale range (data.augment=crop)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True  # data.augment=crop: flip half the crops
    # per channel, of pixels scaled to [0, 1] (arrays: uint8 / 255, uint16 / 65535, floats as
    # they are); default: ImageNet statistics for 3 channels, 0.5 otherwise; auto: measured on a
    # sample of the training split (mae.data.stats) and recorded in config.yaml, derived.json and
    # the export
    mean: tuple[float, ...] | Literal["auto"] | None = None
    std: tuple[float, ...] | Literal["auto"] | None = None  # auto with mean=auto
    # the channels reconstruction grids show; default the first 3
    grid_channels: tuple[int, ...] | None = None
    num_workers: int = 2  # DataLoader worker processes per training process
    # train on images of these label ids only (e.g. anomaly detection)
    classes: tuple[int, ...] | None = None
    # an image that cannot be decoded is replaced by the next one and listed once in
    # RUN/bad_images.jsonl; more distinct bad images than this stop the run (0: stop at the first).
    # Also mae.evaluate's default --max-bad-images
    max_bad_images: int = 100
    # pretraining reads the split as a stream (datasets streaming mode: never stored whole;
    # mae.data.streamed)
    streaming: bool = False
    shuffle_buffer: int = 10_000  # streaming: examples shuffled together (files are shuffled too)
    # streaming: images per epoch, when the dataset's metadata does not say
    stream_size: int | None = None
    # pretraining: decode the split once into one uint8 tensor on the training device and augment
    # there, with no loader workers (mae.data.on_device). For CIFAR-scale data: every image the
    # same size, at most image_size. Same crop, flip and mask distributions as the worker loader,
    # from another generator
    on_device: bool = False
    # how the worker loader decodes: pillow, whole images; pillow_draft, JPEGs at 1/2, 1/4 or 1/8
    # of their size where the crop keeps at least data.image_size's pixels (mae.data.draft: the
    # same crops, pixels within a few levels; faster only where crops are 2x the output or more:
    # docs/data.md); dali, NVIDIA DALI decodes, crops and normalises (nvJPEG on a GPU; the same
    # crops, flips and masks; pip install -e ".[dali]": mae.data.dali)
    decoder: Literal["pillow", "pillow_draft", "dali"] = "pillow"

    @property
    def hw(self) -> tuple[int, int]:
        """``image_size`` as (height, width)."""
        return size_hw(self.image_size)

    @property
    def columns(self) -> Columns:
        return Columns(self.image_column, self.label_column, self.channels)


@dataclass(frozen=True)
class TrainConfig(TrainingSettings):
    """Pretraining's ``train`` section: the shared training settings (``mae.config.training``)
    and what only pretraining has. ``blr``, ``weight_decay`` and ``warmup_epochs`` default per
    model family (``mae.config.families``; MAE: 1e-3, 0.05, 1). The MAE blr was swept for the
    default run (20 epochs of the 3,000-image sample, docs/sweep_mae_sample.md); the paper's
    1.5e-4 is for 800 epochs (configs/mae_vit_*.yaml)."""

    # the keys whose null default is the model family's (shown by --help)
    FAMILY_KEYS: ClassVar[tuple[str, ...]] = ("blr", "weight_decay", "warmup_epochs")

    # torch.compile the training forward (and so its backward). Pays on a GPU: ViT-B/16, bf16,
    # batch 512 on an H200 1.32x the eager step (bench/vs_hf.py --compile); on a CPU it only adds
    # minutes of compiling. Checkpoints are the same either way, so a run can be resumed with it
    # switched
    compile: bool = False
    seed: int = 0
    # optimizer steps between checkpoints (one is always written at the end)
    checkpoint_every: int = 100
    # optimizer steps between reconstruction grids (one is always written at the end)
    recon_every: int = 100
    recon_images: int = 8
    # train a linear head on each step's detached features (needs labels)
    online_probe: bool = False
    # MAE: each image masked this many times per step (disjoint visible sets while they fit),
    # the loss averaged over the masks; the batch and the lr count images (docs/pretraining.md)
    masks_per_image: int = 1


@dataclass(frozen=True)
class Config:
    output_dir: str = "runs/mae"
    # start from these weights (model.name=mae): an official MAE .pth ({"model": ...},
    # encoder-only or _full), a timm ViT export folder or .safetensors, or a checkpoint folder
    # (see mae.interop)
    init: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------
# loading


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Defaults <- recipe file <- ``dotted.key=value`` overrides; then resolved and validated.

    ``init=`` is only a path here: the architecture keys come from the recipe and its preset.
    Reading them off the checkpoint needs torch and the weights formats, which sit above the
    config: ``mae.interop.load_pretrain_config`` does that, then resolves through ``resolve``
    below."""
    return resolve(load_raw(path, overrides, Config))


def preset_values(name: str) -> dict[str, int]:
    """``model.*`` architecture keys of preset ``name`` (an unknown name is a ConfigError)."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset={name!r} is unknown; choose one of {sorted(PRESETS)}")
    return dataclasses.asdict(PRESETS[name])


def resolve(cfg: Config) -> Config:
    """Fill preset and data-dependent defaults, then validate. Idempotent."""
    if cfg.model.name not in FAMILY_DEFAULTS:
        raise ConfigError(
            f"model.name={cfg.model.name!r} is invalid; choose one of {list(FAMILY_DEFAULTS)}"
        )
    model = _resolve_model(cfg.model)
    family = FAMILY_DEFAULTS[model.name]
    data = cfg.data
    if data.augment is None:
        data = dataclasses.replace(data, augment=family["augment"])
    unset = {
        k: family[k]
        for k in ("blr", "weight_decay", "warmup_epochs")
        if getattr(cfg.train, k) is None
    }
    train = dataclasses.replace(cfg.train, **unset)
    cfg = dataclasses.replace(cfg, model=model, data=_resolve_stats(data), train=train)
    validate(cfg)
    return cfg


def _resolve_model(model: ModelConfig) -> ModelConfig:
    """The preset's architecture keys where unset (MAE; the classic families bring their own),
    and the defaults that follow from other keys."""
    if model.name == "mae":
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
        widths = (32, 64, 128) if model.arch == "conv" else (512, 256)
        model = dataclasses.replace(model, widths=widths)
    return model


def _resolve_stats(data: DataConfig) -> DataConfig:
    """``data.std`` follows ``data.mean=auto``; unset statistics are ImageNet's for 3 channels,
    0.5 otherwise."""
    if data.mean == "auto" and data.std is None:
        data = dataclasses.replace(data, std="auto")
    imagenet = data.channels == 3
    if data.mean is None:
        mean = IMAGENET_MEAN if imagenet else (0.5,) * data.channels
        data = dataclasses.replace(data, mean=mean)
    if data.std is None:
        std = IMAGENET_STD if imagenet else (0.5,) * data.channels
        data = dataclasses.replace(data, std=std)
    return data


# ---------------------------------------------------------------------------------------------
# validation


def validate(cfg: Config) -> None:
    """Every key's own range first, then the model family's rules, then the keys that rule each
    other out."""
    m, d, t = cfg.model, cfg.data, cfg.train
    raise_first_invalid(_model_checks(m) + _data_checks(d) + _train_checks(t))
    if m.name == "mae":
        _validate_vit(m, d)
    else:
        _validate_classic(m, d)
    _validate_combinations(cfg)


def _model_checks(m: ModelConfig) -> list[Check]:
    return [
        (0 < m.teacher_layers, "model.teacher_layers", m.teacher_layers, "a positive integer"),
        (0 <= m.ema_decay < 1, "model.ema_decay", m.ema_decay, "a decay in [0, 1)"),
        (0 <= m.ema_end_decay <= 1, "model.ema_end_decay", m.ema_end_decay, "a decay in [0, 1]"),
        (
            m.ema_anneal_steps > 0,
            "model.ema_anneal_steps",
            m.ema_anneal_steps,
            "a positive integer",
        ),
        (
            0.0 < m.mask_ratio < 1.0,
            "model.mask_ratio",
            m.mask_ratio,
            "a fraction strictly between 0 and 1",
        ),
        (m.mlp_ratio > 0, "model.mlp_ratio", m.mlp_ratio, "a positive number"),
    ]


def _data_checks(d: DataConfig) -> list[Check]:
    return [
        (min(d.hw) > 0, "data.image_size", d.image_size, "a positive integer or [H, W]"),
        (d.channels > 0, "data.channels", d.channels, "a positive integer"),
        crop_scale_check(d.crop_scale, "data.crop_scale"),
        *_stats_checks(d),
        (d.num_workers >= 0, "data.num_workers", d.num_workers, "0 or more"),
        (d.max_bad_images >= 0, "data.max_bad_images", d.max_bad_images, "0 or more"),
        (d.shuffle_buffer > 0, "data.shuffle_buffer", d.shuffle_buffer, "a positive integer"),
        (
            d.stream_size is None or d.stream_size > 0,
            "data.stream_size",
            d.stream_size,
            "a positive integer or null",
        ),
    ]


def _stats_checks(d: DataConfig) -> list[Check]:
    """``data.mean`` and ``data.std``: both auto, or one value of the user's per channel each;
    and ``data.grid_channels``."""
    if d.mean == "auto":
        checks = [(d.std == "auto", "data.std", d.std, "unset or auto with data.mean=auto")]
    else:
        own = "values of your own with a data.mean of your own; or set data.mean=auto"
        checks = [(d.std != "auto", "data.std", d.std, own)]
    if d.mean != "auto" and d.std != "auto":  # both the user's: one value per channel each
        checks += [
            (
                len(d.mean) == d.channels,
                "data.mean",
                d.mean,
                f"one value per channel ({d.channels}), or auto",
            ),
            (
                len(d.std) == d.channels and all(v > 0 for v in d.std),
                "data.std",
                d.std,
                f"{d.channels} positive values, or auto",
            ),
        ]
    shown = d.grid_channels
    grid_ok = shown is None or (len(shown) in (1, 3) and all(0 <= c < d.channels for c in shown))
    allowed = f"1 or 3 channel indices in [0, {d.channels})"
    return checks + [(grid_ok, "data.grid_channels", shown, allowed)]


def _train_checks(t: TrainConfig) -> list[Check]:
    return [
        *training_checks(t),
        (0 <= t.seed < 2**31, "train.seed", t.seed, "an integer in [0, 2**31)"),
        (
            t.checkpoint_every > 0,
            "train.checkpoint_every",
            t.checkpoint_every,
            "a positive integer",
        ),
        (t.recon_every > 0, "train.recon_every", t.recon_every, "a positive integer"),
        (t.recon_images > 0, "train.recon_images", t.recon_images, "a positive integer"),
        (t.masks_per_image > 0, "train.masks_per_image", t.masks_per_image, "a positive integer"),
    ]


def _validate_vit(m: ModelConfig, d: DataConfig) -> None:
    """The MAE encoder and decoder: sizes that divide, a mask that leaves patches on both sides."""
    for key in PRESET_KEYS:
        if getattr(m, key) <= 0:
            raise ConfigError(
                f"model.{key}={getattr(m, key)!r} is invalid; it must be a positive integer"
            )
    shown = list(d.hw) if d.hw[0] != d.hw[1] else d.hw[0]
    if min(d.hw) < m.patch_size:
        raise ConfigError(
            f"data.image_size={shown} is smaller than model.patch_size={m.patch_size}; "
            f"choose a size of at least one patch, in multiples of {m.patch_size}"
        )
    if d.hw[0] % m.patch_size or d.hw[1] % m.patch_size:
        raise ConfigError(
            f"data.image_size={shown} is not divisible by model.patch_size={m.patch_size}; "
            f"choose a height and width that are multiples of {m.patch_size}"
        )
    patches = (d.hw[0] // m.patch_size) * (d.hw[1] // m.patch_size)
    visible = int(patches * (1 - m.mask_ratio))
    if not 0 < visible < patches:
        raise ConfigError(
            f"model.mask_ratio={m.mask_ratio} leaves {visible} of {patches} patches visible; "
            "choose a ratio that keeps at least one patch visible and hides at least one"
        )
    for dim, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
        width, count = getattr(m, dim), getattr(m, heads)
        if width % 4:
            raise ConfigError(
                f"model.{dim}={width} must be divisible by 4 (2-D sin-cos position embeddings)"
            )
        if width % count:
            raise ConfigError(f"model.{dim}={width} is not divisible by model.{heads}={count}")
    _validate_decoder(m, patches)


def _validate_decoder(m: ModelConfig, patches: int) -> None:
    r = m.reconstruct_ratio
    cross_only = r != m.mask_ratio or m.decoder_self_attn or m.decoder_features != "last"
    if m.decoder == "mae" and cross_only:
        raise ConfigError(
            "model.reconstruct_ratio, model.decoder_self_attn and model.decoder_features=weighted "
            "need model.decoder=cross (the paper's decoder predicts every masked patch with "
            "self-attention); set model.decoder=cross or leave them out"
        )
    if not (0 < r <= m.mask_ratio and int(patches * r) > 0):
        raise ConfigError(
            f"model.reconstruct_ratio={r} is invalid; it must be in "
            f"(0, model.mask_ratio={m.mask_ratio}] and predict at least one of the {patches} "
            "patches"
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
            f"model.noise_level={m.noise_level} is invalid with model.stack_denoising=true: above "
            "the first layer it is the fraction of code units zeroed; choose a value in [0, 1]"
        )
    stride = 2 ** len(m.widths)
    if m.arch == "conv" and (d.hw[0] % stride or d.hw[1] % stride):
        raise ConfigError(
            f"data.image_size={d.image_size} is not divisible by {stride} (model.widths has "
            f"{len(m.widths)} stride-2 stages); choose a multiple of {stride} or fewer model.widths"
        )


def _validate_combinations(cfg: Config) -> None:
    """Keys that are each valid but do not work together."""
    m, d, t = cfg.model, cfg.data, cfg.train
    if cfg.init is not None and m.name != "mae":
        raise ConfigError(
            f"init={cfg.init!r} loads MAE / ViT weights; it needs model.name=mae, not {m.name!r}"
        )
    if m.target == "teacher" and m.name != "mae":
        raise ConfigError(
            f"model.target=teacher distils a ViT's own features; model.name={m.name} has no "
            "teacher to follow: set model.target=pixels"
        )
    if m.target == "teacher" and m.name == "mae" and m.teacher_layers > m.depth:
        raise ConfigError(
            f"model.teacher_layers={m.teacher_layers} is more than the encoder's "
            f"{m.depth} blocks; choose at most {m.depth}"
        )
    if t.masks_per_image > 1 and m.name != "mae":
        raise ConfigError(
            f"train.masks_per_image={t.masks_per_image} masks the patches of a ViT; "
            f"model.name={m.name} sees whole images: set train.masks_per_image=1"
        )
    if t.compile and m.name in ("vae", "stacked_ae"):
        raise ConfigError(
            f"train.compile=true does not work with model.name={m.name}: its forward follows the "
            "training step (KL warm-up, greedy stages), which torch.compile would recompile for at "
            "every step; set train.compile=false"
        )
    if d.on_device and d.streaming:
        raise ConfigError(
            "data.on_device=true holds the whole split on the device and data.streaming=true "
            "never holds it; choose one of them"
        )
    if d.decoder != "pillow" and (d.on_device or d.streaming):
        raise ConfigError(
            f"data.decoder={d.decoder} is for the loaded split; data.on_device and "
            "data.streaming decode as usual: set data.decoder=pillow, or data.on_device=false "
            "and data.streaming=false"
        )
    if t.online_probe and m.name == "stacked_ae":
        raise ConfigError(
            "train.online_probe=true does not work with model.name=stacked_ae (its greedy stages "
            "compute no code of the whole stack); set train.online_probe=false"
        )
    if d.decoder != "pillow" and d.augment != "crop":
        raise ConfigError(
            f"data.decoder={d.decoder} decodes the crops of data.augment=crop; with "
            f"data.augment={d.augment} use data.decoder=pillow"
        )


# ---------------------------------------------------------------------------------------------
# derived quantities


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
    return derive_schedule(cfg.train, dataset_size, num_processes)


def warmup_steps(t: TrainingSettings, per_epoch: int, total: int, capped: bool = True) -> int:
    """The warm-up of a run of ``total`` steps: ``warmup_epochs`` of them, at most
    ``warmup_cap`` of the run (unless not ``capped``: what the epochs alone ask), and at least one
    step of the cosine after it."""
    asked = round(t.warmup_epochs * per_epoch)
    return min(asked, int(t.warmup_cap * total) if capped else asked, total - 1)


def derive_schedule(t: TrainingSettings, dataset_size: int, num_processes: int) -> Derived:
    """Batch, lr and step counts of a training section (its keys named in errors)."""
    effective = t.batch_size * t.accum_steps * num_processes
    per_epoch = dataset_size // effective
    if per_epoch == 0:
        batch, accum = t.key("batch_size"), t.key("accum_steps")
        raise ConfigError(
            f"the dataset has {dataset_size} images, fewer than one optimizer step needs "
            f"({effective} = {batch} x {accum} x processes); lower {batch} or {accum}"
        )
    total = t.max_steps if t.max_steps is not None else t.epochs * per_epoch
    warmup = warmup_steps(t, per_epoch, total)
    lr = t.blr * effective / 256
    if t.min_lr > lr:
        raise ConfigError(
            f"{t.key('min_lr')}={t.min_lr:g} is above the peak lr {lr:g} "
            f"(blr x {effective} / 256); lower it"
        )
    return Derived(num_processes, dataset_size, effective, lr, per_epoch, total, warmup)


def from_dict(raw: dict[str, Any]) -> Config:
    """Inverse of ``to_dict`` for a resolved config (e.g. a run directory's config.yaml)."""
    return resolve(build(Config, raw))
