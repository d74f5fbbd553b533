"""Sparse autoencoder: a penalty that keeps most code units inactive (``model.sparsity``):

- ``l1``: ReLU code, penalty ``sparsity_weight`` x mean over images of sum |code|;
- ``kl``: sigmoid code, penalty ``sparsity_weight`` x sum over units of KL(rho || rho_hat), rho =
  ``sparsity_target`` and rho_hat each unit's mean activation over the batch (Ng's formulation).

Logged: ``sparsity`` (the weighted penalty) and ``density`` (l1: the fraction of non-zero code
entries; kl: the mean activation).
"""

from __future__ import annotations

import torch

from mae.config import Config
from mae.losses import bernoulli_kl
from mae.models.conv import ClassicAutoencoder


class SparseAutoencoder(ClassicAutoencoder):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        m = cfg.model
        self.sparsity, self.weight, self.target = m.sparsity, m.sparsity_weight, m.sparsity_target
        self.code_activation = "relu" if m.sparsity == "l1" else "sigmoid"

    def penalty(self, x: torch.Tensor, code: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.sparsity == "l1":
            return {"sparsity": self.weight * code.float().abs().sum(dim=1).mean()}
        return {"sparsity": self.weight * bernoulli_kl(self.target, code.float().mean(dim=0))}

    def stats(self, code: torch.Tensor) -> dict[str, torch.Tensor]:
        density = (code > 0).float().mean() if self.sparsity == "l1" else code.float().mean()
        return {"density": density}
