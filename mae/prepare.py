"""Pre-resized shards: a dataset written once as small JPEGs in parquet, so that training decodes
less.

    python -m mae.prepare SOURCE OUT --max-side 256 --quality 90 [--workers N]
        [--shard-size 10000] [--overwrite]
    python -m mae.prepare --check FOLDER [--workers N]

SOURCE is anything ``data.dataset`` takes (an image folder, a parquet folder, a hub id, ``sample``);
every split is written. Each image is resized so that its longer side is at most ``--max-side``
(never enlarged; Pillow's LANCZOS filter, after a JPEG draft decode to no less than twice the target
size, as Pillow's own ``thumbnail`` does), its EXIF orientation applied, and re-encoded as JPEG at
``--quality``: grayscale stays one channel (L), everything else becomes RGB (alpha dropped). Every
image is re-encoded, even one already small enough. The label column (a ``ClassLabel`` keeps its
names) is kept under its own name; other columns are not.

OUT is laid out like a hub dataset repository, ``OUT/data/{split}-0000K-of-0000N.parquet``, with
``OUT/manifest.json`` (the source and its fingerprint, the settings, images and skipped images per
split, the time, the package version). Training reads it as any parquet folder:
``data.dataset=OUT``.

- OUT is written to a temporary sibling and swapped in when complete (``mae.export.replace_dir``):
  an interrupted run leaves the previous OUT as it was.
- OUT holding shards of another source (a different fingerprint), or files not written by this
  command, is refused unless ``--overwrite``. The same source with the same settings is a no-op;
  with other settings OUT is rewritten.
- An image that cannot be decoded is skipped and listed in the manifest (``skipped``).
- ``--check FOLDER`` writes nothing: it fully decodes every image file under FOLDER (the files
  Pillow can open by their extension, as an image folder dataset reads them) and prints one line
  per file that cannot be decoded (corrupt, empty, truncated) with its error, then a summary line;
  the exit code is 1 when there is such a file, else 0. These are the files a run would skip
  (``mae.data.bad_images``), found before it starts.
- The fingerprint of a local folder hashes its files' relative paths, sizes and modification times
  (a copy with new times counts as another source); of a hub dataset, the ``datasets`` fingerprints
  of its splits.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import math
import multiprocessing
import os
import sys
import time
from contextlib import nullcontext
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import datasets
from PIL import ExifTags, Image, ImageOps

from mae.data.bad_images import error_text
from mae.data.images import DECODE_ERRORS, to_mode
from mae.data.loading import (
    SAMPLE_DIR,
    dataset_fingerprint,
    image_column,
    label_column,
    load_splits,
)
from mae.errors import UserError, user_message
from mae.export import replace_dir

FORMAT = 1  # the layout and resizing rules; a manifest of another format is rewritten
CHUNK = 64  # images per task handed to a worker process


class PrepareError(UserError, ValueError):
    """OUT cannot be written as asked; the message says what to change."""


class Job(NamedTuple):
    """What every worker process converts: the source's splits (undecoded), their columns, the
    settings."""

    splits: dict[str, datasets.Dataset]
    image: str
    label: str | None
    max_side: int
    quality: int


class Chunk(NamedTuple):
    split: str
    start: int
    stop: int


class Converted(NamedTuple):
    jpeg: bytes | None  # None: the image could not be decoded
    label: Any
    where: str  # its file, or its row
    error: str | None


_job: list[Job] = []  # the job, in each worker process (set by the pool's initializer)


def folder_fingerprint(root: Path) -> str:
    """sha256 over the sorted relative paths, sizes and modification times of every file under
    ``root``."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def fingerprint(source: str, splits: datasets.DatasetDict | None) -> str:
    """The source's identity: its files for a local folder (the bundled sample too), else the
    ``datasets`` fingerprints of its splits (a hub dataset: they follow its revision)."""
    if source == "sample":
        return folder_fingerprint(SAMPLE_DIR)
    if Path(source).is_dir():
        return folder_fingerprint(Path(source))
    assert splits is not None, "a hub dataset is fingerprinted once loaded"
    h = hashlib.sha256()
    for name in sorted(splits):
        h.update(f"{name}\0{dataset_fingerprint(splits[name])}\n".encode())
    return h.hexdigest()


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) with the longer side at most ``max_side``, the aspect ratio kept; never
    larger."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def open_image(raw: dict[str, Any]) -> Image.Image:
    """An undecoded ``datasets.Image`` value (bytes or a path) opened by Pillow; only the header is
    read."""
    return Image.open(io.BytesIO(raw["bytes"])) if raw.get("bytes") else Image.open(raw["path"])


