"""The project's MAE step vs Hugging Face ``ViTMAEForPreTraining``, side by side in one process.

    python bench/vs_hf.py --setting tiny     # ViT-Tiny/4, 32 px, batch 256
    python bench/vs_hf.py --setting base     # ViT-B/16, 224 px (batch 32 on CPU, 128 on GPU)
    python bench/vs_hf.py --setting large --device cuda

Both models have the identical architecture and the same weights (``mae.interop.to_hf``): dims,
depth, heads, decoder, mask ratio, norm-pix loss; same batch, threads and optimizer (timm AdamW,
the engine's parameter groups). Each runs at fp32 and under bf16 autocast; ours with the attention
core the engine picks for that precision (``mae.run.hardware``), Hugging Face with its default
(``sdpa``). A step is forward + backward + optimizer step on random images in memory.

- **Same results first**: before timing, both compute the loss for the same images and mask noise;
  the difference is printed (fp32 must agree to 1e-5).
- **Throughput**: the four step functions are timed round robin (``--repeats`` rounds of ``--steps``
  steps each, after ``--warmup`` untimed steps), so drift hits all alike; the table gives medians,
  and the ratios ours / Hugging Face at equal precision and each at its default (ours: what
  ``mixed_precision=auto`` gives on this device; Hugging Face: fp32).
- **Memory**: each setting again in a fresh subprocess (``--memory-of``): peak RSS on CPU,
  ``torch.cuda.max_memory_allocated`` on GPU.
- **FLOPs**: one step of ours counted by ``torch.utils.flop_counter.FlopCounterMode`` with the
  attention written out as matmuls (matmuls, convolutions and attention; elementwise ops and the
  optimizer are not counted). Model FLOPs utilisation = counted FLOPs x steps/s / peak; the peak
  is the GPU's dense bf16/fp32 rating (``--peak-tflops`` overrides), and on CPU the rate of a large
  matmul measured here at the same precision ("of this machine's matmul rate").
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from common import (
    ROOT,
    add_out,
    add_step_comparison,
    device_description,
    medians,
    rate_cells,
    rate_header,
    step_flops,
    timestamp,
    torch_device,
    write_json,
)

sys.path.insert(0, str(ROOT))

from throughput import sync  # noqa: E402  (bench/ is the script's own folder)

from mae.config import Config, derive, load_config  # noqa: E402
from mae.models import build_model  # noqa: E402
from mae.pretrain import build_optimizer  # noqa: E402
from mae.run.hardware import resolve_attention, resolve_precision, set_attention  # noqa: E402

SETTINGS = {  # name -> (preset, image size, CPU batch, GPU batch)
    "tiny": ("vit_tiny_patch4", 32, 256, 1024),
    "base": ("vit_base_patch16", 224, 32, 128),
    "large": ("vit_large_patch16", 224, 16, 64),
}
# dense peak TFLOP/s (bf16, fp32 without TF32) from the vendors' data sheets
GPU_PEAK = {
    "H100": (989.4, 66.9),
    "H200": (989.4, 66.9),
    "A100": (312.0, 19.5),
    "L4": (121.0, 30.3),
}
IMPLS, PRECISIONS, OPTIMIZERS = ("ours", "hf"), ("fp32", "bf16"), ("foreach", "fused")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_comparison(p, SETTINGS, steps=3, warmup=2)
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's peak for MFU (default: known GPUs, CPU matmul)",
    )
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument(
        "--impls",
        nargs="+",
        choices=IMPLS,
        default=list(IMPLS),
        help="which to time (both still agree)",
    )
    p.add_argument(
        "--optimizers",
        nargs="+",
        choices=OPTIMIZERS,
        default=["foreach"],
        help="AdamW's implementation: the engine's (foreach) and/or torch's fused kernel, "
        "timed side by side",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        metavar="MODE",
        help="torch.compile both models' forward, in MODE "
        "(default | reduce-overhead | max-autotune...)",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        help="then profile this many steps of ours (first precision)",
    )
    p.add_argument(
        "--no-memory", action="store_true", help="skip the per-setting memory subprocesses"
    )
    # IMPL-PRECISION: one setting's memory, then exit
    p.add_argument("--memory-of", help=argparse.SUPPRESS)
    add_out(p, "vs_hf.json")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    preset, size, *_ = SETTINGS[args.setting]
    return load_config(
        None,
        [f"model.preset={preset}", f"data.image_size={size}", f"train.batch_size={args.batch}"],
    )


def autocast(device: torch.device, precision: str) -> Any:
    return (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    )


def build_pair(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours and Hugging Face's, with the same weights."""
    from mae.interop import to_hf

    torch.manual_seed(0)
    ours = build_model(cfg)
    return ours.to(device).train(), to_hf(ours, cfg).to(device).train()


