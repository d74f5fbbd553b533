"""Loader images/s per core on ImageNet-size JPEGs: originals, pre-resized shards, draft decoding.

    python bench/loader.py --folder /tmp/imagenet_like --images 3000 --out bench/results/loader.json

1. ``--folder`` is made when missing: ``--images`` JPEGs (quality 90) in 10 class folders, of random
   sizes around 500x375 (ImageNet's mean), with natural-ish content (smooth colour fields, shapes
   with edges, fine grain), since what a JPEG costs to decode depends on what it holds. ``--jobs``
   processes make it; image i comes from its own seed, so the folder is the same for any number of
   them.
2. ``--prepared`` (default FOLDER_256) is made when missing: ``python -m mae.prepare FOLDER PREPARED
   --max-side 256 --quality 90`` on every core; its time is reported.
3. The pretraining loader (``ImageDataset`` + the training transform: RandomResizedCrop to
   ``--image-size``, scale 0.2-1, flip, normalisation; ``DataLoader`` with no workers, one torch
   thread) is timed on: the original JPEGs; the shards; the original JPEGs with
   ``data.decoder=pillow_draft``. As in pretraining, the loader gives uint8 images and each batch is
   scaled and normalised after it (``mae.data.loaded.BatchNormalise``; on this core here, on the GPU
   in a GPU run). The three are timed round robin, ``--repeats`` rounds of ``--batches`` batches of
   64 (another epoch each round); the medians, the range and the ratios to the originals, each ratio
   a median of the rounds' own ratios. Two rates each: the loader alone (what a loader worker's core
   does) and with the batch normalisation after it on the same core (where a CPU run does it).
4. Draft decoding against the exact path: the same samples through both transforms; the share of
   crops that a reduced scale served and the mean / max absolute difference in 0-255 levels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from common import ROOT, add_out, medians, write_json
from PIL import Image, ImageDraw

sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from mae.config import IMAGENET_MEAN, IMAGENET_STD, load_config  # noqa: E402
from mae.data.images import EpochSampler, ImageDataset, augment_transform  # noqa: E402
from mae.data.loaded import BatchNormalise, split_normalisation, worker_loader  # noqa: E402
from mae.data.loading import load_split  # noqa: E402

BATCH = 64


def natural_image(rng: np.random.Generator) -> Image.Image:
    """About 500x375 (either orientation): a smooth colour field, a few dozen shapes with hard
    edges, grain."""
    w = int(rng.normal(500, 60))
    h = int(w * rng.choice([0.75, 0.75, 0.67, 1.0, 1.33]))
    field = rng.integers(0, 256, (max(2, h // 48), max(2, w // 48), 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(10, 40))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(5, w // 2)), y0 + int(rng.integers(5, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = rng.integers(0, 3)
        if shape == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=int(rng.integers(1, 6)))
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 8)))
    grain = rng.normal(0, 8, (h, w, 1))
    return Image.fromarray(np.clip(np.asarray(image) + grain, 0, 255).astype(np.uint8))


def save_image(tmp: Path, i: int) -> None:
    """Image ``i``, from its own random stream (so any number of processes make the same folder)."""
    natural_image(np.random.default_rng([0, i])).save(
        tmp / f"class_{i % 10}" / f"{i:05d}.jpg", quality=90
    )


def make_folder(folder: Path, images: int, jobs: int) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    for c in range(10):
        (tmp / f"class_{c}").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(jobs) as pool:
        list(pool.map(partial(save_image, tmp), range(images), chunksize=64))
    tmp.rename(folder)


def dataset(path: Path, image_size: int, decoder: str, split: bool = False) -> ImageDataset:
    """The dataset pretraining reads (``split``: its transform stops at uint8,
    ``split_normalisation``)."""
    overrides = [
        f"data.dataset={json.dumps(str(path))}",
        f"data.image_size={image_size}",
        f"data.decoder={decoder}",
    ]
    cfg = load_config(None, overrides).data  # resolved: the defaults' mean and std
    transform = split_normalisation(augment_transform(cfg))[0] if split else augment_transform(cfg)
    return ImageDataset(load_split(cfg), cfg.columns, transform, seed=0)


def time_loader(ds: ImageDataset, epoch: int, batches: int) -> tuple[float, float]:
    """images/s over ``batches`` batches of epoch ``epoch`` (the first, untimed, starts the
    iterator): of the loader alone (uint8 batches: a loader worker's work), and with each batch then
    scaled and normalised on this core (``BatchNormalise``; in a GPU run that is done on the
    GPU)."""
    sampler = EpochSampler(len(ds), (batches + 1) * BATCH, seed=0)
    sampler.set_epoch(epoch)
    it = iter(worker_loader(ds, sampler, 0, BATCH))
    normalise = BatchNormalise(IMAGENET_MEAN, IMAGENET_STD)
    next(it)
    loading = normalising = 0.0
    for _ in range(batches):
        tic = time.perf_counter()
        images = next(it)[0]
        mid = time.perf_counter()
        normalise(images)
        loading, normalising = loading + mid - tic, normalising + time.perf_counter() - mid
    return batches * BATCH / loading, batches * BATCH / (loading + normalising)


def draft_difference(folder: Path, image_size: int, samples: int) -> dict[str, float]:
    """The same samples decoded exactly and with draft decoding: the share of crops a reduced scale
    served (a crop decoded whole is bit for bit the exact one) and |difference| in 0-255 levels over
    those."""
    exact, draft = (
        dataset(folder, image_size, "pillow"),
        dataset(folder, image_size, "pillow_draft"),
    )
    std = torch.tensor(exact.transform.transforms[-1].std).view(3, 1, 1)
    diffs = [((exact[(0, i)][0] - draft[(0, i)][0]).abs() * std * 255) for i in range(samples)]
    drafted = [d for d in diffs if d.max() > 0]
    d = torch.cat([x.flatten() for x in drafted]) if drafted else torch.zeros(1)
    share = len(drafted) / samples
    return {
        "samples": samples,
        "drafted": share,
        "mean_abs": d.mean().item(),
        "max_abs": d.max().item(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", type=Path, default=Path("/tmp/imagenet_like"))
    p.add_argument("--images", type=int, default=3000, help="images in --folder when it is made")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="processes making --folder")
    p.add_argument(
        "--prepared", type=Path, help="pre-resized shards (default FOLDER_256), made when missing"
    )
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--batches", type=int, default=8, help="timed batches of 64 per variant and round"
    )
    p.add_argument(
        "--compare", type=int, default=100, help="samples for the draft-decoding difference"
    )
    add_out(p, "loader.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # per core
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    prepared = args.prepared or args.folder.with_name(args.folder.name + "_256")
    results: dict = {"settings": {k: str(v) for k, v in vars(args).items()}}
    if not args.folder.is_dir():
        tic = time.perf_counter()
        make_folder(args.folder, args.images, args.jobs)
        print(f"made {args.folder}: {args.images} JPEGs in {time.perf_counter() - tic:.0f} s")
    files = list(args.folder.rglob("*.jpg"))
    sizes = np.array([Image.open(f).size for f in files])
    results["folder"] = {
        "images": len(files),
        "mean_size": sizes.mean(0).round().tolist(),
        "mean_kib": round(sum(f.stat().st_size for f in files) / len(files) / 1024, 1),
    }
    if not prepared.is_dir():
        tic = time.perf_counter()
        cmd = [
            sys.executable,
            "-m",
            "mae.prepare",
            str(args.folder),
            str(prepared),
            "--max-side",
            "256",
        ]
        subprocess.run([*cmd, "--quality", "90"], check=True, cwd=ROOT)
        results["prepare_s"] = round(time.perf_counter() - tic, 1)
        results["prepare_workers"] = os.cpu_count()
    variants = {
        "original": dataset(args.folder, args.image_size, "pillow", split=True),
        "prepared_256": dataset(prepared, args.image_size, "pillow", split=True),
        "original_draft": dataset(args.folder, args.image_size, "pillow_draft", split=True),
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    normalised: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.repeats):
        for name, ds in variants.items():
            loader_rate, with_normalising = time_loader(ds, r, args.batches)
            rates[name].append(loader_rate)
            normalised[name].append(with_normalising)
    for key, table in (("loader", rates), ("loader_and_cpu_normalisation", normalised)):
        results[key] = {
            "images_per_s_per_core": medians(table),
            "samples": table,
            "ratio_to_original": {
                k: statistics.median(a / b for a, b in zip(v, table["original"], strict=True))
                for k, v in table.items()
            },
        }
    results["draft"] = draft_difference(args.folder, args.image_size, args.compare)
    for key in ("loader", "loader_and_cpu_normalisation"):
        print(key.replace("_", " ") + ":")
        for name, v in results[key]["samples"].items():
            ratio = results[key]["ratio_to_original"][name]
            print(
                f"  {name:<15} {statistics.median(v):8.1f} img/s per core "
                f"({min(v):.1f}-{max(v):.1f}); x{ratio:.2f}"
            )
    print(json.dumps({k: results[k] for k in ("folder", "draft")}))
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
