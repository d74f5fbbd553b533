"""Pretraining throughput of one preset: model step, data loader, and both together (images/s).

    python bench/throughput.py --preset vit_tiny_patch4 --image-size 32 --batch 256 --threads 2 \
        --precision fp32 --repeats 5 --steps 5 --out bench/results/throughput.json

1. model step: forward + backward + AdamW step (the engine's optimizer) on random images in memory;
2. data loader: the pretraining DataLoader over --data, without a model;
3. end to end: the loader feeding the model step, as in the engine's inner loop (without Accelerate).

Each is timed ``--repeats`` times over ``--steps`` batches; the table gives the median and the range.
The first batch of each loader worker is never timed (worker start-up and first decode); its latency
is reported separately, cold (worker processes spawned) and warm (persistent workers reused).
"""

from __future__ import annotations

import argparse
import datetime
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
from timm.optim import create_optimizer_v2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from mae.config import PRESET_KEYS, PRESETS, Config, load_config  # noqa: E402
from mae.data import EpochSampler, ImageDataset, load_split, pretrain_loader, pretrain_transform  # noqa: E402
from mae.models import build_model  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"
Step = Callable[[torch.Tensor], torch.Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="vit_tiny_patch4", choices=sorted(PRESETS))
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast around the forward")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="timed batches per repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed model steps before the first repeat")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="parquet dataset folder; 'sample' if it is missing")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput.json"))
    return p.parse_args(argv)


def make_config(args: argparse.Namespace, dataset: str) -> Config:
    overrides = [
        f"model.preset={args.preset}",
        f"data.image_size={args.image_size}",
        f"data.dataset={json.dumps(dataset)}",  # quoted: parsed as YAML
        f"data.num_workers={args.workers}",
        f"train.batch_size={args.batch}",
    ]
    return load_config(None, overrides)


def make_step(model: torch.nn.Module, cfg: Config, device: torch.device, precision: str) -> Step:
    """One optimizer step on a batch, optimizer built as in ``mae.engine._optimizer``; returns the loss."""
    t = cfg.train
    lr = t.blr * t.batch_size / 256
    optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=t.weight_decay, betas=t.betas)

    def autocast() -> AbstractContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

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


def bench_model(step: Step, images: torch.Tensor, args: argparse.Namespace, device: torch.device) -> list[float]:
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
    loader: torch.utils.data.DataLoader,
    sampler: EpochSampler,
    skip: int,
    args: argparse.Namespace,
    epoch0: int,
    consume: Callable[[torch.Tensor], Any],
    device: torch.device,
) -> tuple[list[float], list[float]]:
    """Per repeat (one sampler epoch of exactly ``skip + steps`` batches): ``consume`` each batch,
    time the last ``steps``. Returns (images/s, seconds to the end of the ``skip`` untimed batches)."""
    rates, firsts = [], []
    for r in range(args.repeats):
        sampler.set_epoch(epoch0 + r)
        tic = time.perf_counter()
        batches = iter(loader)
        for _ in range(skip):
            consume(next(batches)[0])
        sync(device)
        mid = time.perf_counter()
        for _ in range(args.steps):
            consume(next(batches)[0])
        sync(device)
        rates.append(args.steps * args.batch / (time.perf_counter() - mid))
        firsts.append(mid - tic)
        for _ in batches:  # the epoch is exactly used up; this only ends the iterator cleanly
            pass
    return rates, firsts


def summary(rates: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "samples": rates}


