"""Pretraining throughput of one preset: model step, data loader, and both together (images/s).

    python bench/throughput.py --preset vit_tiny_patch4 --image-size 32 --batch 256 --threads 2 \
        --precision fp32 --repeats 5 --steps 5 --out bench/results/throughput.json

1. model step: forward + backward + AdamW step (the engine's optimizer) on random images in memory;
2. data loader: the pretraining DataLoader over --data, without a model;
3. end to end: the loader feeding the model step, as in the engine's inner loop (no Accelerate).

On CPU, glibc's malloc is tuned first, as training does (``mae.run.hardware.tune_cpu_allocator``;
``--default-malloc`` leaves it alone).

``--on-device``: the split decoded once into a uint8 tensor on ``--device`` and augmented there
(``data.on_device=true``, ``mae.data.on_device``); the "data loader" is then the key loader plus the
on-device augmentation, with no workers.

Each is timed ``--repeats`` times over ``--steps`` batches; the table gives the median and the
range. The first batch of each loader worker is never timed (start-up); its latency is reported
separately.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import timm
import torch
from common import (
    ROOT,
    add_out,
    rate_cells,
    rate_header,
    summary,
    timestamp,
    torch_device,
    write_json,
)
from torch.utils.data import DataLoader

sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from mae.config import Config, derive, load_config  # noqa: E402
from mae.config.presets import PRESET_KEYS, PRESETS  # noqa: E402
from mae.data.images import EpochSampler, ImageDataset, augment_transform  # noqa: E402
from mae.data.loaded import worker_loader  # noqa: E402
from mae.data.loading import load_split  # noqa: E402
from mae.data.on_device import DecodedImages, DeviceAugment, key_loader  # noqa: E402
from mae.models import build_model  # noqa: E402
from mae.pretrain import build_optimizer  # noqa: E402
from mae.run.hardware import (  # noqa: E402
    resolve_attention,
    resolve_precision,
    set_attention,
    tune_cpu_allocator,
)

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"
Step = Callable[[torch.Tensor], torch.Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="vit_tiny_patch4", choices=sorted(PRESETS))
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads"
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="bf16: autocast around the forward; "
        "auto: what train.mixed_precision=auto picks on this device",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument(
        "--on-device", action="store_true", help="data.on_device=true: decoded uint8 on --device"
    )
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="skip tune_cpu_allocator, which training on CPU calls",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="timed batches per repeat")
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed model steps before the first repeat"
    )
    p.add_argument(
        "--data",
        default=str(DEFAULT_DATA),
        help="parquet dataset folder; 'sample' if it is missing",
    )
    add_out(p, "throughput.json")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace, dataset: str) -> Config:
    data = (
        f"data.image_size={args.image_size} data.num_workers={args.workers} "
        f"train.batch_size={args.batch}"
    )
    # the path is quoted because override values are parsed as YAML
    return load_config(
        None, [f"model.preset={args.preset}", f"data.dataset={json.dumps(dataset)}", *data.split()]
    )


def make_step(model: torch.nn.Module, cfg: Config, device: torch.device, precision: str) -> Step:
    """One optimizer step with the engine's optimizer (lr for one process); returns the loss."""
    optimizer = build_optimizer(
        model, cfg, derive(cfg, dataset_size=cfg.train.batch_size, num_processes=1)
    )
    set_attention(
        model,
        resolve_attention(cfg.train.attention, device, "bf16" if precision == "bf16" else "no"),
    )

    def autocast() -> AbstractContextManager:
        return (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if precision == "bf16"
            else nullcontext()
        )

    def step(images: torch.Tensor) -> torch.Tensor:
        with autocast():
            out = model(images)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(
    step: Step, images: torch.Tensor, args: argparse.Namespace, device: torch.device
) -> list[float]:
    for _ in range(args.warmup):
        step(images)
    rates = []
    for _ in range(args.repeats):
        sync(device)
        tic = time.perf_counter()
        for _ in range(args.steps):
            loss = step(images)
        sync(device)
        rates.append(args.steps * len(images) / (time.perf_counter() - tic))
        assert torch.isfinite(loss), f"loss became {loss.item()}"
    return rates


