"""Streaming (iterable) datasets for pretraining: data read while it is trained on, never stored
whole.

``data.streaming=true`` opens the training split with ``datasets.load_dataset(..., streaming=True)``
(a hub id, or local parquet / image folders), so a dataset larger than the disk can be trained on.

- **Sharding.** Each process takes its part with ``datasets.distributed.split_dataset_by_node``
  (whole files when their number divides by the processes, else every n-th example); within a
  process, ``datasets`` hands each DataLoader worker its own files. Workers beyond the number of
  files get nothing (``datasets`` warns); use more files or fewer workers.
- **Order.** Files and a buffer of ``data.shuffle_buffer`` examples are shuffled with
  ``train.seed`` + epoch. Every worker loops over epochs on its own, so no process ever waits for
  another's epoch to end; an epoch is ``data.stream_size`` images (or the size the dataset's
  metadata gives) for the schedule's sake.
- **Augmentation.** Each example's crop, flip and MAE mask come from its own seed (process, worker,
  epoch, position in the worker's stream), as for map-style data.
- **Resuming exactly.** Every checkpoint stores, per process, the position (epoch, examples read) of
  each worker's stream and how many batches were taken (``process_{rank}.json``). A relaunch starts
  every worker at its position (reading past the examples it already gave in that epoch, without
  decoding them) and takes batches in the original worker order. That needs the same number of
  processes and of workers; another layout is refused. Examples are not stored: skipping costs
  reading up to one epoch of a worker's files again.
- **Bad images** are skipped and logged as for map-style data (``bad_images.jsonl``,
  ``data.max_bad_images``).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2

from mae.config import ConfigError, DataConfig, Derived
from mae.data.arrays import ArrayError
from mae.data.bad_images import error_text, log_bad_image
from mae.data.base import Batch, DataSource
from mae.data.images import (
    DECODE_ERRORS,
    ImageColumns,
    sample_seed,
    seeded_sample,
    to_mode,
)
from mae.data.loading import DataError
from mae.run.signals import ignore_in_worker


class ImageStream(IterableDataset):
    """This process's part of a stream as ``(image, label or -1[, noise], tag)`` items; ``tag`` is
    ``(worker, epoch, examples read)`` for ``StreamBatches``. Endless: each worker loops over
    epochs."""

    def __init__(
        self,
        stream: datasets.IterableDataset,
        cfg: DataConfig,
        transform: v2.Compose,
        seed: int,
        rank: int,
        num_processes: int,
        noise_length: int | None = None,
        bad_log: Path | None = None,
    ) -> None:
        self.columns = ImageColumns(stream, cfg.columns)
        stream = self.columns.select(stream)
        if not self.columns.arrays:  # decode only what is used
            stream = stream.cast_column(self.columns.image, datasets.Image(decode=False))
        self.base, self.buffer, self.num_processes = stream, cfg.shuffle_buffer, num_processes
        self.transform, self.seed, self.rank = transform, seed, rank
        self.num_shards = self.epoch_stream(0).num_shards
        self.features = stream.features
        self.noise_length, self.bad_log = noise_length, bad_log
        self.start: dict[
            int, tuple[int, int]
        ] = {}  # worker -> (epoch, examples read), from a checkpoint

    def epoch_stream(self, epoch: int) -> datasets.IterableDataset:
        """This process's part of the stream, files and buffer shuffled for ``epoch``. A new object
        per epoch and worker: ``set_epoch`` would change an epoch counter that forked workers
        share."""
        shuffled = self.base.shuffle(
            seed=(self.seed * 1_000_003 + epoch) % 2**32, buffer_size=self.buffer
        )
        return split_dataset_by_node(shuffled, rank=self.rank, world_size=self.num_processes)

    def active_workers(self, num_workers: int) -> int:
        """Workers that get files from ``datasets`` (it stops the others)."""
        return max(1, min(num_workers, self.num_shards)) if num_workers else 1

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and worker >= self.active_workers(info.num_workers):
            return  # datasets gives this worker no files
        epoch, skip = self.start.get(worker, (0, 0))
        while True:
            read, given = -1, 0
            for read, row in enumerate(self.epoch_stream(epoch)):
                if read < skip:
                    continue
                item = self._item(row, worker, epoch, read)
                if item is not None:
                    given += 1
                    yield item
            # a whole epoch without one image: the loop would wait forever
            if given == 0 and skip == 0:
                raise DataError(
                    f"process {self.rank}'s loader worker {worker} read {read + 1} examples and no "
                    "decodable image in a whole epoch of its files; check data.classes and the "
                    "files, or lower data.num_workers"
                )
            epoch, skip = epoch + 1, 0

    def _item(
        self, row: dict[str, Any], worker: int, epoch: int, read: int
    ) -> tuple[Any, ...] | None:
        raw = row[self.columns.image]
        try:
            if self.columns.arrays:
                image = self.columns.decode(
                    row, f"array {read} of epoch {epoch} (worker {worker}) of the stream"
                )
            else:
                image = to_mode(datasets.Image().decode_example(raw), self.columns.mode)
        except ArrayError:
            raise
        except DECODE_ERRORS as e:
            where = (raw or {}).get(
                "path"
            ) or f"process {self.rank}, worker {worker}, epoch {epoch}, example {read}"
            if self.bad_log is None:
                raise DataError(
                    f"an image of the stream ({where}) cannot be decoded ({type(e).__name__}: {e})"
                ) from e
            key = (raw or {}).get("path") or f"{self.rank}:{worker}:{epoch}:{read}"  # once per file
            log_bad_image(self.bad_log, key, where, error_text(e))
            return None
        x, noise = seeded_sample(
            self.transform,
            image,
            sample_seed(self.seed, self.rank, worker, epoch, read),
            self.noise_length,
        )
        label = self.columns.label_of(row)
        tag = torch.tensor([worker, epoch, read + 1])
        return (x, label, tag) if noise is None else (x, label, noise, tag)


class StreamBatches:
    """The batches of an ``ImageStream`` DataLoader in a fixed worker order (round robin over the
    active workers, as an uninterrupted DataLoader gives them), recording where each worker's stream
    stands.

    ``state_dict`` / ``load_state_dict`` are what a checkpoint keeps; load before iterating."""

    def __init__(
        self, stream: ImageStream, cfg: DataConfig, batch_size: int, num_processes: int
    ) -> None:
        self.stream, self.num_workers, self.num_processes = stream, cfg.num_workers, num_processes
        self.active = stream.active_workers(cfg.num_workers)
        self.batches = 0  # micro-batches taken by the training loop
        self.positions: dict[int, tuple[int, int]] = {}
        self.loader = DataLoader(
            stream,
            batch_size=batch_size,
            num_workers=cfg.num_workers,
            # a SIGTERM to the process group is the main process's to handle
            worker_init_fn=ignore_in_worker,
            prefetch_factor=4 if cfg.num_workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )
        self._it: Iterator[Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "workers": {str(w): list(p) for w, p in sorted(self.positions.items())},
            "num_workers": self.num_workers,
            "num_processes": self.num_processes,
        }

    def load_state_dict(self, state: dict[str, Any], where: str) -> None:
        layout = (state["num_processes"], state["num_workers"])
        if layout != (self.num_processes, self.num_workers):
            raise DataError(
                f"{where} was written by {layout[0]} processes x data.num_workers={layout[1]} "
                f"reading the stream; this launch has {self.num_processes} x {self.num_workers}. A "
                f"stream resumes exactly only with the same layout: launch with {layout[0]} "
                f"processes and data.num_workers={layout[1]}"
            )
        self.batches = state["batches"]
        self.positions = {int(w): (p[0], p[1]) for w, p in state["workers"].items()}
        self.stream.start = dict(self.positions)

    def close(self) -> None:
        """Stop the loader's worker processes now. A training loop that ends with an exception keeps
        its iterator alive in the traceback, and live workers can keep the interpreter from
        exiting."""
        it, self._it = self._it, None
        # torch has no public call that stops an iterator's workers: dropping it is not enough
        # while a traceback's frames still hold it. ``_shutdown_workers`` is what the iterator's
        # own ``__del__`` calls; where a torch release lacks it, the workers end with the process.
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        try:
            yield from self._batches()
        # an error from a worker, or the consumer closing early: no worker outlives it
        except BaseException:
            self.close()
            raise

    def _batches(self) -> Iterator[tuple[Any, ...]]:
        if self._it is None:
            self._it = iter(self.loader)
        held: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        while True:
            want = self.batches % self.active
            while not held[want]:
                try:
                    batch = next(self._it)
                except StopIteration:
                    raise DataError(
                        "the stream gave no images (every worker's part is empty); check "
                        "data.dataset, data.split and data.classes"
                    ) from None
                held[int(batch[-1][0, 0])].append(batch)
                # the worker due has stopped giving batches
                if sum(map(len, held.values())) > 4 * self.active + 8:
                    raise DataError(
                        f"loader worker {want} of process {self.stream.rank} stopped giving images "
                        "while the others go on; its files are empty or unreadable: check the "
                        "files and data.classes, or lower data.num_workers"
                    )
            *batch, tags = held[want].popleft()
            last = tags[-1]
            self.positions[int(last[0])] = (int(last[1]), int(last[2]))
            self.batches += 1
            yield tuple(batch)


class StreamSource(DataSource):
    """``data.streaming``: each process reads its own part of the stream (not through Accelerate)
    and moves its batches to the device; a checkpoint keeps where every worker's stream stands."""

    def __init__(
        self,
        stream: datasets.IterableDataset,
        size: int,
        cfg: DataConfig,
        dataset: ImageStream,
        batch_size: int,
    ) -> None:
        self.split, self.size, self.dataset = stream, size, dataset
        self.label_column, self.bad_log = dataset.columns.label, dataset.bad_log
        self.max_bad_images = cfg.max_bad_images
        self.batches_of = StreamBatches(dataset, cfg, batch_size, dataset.num_processes)
        self.device: torch.device | None = None  # the training device, known at ``attach``

    def attach(self, accelerator: Accelerator, derived: Derived, loader: Any) -> None:
        self.device = accelerator.device  # no loader: each process reads its own part of the stream

    def batches(self, step: int) -> Iterator[Batch]:
        for batch in self.batches_of:  # endless: the stream has no epoch ends the loop waits for
            yield Batch.of([x.to(self.device, non_blocking=True) for x in batch])

    def state_dict(self) -> dict[str, Any]:
        return self.batches_of.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None, where: str) -> None:
        if state is None:
            raise ConfigError(
                f"{where} holds no stream position (it was written with data.streaming=false); "
                "resume with data.streaming=false or use another output_dir"
            )
        self.batches_of.load_state_dict(state, where)

    def close(self) -> None:
        self.batches_of.close()
