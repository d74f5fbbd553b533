"""The one interface between the step runner and the data: a ``DataSource``.

A source is chosen once from the config (``mae.data.sources.build_source`` for pretraining;
fine-tuning reads a ``LoadedSource``) and owns everything that depends on what kind of data it is:
its loader, the epoch order and the mid-epoch skip of a resumed run, its own state in a checkpoint,
bad-image accounting and shutdown. The runner asks it for the batches from an optimizer step on and
never asks which kind it holds; a new kind of data is a new subclass.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from mae.config import Derived
from mae.data.bad_images import count_bad_images, too_many


@dataclass(frozen=True)
class Batch:
    """One micro-batch on the training device."""

    images: torch.Tensor  # (B, C, H, W), normalised
    labels: torch.Tensor  # (B,) int64 class ids; -1 where the split has no labels
    # (B, L) uniform noise whose argsort is each image's patch mask (mae.masking), where the
    # source draws it per sample; None: the model draws its own
    noise: torch.Tensor | None = None

    @classmethod
    def of(cls, parts: Sequence[torch.Tensor]) -> Batch:
        """From a loader's collated ``(images, labels)`` or ``(images, labels, noise)``: the one
        place that reads a batch by position."""
        if len(parts) not in (2, 3):
            raise ValueError(f"a batch is (images, labels[, noise]), not {len(parts)} tensors")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def with_images(self, images: torch.Tensor) -> Batch:
        return replace(self, images=images)


class DataSource(ABC):
    """``Batch``es on the training device, from (epoch, step) on.

    ``size`` (images per epoch) is known at construction, so the schedule can be derived from it.
    Then ``loader_for`` gives the loader Accelerate should prepare for that schedule (together with
    the model, in one ``prepare`` call) and ``attach`` takes it back prepared. Every sample's
    randomness comes from (seed, epoch, index), so any source, process count and resume draw the
    same."""

    size: int
    split: Any  # the ``datasets`` split it reads (map-style or stream)
    label_column: str | None = None
    bad_log: Path | None = None  # where undecodable images are recorded (None: they are errors)
    max_bad_images: int = 0  # past this many, the run stops
    bad_images_seen: int = 0

    def loader_for(self, derived: Derived) -> DataLoader | None:
        """The loader for this schedule, for Accelerate to prepare (None: the source shards
        itself)."""
        return None

    @abstractmethod
    def attach(self, accelerator: Accelerator, derived: Derived, loader: Any) -> None:
        """Keep ``loader_for``'s loader as Accelerate prepared it (None when there was none)."""

    @abstractmethod
    def batches(self, step: int) -> Iterator[Batch]:
        """The micro-batches from optimizer step ``step`` on, at least to the end of its epoch."""

    def state_dict(self) -> dict[str, Any] | None:
        """This process's position, for a checkpoint (None: the step alone says where the data
        stands)."""
        return None

    def load_state_dict(self, state: dict[str, Any] | None, where: str) -> None:
        """Restore ``state_dict``'s position read from checkpoint ``where``, before iterating."""
        return None

    def close(self) -> None:
        """Stop whatever reads the data (worker processes); called however training ends."""
        return None

    def describe(self) -> str | None:
        """A line for the setup printout, where the source has something to say."""
        return None

    def check_bad_images(self, accelerator: Accelerator) -> None:
        """Collective: the main process's count of distinct undecodable images, the same on every
        process; past ``max_bad_images`` the run stops (before any later checkpoint), else a new
        count is reported."""
        if self.bad_log is None:  # undecodable images are errors: nothing to count
            return
        seen = count_bad_images(self.bad_log) if accelerator.is_main_process else 0
        count = int(
            accelerator.reduce(
                torch.tensor(seen, device=accelerator.device), reduction="sum"
            ).item()
        )
        if count > self.max_bad_images:
            key, then = "data.max_bad_images", ", and launch again to resume"
            raise too_many(self.bad_log, count, self.max_bad_images, key, then)
        if count != self.bad_images_seen:
            self.bad_images_seen = count
            accelerator.print(f"\n{count} undecodable images skipped so far (see {self.bad_log})")

    @property
    def label_feature(self) -> Any:
        """The ``datasets`` feature of the label column (None without labels)."""
        features = self.split.features or {}
        return features.get(self.label_column) if self.label_column else None

    def first_rows(self, n: int) -> datasets.Dataset:
        """A map-style dataset whose first ``n`` rows are the split's: the split itself, or the
        first ``n`` examples of a stream."""
        if isinstance(self.split, datasets.Dataset):
            return self.split
        return datasets.Dataset.from_list(list(self.split.take(n)), features=self.split.features)

    def grid_rows(self, n: int) -> datasets.Dataset:
        """``n`` rows of ``first_rows`` to show in reconstruction grids, the same every time:
        across the classes where there are labels (the first of each class in turn: a folder
        sorted by class would otherwise show one class), else evenly spaced through them."""
        rows = self.first_rows(n)
        n = min(n, len(rows))
        if self.label_column is None:
            return rows.select(np.linspace(0, len(rows) - 1, n).round().astype(int).tolist())
        by_class: dict[int, list[int]] = {}
        for i, label in enumerate(rows[self.label_column]):
            by_class.setdefault(label, []).append(i)
        turns = itertools.zip_longest(*by_class.values())
        order = [i for turn in turns for i in turn if i is not None]
        return rows.select(order[:n])
