"""Arrays as images: a dataset column of arrays, or a folder of ``.npy`` files laid out like an
image folder.

Satellite and medical images come as arrays of any channel count, 8-bit, 16-bit or float. Pillow
holds at most four channels, so such images never pass through it: each array becomes a float32
tensor (C, H, W) and the augmentation runs on tensors (torchvision's transforms take them as they
are).

- Layout: (C, H, W), (H, W, C) or (H, W). The axis whose length is ``data.channels`` is the channel
  axis, the first one when both ends qualify (channels first, as torch and rasterio store them).
- Scale: uint8 / 255, uint16 / 65535, other integers and floats as they are. ``data.mean`` and
  ``data.std`` are in these units; ``data.mean=auto`` measures them (``mae.data.stats``).
- A ``.npy`` folder: ``ROOT/CLASS/*.npy`` (labels from the sorted class folder names), or files
  directly in ROOT (no labels); ``ROOT/train``, ``ROOT/test``, ``ROOT/validation`` are splits when
  present. ``datasets`` has no ``.npy`` builder, so the split is a table of file paths and labels,
  read lazily.
- An array with another channel count, or with NaN or infinity, is refused with the row that holds
  it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from mae.errors import UserError

SPLIT_NAMES = ("train", "validation", "test")
SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


class ArrayError(UserError, ValueError):
    """An array that cannot be an image of this run (channels, values); the message names it."""


def is_array_feature(feature: Any) -> bool:
    """A column of arrays: ``datasets`` Array2D/Array3D or nested lists of numbers."""
    if isinstance(feature, (datasets.Array2D, datasets.Array3D)):
        return True
    inner = feature
    depth = 0
    while (
        isinstance(inner, (datasets.Sequence, datasets.LargeList, list))
        or type(inner).__name__ == "List"
    ):
        inner = inner[0] if isinstance(inner, list) else inner.feature
        depth += 1
    return (
        depth >= 2
        and isinstance(inner, datasets.Value)
        and inner.dtype not in ("string", "large_string")
    )


def has_npy_files(root: Path) -> bool:
    """Whether ``root`` is a ``.npy`` folder: the first file found down its first folders (3 levels)
    is one. (Not a full walk: an image folder of a million files is not listed to find out.)"""
    folder = root
    for _ in range(3):
        entries = sorted(folder.iterdir())
        files = [e for e in entries if e.is_file() and not e.name.startswith(".")]
        if files:
            return any(f.suffix == ".npy" for f in files)
        dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
        if not dirs:
            return False
        folder = dirs[0]
    return False


def npy_folder(root: Path) -> datasets.DatasetDict:
    """The splits of a ``.npy`` folder (see the module docstring) as tables of ``path`` and
    ``label``."""
    roots = {s: root / s for s in SPLIT_NAMES if (root / s).is_dir()} or {"train": root}
    splits = {}
    for name, folder in roots.items():
        files = sorted(folder.rglob("*.npy"))
        classes = sorted({f.parent.name for f in files if f.parent != folder})
        table: dict[str, list] = {"path": [str(f) for f in files]}
        features = {"path": datasets.Value("string")}
        if classes:
            if any(f.parent == folder or f.parent.parent != folder for f in files):
                raise ArrayError(
                    f"{folder}: .npy files must all sit in class folders one level down "
                    "(CLASS/x.npy), or all directly in it; move them"
                )
            table["label"] = [classes.index(f.parent.name) for f in files]
            features["label"] = datasets.ClassLabel(names=classes)
        splits[name] = datasets.Dataset.from_dict(table, features=datasets.Features(features))
    return datasets.DatasetDict(splits)


def is_npy_column(ds: Any, name: str) -> bool:
    """A column of ``.npy`` file paths (what ``npy_folder`` makes)."""
    feature = ds.features.get(name)
    return name == "path" and isinstance(feature, datasets.Value) and feature.dtype == "string"


def to_tensor(value: Any, channels: int, where: str) -> torch.Tensor:
    """One array (any layout above, or a ``.npy`` path) as float32 (C, H, W) in the scale above."""
    a = np.load(value, allow_pickle=False) if isinstance(value, str) else np.asarray(value)
    if a.ndim == 2:
        a = a[None]
    elif a.ndim != 3:
        raise ArrayError(
            f"{where} is an array of shape {a.shape}; arrays must be (C, H, W), (H, W, C) or (H, W)"
        )
    if a.shape[0] != channels:
        if a.shape[-1] != channels:
            raise ArrayError(
                f"{where} has shape {a.shape}: no axis of data.channels={channels}; every array "
                f"needs {channels} channels (set data.channels to the dataset's, or remove that "
                "array)"
            )
        a = np.moveaxis(a, -1, 0)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ArrayError(
            f"{where} holds NaN or infinite values; replace them (e.g. np.nan_to_num) or remove it"
        )
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    scale = SCALE.get(a.dtype)
    return x / scale if scale else x