def make_step(
    impl: str,
    model: torch.nn.Module,
    cfg: Config,
    device: torch.device,
    precision: str,
    images: torch.Tensor,
    compile: str | None = None,
    optimizer_impl: str = "foreach",
) -> Callable[[], torch.Tensor]:
    """One optimizer step of ``model`` on ``images``; the engine's optimizer for both
    implementations. ``compile``: the forward (and so its backward) through ``torch.compile`` in
    that mode; the optimizer step stays eager. ``optimizer_impl``: ``fused`` takes torch's
    single-kernel AdamW instead of the default."""
    if impl == "ours":
        set_attention(
            model, resolve_attention("auto", device, "bf16" if precision == "bf16" else "no")
        )
    derived = derive(cfg, dataset_size=cfg.train.batch_size, num_processes=1)
    optimizer = build_optimizer(model, cfg, derived, fused=optimizer_impl == "fused")
    forward = (
        torch.compile(model, mode=None if compile == "default" else compile) if compile else model
    )

    def step() -> torch.Tensor:
        with autocast(device, precision):
            loss = forward(images).loss if impl == "ours" else forward(pixel_values=images).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def round_robin(
    steps: dict[str, Callable[[], torch.Tensor]], args: argparse.Namespace, device: torch.device
):
    """Images/s of each step function: ``args.warmup`` untimed steps each, then ``args.repeats``
    rounds of ``args.steps`` steps of every one in turn, so drift hits all alike. Stops on a
    non-finite loss."""
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    rates: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.repeats):
        for key, step in steps.items():
            sync(device)
            tic = time.perf_counter()
            for _ in range(args.steps):
                loss = step()
            sync(device)
            rates[key].append(args.steps * args.batch / (time.perf_counter() - tic))
            if not torch.isfinite(loss):
                sys.exit(f"error: {key} loss became {loss.item()}")
    return rates


