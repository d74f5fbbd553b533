"""Which ``DataSource`` a pretraining run reads, chosen once from the config."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mae.config import Config, DataConfig
from mae.data.base import DataSource
from mae.data.dali import DaliSource
from mae.data.images import ImageDataset, augment_transform
from mae.data.loaded import LoadedSource, split_normalisation
from mae.data.loading import load_split, load_stream, stream_size
from mae.data.on_device import DecodedImages, DeviceSource
from mae.data.stats import survey
from mae.data.streamed import ImageStream, StreamSource


@dataclass(frozen=True)
class TrainingData:
    """What a pretraining run reads: its source, and the data config as it was resolved from the
    data (``data.mean=auto`` measured), with what was measured (None: nothing)."""

    source: DataSource
    config: DataConfig
    stats: dict[str, Any] | None


def build_source(
    cfg: Config,
    rank: int,
    num_processes: int,
    bad_log: Path,
    noise_length: int | None,
    loading: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> TrainingData:
    """The training split of ``cfg.data``: streamed (``data.streaming``), decoded by DALI
    (``data.decoder=dali``), decoded once onto the device (``data.on_device``), or loaded and
    decoded by loader workers. ``noise_length``: MAE's masking noise per sample (None: no noise).
    The returned config is ``cfg.data`` with ``data.mean=auto`` measured (``mae.data.stats``),
    the stats what was measured. The split is opened inside ``loading()`` (e.g.
    one process per machine first, so that it alone builds the datasets cache); decoding happens
    after it, in every process at once."""
    d, t = cfg.data, cfg.train
    with loading():
        split = load_stream(d) if d.streaming else load_split(d)
    d, stats = survey(split, d, bad_log)  # data.mean=auto measured; arrays checked on a sample
    if d.streaming:
        items = ImageStream(
            split, d, augment_transform(d), t.seed, rank, num_processes, noise_length, bad_log
        )
        source = StreamSource(split, stream_size(split, d, d.split), d, items, t.batch_size)
    elif d.decoder == "dali":  # decoded, cropped and normalised by DALI
        source = DaliSource(split, d, t.batch_size, t.accum_steps, t.seed, noise_length, bad_log)
    elif d.on_device:  # decoded once; augmented on the device
        source = DeviceSource(
            DecodedImages(split, d, bad_log), d, t.batch_size, t.accum_steps, t.seed, noise_length
        )
    else:
        transform, normalise = split_normalisation(augment_transform(d))  # workers hand over uint8
        dataset = ImageDataset(split, d.columns, transform, t.seed, noise_length, bad_log)
        source = LoadedSource(
            dataset, d.num_workers, t.batch_size, t.accum_steps, t.seed, normalise, d.max_bad_images
        )
    return TrainingData(source, d, stats)
