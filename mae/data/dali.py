"""``data.decoder=dali``: NVIDIA DALI decodes, crops, resizes, flips and normalises; nvJPEG on a
GPU.

An optional extra (``pip install -e ".[dali]"``). The work splits in two:
- the loader (``LoadedSource``'s, in the same per-epoch order and split across processes the same
  way) reads each sample's encoded bytes and draws its randomness from (seed, epoch, index), exactly
  as the Pillow path does (``seeded_sample``): ``RandomResizedCrop.make_params`` on the image's size
  read from its header, then the flip, then MAE's masking noise. The crop box, flip and noise of
  every sample are the Pillow path's, so a resumed run, any process count and either decoder draw
  the same;
- DALI then decodes only the box (``decoders.image_slice``: a region-of-interest decode on
  ``device="mixed"``, i.e. nvJPEG on the GPU; on ``"cpu"`` without one), resizes it to
  ``data.image_size`` (cubic, antialiased), flips and normalises it (``crop_mirror_normalize``), and
  hands over a (B, C, H, W) float32 batch on the training device. The next batch decodes while this
  one trains.

The pixels differ a little from Pillow's (DALI's cubic resampling and JPEG decoder are not
Pillow's): measured in tests/test_dali.py and docs/data.md. DALI decodes JPEG, PNG, BMP, TIFF, WebP,
PNM and JPEG 2000; an image in another format is refused with the fix. Only the header of a JPEG is
read on the loader side; an image of another format is decoded there once to learn its size. An
image whose header cannot be read is replaced by the next one and logged, as ever; one whose data is
damaged past a readable header stops the run in DALI (``data.decoder=pillow`` finds and lists such
images).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from mae.config import DataConfig, Derived
from mae.data.base import Batch
from mae.data.images import EpochSampler, ImageRows, sample_seed, seeded_sample
from mae.data.loaded import LoadedSource, worker_loader
from mae.data.loading import DataError

# the leading bytes of the formats DALI's decoders read (JPEG 2000: its codestream and its JP2 box)
DALI_FORMATS = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG": "PNG",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"\xff\x4f\xff\x51": "JPEG 2000",
    b"\x00\x00\x00\x0cjP  ": "JPEG 2000",
    **{f"P{i}".encode(): "PNM" for i in range(1, 7)},
}


def require_dali() -> None:
    """Refuse ``data.decoder=dali`` in one line where the ``nvidia.dali`` package is missing."""
    try:
        import nvidia.dali  # noqa: F401 - an optional dependency: only its presence is checked here
    except ImportError:
        raise DataError(
            'data.decoder=dali needs NVIDIA DALI, which is not installed: pip install -e ".[dali]" '
            "(CUDA 13 wheels; its CPU backend runs without a GPU), or set data.decoder=pillow"
        ) from None


def dali_decodes(data: bytes) -> bool:
    """Whether ``data`` starts like an image DALI's decoders read (WebP: a RIFF file of WEBP)."""
    return any(data.startswith(magic) for magic in DALI_FORMATS) or (
        data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    )


class CropDraws:
    """What the Pillow path's transform draws for an image, without resampling it:
    ``RandomResizedCrop``'s box from the image's size (``make_params``), then
    ``RandomHorizontalFlip``'s coin (flipped when ``torch.rand(1) < 0.5``; nothing drawn with
    ``data.hflip=false``). Returns (5,) float32 ``(left, top, width, height, flip)``."""

    def __init__(self, cfg: DataConfig) -> None:
        self.crop = v2.RandomResizedCrop(list(cfg.hw), scale=cfg.crop_scale)
        self.hflip = cfg.hflip

    def __call__(self, image: Any) -> np.ndarray:
        p = self.crop.make_params([image])  # reads the size only: an opened JPEG is not decoded
        flip = self.hflip and bool(torch.rand(1) < 0.5)
        return np.array([p["left"], p["top"], p["width"], p["height"], flip], dtype=np.float32)


