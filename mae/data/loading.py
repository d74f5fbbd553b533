"""Datasets as ``datasets`` objects: which source, which split, which columns. Knows nothing about
models.

``data.dataset`` is one of: ``sample`` (the class-balanced CIFAR-10 subset shipped in the
package), a local directory (an image folder with class subfolders, or parquet shards laid
out like a hub dataset repo, both read by ``datasets``; or a folder of ``.npy`` arrays,
``mae.data.arrays``), or a Hugging Face hub id. A split is
loaded whole (map-style, ``load_split``) or opened as a stream (``load_stream``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from datasets import IterableDatasetDict

from mae.config import DataConfig
from mae.data.arrays import ArrayError, has_npy_files, is_array_feature, is_npy_column, npy_folder
from mae.errors import UserError

SAMPLE_DIR = Path(__file__).parent.parent / "assets" / "cifar10_sample"


class DataError(UserError, ValueError):
    """A dataset that cannot be used as configured; the message says what to change."""


def load_split(cfg: DataConfig, split: str | None = None) -> datasets.Dataset:
    """Load one split of ``cfg.dataset`` as a map-style ``datasets.Dataset`` (only the images of
    ``cfg.classes`` when set)."""
    ds = pick_split(load_splits(cfg.dataset), cfg.dataset, split or cfg.split)
    return ds if cfg.classes is None else select_classes(ds, cfg)


def load_stream(cfg: DataConfig, split: str | None = None) -> datasets.IterableDataset:
    """One split of ``cfg.dataset`` as a ``datasets`` stream (only ``cfg.classes`` when set)."""
    split = split or cfg.split
    ds = pick_split(load_splits(cfg.dataset, streaming=True), cfg.dataset, split)
    if ds.features is None:
        raise DataError(
            f"data.dataset={cfg.dataset!r} does not say its columns' types when streamed; use "
            "data.streaming=false or a dataset with features (parquet, image folders, most hub "
            "datasets)"
        )
    return ds if cfg.classes is None else select_classes(ds, cfg)


def stream_size(ds: datasets.IterableDataset, cfg: DataConfig, split: str) -> int:
    """Images in one epoch of a stream: ``data.stream_size``, else the dataset's own metadata."""
    if cfg.stream_size is not None:
        return cfg.stream_size
    known = ds.info.splits.get(split) if ds.info.splits and cfg.classes is None else None
    if known is None or not known.num_examples:
        raise DataError(
            f"data.streaming=true: {cfg.dataset!r} does not record how many images split {split!r} "
            "holds (needed for epochs, warm-up and the schedule); give it as data.stream_size=N"
        )
    return known.num_examples


def select_classes(ds: datasets.Dataset, cfg: DataConfig) -> datasets.Dataset:
    col = label_column(ds, cfg.label_column)
    if col is None:
        raise DataError(
            "data.classes needs labels and the dataset has none; name them with "
            "data.label_column=NAME"
        )
    keep = set(cfg.classes)
    ds = ds.filter(lambda labels: [y in keep for y in labels], input_columns=col, batched=True)
    # a stream's size is not known before reading it
    if isinstance(ds, datasets.Dataset) and len(ds) == 0:
        raise DataError(
            f"data.classes={list(cfg.classes)} selects no image of {cfg.dataset!r}; give label ids "
            "it has"
        )
    return ds


