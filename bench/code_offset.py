"""How much of each run's codes is an offset all images share: what raw cosine kNN cannot see past.

    python bench/code_offset.py bench/results/budget300_family/runs/cae \\
        bench/results/budget600_family/runs/cae

For each run (or ``random:RUN``), on the training split's features as the probes take them
(``mae.eval.probe``'s cache, extracted when missing, with ``configs/eval/knn_cifar10.yaml``'s
settings):

- offset share: ||mean feature||^2 / mean ||feature||^2 (0: centred codes; 1: all images one code);
- mean cosine between two images' features (4,000 images, each pair once);
- the mean feature value and the smallest per-dimension std (a dead unit: std below 0.01).

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from mae.config.evaluation import load_eval_config  # noqa: E402
from mae.eval.probe import cached_features, fit_and_eval_splits, probe_encoder  # noqa: E402


def offset_stats(x: torch.Tensor, pairs_of: int = 4000) -> dict[str, float]:
    x = x.float()
    mean = x.mean(dim=0)
    some = torch.nn.functional.normalize(
        x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))][:pairs_of]
    )
    cos = some @ some.T
    n = len(some)
    return {
        "offset_share": (mean.pow(2).sum() / x.pow(2).sum(dim=1).mean()).item(),
        "mean_cosine": ((cos.sum() - cos.diagonal().sum()) / (n * (n - 1))).item(),
        "mean_value": x.mean().item(),
        "min_std": x.std(dim=0).min().item(),
    }


def training_features(source: str, data: str) -> torch.Tensor:
    cfg = load_eval_config(
        str(ROOT / "configs/eval/knn_cifar10.yaml"), [f"encoder={source}", f"data.dataset={data}"]
    )
    encoder, pool = probe_encoder(cfg)
    fit = fit_and_eval_splits(cfg).fit
    return cached_features(encoder, fit, cfg.data.split, cfg, pool)[0]["features"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (or random:RUN)")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10"))
    args = p.parse_args(argv)
    print("| run | offset share | mean cosine | mean value | smallest std |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for source in args.runs:
        s = offset_stats(training_features(source, args.data))
        shown = source.replace(str(ROOT) + "/", "")
        cells = [f"{s[k]:.3f}" for k in ("offset_share", "mean_cosine", "mean_value", "min_std")]
        print(f"| {shown} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
