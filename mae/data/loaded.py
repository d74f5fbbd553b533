"""Map-style data through DataLoader workers: each worker decodes and augments its samples.

For pretraining, workers hand over uint8 images and each batch is scaled and normalised where it
arrives, on the training device (``split_normalisation``): the values are bit for bit those of the
whole transform run per image, with a quarter of the bytes to collate, pin and copy and no float
work per image in the workers (on a CPU core, about a third of the time of a 256-px image:
docs/results.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from mae.config import Derived
from mae.data.base import Batch, DataSource
from mae.data.images import EpochSampler
from mae.run.signals import ignore_in_worker


def worker_loader(
    ds: Dataset,
    sampler: EpochSampler,
    num_workers: int,
    batch_size: int,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """Training batches in ``sampler``'s order, decoded by ``num_workers`` processes
    (``collate_fn``: how items make a batch; default torch's)."""
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # a SIGTERM to the process group is the main process's to handle
        worker_init_fn=ignore_in_worker,
        prefetch_factor=4 if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        collate_fn=collate_fn,
        # the loader's own generator, so creating an iterator never draws from the global RNG
        # (which drives masking and must continue identically after a resume)
        generator=torch.Generator().manual_seed(0),
    )


class BatchNormalise:
    """A training transform's last two steps, ``ToDtype(float32, scale=True)`` then ``Normalize``,
    for a whole (B, C, H, W) batch: the same operations in the same order (uint8 to float32, times
    1/255; minus the mean, divided by the std), so every value is the one the per-image steps
    give."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.as_subclass(torch.Tensor)
        x = x.to(torch.float32).mul_(1.0 / 255) if x.dtype == torch.uint8 else x.to(torch.float32)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return x.sub_(mean).div_(std)


def split_normalisation(transform: v2.Compose) -> tuple[v2.Compose, BatchNormalise | None]:
    """``transform`` without its closing ``ToDtype(float32, scale=True)`` and ``Normalize``, and
    those as a ``BatchNormalise``; a transform that does not end so is returned whole, with None."""
    *head, to_float, norm = transform.transforms
    if not (isinstance(to_float, v2.ToDtype) and isinstance(norm, v2.Normalize) and to_float.scale):
        return transform, None
    if to_float.dtype != torch.float32 or norm.inplace:
        return transform, None
    return v2.Compose(head), BatchNormalise(norm.mean, norm.std)


class LoadedSource(DataSource):
    """A map-style dataset (an ``ImageDataset``, or any with its ``rows``) in a seeded per-epoch
    order, split across processes by Accelerate. A resumed run skips the micro-batches of its epoch
    already consumed (``skip_first_batches``). ``normalise``: applied to each batch's images on the
    device (the dataset's transform then stops before scaling and normalising:
    ``split_normalisation``)."""

    def __init__(
        self,
        dataset: Dataset,
        num_workers: int,
        batch_size: int,
        accum_steps: int,
        seed: int,
        normalise: BatchNormalise | None = None,
        max_bad_images: int = 0,
    ) -> None:
        # the split's rows, columns and bad-image log, as the dataset reads them
        rows = dataset.rows
        self.dataset, self.size = dataset, len(dataset)
        self.split, self.label_column, self.bad_log = rows.ds, rows.columns.label, rows.bad_log
        self.num_workers, self.batch_size = num_workers, batch_size
        self.accum_steps, self.seed = accum_steps, seed
        self.normalise, self.max_bad_images = normalise, max_bad_images
        # the prepared loader and its schedule, known at ``attach``
        self.accelerator: Accelerator | None = None
        self.prepared: Any = None
        self.steps_per_epoch = 0

    def first_rows(self, n: int) -> datasets.Dataset:
        """The split, its images decodable where the dataset reads them undecoded
        (``data.decoder=pillow_draft``, ``dali``)."""
        rows = self.dataset.rows
        return (
            rows.ds.cast_column(rows.columns.image, datasets.Image())
            if rows.columns.undecoded
            else rows.ds
        )

    def loader(self, sampler: EpochSampler) -> DataLoader:
        return worker_loader(self.dataset, sampler, self.num_workers, self.batch_size)

    def loader_for(self, derived: Derived) -> DataLoader:
        return self.loader(
            EpochSampler(
                self.size, derived.steps_per_epoch * derived.effective_batch, seed=self.seed
            )
        )

    def attach(self, accelerator: Accelerator, derived: Derived, loader: Any) -> None:
        self.accelerator, self.prepared = accelerator, loader
        self.steps_per_epoch = derived.steps_per_epoch

    def loaded(self, step: int) -> Iterable[tuple[torch.Tensor, ...]]:
        """The prepared loader's collated tuples from optimizer step ``step`` on."""
        epoch, within = divmod(step, self.steps_per_epoch)
        # through Accelerate's loader: it keeps its own epoch counter and passes it to the sampler
        self.prepared.set_epoch(epoch)
        if within:  # resume mid-epoch: skip the micro-batches already consumed
            return self.accelerator.skip_first_batches(self.prepared, within * self.accum_steps)
        return self.prepared

    def batches(self, step: int) -> Iterator[Batch]:
        for parts in self.loaded(step):
            batch = Batch.of(parts)
            yield (
                batch if self.normalise is None else batch.with_images(self.normalise(batch.images))
            )
