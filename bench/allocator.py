"""The MAE training step on CPU with glibc's default malloc settings and ``tune_cpu_allocator``.

    python bench/allocator.py --setting base --precision bf16      # ViT-B/16, 224 px, batch 32
    python bench/allocator.py --setting tiny --precision fp32      # ViT-Tiny/4, 32 px, batch 256

Training on CPU calls ``mae.run.hardware.tune_cpu_allocator`` at start. It is process-wide, so the
two settings run in separate fresh processes, alternately (``--pairs`` of each, the order flipped
every pair so that drift hits both alike). Each process times ``--rounds`` rounds of 2 steps after
one untimed step. The script prints the medians, their ratio and each process's peak RSS, and writes
JSON. ``bench/vs_hf.py`` compares implementations within one process, under the default settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from common import ROOT, add_out, write_json

sys.path.insert(0, str(ROOT))

import vs_hf  # noqa: E402  (bench/ is the script's own folder)

from mae.models import build_model  # noqa: E402
from mae.run.hardware import tune_cpu_allocator  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=sorted(vs_hf.SETTINGS), default="tiny")
    p.add_argument("--precision", choices=vs_hf.PRECISIONS, default="bf16")
    p.add_argument("--batch", type=int, help="default: the setting's CPU batch (bench/vs_hf.py)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", choices=["default", "tuned"], help=argparse.SUPPRESS)
    add_out(p, "allocator.json")
    args = p.parse_args(argv)
    args.batch = args.batch or vs_hf.SETTINGS[args.setting][2]
    return args


def child(args: argparse.Namespace) -> None:
    """One process, one setting: a JSON line with the median images/s and the peak RSS."""
    applied = tune_cpu_allocator() if args.child == "tuned" else False
    if args.child == "tuned" and not applied:
        sys.exit(
            "error: tune_cpu_allocator did not apply here "
            "(no glibc, or malloc settings already chosen)"
        )
    torch.set_num_threads(args.threads)
    cfg = vs_hf.make_config(args)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    images = torch.randn(args.batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    step = vs_hf.make_step("ours", model, cfg, torch.device("cpu"), args.precision, images)
    step()
    rates = []
    for _ in range(args.rounds):
        tic = time.perf_counter()
        step(), step()
        rates.append(2 * args.batch / (time.perf_counter() - tic))
    print(
        json.dumps({"images_per_s": statistics.median(rates), "peak_rss_mib": vs_hf.peak_rss_mib()})
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    runs: dict[str, list[dict]] = {"default": [], "tuned": []}
    base = [sys.executable, __file__, "--setting", args.setting, "--precision", args.precision]
    base += [
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
        "--rounds",
        str(args.rounds),
    ]
    env = {k: v for k, v in os.environ.items() if k != "MAE_DEFAULT_MALLOC"}
    for pair in range(args.pairs):
        for which in ("default", "tuned") if pair % 2 == 0 else ("tuned", "default"):
            proc = subprocess.run(
                [*base, "--child", which], capture_output=True, text=True, env=env, check=False
            )
            if proc.returncode:
                sys.exit(proc.stderr.strip().splitlines()[-1])
            runs[which].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    median = {k: statistics.median(r["images_per_s"] for r in v) for k, v in runs.items()}
    rss = {k: max(r["peak_rss_mib"] for r in v) for k, v in runs.items()}
    preset, size, *_ = vs_hf.SETTINGS[args.setting]
    print(
        f"{preset} at {size} px, batch {args.batch}, {args.precision}, {args.threads} threads; "
        f"{args.pairs} processes each, {args.rounds} x 2 steps per process"
    )
    for k in runs:
        each = ", ".join(f"{r['images_per_s']:.2f}" for r in runs[k])
        print(f"{k:<8} {median[k]:8.2f} img/s (processes: {each}); peak RSS {rss[k]:.0f} MiB")
    print(f"tuned / default: {median['tuned'] / median['default']:.3f}x")
    write_json(args.out, {"settings": vars(args), "runs": runs, "median": median})
    return 0


if __name__ == "__main__":
    sys.exit(main())
