"""CrossMAE's decoder against MAE's, same encoder, side by side in one process: images/s and FLOPs.

    python bench/crossmae.py --setting base     # ViT-B/16 at 224 px: MAE 512x8 vs CrossMAE 512x12, 25%
    python bench/crossmae.py --setting tiny     # ViT-Tiny/4 at 32 px: the CIFAR-10 budget recipes

A step is forward + backward + AdamW step (the trainer's optimizer and attention choice,
``bench/vs_hf.py``'s ``make_step``) on random images in memory. The settings are timed round robin
(``--repeats`` rounds of ``--steps`` steps, after ``--warmup`` untimed steps), so drift hits all alike;
the table gives medians and the speed-up cross / mae at each precision. FLOPs: one forward + backward
counted by ``torch.utils.flop_counter.FlopCounterMode`` with attention written out as matmuls
(``bench/vs_hf.py``'s ``step_flops``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vs_hf import make_step, round_robin, step_flops  # noqa: E402

from mae.config import load_config  # noqa: E402
from mae.models import build_model  # noqa: E402

# name -> (encoder preset, image size, CPU batch, GPU batch, {decoder: overrides})
SETTINGS = {
    "base": (
        "vit_base_patch16",
        224,
        16,
        256,
        {
            "mae": [],  # the paper's decoder: 512 wide, 8 blocks, every patch
            "cross": [
                "model.decoder=cross",
                "model.decoder_depth=12",
                "model.reconstruct_ratio=0.25",
                "model.decoder_features=weighted",
            ],  # CrossMAE's ViT-B recipe
        },
    ),
    "tiny": (
        "vit_tiny_patch4",
        32,
        256,
        1024,
        {
            "mae": [],  # configs/mae_vit_tiny_cifar10_budget.yaml's decoder: 128 wide, 2 blocks
            "cross": [
                "model.decoder=cross",
                "model.reconstruct_ratio=0.25",
                "model.decoder_features=weighted",
            ],
        },
    ),
}
PRECISIONS = ("fp32", "bf16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="tiny")
    p.add_argument("--batch", type=int, help="default: per setting and device (see SETTINGS)")
    p.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads on CPU"
    )
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="steps per timed round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument(
        "--compile", nargs="?", const="default", metavar="MODE", help="torch.compile the forwards"
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "crossmae.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no GPU is visible")
    device = torch.device(args.device)
    preset, size, cpu_batch, gpu_batch, decoders = SETTINGS[args.setting]
    args.batch = args.batch or (gpu_batch if device.type == "cuda" else cpu_batch)
    torch.set_num_threads(args.threads)
    base = [f"model.preset={preset}", f"data.image_size={size}", f"train.batch_size={args.batch}"]
    configs = {name: load_config(None, [*base, *extra]) for name, extra in decoders.items()}
    images = torch.randn(args.batch, 3, size, size, device=device)
    flops, steps = {}, {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = build_model(cfg).to(device).train()
        flops[name] = step_flops(model, cfg, device)
        for precision in args.precisions:  # each precision trains its own copy
            torch.manual_seed(0)
            copy = build_model(cfg).to(device).train()
            steps[f"{name}-{precision}"] = make_step(
                "ours", copy, cfg, device, precision, images, args.compile
            )
    rates = round_robin(steps, args, device)
    median = {k: statistics.median(v) for k, v in rates.items()}
    speedup = {p: median[f"cross-{p}"] / median[f"mae-{p}"] for p in args.precisions}

    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{args.threads} CPU threads"
    )
    print(f"{preset} at {size} px, batch {args.batch}, {where}; torch {torch.__version__}")
    for name, extra in decoders.items():
        print(f"  {name}: {' '.join(extra) or 'the preset decoder'}")
    print(f"{'setting':<12} {'img/s':>8} {'min':>8} {'max':>8} {'GFLOP/img':>10}")
    for key, r in rates.items():
        gflops = flops[key.split("-")[0]] / 1e9
        print(f"{key:<12} {median[key]:>8.1f} {min(r):>8.1f} {max(r):>8.1f} {gflops:>10.2f}")
    ratio = flops["mae"] / flops["cross"]
    print(
        "cross / mae images/s: "
        + ", ".join(f"{p} {v:.2f}x" for p, v in speedup.items())
        + f"; FLOPs per image mae / cross: {ratio:.2f}x"
    )
    result = {
        "settings": {
            "setting": args.setting,
            "preset": preset,
            "image_size": size,
            "batch": args.batch,
            "device": where,
            "threads": args.threads,
            "repeats": args.repeats,
            "steps": args.steps,
            "warmup": args.warmup,
            "compile": args.compile,
            "decoders": decoders,
            "torch": torch.__version__,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        },
        "images_per_s": rates,
        "median": median,
        "speedup": speedup,
        "flops_per_image": flops,
        "flops_ratio": ratio,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