def bench_loader(
    loader: DataLoader,
    skip: int,
    epoch0: int,
    consume: Step | None,
    args: argparse.Namespace,
    device: torch.device,
    augment: DeviceAugment | None = None,
) -> tuple[list[float], list[float]]:
    """Per repeat, one sampler epoch of exactly ``skip + steps`` batches, each passed to
    ``consume``; the last ``steps`` are timed. Returns (images/s, seconds to the end of the ``skip``
    untimed batches)."""
    consume = consume or (lambda images: images)
    rates, firsts = [], []
    for r in range(args.repeats):
        loader.sampler.set_epoch(epoch0 + r)
        tic = time.perf_counter()
        if augment is None:
            batches = (images for images, *_ in loader)
        else:
            batches = (batch.images for batch in augment.batches(iter(loader)))
        for _ in range(skip):
            consume(next(batches))
        sync(device)
        mid = time.perf_counter()
        for _ in range(args.steps):
            consume(next(batches))
        sync(device)
        rates.append(args.steps * args.batch / (time.perf_counter() - mid))
        firsts.append(mid - tic)
        for _ in batches:  # the epoch is exactly used up; this only ends the iterator cleanly
            pass
    return rates, firsts


def max_rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
        "unknown",
    )


def others_cpu_s() -> float:
    """CPU seconds used on the machine (steal included) by everything but this process and its
    reaped children."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK") - sum(os.times()[:4])


def report(results: dict[str, Any], args: argparse.Namespace, skip: int) -> None:
    """The table, which of model step / data loader bounds the end-to-end rate, and memory."""
    first = results["loader_first_batches_s"]
    notes = {
        "model_step": f"fwd+bwd+AdamW, {args.precision}, synthetic images",
        "data_loader": ("decoded uint8 on the device, augmented there; " if args.on_device else "")
        + f"{args.workers} workers; first {skip} batches {first['cold']:.2f} s cold, "
        f"{first['warm_median']:.2f} s warm",
        "end_to_end": "loader -> model step",
    }
    print(f"{'measurement':<12} {rate_header(9)}  notes")
    for key, note in notes.items():
        print(f"{key.replace('_', ' '):<12} {rate_cells(results[key]['samples'], 9)}  {note}")
    rates = {k.replace("_", " "): results[k]["median"] for k in ("model_step", "data_loader")}
    bound, other = sorted(rates, key=rates.get)
    results["bound_by"] = bound
    share = 100 * results["end_to_end"]["median"] / rates[bound]
    print(
        f"bound by: {bound} ({rates[bound]:.1f} vs {other} {rates[other]:.1f} img/s); "
        f"end to end: {share:.0f}% of it"
    )
    rss, cuda = results["peak_rss_mib"], results.get("cuda_max_memory_allocated_mib")
    worker = f", largest worker {rss['largest_worker']:.0f} MiB" if rss["largest_worker"] else ""
    print(
        f"peak RSS: main {rss['main']:.0f} MiB "
        f"(model step alone {rss['after_model_step']:.0f}){worker}"
        + (f"; CUDA max allocated {cuda:.0f} MiB" if cuda else "")
    )
    others, wall = results["other_processes_cpu_s"], results["wall_s"]
    if others > 0.05 * wall * (os.cpu_count() or 1):
        print(
            f"warning: other processes used {others:.0f} CPU-s during this {wall:.0f} s run; "
            "timings are disturbed"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch_device(args.device)
    if args.precision == "auto":
        args.precision = "bf16" if resolve_precision("auto", device) == "bf16" else "fp32"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # as the engine does
    malloc_tuned = device.type == "cpu" and not args.default_malloc and tune_cpu_allocator()
    start, others_before = time.perf_counter(), others_cpu_s()

    dataset = args.data if args.data != "sample" and Path(args.data).is_dir() else "sample"
    if dataset != args.data:
        print(f"note: {args.data} is not a folder; using the bundled sample")
    cfg = make_config(args, dataset)
    tic = time.perf_counter()
    if args.on_device:
        args.workers = 0
        data = DecodedImages(load_split(cfg.data), cfg.data)
    else:
        data = ImageDataset(
            load_split(cfg.data), cfg.data.columns, augment_transform(cfg.data), seed=cfg.train.seed
        )
    load_s = time.perf_counter() - tic
    skip = max(1, args.workers)  # one untimed batch per worker: start-up and first decode
    per_epoch = (skip + args.steps) * args.batch
    if len(data) < per_epoch:
        sys.exit(
            f"error: {len(data)} images < {per_epoch} needed per repeat; lower --batch or --steps"
        )
    sampler = EpochSampler(len(data), per_epoch, seed=cfg.train.seed)
    if args.on_device:
        loader = key_loader(data, sampler, args.batch)
        augment = DeviceAugment(data, cfg.data, cfg.train.seed, None, device)
    else:
        loader, augment = worker_loader(data, sampler, cfg.data.num_workers, args.batch), None

    model = build_model(cfg).to(device).train()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step = make_step(model, cfg, device, args.precision)
    print(
        f"{args.preset}: {params / 1e6:.2f}M params, {args.image_size}px, batch {args.batch}, "
        f"{args.precision}, {device}, {args.threads} threads, {args.workers} workers, "
        f"{os.cpu_count()} cpus ({cpu_model()}); "
        f"data {dataset}: {len(data)} images (loaded in {load_s:.1f} s)"
    )

    images = torch.randn(
        args.batch, cfg.data.channels, args.image_size, args.image_size, device=device
    )
    model_rates = bench_model(step, images, args, device)
    rss_model = max_rss_mib(resource.RUSAGE_SELF)
    del images
    loader_rates, firsts = bench_loader(loader, skip, 0, None, args, device, augment)
    e2e_rates, _ = bench_loader(
        loader, skip, args.repeats, lambda x: step(x.to(device)), args, device, augment
    )
    del loader  # shuts the persistent workers down, so their peak RSS is counted below
    gc.collect()

    results: dict[str, Any] = {
        "model_step": summary(model_rates),
        "data_loader": summary(loader_rates),
        "end_to_end": summary(e2e_rates),
        "loader_first_batches_s": {
            "cold": firsts[0],
            "warm_median": statistics.median(firsts[1:] or firsts),
        },
        "dataset_load_s": load_s,
        "peak_rss_mib": {
            "after_model_step": rss_model,
            "main": max_rss_mib(resource.RUSAGE_SELF),
            "largest_worker": max_rss_mib(resource.RUSAGE_CHILDREN)
            if args.workers
            else None,  # shares pages
        },
        "wall_s": time.perf_counter() - start,
        "other_processes_cpu_s": others_cpu_s() - others_before,
    }
    if device.type == "cuda":
        results["cuda_max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    report(results, args, skip)

    m = cfg.model
    keys = (
        "image_size",
        "batch",
        "threads",
        "workers",
        "on_device",
        "precision",
        "device",
        "repeats",
        "steps",
    )
    settings = {
        "preset": args.preset,
        "dims": {k: getattr(m, k) for k in PRESET_KEYS}
        | {"mlp_ratio": m.mlp_ratio, "mask_ratio": m.mask_ratio},
        "params": params,
        **{k: getattr(args, k) for k in keys},
        "warmup_model_steps": args.warmup,
        "malloc_tuned": malloc_tuned,
        "untimed_loader_batches": skip,
        "dataset": {"path": dataset, "images": len(data)},
        "versions": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": sys.version.split()[0],
        },
        "cpu": {"model": cpu_model(), "count": os.cpu_count()},
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "date": timestamp(),
    }
    write_json(args.out, {"settings": settings, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