def resized_jpeg(raw: dict[str, Any], max_side: int, quality: int) -> bytes:
    """The image of ``raw`` with its longer side at most ``max_side``, as JPEG bytes (L or RGB)."""
    image = open_image(raw)
    size = target_size(*image.size, max_side)
    # a JPEG decodes at 1/2, 1/4 or 1/8 where 2x the target is left
    image.draft(None, (2 * size[0], 2 * size[1]))
    image.load()
    # stored turned by 90 degrees
    if image.getexif().get(ExifTags.Base.Orientation) in (
        5,
        6,
        7,
        8,
    ):
        size = size[::-1]
    image = ImageOps.exif_transpose(image)  # as datasets decodes it
    gray = image.mode in ("1", "L", "LA", "I", "F") or image.mode.startswith("I;16")
    # before resizing: Pillow resizes palette images nearest
    image = to_mode(image, "L" if gray else "RGB")
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _start_worker(job: Job) -> None:
    _job[:] = [job]


def _convert(chunk: Chunk) -> list[Converted]:
    """Rows [start, stop) of a split, converted."""
    job = _job[0]
    rows = job.splits[chunk.split][chunk.start : chunk.stop]
    labels = rows[job.label] if job.label else [None] * (chunk.stop - chunk.start)
    out = []
    for i, (raw, label) in enumerate(zip(rows[job.image], labels, strict=True)):
        where = raw.get("path") or f"row {chunk.start + i} of split {chunk.split!r}"
        try:
            out.append(Converted(resized_jpeg(raw, job.max_side, job.quality), label, where, None))
        except DECODE_ERRORS as e:
            out.append(Converted(None, label, where, error_text(e)))
    return out


def toolkit_version() -> str | None:
    """This package's installed version; None when it runs from a checkout that was never
    installed."""
    try:
        return metadata.version("mae-toolkit")
    except metadata.PackageNotFoundError:
        return None


def write_split(
    pool: Any, job: Job, name: str, features: datasets.Features, shard_size: int, out: Path
) -> dict:
    """The shards of split ``name`` in ``out/data`` (``pool``: worker processes, or None for this
    one); returns its images, shards and skipped images."""
    rows = len(job.splits[name])
    shards = max(1, math.ceil(rows / shard_size))
    counts: dict[str, Any] = {"images": 0, "shards": shards, "skipped": []}
    for k in range(shards):
        lo, hi = k * shard_size, min(rows, (k + 1) * shard_size)
        chunks = [Chunk(name, a, min(a + CHUNK, hi)) for a in range(lo, hi, CHUNK)]
        images, labels = [], []
        for converted in pool.imap(_convert, chunks) if pool else map(_convert, chunks):  # in order
            for c in converted:
                if c.error is not None:
                    counts["skipped"].append({"source": c.where, "error": c.error})
                else:
                    images.append({"bytes": c.jpeg, "path": None})
                    labels.append(c.label)
        columns = {job.image: images} | ({job.label: labels} if job.label else {})
        shard = out / "data" / f"{name}-{k:05d}-of-{shards:05d}.parquet"
        datasets.Dataset.from_dict(columns, features=features).to_parquet(str(shard))
        counts["images"] += len(images)
        print(
            f"{name}: shard {k + 1}/{shards}, {counts['images']} images, "
            f"{len(counts['skipped'])} skipped"
        )
    return counts


def make_job(
    dsd: datasets.DatasetDict, source: str, args: argparse.Namespace
) -> tuple[Job, datasets.Features]:
    """The job for every split, and the features OUT is written with (the label's own, names
    kept)."""
    first = next(iter(dsd.values()))
    image, label = image_column(first, None), label_column(first, None)
    if not isinstance(first.features[image], datasets.Image):
        raise PrepareError(
            f"{source!r} holds arrays in {image!r}, not images; mae.prepare writes JPEG images"
        )
    keep = [c for c in (image, label) if c]
    splits = {
        n: ds.select_columns(keep).cast_column(image, datasets.Image(decode=False))
        for n, ds in dsd.items()
    }
    features = datasets.Features(
        {image: datasets.Image()} | ({label: first.features[label]} if label else {})
    )
    return Job(splits, image, label, args.max_side, args.quality), features


def needs_writing(
    source: str, out: Path, fp: str, settings: dict[str, Any], overwrite: bool
) -> bool:
    """Whether OUT needs writing; raises when it holds something this run must not replace."""
    if Path(source).is_dir() and out.resolve().is_relative_to(Path(source).resolve()):
        raise PrepareError(f"OUT {out} is inside SOURCE {source}; write it elsewhere")
    manifest = out / "manifest.json"
    if not out.exists() or not any(out.iterdir()):
        return True
    old = json.loads(manifest.read_text()) if manifest.is_file() else None
    if old is None:
        if overwrite:
            return True
        raise PrepareError(
            f"{out} is not empty and was not written by mae.prepare; pass --overwrite to replace it"
        )
    if old.get("fingerprint") != fp and not overwrite:
        raise PrepareError(
            f"{out} holds shards written from {old.get('source')!r} (fingerprint "
            f"{str(old.get('fingerprint'))[:12]}), not from {source!r} ({fp[:12]}); pass "
            "--overwrite to replace them, or choose another OUT"
        )
    same = old.get("fingerprint") == fp and all(old.get(k) == v for k, v in settings.items())
    return overwrite or not same


