"""Datasets -> transforms -> DataLoader. Knows nothing about models.

``data.dataset`` is one of: ``sample`` (the class-balanced CIFAR-10 subset shipped in the
package), a local directory (an image folder with class subfolders, or parquet shards laid
out like a hub dataset repo; both read by ``datasets``), or a Hugging Face hub id.

Augmentation is a pure function of (seed, epoch, index): each sample's crop and flip are
drawn from its own seeded RNG, so data order and augmentations are identical whatever the
number of workers or processes, and a resumed run sees exactly what an uninterrupted one
would have.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torchvision.transforms import v2

from mae.config import DataConfig
from mae.errors import UserError
from mae.preemption import ignore_in_worker

SAMPLE_DIR = Path(__file__).parent / "assets" / "cifar10_sample"
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class DataError(UserError, ValueError):
    """A dataset that cannot be used as configured; the message says what to change."""


def load_split(cfg: DataConfig, split: str | None = None) -> datasets.Dataset:
    """Load one split of ``cfg.dataset`` as a map-style ``datasets.Dataset`` (only the images of
    ``cfg.classes`` when set)."""
    ds = pick_split(load_splits(cfg), cfg, split or cfg.split)
    return ds if cfg.classes is None else select_classes(ds, cfg)


def select_classes(ds: datasets.Dataset, cfg: DataConfig) -> datasets.Dataset:
    col = label_column(ds, cfg)
    if col is None:
        raise DataError("data.classes needs labels and the dataset has none; name them with data.label_column=NAME")
    keep = set(cfg.classes)
    ds = ds.filter(lambda labels: [y in keep for y in labels], input_columns=col, batched=True)
    if isinstance(ds, datasets.Dataset) and len(ds) == 0:  # a stream's size is not known before reading it
        raise DataError(f"data.classes={list(cfg.classes)} selects no image of {cfg.dataset!r}; give label ids it has")
    return ds


def load_splits(cfg: DataConfig, streaming: bool = False) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Every split of ``cfg.dataset`` (``streaming``: as ``datasets`` streams, nothing loaded)."""
    source = cfg.dataset
    try:
        if source == "sample":
            files = {s: str(SAMPLE_DIR / f"{s}-*.parquet") for s in ("train", "test")}
            dsd = datasets.load_dataset("parquet", data_files=files, streaming=streaming)
        elif Path(source).is_dir():
            dsd = datasets.load_dataset(str(Path(source).resolve()), streaming=streaming)
        elif Path(source).exists():
            raise DataError(f"data.dataset={source!r} is a file; give a directory, a hub id or 'sample'")
        else:
            dsd = datasets.load_dataset(source, streaming=streaming)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; all mean the same thing to a user
        raise DataError(
            f"data.dataset={source!r} could not be loaded ({type(e).__name__}: {e}); "
            "give a hub id, a local image folder / parquet directory, or 'sample'"
        ) from e
    return dsd


def pick_split(dsd: datasets.DatasetDict, cfg: DataConfig, split: str, key: str = "data.split") -> datasets.Dataset:
    """One non-empty split of ``dsd``; ``key`` names the setting that asked for it."""
    if split not in dsd:
        raise DataError(f"{key}={split!r} does not exist in {cfg.dataset!r}; available splits: {sorted(dsd)}")
    ds = dsd[split]
    if isinstance(ds, datasets.Dataset) and len(ds) == 0:  # a stream's size is not known before reading it
        raise DataError(f"split {split!r} of {cfg.dataset!r} is empty; point data.dataset at data with images")
    return ds


def _named_column(ds: datasets.Dataset, key: str, name: str, accepts: Any, what: str) -> str:
    if name not in ds.column_names:
        raise DataError(f"{key}={name!r} is not a column of the dataset; columns: {ds.column_names}")
    if not accepts(ds.features[name]):
        raise DataError(f"{key}={name!r} holds {ds.features[name]}, not {what}; name another column")
    return name


