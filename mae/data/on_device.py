"""Small datasets decoded once into one uint8 tensor on the training device, and augmented there.

``data.on_device=true`` is for CIFAR-scale data: every image the same size, at most
``data.image_size`` (so that every crop is resized up, which needs no antialiasing).
The training split is decoded once at start (CIFAR-10's 50,000 images: 150 MB as uint8) and moved
to the training device. The loader then carries only each batch's ``(epoch, index)`` keys, with no
worker processes. The paper's augmentation runs on the device for the whole batch in one resampling
(``grid_sample``, bicubic):
- the random resized crop, with ``RandomResizedCrop``'s own sampling of area, aspect ratio and
  position (10 tries, then the centre crop);
- the horizontal flip;
- normalisation.
MAE's masking noise is drawn on the device too.

Every random number of a sample comes from a counter-based hash of ``(seed, epoch, index)``.
So, as with the worker loader, a sample's crop, flip and mask are the same whatever the number of
processes, and a resumed run draws exactly what an uninterrupted one would. They are not the worker
loader's numbers, though: the two paths draw the same distributions from different generators.
The resampling also differs a little from Pillow's (mean absolute difference ~1.3 of 255 levels on
a smooth image, tests/test_device_data.py): the bicubic kernel is a = -0.75 and the crop's
neighbours are read at its edges. A downscale would not be antialiased (a 2x one differs from
Pillow's by ~25 levels on fine texture), so images larger than ``data.image_size`` are refused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader

from mae.config import DataConfig, Derived
from mae.data.base import Batch
from mae.data.images import EpochSampler, ImageRows
from mae.data.loaded import LoadedSource
from mae.data.loading import DataError

# SplitMix64 (Steele, Lea and Flood 2014) constants as signed 64-bit integers; torch's int64
# arithmetic wraps around like the unsigned original
_GAMMA = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params
RATIO = (3 / 4, 4 / 3)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (``>>`` on int64 keeps the sign)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output for state ``x`` (int64 tensor, elementwise)."""
    x = x + _GAMMA
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def uniforms(seed: int, keys: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) float32 uniform in [0, 1) for ``keys`` (B, 2) int64 ``(epoch, index)`` pairs: the
    first ``count`` outputs of a SplitMix64 stream whose state starts at a hash of
    ``(seed, epoch, index)``."""
    state = splitmix64(splitmix64(torch.full_like(keys[:, 0], seed)) ^ keys[:, 0])
    state = splitmix64(state ^ keys[:, 1])
    counter = torch.arange(count, device=keys.device, dtype=torch.int64)
    bits = splitmix64(state[:, None] + counter * _GAMMA)
    return _shr(bits, 40).float() / float(1 << 24)  # the top 24 bits: exact in float32


def centre_crop(height: int, width: int) -> tuple[int, int, int, int]:
    """``RandomResizedCrop``'s fallback: the centre crop clamped to an aspect ratio in
    [3/4, 4/3]."""
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        cw, ch = width, round(width / RATIO[0])
    elif in_ratio > RATIO[1]:
        cw, ch = round(height * RATIO[1]), height
    else:
        cw, ch = width, height
    return (height - ch) // 2, (width - cw) // 2, ch, cw


def crop_boxes(
    u: torch.Tensor,
    height: int,
    width: int,
    scale: tuple[float, float],
    centre: torch.Tensor | None = None,
) -> torch.Tensor:
    """``RandomResizedCrop.get_params`` for a batch: (B, 4) float ``(top, left, h, w)`` from ``u``
    (B, 4 x CROP_TRIES) uniforms. Each try draws an area fraction in ``scale`` and a log-uniform
    aspect ratio in [3/4, 4/3]; the first try that fits is taken, at a uniform integer position;
    when none fits, the centre crop clamped to that ratio (``centre``: that box, made once by the
    caller)."""
    area_u, ratio_u, top_u, left_u = u.view(len(u), 4, CROP_TRIES).unbind(1)
    area = height * width * (scale[0] + area_u * (scale[1] - scale[0]))
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = torch.exp(log_lo + ratio_u * (log_hi - log_lo))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    top = torch.floor(top_u * (height - h + 1))
    left = torch.floor(left_u * (width - w + 1))
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # index of the first try that fits
    box = torch.stack([t.gather(1, first)[:, 0] for t in (top, left, h, w)], 1)
    if centre is None:
        centre = torch.tensor(centre_crop(height, width), dtype=box.dtype, device=box.device)
    return torch.where(fits.any(1, keepdim=True), box, centre)


def resized_crops(
    images: torch.Tensor,
    boxes: torch.Tensor,
    flip: torch.Tensor,
    size: tuple[int, int],
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """(B, C, H, W) float for ``size`` (H, W): each uint8 image's box (top, left, h, w), flipped
    where ``flip``, resampled bicubically and normalised, in one ``grid_sample``."""
    b, c, height, width = images.shape
    top, left, h, w = boxes.unbind(1)
    # output x in [-1, 1] -> input x, mirrored for a flip
    sx = torch.where(flip, -w / width, w / width)
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, (2 * left + w) / width - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / height, (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [b, c, *size], align_corners=False)
    x = F.grid_sample(
        images.float(), grid, mode="bicubic", padding_mode="border", align_corners=False
    )
    x = x.clamp_(0, 255).div_(255)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


class DecodedImages:
    """The split decoded into ``images`` (N, C, H, W) uint8 and ``labels`` (N,) int64 (-1 without
    labels), in CPU memory. An undecodable image is replaced by the next decodable one (logged to
    ``bad_log``), as in ``ImageDataset``. Items are batches of keys: ``__getitems__`` gives one
    ``((B, 2) int64 (epoch, index), (B,) labels)`` pair (collated by ``first``). A split of more
    than ``max_bytes`` decoded is refused before it is decoded."""

    def __init__(
        self,
        ds: datasets.Dataset,
        cfg: DataConfig,
        bad_log: Path | None = None,
        max_bytes: int = 16 << 30,
    ) -> None:
        self.rows = ImageRows(ds, cfg.columns, bad_log)
        if self.rows.columns.arrays:
            raise DataError(
                "data.on_device=true holds 8-bit images; this dataset is arrays: set "
                "data.on_device=false"
            )
        tic = time.perf_counter()
        arrays, labels, shape = [], [], None
        for i in range(len(self.rows)):
            row, image = self.rows.decodable(i)
            a = np.asarray(image)
            a = a[:, :, None] if a.ndim == 2 else a
            if shape is None:
                shape = a.shape
                _check_fits(shape, len(self.rows) * a.nbytes, cfg, max_bytes)
            elif a.shape != shape:
                raise DataError(
                    f"data.on_device=true needs every image the same size; image {i} is "
                    f"{a.shape[1]}x{a.shape[0]}, the first {shape[1]}x{shape[0]}: set "
                    "data.on_device=false"
                )
            arrays.append(a)
            labels.append(self.rows.columns.label_of(row))
        self.images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.tensor([-1 if x is None else x for x in labels], dtype=torch.int64)
        self.decode_s = time.perf_counter() - tic

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Any, ...]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        keys = torch.tensor(
            [i if isinstance(i, tuple) else (0, i) for i in indices], dtype=torch.int64
        )
        return [(keys, self.labels[keys[:, 1]])]


def _check_fits(shape: tuple[int, ...], total: int, cfg: DataConfig, max_bytes: int) -> None:
    if shape[0] > cfg.hw[0] or shape[1] > cfg.hw[1]:
        raise DataError(
            f"data.on_device=true is for images stored at most data.image_size={cfg.image_size} "
            f"(height, width; it does not antialias a downscale); these are {shape[0]}x{shape[1]}: "
            "set data.on_device=false, or data.image_size to at least their size"
        )
    if total > max_bytes:
        raise DataError(
            f"data.on_device=true would hold {total / 2**30:.1f} GiB of decoded images (limit "
            f"{max_bytes / 2**30:.0f} GiB); it is meant for CIFAR-scale data: set "
            "data.on_device=false"
        )


def first(batch: list[Any]) -> Any:
    """Collate for ``DecodedImages``: its ``__getitems__`` already returns the whole batch."""
    return batch[0]


def key_loader(ds: DecodedImages, sampler: EpochSampler, batch_size: int) -> DataLoader:
    """Batches of keys in the worker loader's order (same sampler); no workers, nothing to
    decode."""
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=0,
        drop_last=True,
        collate_fn=first,
        generator=torch.Generator().manual_seed(0),
    )


class DeviceAugment:
    """The decoded split on ``device`` and the pretraining transform applied there, batch by
    batch."""

    def __init__(
        self,
        data: DecodedImages,
        cfg: DataConfig,
        seed: int,
        noise_length: int | None,
        device: torch.device,
    ) -> None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if data.images.numel() > free // 2:
                raise DataError(
                    f"data.on_device=true: the decoded split ({data.images.numel() / 2**30:.2f} "
                    f"GiB) would take more than half of the GPU's free memory ({free / 2**30:.1f} "
                    "GiB); set data.on_device=false"
                )
        self.images = data.images.to(device)
        # the loader keeps only the labels; no second copy in CPU memory
        if self.images is not data.images:
            data.images = data.images[:0]
        _, _, height, width = self.images.shape
        self.centre = torch.tensor(centre_crop(height, width), dtype=torch.float32, device=device)
        self.cfg, self.seed, self.noise_length = cfg, seed, noise_length
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(cfg.std, dtype=torch.float32, device=device)

    def __call__(self, keys: torch.Tensor, labels: torch.Tensor) -> Batch:
        """(images, labels) or, with noise, (images, labels, noise) for a batch of keys."""
        keys = keys.to(self.images.device)
        n = 4 * CROP_TRIES
        u = uniforms(self.seed, keys, n + 1 + (self.noise_length or 0))
        _, _, height, width = self.images.shape
        augment = self.cfg.augment or "crop"
        if augment == "crop":
            boxes = crop_boxes(u[:, :n], height, width, self.cfg.crop_scale, self.centre)
        else:
            # the whole image (stored at most data.image_size: resized up, as the evaluation
            # transform does)
            boxes = torch.tensor([[0.0, 0.0, height, width]], device=keys.device).expand(
                len(keys), 4
            )
        flips = augment == "flip" or (augment == "crop" and self.cfg.hflip)
        flip = (
            u[:, n] < 0.5 if flips else torch.zeros(len(keys), dtype=torch.bool, device=keys.device)
        )
        x = resized_crops(self.images[keys[:, 1]], boxes, flip, self.cfg.hw, self.mean, self.std)
        labels = labels.to(self.images.device)
        noise = None if self.noise_length is None else u[:, n + 1 :].contiguous()
        return Batch(x, labels, noise)

    def batches(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[Batch]:
        for keys, labels in batches:
            yield self(keys, labels)


class DeviceSource(LoadedSource):
    """``data.on_device``: the loader carries keys in ``LoadedSource``'s order; ``DeviceAugment``
    turns them into images on the training device."""

    def __init__(
        self,
        data: DecodedImages,
        cfg: DataConfig,
        batch_size: int,
        accum_steps: int,
        seed: int,
        noise_length: int | None,
    ) -> None:
        # its items are keys: nothing for workers
        super().__init__(data, 0, batch_size, accum_steps, seed, max_bad_images=cfg.max_bad_images)
        self.cfg, self.noise_length = cfg, noise_length
        self.augment: DeviceAugment | None = None  # on the training device, known at ``attach``

    def loader(self, sampler: EpochSampler) -> DataLoader:
        return key_loader(self.dataset, sampler, self.batch_size)

    def attach(self, accelerator: Accelerator, derived: Derived, loader: Any) -> None:
        super().attach(accelerator, derived, loader)
        self.augment = DeviceAugment(
            self.dataset, self.cfg, self.seed, self.noise_length, accelerator.device
        )

    def batches(self, step: int) -> Iterator[Batch]:
        return self.augment.batches(self.loaded(step))

    def describe(self) -> str:
        images = self.augment.images
        return (
            f"data on {images.device}: {tuple(images.shape)} uint8 ({images.numel() / 2**20:.0f} "
            f"MiB), decoded in {self.dataset.decode_s:.1f} s; augmented there, no loader workers "
            "(data.num_workers is not used)"
        )
