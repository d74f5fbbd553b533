"""Which ``DataSource`` a pretraining run reads, chosen once from the config."""

from __future__ import annotations

from pathlib import Path

from mae.config import Config
from mae.data.base import DataSource
from mae.data.images import ImageDataset, augment_transform
from mae.data.loaded import LoadedSource
from mae.data.loading import load_split, load_stream, stream_size
from mae.data.on_device import DecodedImages, DeviceSource
from mae.data.streamed import ImageStream, StreamSource


def build_source(cfg: Config, rank: int, num_processes: int, bad_log: Path, noise_length: int | None) -> DataSource:
    """The training split of ``cfg.data``: streamed (``data.streaming``), decoded once onto the device
    (``data.on_device``), or loaded and decoded by loader workers. ``noise_length``: MAE's masking noise
    per sample (None: no noise)."""
    d, t = cfg.data, cfg.train
    if d.streaming:
        stream = load_stream(d)
        items = ImageStream(stream, d, augment_transform(d), t.seed, rank, num_processes, noise_length, bad_log)
        return StreamSource(stream, stream_size(stream, d, d.split), d, items, t.batch_size)
    split = load_split(d)
    if d.on_device:  # decoded once; augmented on the device
        return DeviceSource(DecodedImages(split, d, bad_log), d, t.batch_size, t.accum_steps, t.seed, noise_length)
    dataset = ImageDataset(split, d, augment_transform(d), t.seed, noise_length, bad_log)
    return LoadedSource(dataset, d.num_workers, t.batch_size, t.accum_steps, t.seed)