def same_results(
    ours: torch.nn.Module, hf: torch.nn.Module, cfg: Config, device: torch.device
) -> dict[str, float]:
    """|loss ours - loss HF| for the same images and mask noise, per precision (before any step)."""
    torch.manual_seed(1)
    images = torch.randn(
        8, cfg.data.channels, cfg.data.image_size, cfg.data.image_size, device=device
    )
    noise = torch.rand(8, (cfg.data.image_size // cfg.model.patch_size) ** 2, device=device)
    diffs = {}
    for precision in PRECISIONS:
        set_attention(
            ours, resolve_attention("auto", device, "bf16" if precision == "bf16" else "no")
        )
        with torch.no_grad(), autocast(device, precision):
            a, b = (
                ours(images, noise=noise).loss.float(),
                hf(pixel_values=images, noise=noise).loss.float(),
            )
        diffs[precision] = {"ours": a.item(), "hf": b.item(), "abs_diff": (a - b).abs().item()}
    if diffs["fp32"]["abs_diff"] > 1e-5:
        sys.exit(
            f"error: the two models disagree at fp32 ({diffs['fp32']}); "
            "the comparison would be meaningless"
        )
    return diffs


def matmul_tflops(
    device: torch.device, precision: str, size: int = 2048, repeats: int = 5
) -> float:
    """This machine's rate on a large square matmul at ``precision`` (median of ``repeats``)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    rates = []
    for _ in range(repeats + 1):
        sync(device)
        tic = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        rates.append(4 * 2 * size**3 / (time.perf_counter() - tic) / 1e12)
    return statistics.median(rates[1:])


def gpu_peak(device: torch.device, precision: str) -> float | None:
    name = torch.cuda.get_device_name(device)
    match = next((v for k, v in GPU_PEAK.items() if k in name), None)
    return None if match is None else match[0 if precision == "bf16" else 1]


def memory_of(args: argparse.Namespace, device: torch.device) -> None:
    """Peak memory of one IMPL-PRECISION setting, alone in this process: a JSON line on stdout."""
    impl, precision = args.memory_of.split("-")
    cfg = make_config(args)
    if impl == "ours":  # only the one model is ever allocated (weights do not matter here)
        model = build_model(cfg).to(device).train()
    else:
        from transformers import ViTMAEForPreTraining

        from mae.interop import hf_config

        model = ViTMAEForPreTraining(hf_config(cfg)).to(device).train()
    images = torch.randn(
        args.batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size, device=device
    )
    step = make_step(impl, model, cfg, device, precision, images, args.compile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(3):
        step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    print(
        json.dumps(
            {
                "peak_rss_mib": peak_rss_mib(),
                "cuda_max_allocated_mib": peak / 2**20 if peak else None,
            }
        )
    )


def peak_rss_mib() -> float:
    """This process's RSS high-water mark. ``VmHWM`` rather than ``ru_maxrss``, which Linux carries
    over from the parent through fork and exec."""
    status = Path("/proc/self/status")
    if status.is_file():
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for impl in args.impls:
        for precision in args.precisions:
            cmd = [sys.executable, __file__, "--setting", args.setting, "--batch", str(args.batch)]
            cmd += ["--compile", args.compile] if args.compile else []
            cmd += [
                "--threads",
                str(args.threads),
                "--device",
                args.device,
                "--memory-of",
                f"{impl}-{precision}",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                out[f"{impl}-{precision}"] = {"error": proc.stderr.strip().splitlines()[-1:]}
                continue
            out[f"{impl}-{precision}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch_device(args.device)
    args.batch = args.batch or SETTINGS[args.setting][3 if device.type == "cuda" else 2]
    torch.set_num_threads(args.threads)
    if args.memory_of:
        memory_of(args, device)
        return 0
    try:
        import transformers
    except ImportError:
        sys.exit('error: Hugging Face transformers is needed: pip install -e ".[hf]"')

    cfg = make_config(args)
    ours, hf = build_pair(cfg, device)
    diffs = same_results(ours, hf, cfg, device)
    flops = step_flops(ours, cfg, device)
    images = torch.randn(
        args.batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size, device=device
    )
    models = {"ours": ours, "hf": hf}
    steps = {  # each setting trains its own copy, so that all start from the same weights
        f"{impl}-{precision}" + ("" if opt == "foreach" else f"-{opt}"): make_step(
            impl, copy.deepcopy(models[impl]), cfg, device, precision, images, args.compile, opt
        )
        for impl in args.impls
        for precision in args.precisions
        for opt in args.optimizers
    }
    rates = round_robin(steps, args, device)
    median = medians(rates)
    default = resolve_precision("auto", device)
    ours_default = "ours-bf16" if default == "bf16" else "ours-fp32"
    ratios = {
        p: median[f"ours-{p}"] / median[f"hf-{p}"] for p in args.precisions if f"hf-{p}" in median
    }
    if ours_default in median and "hf-fp32" in median:
        ratios["defaults"] = median[ours_default] / median["hf-fp32"]
    peaks = {}
    for precision in args.precisions:
        peak = args.peak_tflops or (gpu_peak(device, precision) if device.type == "cuda" else None)
        peaks[precision] = {
            "tflops": peak or matmul_tflops(device, precision),
            "source": "rating" if peak else "matmul",
        }
    mem = {} if args.no_memory else memory(args)

    preset, size, *_ = SETTINGS[args.setting]
    where = device_description(device, args.threads)
    compiled = f"; both forwards through torch.compile ({args.compile})" if args.compile else ""
    print(
        f"{preset} at {size} px, batch {args.batch}, {where}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}{compiled}"
    )
    print(
        f"same weights and mask: |loss ours - loss HF| fp32 {diffs['fp32']['abs_diff']:.1e}, "
        f"bf16 {diffs['bf16']['abs_diff']:.1e}"
    )
    print(f"{'setting':<16} {rate_header(8)} {'TFLOP/s':>8} {'MFU':>6} {'peak MiB':>9}")
    for key, r in rates.items():
        tflops = flops * median[key] / 1e12
        mfu = tflops / peaks[key.split("-")[1]]["tflops"]
        m = mem.get(key, {})
        peak_mem = m.get("cuda_max_allocated_mib") or m.get("peak_rss_mib")
        print(
            f"{key:<16} {rate_cells(r, 8)} "
            f"{tflops:>8.3f} {mfu:>6.1%} {'-' if peak_mem is None else round(peak_mem):>9}"
        )
    if ratios:
        print(
            "ours / HF: "
            + ", ".join(f"{p} {ratios[p]:.2f}x" for p in ratios if p != "defaults")
            + (
                f"; each at its default ({ours_default} vs hf-fp32): {ratios['defaults']:.2f}x"
                if "defaults" in ratios
                else ""
            )
        )
    print(
        f"FLOPs per image (fwd + bwd, FlopCounterMode): {flops / 1e9:.3f} G; MFU against "
        + ", ".join(f"{p} {v['tflops']:.2f} TFLOP/s ({v['source']})" for p, v in peaks.items())
    )

    result = {
        "settings": {
            "setting": args.setting,
            "preset": preset,
            "image_size": size,
            "batch": args.batch,
            "threads": args.threads,
            "device": where,
            "repeats": args.repeats,
            "steps": args.steps,
            "warmup": args.warmup,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "compile": args.compile,
            "impls": args.impls,
            "optimizers": args.optimizers,
            "date": timestamp(),
            "ours_default_precision": default,
        },
        "same_results": diffs,
        "images_per_s": rates,
        "median": median,
        "ratios": ratios,
        "flops_per_image": flops,
        "peak_tflops": peaks,
        "memory": mem,
    }
    write_json(args.out, result)
    if args.profile:
        profile(steps[f"ours-{args.precisions[0]}"], args.profile, device)
    return 0


def profile(step: Callable[[], torch.Tensor], n: int, device: torch.device) -> None:
    """The operators of ``n`` steps that take most time (device time on GPU, CPU time on CPU)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(n):
            step()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    sys.exit(main())
