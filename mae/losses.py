"""Loss formulas as pure functions of tensors."""

from __future__ import annotations

import torch


def normalize_patches(
    patches: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch pixel normalisation of (B, L, P): returns (normalised, mean, std), mean/std
    (B, L, 1).

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


def kl_diag_gaussians(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """KL(q || p) of diagonal Gaussians, summed over the last dimension: (..., D) -> (...)."""
    return 0.5 * (
        logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1
    ).sum(dim=-1)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over the last dimension."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(dim=-1)


def bernoulli_kl(rho: float, rho_hat: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Sparsity penalty: sum over units of KL(Bernoulli(rho) || Bernoulli(rho_hat)), rho_hat (D,)
    the mean activation of each unit over the batch."""
    rho_hat = rho_hat.clamp(eps, 1 - eps)
    return (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()


def sigmoid_layer_jacobian_norm(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm of d h / d x for h = sigmoid(W x + b), per sample: (B, D_h),
    W (D_h, D_x) -> (B,). Closed form (Rifai et al. 2011): sum_j (h_j (1 - h_j))^2 ||W_j||^2."""
    return ((h * (1 - h)).pow(2) * weight.pow(2).sum(dim=1)).sum(dim=1)