def image_column(ds: datasets.Dataset, cfg: DataConfig) -> str:
    """The column named by ``data.image_column`` (checked), else the first ``Image`` feature."""
    if cfg.image_column is not None:
        return _named_column(
            ds, "data.image_column", cfg.image_column, lambda f: isinstance(f, datasets.Image), "images"
        )
    col = next((name for name, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if col is None:
        raise DataError(
            f"the dataset has no Image feature (columns: {ds.column_names}); name the image column "
            "with data.image_column=NAME"
        )
    return col


def label_column(ds: datasets.Dataset, cfg: DataConfig) -> str | None:
    """The column named by ``data.label_column`` (checked), else the first ``ClassLabel``, else None."""
    if cfg.label_column is not None:
        return _named_column(ds, "data.label_column", cfg.label_column, _is_label, "integer class labels")
    return next((name for name, f in ds.features.items() if isinstance(f, datasets.ClassLabel)), None)


def _is_label(feature: Any) -> bool:
    return isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
    )


def timm_data_config(cfg: DataConfig) -> dict[str, Any]:
    """This preprocessing in timm's terms: what an export records and evaluation feeds the encoder."""
    return {
        "input_size": (cfg.channels, cfg.image_size, cfg.image_size),
        "mean": tuple(cfg.mean),
        "std": tuple(cfg.std),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
    }


def pretrain_transform(cfg: DataConfig) -> v2.Compose:
    """The paper's: RandomResizedCrop(scale, bicubic), horizontal flip, normalisation."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(cfg.image_size, scale=cfg.crop_scale, interpolation=v2.InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip() if cfg.hflip else v2.Identity(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(cfg.mean, cfg.std),
        ]
    )


def eval_transform(cfg: DataConfig) -> v2.Compose:
    """Deterministic: resize the short side, centre crop, normalise."""
    return v2.Compose(
        [
            v2.Resize(cfg.image_size, interpolation=v2.InterpolationMode.BICUBIC),
            v2.CenterCrop(cfg.image_size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(cfg.mean, cfg.std),
        ]
    )


@contextlib.contextmanager
def _sample_rng(seed: int) -> Iterator[None]:
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


class ImageDataset(Dataset):
    """Images (and labels when the dataset has them) with a per-sample seeded transform.

    Indices are ``(epoch, i)`` pairs (see ``EpochSampler``) or plain ints (epoch 0).
    Items are ``(image (C, H, W) float, label int or -1)``, plus ``noise (noise_length,)`` uniform in
    [0, 1) when ``noise_length`` is given: MAE's masking noise, drawn from the sample's own RNG after its
    transform, so a sample's mask, like its crop, is the same whatever the processes and workers.

    An image that cannot be decoded (corrupt, truncated, empty, not an image, over Pillow's
    decompression-bomb limit) raises ``DataError`` naming it; with ``bad_log`` set it is replaced by
    the next decodable image instead and recorded as one JSON line in ``bad_log`` (which
    ``count_bad_images`` reads). 16-bit and 32-bit grayscale images are scaled to 8 bits; every mode
    is converted to ``data.channels``.
    """

    def __init__(
        self,
        ds: datasets.Dataset,
        cfg: DataConfig,
        transform: v2.Compose,
        seed: int = 0,
        noise_length: int | None = None,
        bad_log: Path | None = None,
    ) -> None:
        self.image_col = image_column(ds, cfg)
        self.label_col = label_column(ds, cfg)
        self.ds = ds.select_columns([c for c in (self.image_col, self.label_col) if c is not None])
        self.mode = _MODES.get(cfg.channels)
        if self.mode is None:
            raise DataError(f"data.channels={cfg.channels} is not supported for images; choose one of {sorted(_MODES)}")
        self.transform, self.seed, self.noise_length, self.bad_log = transform, seed, noise_length, bad_log

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Any, ...]:
        epoch, i = index if isinstance(index, tuple) else (0, index)
        row, image = self._decodable(i)
        with _sample_rng(hash((self.seed, epoch, i)) & 0x7FFF_FFFF_FFFF_FFFF):
            x = self.transform(image)
            noise = torch.rand(self.noise_length) if self.noise_length else None
        label = row[self.label_col] if self.label_col is not None else -1
        return (x, label) if noise is None else (x, label, noise)

    def _decodable(self, i: int) -> tuple[dict[str, Any], Image.Image]:
        """Row ``i`` and its image in ``self.mode``; past an undecodable one, the next decodable row."""
        for attempt in range(min(len(self.ds), 1000)):
            j = (i + attempt) % len(self.ds)
            try:
                row = self.ds[j]
                return row, to_mode(row[self.image_col], self.mode)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # what Pillow raises
                where = self._source(j)
                if self.bad_log is None:
                    raise DataError(
                        f"image {j} of the dataset ({where}) cannot be decoded ({type(e).__name__}: {e}); remove or "
                        "replace it"
                    ) from e
                log_bad_image(self.bad_log, j, where, e)
        raise DataError(f"no decodable image among 1000 rows from row {i} of the dataset; check the data")

    def _source(self, j: int) -> str:
        """The file an image came from, when the dataset knows it."""
        try:
            raw = self.ds.cast_column(self.image_col, datasets.Image(decode=False))[j][self.image_col]
            return raw.get("path") or "embedded bytes"
        except Exception:  # noqa: BLE001 - only for the error message
            return "unknown source"


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` in ``mode`` (L, RGB, RGBA). 16/32-bit integer and float grayscale are scaled to 8 bits
    first (Pillow's own conversion would clip them to white)."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        a = np.asarray(image, dtype=np.float64)
        peak = float(a.max(initial=0))
        if image.mode == "F":  # floats: [0, 1] as they are, anything larger by its maximum
            top = 1.0 if peak <= 1 else peak
        else:  # integers: the 16-bit range, unless values go beyond it
            top = 65535.0 if peak <= 65535 else peak
        image = Image.fromarray((np.clip(a / top, 0, 1) * 255).round().astype(np.uint8), mode="L")
    return image if image.mode == mode else image.convert(mode)


def log_bad_image(bad_log: Path, key: int | str, where: str, error: Exception) -> None:
    """One JSON line in ``bad_log``; ``key`` identifies the image for ``count_bad_images``."""
    record = {"index": key, "source": where, "error": f"{type(error).__name__}: {error}"[:300]}
    bad_log.parent.mkdir(parents=True, exist_ok=True)
    with open(bad_log, "a") as f:  # one short append per line: whole lines from every worker
        f.write(json.dumps(record) + "\n")


def count_bad_images(bad_log: Path) -> int:
    """Distinct dataset rows recorded in ``bad_log`` (a row hit again after a resume counts once)."""
    if not bad_log.is_file():
        return 0
    rows = set()
    for line in bad_log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.add(json.loads(line)["index"])
    return len(rows)


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


def pretrain_loader(ds: ImageDataset, sampler: EpochSampler, cfg: DataConfig, batch_size: int) -> DataLoader:
    workers = cfg.num_workers
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=ignore_in_worker,  # a SIGTERM to the process group is the main process's to handle
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        # the loader's own generator, so creating an iterator never draws from the global RNG
        # (which drives masking and must continue identically after a resume)
        generator=torch.Generator().manual_seed(0),
    )