def prepare(args: argparse.Namespace) -> Path:
    """Write OUT from SOURCE as the command line asks (or find it up to date); returns OUT."""
    out, tic = Path(args.out), time.perf_counter()
    local = args.source == "sample" or Path(args.source).is_dir()
    dsd = None if local else load_splits(args.source)  # a local folder is checked before loading
    fp = fingerprint(args.source, dsd)
    settings = {"format": FORMAT, "max_side": args.max_side, "quality": args.quality}
    if not needs_writing(args.source, out, fp, settings, args.overwrite):
        print(
            f"{out} is up to date (same source fingerprint, --max-side and --quality): "
            "nothing to do"
        )
        return out
    splits = dsd if dsd is not None else load_splits(args.source)
    job, features = make_job(splits, args.source, args)
    source = str(Path(args.source).resolve()) if Path(args.source).is_dir() else args.source
    manifest: dict[str, Any] = {
        "source": source,
        "fingerprint": fp,
        **settings,
        "resample": "LANCZOS",
    }

    def write(tmp: Path) -> None:
        (tmp / "data").mkdir(parents=True)
        _start_worker(job)
        workers = min(args.workers, sum(math.ceil(len(ds) / CHUNK) for ds in job.splits.values()))
        with (
            multiprocessing.Pool(workers, _start_worker, (job,))
            if workers > 1
            else nullcontext() as pool
        ):
            manifest["splits"] = {
                n: write_split(pool, job, n, features, args.shard_size, tmp) for n in job.splits
            }
        manifest.update(
            written=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            seconds=round(time.perf_counter() - tic, 1),
            version=toolkit_version(),
            pillow=Image.__version__,
        )
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    replace_dir(out, write)
    counts = ", ".join(
        f"{n} {s['images']} ({len(s['skipped'])} skipped)" for n, s in manifest["splits"].items()
    )
    print(f"wrote {out}: {counts}; train on it with data.dataset={out}")
    return out


def decode_error(path: Path) -> str | None:
    """What a full decode of the file ``path`` raises, as one line; None when it decodes."""
    try:
        with Image.open(path) as image:
            image.load()  # the header alone opens a truncated file
    except DECODE_ERRORS as e:
        return error_text(e)
    return None


def image_files(folder: Path) -> list[Path]:
    """The files under ``folder`` that Pillow opens by their extension, sorted."""
    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in readable)


def check_folder(folder: Path, workers: int) -> int:
    """Print each image file under ``folder`` that cannot be decoded, with its error, and a summary
    line; returns how many there are. A big folder is decoded by ``workers`` processes."""
    if not folder.is_dir():
        raise PrepareError(f"--check {folder}: not a folder; give an image folder")
    files = image_files(folder)
    parallel = workers > 1 and len(files) > 4 * CHUNK
    bad = 0
    with multiprocessing.Pool(workers) if parallel else nullcontext() as pool:
        # in order, so that the listing is the same however many processes decode it
        errors = pool.imap(decode_error, files, CHUNK) if pool else map(decode_error, files)
        for path, error in zip(files, errors, strict=True):
            if error is not None:
                bad += 1
                print(f"{path}: {error}")
    if bad:
        print(f"{bad} of {len(files)} image files under {folder} cannot be decoded")
    else:
        print(f"all {len(files)} image files under {folder} decode")
    return bad


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mae.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "source",
        nargs="?",
        help="an image folder, a parquet folder, a hub id or 'sample' (as data.dataset)",
    )
    p.add_argument(
        "out", nargs="?", help="the folder to write (data/{split}-*.parquet and manifest.json)"
    )
    p.add_argument("--max-side", type=int, help="the longer side of every image at most this")
    p.add_argument(
        "--check",
        metavar="FOLDER",
        help="write nothing: list the image files under FOLDER that cannot be decoded",
    )
    p.add_argument("--quality", type=int, default=90, help="JPEG quality, 1-95 (default 90)")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (default: every core)"
    )
    p.add_argument(
        "--shard-size", type=int, default=10_000, help="images per parquet file (default 10,000)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace OUT even when another source wrote it"
    )
    args = p.parse_args(argv)
    if args.check is not None:
        if args.source is not None:
            p.error("--check FOLDER takes no SOURCE or OUT")
        return args
    if args.out is None or args.max_side is None:
        p.error("SOURCE, OUT and --max-side are required (or --check FOLDER)")
    for key, value, low, high in (
        ("max-side", args.max_side, 1, None),
        ("quality", args.quality, 1, 95),
        ("shard-size", args.shard_size, 1, None),
    ):
        if value < low or (high is not None and value > high):
            p.error(
                f"--{key}={value}: give {low} to {high}"
                if high
                else f"--{key}={value}: give {low} or more"
            )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    datasets.disable_progress_bars()  # one line per shard instead
    try:
        if args.check is not None:
            return 1 if check_folder(Path(args.check).expanduser(), args.workers) else 0
        prepare(args)
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