class EncodedImages(Dataset):
    """The split's encoded images with each sample's draws. Indices are ``(epoch, i)`` pairs (see
    ``EpochSampler``) or plain ints (epoch 0); items are ``(bytes (n,) uint8, draws (5,) float32
    (left, top, width, height, flip), label or -1[, noise (noise_length,)])``; ``collate``
    batches them."""

    def __init__(
        self,
        ds: datasets.Dataset,
        cfg: DataConfig,
        seed: int,
        noise_length: int | None,
        bad_log: Path | None = None,
    ) -> None:
        # JPEGs opened (their header read), not decoded
        self.rows = ImageRows(ds, cfg.columns, bad_log, undecoded=True)
        if self.rows.columns.arrays or cfg.channels not in (1, 3):
            raise DataError(
                f"data.decoder=dali decodes images to 1 or 3 channels; this dataset is "
                f"{'arrays' if self.rows.columns.arrays else f'data.channels={cfg.channels}'}: set "
                "data.decoder=pillow"
            )
        self.draws, self.seed, self.noise_length = CropDraws(cfg), seed, noise_length

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Any, ...]:
        epoch, i = index if isinstance(index, tuple) else (0, index)
        # the Pillow path's (ImageDataset): the same draws, in the same order
        seed = sample_seed(self.seed, epoch, i)

        def sample(image: Any) -> tuple[np.ndarray, torch.Tensor | None]:
            return seeded_sample(self.draws, image, seed, self.noise_length)

        # a header that cannot be read: the next image
        row, (draws, noise) = self.rows.decodable(i, sample)
        raw = row[self.rows.columns.image]
        data = raw["bytes"] or Path(raw["path"]).read_bytes()
        if not dali_decodes(data):
            raise DataError(
                f"image {i} of the dataset ({raw.get('path') or 'embedded bytes'}) is in a format "
                "DALI does not decode (it reads "
                f"{', '.join(sorted(set(DALI_FORMATS.values()) | {'WebP'}))}): set "
                "data.decoder=pillow, or write the dataset as JPEG shards (python -m mae.prepare)"
            )
        encoded = np.frombuffer(data, dtype=np.uint8)
        label = self.rows.columns.label_of(row)
        return (encoded, draws, label) if noise is None else (encoded, draws, label, noise)


def collate(items: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """``EncodedImages`` items as one batch:
    ``([bytes...], (B, 5) draws, (B,) labels[, (B, L) noise])``. The bytes and draws stay NumPy
    arrays, which Accelerate leaves where they are (DALI reads them on the CPU); labels and noise
    are tensors it moves to the training device."""
    encoded, draws, labels, *noise = zip(*items, strict=True)
    batch = (list(encoded), np.stack(draws), torch.tensor(labels, dtype=torch.int64))
    return (*batch, torch.stack(noise[0])) if noise else batch


def dali_pipeline(cfg: DataConfig, batch_size: int, threads: int, device: torch.device) -> Any:
    """A built DALI pipeline fed ``encoded``, ``anchor`` (x, y), ``shape`` (w, h) and ``flip`` per
    sample that outputs (B, C, H, W) float32 normalised crops: decoded on ``device`` (a GPU: nvJPEG,
    ``mixed``)."""
    from nvidia.dali import Pipeline, fn, types  # an optional dependency, imported where it is used

    gpu = device.type == "cuda"
    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=threads,
        device_id=(device.index or 0) if gpu else None,
        # one batch at a time: DALI's deeper queues want that many batches fed before the first run;
        # DaliAugment schedules the next batch before handing over the current one instead
        prefetch_queue_depth=1,
    )
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
        shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)
        flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
        images = fn.decoders.image_slice(
            encoded,
            anchor,
            shape,
            device="mixed" if gpu else "cpu",
            output_type=types.RGB if cfg.channels == 3 else types.GRAY,
            axis_names="WH",
            normalized_anchor=False,
            normalized_shape=False,
        )
        (h, w) = cfg.hw
        images = fn.resize(
            images, resize_x=w, resize_y=h, interp_type=types.INTERP_CUBIC, antialias=True
        )
        images = fn.crop_mirror_normalize(
            images,
            mirror=flip,
            mean=[255 * m for m in cfg.mean],  # DALI normalises 0-255 values
            std=[255 * s for s in cfg.std],
            output_layout="CHW",
            dtype=types.FLOAT,
        )
        pipe.set_outputs(images)
    pipe.build()
    return pipe