def max_rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no GPU is visible")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    dataset = args.data if args.data != "sample" and Path(args.data).is_dir() else "sample"
    if dataset != args.data:
        print(f"note: {args.data} is not a folder; using the bundled sample")
    cfg = make_config(args, dataset)
    tic = time.perf_counter()
    split = load_split(cfg.data)
    load_s = time.perf_counter() - tic
    data = ImageDataset(split, cfg.data, pretrain_transform(cfg.data), seed=cfg.train.seed)
    skip = max(1, args.workers)  # one untimed batch per worker: start-up and first decode
    per_epoch = (skip + args.steps) * args.batch
    if len(data) < per_epoch:
        sys.exit(f"error: {len(data)} images < {per_epoch} needed per repeat; lower --batch or --steps")
    sampler = EpochSampler(len(data), per_epoch, seed=cfg.train.seed)
    loader = pretrain_loader(data, sampler, cfg.data, args.batch)

    model = build_model(cfg).to(device).train()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step = make_step(model, cfg, device, args.precision)
    m = cfg.model
    print(
        f"{args.preset}: {params / 1e6:.2f}M params, {args.image_size}px, batch {args.batch}, {args.precision}, "
        f"{device}, {args.threads} threads, {args.workers} workers, {os.cpu_count()} cpus ({cpu_model()}); "
        f"data {dataset}: {len(data)} images (loaded in {load_s:.1f} s)"
    )

    images = torch.randn(args.batch, cfg.data.channels, args.image_size, args.image_size, device=device)
    model_rates = bench_model(step, images, args, device)
    rss_model = max_rss_mib(resource.RUSAGE_SELF)
    del images

    loader_rates, loader_firsts = bench_loader(loader, sampler, skip, args, 0, lambda x: None, device)
    e2e_rates, _ = bench_loader(
        loader, sampler, skip, args, args.repeats, lambda x: step(x.to(device, non_blocking=True)), device
    )
    del loader  # shuts the persistent workers down, so their peak RSS is counted below
    gc.collect()

    results: dict[str, Any] = {
        "model_step": summary(model_rates),
        "data_loader": summary(loader_rates),
        "end_to_end": summary(e2e_rates),
        "loader_first_batches_s": {"cold": loader_firsts[0], "warm_median": statistics.median(loader_firsts[1:] or [0])},
        "dataset_load_s": load_s,
        "peak_rss_mib": {
            "after_model_step": rss_model,
            "main": max_rss_mib(resource.RUSAGE_SELF),
            "largest_worker": max_rss_mib(resource.RUSAGE_CHILDREN),
        },
    }
    if device.type == "cuda":
        results["cuda_max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20

    firsts = results["loader_first_batches_s"]
    rows = [
        ("model step", results["model_step"], f"fwd+bwd+AdamW, {args.precision}, synthetic images"),
        ("data loader", results["data_loader"], f"{args.workers} workers; first {skip} batches "
         f"{firsts['cold']:.2f} s cold, {firsts['warm_median']:.2f} s warm"),
        ("end to end", results["end_to_end"], "loader -> model step"),
    ]
    print(f"{'measurement':<12} {'img/s':>9} {'min':>9} {'max':>9}  notes")
    for name, r, note in rows:
        print(f"{name:<12} {r['median']:>9.1f} {r['min']:>9.1f} {r['max']:>9.1f}  {note}")
    model_med, loader_med, e2e_med = (results[k]["median"] for k in ("model_step", "data_loader", "end_to_end"))
    bound, other = ("data loader", "model step") if loader_med < model_med else ("model step", "data loader")
    slower = min(model_med, loader_med)
    results["bound_by"] = bound
    print(
        f"bound by: {bound} ({slower:.1f} img/s vs {other} {max(model_med, loader_med):.1f}); "
        f"end to end reaches {100 * e2e_med / slower:.0f}% of it"
    )
    rss = results["peak_rss_mib"]
    cuda = results.get("cuda_max_memory_allocated_mib")
    print(
        f"peak RSS: main {rss['main']:.0f} MiB (model step alone {rss['after_model_step']:.0f}), "
        f"largest worker {rss['largest_worker']:.0f} MiB" + (f"; CUDA max allocated {cuda:.0f} MiB" if cuda else "")
    )

    settings = {
        "preset": args.preset,
        "dims": {k: getattr(m, k) for k in PRESET_KEYS} | {"mlp_ratio": m.mlp_ratio, "mask_ratio": m.mask_ratio},
        "params": params,
        "image_size": args.image_size,
        "batch": args.batch,
        "threads": args.threads,
        "workers": args.workers,
        "precision": args.precision,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "repeats": args.repeats,
        "steps": args.steps,
        "warmup": args.warmup,
        "untimed_loader_batches": skip,
        "dataset": dataset,
        "dataset_size": len(data),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": sys.version.split()[0],
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings, "results": results}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
