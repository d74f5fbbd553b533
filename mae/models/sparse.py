"""Sparse autoencoder: a penalty that keeps most code units inactive (``model.sparsity``):

- ``l1``: ReLU code, penalty ``sparsity_weight`` x mean over images of sum |code|;
- ``kl``: sigmoid code, penalty ``sparsity_weight`` x sum over units of KL(rho || rho_hat), rho =
  ``sparsity_target`` and rho_hat each unit's mean activation over the batch (Ng's formulation).

Logged: ``sparsity`` (the weighted penalty) and ``density`` (l1: the fraction of non-zero code
entries; kl: the mean activation).
"""

from __future__ import annotations

from typing import Any

import torch

from mae.losses import bernoulli_kl
from mae.models.conv import ClassicAutoencoder


class SparseAutoencoder(ClassicAutoencoder):
    config_keys = ("sparsity", "sparsity_weight", "sparsity_target")

    def __init__(
        self,
        *,
        sparsity: str = "kl",
        sparsity_weight: float = 1e-3,
        sparsity_target: float = 0.05,
        **shared: Any,
    ) -> None:
        super().__init__(**shared)
        self.sparsity, self.weight, self.target = sparsity, sparsity_weight, sparsity_target
        self.code_activation = "relu" if sparsity == "l1" else "sigmoid"

    def penalty(self, x: torch.Tensor, code: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.sparsity == "l1":
            return {"sparsity": self.weight * code.float().abs().sum(dim=1).mean()}
        return {"sparsity": self.weight * bernoulli_kl(self.target, code.float().mean(dim=0))}

    def stats(self, code: torch.Tensor) -> dict[str, torch.Tensor]:
        density = (code > 0).float().mean() if self.sparsity == "l1" else code.float().mean()
        return {"density": density}
