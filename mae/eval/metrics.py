"""Image and detection metrics of ``mae.evaluate``: PSNR over a split (identical images handled),
per-image MSE, SSIM, and AUROC / AUPR of anomaly scores."""

from __future__ import annotations

import math
from typing import Any

import torch
from torchmetrics.functional.classification import binary_auroc, binary_average_precision
from torchmetrics.functional.image import structural_similarity_index_measure


def psnr_summary(mse: torch.Tensor) -> dict[str, Any]:
    """PSNR over images with per-image MSE ``mse`` (pixels in [0, 1]); identical images handled."""
    identical = mse == 0
    mean_mse = mse.mean().item()
    per_image = -10 * torch.log10(mse[~identical])
    return {
        "mse": mean_mse,
        "psnr_db": "inf" if mean_mse == 0 else -10 * math.log10(mean_mse),
        "psnr_db_mean": per_image.mean().item() if len(per_image) else "inf",
        "identical": int(identical.sum()),
    }


def pixel_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error of (B, ...) tensors: (B,)."""
    return (a - b).pow(2).flatten(1).mean(dim=1)


def image_metrics(pixels: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image MSE and SSIM of (B, C, H, W) pixels in [0, 1]."""
    mse = pixel_mse(pixels, target)
    side = min(target.shape[-2:])
    # the usual 11x11 window, or the largest odd one that fits
    size = 11 if side >= 11 else side - (side + 1) % 2
    ssim = structural_similarity_index_measure(
        pixels.float(), target.float(), data_range=1.0, reduction="none", kernel_size=size
    )
    return {"mse": mse, "ssim": ssim}


def detection_scores(
    scores: torch.Tensor, labels: torch.Tensor, normal: list[int]
) -> dict[str, Any]:
    """AUROC / AUPR of ``scores`` (higher = more anomalous), each anomalous class against the normal
    ones."""
    is_normal = torch.isin(labels, torch.tensor(normal))
    out: dict[str, Any] = {"per_class": {}}
    groups = {int(c): labels == c for c in labels.unique().tolist() if c not in normal}
    groups_all = {"all": ~is_normal}
    for name, positive in {**groups, **groups_all}.items():
        keep = positive | is_normal
        target = positive[keep].long()
        row = {
            "auroc": binary_auroc(scores[keep], target).item(),
            "aupr": binary_average_precision(scores[keep], target).item(),
            "count": int(positive.sum()),
        }
        if name == "all":
            out["all"] = row
        else:
            out["per_class"][str(name)] = row
    return out
