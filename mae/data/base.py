"""The one interface between the step runner and the data: a ``DataSource``.

A source is chosen once from the config (``mae.data.sources.build_source``) and owns everything
that depends on what kind of data it is: its loader, the epoch order and the mid-epoch skip of a
resumed run, its own state in a checkpoint, bad-image accounting and shutdown. The runner asks it
for the batches from an optimizer step on and never asks which kind it holds; a new kind of data
is a new subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator

from mae.config import Derived


class DataSource(ABC):
    """Batches ``(images, labels[, noise])`` on the training device, from (epoch, step) on.

    ``size`` (images per epoch) is known at construction, so the schedule can be derived from it;
    ``setup`` then builds the loader for that schedule. Every sample's randomness comes from
    (seed, epoch, index), so any source, process count and resume draw the same."""

    size: int
    split: Any  # the ``datasets`` split it reads (map-style or stream)
    bad_log: Path | None = None  # where undecodable images are recorded (None: they are errors)
    label_column: str | None = None

    @abstractmethod
    def setup(self, accelerator: Accelerator, derived: Derived) -> None:
        """Build the loader for this schedule (through ``accelerator`` where it shards the data)."""

    @abstractmethod
    def batches(self, step: int) -> Iterable[tuple[torch.Tensor, ...]]:
        """The micro-batches from optimizer step ``step`` on, at least to the end of its epoch."""

    def state_dict(self) -> dict[str, Any] | None:
        """This process's position, for a checkpoint (None: the step alone says where the data stands)."""
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

    @property
    def label_feature(self) -> Any:
        """The ``datasets`` feature of the label column (None without labels)."""
        features = self.split.features or {}
        return features.get(self.label_column) if self.label_column else None

    def first_rows(self, n: int) -> datasets.Dataset:
        """The first ``n`` rows of the split as a map-style dataset (e.g. for reconstruction grids)."""
        if isinstance(self.split, datasets.Dataset):
            return self.split
        return datasets.Dataset.from_list(list(self.split.take(n)), features=self.split.features)