class DaliAugment:
    """Batches of ``collate`` through the DALI pipeline: (images, labels[, noise]) on ``device``,
    one batch decoding ahead of the one handed over."""

    def __init__(
        self, cfg: DataConfig, batch_size: int, threads: int, device: torch.device
    ) -> None:
        self.pipe, self.device = dali_pipeline(cfg, batch_size, threads, device), device
        self.image_shape = (cfg.channels, *cfg.hw)
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _schedule(self, encoded: list[np.ndarray], draws: np.ndarray) -> None:
        self.pipe.feed_input("encoded", encoded)
        self.pipe.feed_input("anchor", list(draws[:, :2]))
        self.pipe.feed_input("shape", list(draws[:, 2:4]))
        self.pipe.feed_input("flip", list(draws[:, 4].astype(np.int32)))
        self.pipe.schedule_run()

    def _take(self, n: int) -> torch.Tensor:
        """The oldest scheduled run's images, copied into a tensor of ours before DALI may reuse its
        buffer."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty((n, *self.image_shape), dtype=torch.float32, device=self.device)
        if self.device.type != "cuda":
            (images,) = self.pipe.outputs()
            return feed_ndarray(images.as_tensor(), out)
        # ready on our stream, after DALI's work
        (images,) = self.pipe.outputs(cuda_stream=self.copy_stream)
        feed_ndarray(images.as_tensor(), out, cuda_stream=self.copy_stream)
        # only the copy: the training stream's queue is not waited for
        self.copy_stream.synchronize()
        out.record_stream(torch.cuda.current_stream(self.device))
        return out

    def batches(self, loader: Iterable[tuple[Any, ...]]) -> Iterator[Batch]:
        pending: collections.deque = collections.deque()  # the rest of each batch scheduled in DALI
        try:
            for encoded, draws, *rest in loader:
                self._schedule(encoded, draws)
                pending.append(rest)
                if len(pending) > 1:
                    rest = pending.popleft()
                    yield Batch.of((self._take(len(rest[0])), *rest))
            while pending:
                rest = pending.popleft()
                yield Batch.of((self._take(len(rest[0])), *rest))
        # the consumer stopped (a checkpoint, the end of the run): collect what runs
        except GeneratorExit:
            while pending:
                pending.popleft()
                self.pipe.outputs()
            raise


class DaliSource(LoadedSource):
    """``data.decoder=dali``: ``LoadedSource``'s order, processes and mid-epoch skip over
    ``EncodedImages`` (its ``data.num_workers`` workers read bytes and draw crops); ``DaliAugment``
    makes the images on the training device, with ``data.num_workers`` DALI threads (at least
    one)."""

    def __init__(
        self,
        split: datasets.Dataset,
        cfg: DataConfig,
        batch_size: int,
        accum_steps: int,
        seed: int,
        noise_length: int | None,
        bad_log: Path | None = None,
    ) -> None:
        require_dali()  # before anything is read
        data = EncodedImages(split, cfg, seed, noise_length, bad_log)
        max_bad = cfg.max_bad_images
        super().__init__(data, cfg.num_workers, batch_size, accum_steps, seed, None, max_bad)
        self.cfg = cfg
        self.augment: DaliAugment | None = None  # on the training device, known at ``attach``

    def loader(self, sampler: EpochSampler) -> DataLoader:
        return worker_loader(self.dataset, sampler, self.num_workers, self.batch_size, collate)

    def attach(self, accelerator: Accelerator, derived: Derived, loader: Any) -> None:
        super().attach(accelerator, derived, loader)
        self.augment = DaliAugment(
            self.cfg, self.batch_size, max(1, self.num_workers), accelerator.device
        )

    def batches(self, step: int) -> Iterator[Batch]:
        return self.augment.batches(self.loaded(step))

    def describe(self) -> str:
        where = "on the GPU (nvJPEG)" if self.augment.device.type == "cuda" else "on the CPU"
        return (
            f"data decoded, cropped and normalised by DALI {where} (threads: "
            f"{max(1, self.num_workers)}); bytes and crop boxes from the loader (workers: "
            f"{self.num_workers})"
        )
