"""``data.mean=auto``: per-channel statistics measured on a sample of the training split, and the
check that arrays are fit to train on before anything is written.

The sample is up to ``SAMPLE`` images spread evenly over the split (a stream: its first ones), read
at their own size with no augmentation, in the units ``data.mean`` has (pixels / 255; arrays scaled
as ``mae.data.arrays`` says). The same split gives the same numbers, so a resumed run measures what
it recorded. Arrays are checked on the same sample (channel count, finite values): a wrong one stops
the run before its directory is written; one outside the sample stops it when it is read.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torchvision.transforms import v2

from mae.config import ConfigError, DataConfig
from mae.data.images import ImageColumns, ImageRows

SAMPLE = 1000


def _pixels(image: Any) -> torch.Tensor:
    """(C, H, W) float64 in ``data.mean``'s units."""
    if isinstance(image, torch.Tensor):
        return image.double()
    return v2.functional.to_dtype(v2.functional.to_image(image), torch.float32, scale=True).double()


def _sample(split: Any, d: DataConfig, bad_log: Path | None) -> Iterator[torch.Tensor]:
    """The sample's pixels, one image at a time (a thousand large images would not fit in memory at
    once)."""
    if not isinstance(split, datasets.Dataset):  # a stream: its first images
        columns = ImageColumns(split, d.columns)
        rows = itertools.islice(iter(columns.select(split)), SAMPLE)
        yield from (
            _pixels(columns.decode(r, f"example {k} of the stream")) for k, r in enumerate(rows)
        )
        return
    rows = ImageRows(split, d.columns, bad_log)
    picks = np.unique(np.linspace(0, len(rows) - 1, min(len(rows), SAMPLE)).round().astype(int))
    yield from (_pixels(rows.decodable(int(i))[1]) for i in picks)


def measure(images: Iterable[torch.Tensor]) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """Per-channel mean and standard deviation over every pixel of ``images`` (any sizes), and the
    image count."""
    total = squares = 0
    count = n = 0
    for x in images:
        total = total + x.sum(dim=(1, 2))
        squares = squares + (x * x).sum(dim=(1, 2))
        count, n = count + x.shape[1] * x.shape[2], n + 1
    mean = total / count
    std = (squares / count - mean * mean).clamp(min=0).sqrt()
    flat = [int(c) for c in torch.nonzero(std < 1e-8).flatten()]
    if flat:
        raise ConfigError(
            f"data.mean=auto: channel(s) {flat} hold one value across the {n} images sampled, so "
            "they cannot be normalised; give data.mean and data.std yourself, or drop those "
            "channels"
        )
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std), n


def survey(
    split: Any, d: DataConfig, bad_log: Path | None = None
) -> tuple[DataConfig, dict[str, Any] | None]:
    """``d`` with ``data.mean=auto`` replaced by the statistics measured on ``split`` (map-style or
    a stream), and their record for ``derived.json`` (None when nothing was measured). A split of
    arrays is checked on the sample either way."""
    if d.mean != "auto" and not ImageColumns(split, d.columns).arrays:
        return d, None
    images = _sample(split, d, bad_log)
    if d.mean != "auto":
        for _ in images:  # decoding checks each array
            pass
        return d, None
    mean, std, n = measure(images)
    record = {"mean": list(mean), "std": list(std), "images": n, "split": d.split}
    return dataclasses.replace(d, mean=mean, std=std), record
