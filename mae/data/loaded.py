"""Map-style data through DataLoader workers: each worker decodes and augments its samples."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from mae.config import Derived
from mae.data.base import DataSource
from mae.data.images import EpochSampler
from mae.preemption import ignore_in_worker


def worker_loader(ds: Dataset, sampler: EpochSampler, num_workers: int, batch_size: int) -> DataLoader:
    """Training batches in ``sampler``'s order, decoded by ``num_workers`` processes."""
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        worker_init_fn=ignore_in_worker,  # a SIGTERM to the process group is the main process's to handle
        prefetch_factor=4 if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        # the loader's own generator, so creating an iterator never draws from the global RNG
        # (which drives masking and must continue identically after a resume)
        generator=torch.Generator().manual_seed(0),
    )


class LoadedSource(DataSource):
    """A map-style dataset (an ``ImageDataset``, or any with its ``rows``) in a seeded per-epoch order,
    split across processes by Accelerate. A resumed run skips the micro-batches of its epoch already
    consumed (``skip_first_batches``)."""

    def __init__(self, dataset: Dataset, num_workers: int, batch_size: int, accum_steps: int, seed: int) -> None:
        rows = dataset.rows  # the split's rows, columns and bad-image log, as the dataset reads them
        self.dataset, self.size = dataset, len(dataset)
        self.split, self.label_column, self.bad_log = rows.ds, rows.columns.label, rows.bad_log
        self.num_workers, self.batch_size, self.accum_steps, self.seed = num_workers, batch_size, accum_steps, seed

    def loader(self, sampler: EpochSampler) -> DataLoader:
        return worker_loader(self.dataset, sampler, self.num_workers, self.batch_size)

    def loader_for(self, derived: Derived) -> DataLoader:
        return self.loader(EpochSampler(self.size, derived.steps_per_epoch * derived.effective_batch, seed=self.seed))

    def attach(self, accelerator: Accelerator, derived: Derived, loader: Any) -> None:
        self.accelerator, self.steps_per_epoch, self.prepared = accelerator, derived.steps_per_epoch, loader

    def batches(self, step: int) -> Iterable[tuple[torch.Tensor, ...]]:
        epoch, within = divmod(step, self.steps_per_epoch)
        # through Accelerate's loader: it keeps its own epoch counter and passes it to the sampler
        self.prepared.set_epoch(epoch)
        if within:  # resume mid-epoch: skip the micro-batches already consumed
            return self.accelerator.skip_first_batches(self.prepared, within * self.accum_steps)
        return self.prepared
