"""Loss formulas as pure functions of tensors."""

from __future__ import annotations

import torch


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch pixel normalisation of (B, L, P): returns (normalised, mean, std), mean/std (B, L, 1).

    Uses the unbiased variance, as the official MAE code does.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + eps) ** 0.5
    return (patches - mean) / std, mean, std


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over removed patches only.

    pred, target: (B, L, P); mask: (B, L), 1 for removed patches. Each patch's error is the mean
    over its P values; the loss is the mean over removed patches.
    """
    per_patch = (pred - target).pow(2).mean(dim=-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()
