"""CrossMAE's decoder against MAE's, same encoder, side by side in one process: images/s and FLOPs.

    python bench/crossmae.py --setting base  # ViT-B/16 at 224 px: MAE 512x8 vs CrossMAE 512x12, 25%
    python bench/crossmae.py --setting tiny  # ViT-Tiny/4 at 32 px: the CIFAR-10 budget recipes

A step is forward + backward + AdamW step (the trainer's optimizer and attention choice,
``bench/vs_hf.py``'s ``make_step``) on random images in memory. The settings are timed round robin
(``--repeats`` rounds of ``--steps`` steps, after ``--warmup`` untimed steps), so drift hits all
alike; the table gives medians and the speed-up cross / mae at each precision. FLOPs: one forward +
backward counted by ``torch.utils.flop_counter.FlopCounterMode`` with attention written out as
matmuls (``bench/vs_hf.py``'s ``step_flops``).
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import (
    ROOT,
    add_out,
    add_step_comparison,
    device_description,
    medians,
    rate_cells,
    rate_header,
    timestamp,
    torch_device,
    write_json,
)

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
    add_step_comparison(p, SETTINGS, steps=2, warmup=1)
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument(
        "--compile", nargs="?", const="default", metavar="MODE", help="torch.compile the forwards"
    )
    add_out(p, "crossmae.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch_device(args.device)
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
    median = medians(rates)
    speedup = {p: median[f"cross-{p}"] / median[f"mae-{p}"] for p in args.precisions}

    where = device_description(device, args.threads)
    print(f"{preset} at {size} px, batch {args.batch}, {where}; torch {torch.__version__}")
    for name, extra in decoders.items():
        print(f"  {name}: {' '.join(extra) or 'the preset decoder'}")
    print(f"{'setting':<12} {rate_header(8)} {'GFLOP/img':>10}")
    for key, r in rates.items():
        gflops = flops[key.split("-")[0]] / 1e9
        print(f"{key:<12} {rate_cells(r, 8)} {gflops:>10.2f}")
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
            "date": timestamp(),
        },
        "images_per_s": rates,
        "median": median,
        "speedup": speedup,
        "flops_per_image": flops,
        "flops_ratio": ratio,
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
