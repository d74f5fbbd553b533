"""Contractive autoencoder (Rifai et al. 2011): sigmoid code, penalty ``contractive_weight`` x the
squared Frobenius norm of the Jacobian d code / d input, averaged over images.

- A single sigmoid layer (``arch=mlp``, ``widths=[]``): the exact closed form
  sum_j (h_j (1 - h_j))^2 ||W_j||^2.
- Deeper encoders: the unbiased estimate ||J||_F^2 = E_v ||J v||^2 over Rademacher v in input
  space, ``contractive_projections`` forward-mode products (``torch.func.jvp``) per step: the cost
  is a forward pass per projection, whatever the input size.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.func import jvp

from mae.losses import sigmoid_layer_jacobian_norm
from mae.models.conv import ClassicAutoencoder


class ContractiveAutoencoder(ClassicAutoencoder):
    code_activation = "sigmoid"
    config_keys = ("contractive_weight", "contractive_projections")

    def __init__(
        self, *, contractive_weight: float = 0.1, contractive_projections: int = 1, **shared: Any
    ) -> None:
        super().__init__(**shared)
        self.weight, self.projections = contractive_weight, contractive_projections
        self.exact = self.arch == "mlp" and len(self.widths) == 0

    def jacobian_norm(self, x: torch.Tensor, code: torch.Tensor | None = None) -> torch.Tensor:
        """||d code / d x||_F^2 per image, (B,): exact for a single sigmoid layer, else the
        estimate."""
        if self.exact:
            code = self.code(x) if code is None else code
            return sigmoid_layer_jacobian_norm(code.float(), self.encoder.net[0].weight.float())
        total = torch.zeros(len(x), device=x.device)
        for _ in range(self.projections):
            v = torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1  # Rademacher
            # torch's forward-AD set-up scripts its decompositions once
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
                _, jv = jvp(self.code, (x,), (v,))
            total = total + jv.float().pow(2).flatten(1).sum(dim=1)
        return total / self.projections

    def penalty(self, x: torch.Tensor, code: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"contractive": self.weight * self.jacobian_norm(x, code).mean()}