def _is_path(source: str) -> bool:
    """A name that can only be a path (a hub id is ``NAME`` or ``ORG/NAME``)."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1


@contextlib.contextmanager
def _quiet_local_load() -> Iterator[None]:
    """Loading a local folder: without datasets' "Downloading data" and "Generating split" bars
    (nothing is downloaded; a folder of images is indexed in seconds) and huggingface_hub's
    warning about a README.md without a metadata block (a folder's own notes, not a dataset
    card)."""
    bars = datasets.is_progress_bar_enabled()
    card = logging.getLogger("huggingface_hub.repocard")
    level = card.level
    datasets.disable_progress_bars()
    card.setLevel(logging.ERROR)
    try:
        yield
    finally:
        card.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def load_splits(
    source: str, streaming: bool = False
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Every split of dataset ``source`` (``data.dataset``'s forms; ``streaming``: as ``datasets``
    streams, nothing loaded)."""
    try:
        if source == "sample":
            files = {s: str(SAMPLE_DIR / f"{s}-*.parquet") for s in ("train", "test")}
            dsd = datasets.load_dataset("parquet", data_files=files, streaming=streaming)
        elif Path(source).is_dir() and has_npy_files(Path(source)):  # datasets has no .npy builder
            dsd = npy_folder(Path(source).resolve())
            dsd = (
                IterableDatasetDict({k: v.to_iterable_dataset() for k, v in dsd.items()})
                if streaming
                else dsd
            )
        elif Path(source).is_dir():
            with _quiet_local_load():
                dsd = datasets.load_dataset(str(Path(source).resolve()), streaming=streaming)
        elif Path(source).exists():
            raise DataError(
                f"data.dataset={source!r} is a file; give a directory, a hub id or 'sample'"
            )
        elif _is_path(source):
            raise DataError(
                f"data.dataset={source!r}: no such folder; give an existing directory, a hub id "
                "(ORG/NAME) or 'sample'"
            )
        else:
            dsd = datasets.load_dataset(source, streaming=streaming)
    except (DataError, ArrayError):
        raise
    except Exception as e:  # datasets raises many types; all mean the same thing to a user
        raise DataError(
            f"data.dataset={source!r} could not be loaded ({type(e).__name__}: {e}); "
            "give a hub id, a local image folder / parquet directory, or 'sample'"
        ) from e
    return dsd


def pick_split(
    dsd: datasets.DatasetDict, source: str, split: str, key: str = "data.split"
) -> datasets.Dataset:
    """One non-empty split of ``dsd``, the splits of dataset ``source``; ``key`` names the setting
    that asked for it."""
    if split not in dsd:
        raise DataError(
            f"{key}={split!r} does not exist in {source!r}; available splits: {sorted(dsd)}"
        )
    ds = dsd[split]
    # a stream's size is not known before reading it
    if isinstance(ds, datasets.Dataset) and len(ds) == 0:
        raise DataError(
            f"split {split!r} of {source!r} is empty; point data.dataset at data with images"
        )
    return ds


def dataset_fingerprint(ds: datasets.Dataset) -> str:
    """The identity ``datasets`` gives a dataset's rows and columns after every transform (the key
    of its own cache). ``datasets`` has no public accessor for it: the attribute is read here alone,
    and a release without it is an error that says so."""
    fingerprint = getattr(ds, "_fingerprint", None)
    if not isinstance(fingerprint, str):
        raise RuntimeError(
            f"datasets {datasets.__version__} keeps no dataset fingerprint where mae.data.loading "
            "reads it (Dataset._fingerprint); install a datasets release this project supports "
            "(pyproject.toml)"
        )
    return fingerprint


def _named_column(ds: datasets.Dataset, key: str, name: str, accepts: Any, what: str) -> str:
    if name not in ds.column_names:
        raise DataError(
            f"{key}={name!r} is not a column of the dataset; columns: {ds.column_names}"
        )
    if not accepts(ds.features[name]):
        raise DataError(
            f"{key}={name!r} holds {ds.features[name]}, not {what}; name another column"
        )
    return name


def image_column(ds: datasets.Dataset, name: str | None) -> str:
    """The column named by ``data.image_column`` (checked), else the first ``Image`` feature, else
    the first column of arrays (``mae.data.arrays``: nested lists, Array2D/3D, or a ``.npy``
    folder's paths)."""

    def holds_images(column: str, f: Any) -> bool:
        return isinstance(f, datasets.Image) or is_array_feature(f) or is_npy_column(ds, column)

    if name is not None:
        return _named_column(
            ds, "data.image_column", name, lambda f: holds_images(name, f), "images or arrays"
        )
    features = ds.features.items()
    col = next((n for n, f in features if isinstance(f, datasets.Image)), None)
    col = col or next((n for n, f in features if holds_images(n, f)), None)
    if col is None:
        raise DataError(
            f"the dataset has no Image feature or column of arrays (columns: {ds.column_names}); "
            "name the image column with data.image_column=NAME"
        )
    return col


def label_column(ds: datasets.Dataset, name: str | None) -> str | None:
    """The column named by ``data.label_column`` (checked), else the first ``ClassLabel``, else
    None."""
    if name is not None:
        return _named_column(ds, "data.label_column", name, _is_label, "integer class labels")
    return next(
        (name for name, f in ds.features.items() if isinstance(f, datasets.ClassLabel)), None
    )


def _is_label(feature: Any) -> bool:
    return isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
    )
