"""Images from a dataset's rows: columns, decoding, skipping bad images, transforms, the epoch
order.

Augmentation is a pure function of (seed, epoch, index): each sample's crop and flip are
drawn from its own seeded RNG, so data order and augmentations are identical whatever the
number of workers or processes, and a resumed run sees exactly what an uninterrupted one
would have.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, get_worker_info
from torchvision.transforms import v2

from mae.config import Columns, DataConfig
from mae.data.arrays import ArrayError, to_tensor
from mae.data.bad_images import error_text, log_bad_image
from mae.data.draft import DraftResizedCrop, open_jpeg, takes_undecoded
from mae.data.loading import DataError, image_column, label_column

MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # data.channels -> the Pillow mode images are converted to
# what Pillow raises
DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
)


class ImageColumns:
    """Which columns of a dataset (map-style or stream) hold the images and labels; whether the
    images are arrays (``mae.data.arrays``) or Pillow images, and the mode these are converted to.
    ``undecoded``: JPEGs are only opened (``mae.data.draft``), from a column cast to
    ``datasets.Image(decode=False)``."""

    def __init__(
        self,
        ds: datasets.Dataset | datasets.IterableDataset,
        columns: Columns,
        undecoded: bool = False,
    ) -> None:
        self.image = image_column(ds, columns.image)
        self.label = label_column(ds, columns.label)
        self.arrays = not isinstance(ds.features[self.image], datasets.Image)
        self.undecoded = undecoded and not self.arrays
        self.channels = columns.channels
        self.mode = MODES.get(columns.channels)
        if self.mode is None and not self.arrays:
            raise DataError(
                f"data.channels={columns.channels} is not supported for images; choose one of "
                f"{sorted(MODES)} (arrays take any count: mae.data.arrays)"
            )

    def decode(self, row: dict[str, Any], where: str) -> Image.Image | torch.Tensor:
        """The row's image: in ``data.channels``' Pillow mode, or an array's float32 (C, H, W)
        tensor."""
        value = row[self.image]
        if self.undecoded:
            return open_jpeg(value) or to_mode(datasets.Image().decode_example(value), self.mode)
        if not self.arrays:
            return to_mode(value, self.mode)
        return to_tensor(
            value, self.channels, f"{where} ({value})" if isinstance(value, str) else where
        )

    def select(self, ds: Any) -> Any:
        """``ds`` with only the image and label columns (the images undecoded where
        ``undecoded``)."""
        ds = ds.select_columns([c for c in (self.image, self.label) if c is not None])
        return ds.cast_column(self.image, datasets.Image(decode=False)) if self.undecoded else ds

    def label_of(self, row: dict[str, Any]) -> int:
        return row[self.label] if self.label is not None else -1


def timm_data_config(
    channels: int,
    size: tuple[int, int],
    mean: tuple[float, ...] | list[float],
    std: tuple[float, ...] | list[float],
) -> dict[str, Any]:
    """Preprocessing of images of ``size`` (H, W) in timm's terms: what an export records and
    evaluation feeds the encoder."""
    return {
        "input_size": (channels, *size),
        "mean": tuple(mean),
        "std": tuple(std),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
    }


def augment_transform(cfg: DataConfig) -> v2.Compose:
    """The training transform of ``data.augment``: crop, the MAE paper's
    (RandomResizedCrop(scale, bicubic), horizontal flip); flip, the evaluation transform's resize
    with a horizontal flip; none, the evaluation transform. Then normalisation. (Unset: crop.)"""
    if (cfg.augment or "crop") != "crop":
        steps = eval_transform(cfg).transforms
        return v2.Compose([v2.RandomHorizontalFlip(), *steps] if cfg.augment == "flip" else steps)
    # the same crops, JPEGs decoded at a reduced scale where they allow
    draft = None
    if cfg.decoder == "pillow_draft":
        draft = DraftResizedCrop(list(cfg.hw), cfg.crop_scale, MODES.get(cfg.channels, "RGB"))
    return crop_transform(cfg.hw, cfg.crop_scale, cfg.mean, cfg.std, cfg.hflip, draft)


def crop_transform(
    size: tuple[int, int],
    scale: tuple[float, float],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    hflip: bool = True,
    crop: v2.Transform | None = None,
) -> v2.Compose:
    """RandomResizedCrop(``scale``, bicubic) to ``size`` (H, W) (or ``crop``, which draws the same
    boxes), a horizontal flip half the time, then normalisation."""
    if crop is None:
        crop = v2.RandomResizedCrop(
            list(size), scale=scale, interpolation=v2.InterpolationMode.BICUBIC
        )
    return v2.Compose(
        [
            crop,
            v2.RandomHorizontalFlip() if hflip else v2.Identity(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def eval_transform(cfg: DataConfig) -> v2.Compose:
    """Deterministic: resize to cover ``data.image_size`` keeping the aspect ratio (a square: the
    short side to its size), centre crop, normalise."""
    h, w = cfg.hw
    bicubic = v2.InterpolationMode.BICUBIC
    return v2.Compose(
        [
            v2.Resize(h, interpolation=bicubic) if h == w else CoverResize((h, w), bicubic),
            v2.CenterCrop([h, w]),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(cfg.mean, cfg.std),
        ]
    )


class CoverResize(v2.Transform):
    """Resize to the smallest size that covers ``size`` (H, W) with the image's own aspect ratio, so
    that a centre crop of ``size`` follows (torchvision's Resize takes one side or an exact
    size)."""

    def __init__(self, size: tuple[int, int], interpolation: v2.InterpolationMode) -> None:
        super().__init__()
        self.size, self.interpolation = size, interpolation

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        height, width = v2.functional.get_size(inpt)
        scale = max(self.size[0] / height, self.size[1] / width)
        out = [max(self.size[0], round(height * scale)), max(self.size[1], round(width * scale))]
        return v2.functional.resize(inpt, out, interpolation=self.interpolation, antialias=True)


@contextlib.contextmanager
def sample_rng(seed: int) -> Iterator[None]:
    """Seed the global generators transforms draw from (torch: torchvision; Python and NumPy: timm's
    RandAugment, random erasing, crops) for one sample. Outside DataLoader workers every stream is
    put back afterwards (the caller's own draws, e.g. mixup, must not depend on the data); inside
    them nothing else reads the state, so saving it (~0.1 ms) is skipped."""
    in_worker = get_worker_info() is not None
    saved = None if in_worker else (random.getstate(), np.random.get_state())
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed & 0xFFFF_FFFF)
        try:
            yield
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])


def sample_seed(*parts: int) -> int:
    """The seed of one sample's draws in the loaders that decode on the CPU, from the integers that
    name it (run seed, epoch, index; a stream's rank, worker and read count). Python's hash of a
    tuple of ints is the same in every process and run (hash salting only touches str and bytes).
    ``mae.data.on_device`` draws on the device instead, from SplitMix64 streams of the same
    integers."""
    return hash(tuple(int(p) for p in parts))


def seeded_sample(
    transform: Any, image: Image.Image, seed: int, noise_length: int | None
) -> tuple[Any, Any]:
    """``transform(image)`` and MAE's masking noise ``(noise_length,)`` uniform in [0, 1) (None
    without a length), both drawn from the sample's own RNG: the same whatever the processes and
    workers."""
    with sample_rng(seed & 0x7FFF_FFFF_FFFF_FFFF):
        x = transform(image)
        noise = torch.rand(noise_length) if noise_length else None
    return x, noise


# the label of an item whose own image could not be decoded, where the reader drops such images
# (``ImageDataset(drop_bad=True)``): the item holds the next decodable image, which is not to be
# counted (-1 stays "the split has no labels")
DROPPED = -2


class ImageRows:
    """The rows of a map-style split with their images decoded in ``data.channels``' mode.

    An image that cannot be decoded (corrupt, truncated, empty, not an image, over Pillow's
    decompression-bomb limit) raises ``DataError`` naming it; with ``bad_log`` set it is skipped
    instead (``decodable`` gives the next decodable row) and recorded once in ``bad_log``
    (``mae.data.bad_images``): by its file where it is one, else as a row of ``name``, so that two
    splits recorded in one log keep their rows apart. ``undecoded``: JPEGs are only opened
    (``ImageColumns``)."""

    def __init__(
        self,
        ds: datasets.Dataset,
        columns: Columns,
        bad_log: Path | None = None,
        undecoded: bool = False,
        name: str = "the dataset",
    ) -> None:
        self.columns = ImageColumns(ds, columns, undecoded)
        self.ds = self.columns.select(ds)
        self.bad_log, self.name = bad_log, name

    def __len__(self) -> int:
        return len(self.ds)

    def decodable(
        self, i: int, finish: Callable[[Any], Any] | None = None
    ) -> tuple[dict[str, Any], Any]:
        """Row ``i`` and its image (passed through ``finish``, whose decoding errors count as the
        image's); past an undecodable one, the next decodable row."""
        _, row, image = self.first_decodable(i, finish)
        return row, image

    def first_decodable(
        self, i: int, finish: Callable[[Any], Any] | None = None
    ) -> tuple[int, dict[str, Any], Any]:
        """``decodable``, with the index of the row it gives (``i`` unless that was skipped)."""
        for attempt in range(min(len(self.ds), 1000)):
            j = (i + attempt) % len(self.ds)
            try:
                row = self.ds[j]
                image = self.columns.decode(row, f"image {j} of {self.name}")
                return j, row, image if finish is None else finish(image)
            # a wrong array is the data's mistake, not a damaged file: not skipped
            except ArrayError:
                raise
            except DECODE_ERRORS as e:
                self._skip(j, e)
        raise DataError(
            f"no decodable image among 1000 rows from row {i} of {self.name}; check the data"
        )

    def _skip(self, j: int, error: Exception) -> None:
        """Record row ``j``'s image in ``bad_log``, or raise an error naming it."""
        raw = self._raw(j)
        # an image read from a file is named by it; embedded bytes only by their row
        file = raw.get("path") if not raw.get("bytes") else None
        where = file or f"image {j} of {self.name} ({raw.get('path') or 'embedded bytes'})"
        if self.bad_log is None:
            raise DataError(
                f"{where} cannot be decoded ({error_text(error)}); remove or replace it"
            ) from error
        log_bad_image(self.bad_log, file or f"row {j} of {self.name}", where, error_text(error))

    def _raw(self, j: int) -> dict[str, Any]:
        """Row ``j``'s image undecoded (``path``, ``bytes``), as far as the dataset knows them."""
        try:
            raw = self.ds.cast_column(self.columns.image, datasets.Image(decode=False))[j][
                self.columns.image
            ]
        except Exception:  # noqa: BLE001 - only to name the image
            return {}
        return {"path": raw} if isinstance(raw, str) else dict(raw or {})


class ImageDataset(Dataset):
    """Images (and labels when the dataset has them) with a per-sample seeded transform.

    Indices are ``(epoch, i)`` pairs (see ``EpochSampler``) or plain ints (epoch 0).
    Items are ``(image (C, H, W) float, label int or -1)``, plus ``noise (noise_length,)`` when
    ``noise_length`` is given (``seeded_sample``). Undecodable images: see ``ImageRows``. 16-bit and
    32-bit grayscale images are scaled to 8 bits; every mode is converted to ``data.channels``. A
    transform that starts with ``DraftResizedCrop`` gets JPEGs opened, not decoded, and decodes
    them.

    A skipped image is replaced by the next decodable row with that row's own label, so that no
    label is ever paired with another image: what training wants (batches keep their size, the
    schedule its steps). What is measured (features for the probes, evaluation accuracy,
    ``mae.evaluate``) must not count one image twice, so there ``drop_bad`` labels the replacement
    ``DROPPED`` and the reader leaves it out. A label, not a shorter batch: batches keep their size,
    so an evaluation gathered across processes (Accelerate pads and trims by count) stays exact.
    """

    def __init__(
        self,
        ds: datasets.Dataset,
        columns: Columns,
        transform: v2.Compose,
        seed: int = 0,
        noise_length: int | None = None,
        bad_log: Path | None = None,
        drop_bad: bool = False,
        name: str = "the dataset",
    ) -> None:
        undecoded = takes_undecoded(transform)
        self.rows = ImageRows(ds, columns, bad_log, undecoded=undecoded, name=name)
        self.transform, self.seed, self.noise_length = transform, seed, noise_length
        self.drop_bad = drop_bad

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Any, ...]:
        epoch, i = index if isinstance(index, tuple) else (0, index)
        seed = sample_seed(self.seed, epoch, i)

        def sample(image: Any) -> tuple[Any, Any]:
            return seeded_sample(self.transform, image, seed, self.noise_length)

        if self.rows.columns.undecoded:  # the transform decodes: its errors are the image's
            j, row, (x, noise) = self.rows.first_decodable(i, sample)
        else:
            j, row, image = self.rows.first_decodable(i)
            x, noise = sample(image)
        label = DROPPED if self.drop_bad and j != i else self.rows.columns.label_of(row)
        return (x, label) if noise is None else (x, label, noise)


def kept(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of a ``drop_bad`` dataset without its ``DROPPED`` items."""
    keep = labels != DROPPED
    return images[keep], labels[keep]


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` in ``mode`` (L, RGB, RGBA). 16/32-bit integer and float grayscale are scaled to 8
    bits first (Pillow's own conversion would clip them to white)."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        a = np.asarray(image, dtype=np.float64)
        peak = float(a.max(initial=0))
        if image.mode == "F":  # floats: [0, 1] as they are, anything larger by its maximum
            top = 1.0 if peak <= 1 else peak
        else:  # integers: the 16-bit range, unless values go beyond it
            top = 65535.0 if peak <= 65535 else peak
        image = Image.fromarray((np.clip(a / top, 0, 1) * 255).round().astype(np.uint8), mode="L")
    return image if image.mode == mode else image.convert(mode)


class EpochSampler(Sampler):
    """Seeded per-epoch permutation, yielding ``(epoch, index)`` and cut to ``num_samples``.

    ``num_samples`` is a whole number of global optimizer steps, so every process sees the same
    number of full micro-batches and gradient accumulation never ends on a partial step.
    Accelerate splits the resulting batches across processes.
    """

    def __init__(self, length: int, num_samples: int, seed: int) -> None:
        self.length, self.num_samples, self.seed, self.epoch = length, num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.length, generator=g)[: self.num_samples].tolist()
        return iter((self.epoch, i) for i in order)
