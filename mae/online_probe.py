"""A linear classifier trained alongside pretraining on the detached features of each training
forward (``AEOutput.features``): a cheap health signal for the representation, logged as
``terms/probe_acc`` and ``terms/probe_loss``. It never sends gradients into the autoencoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LR = 1e-3  # AdamW, no weight decay: the head only has to follow the features


class OnlineProbe(nn.Module):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        # built under a forked RNG so that switching the probe on leaves the pretraining run
        # (initialisation, masks) bit-identical
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.head = nn.Sequential(
                nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes)
            )

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, D) detached; labels (B,), -1 for unlabelled rows (ignored). Returns
        (cross-entropy, top-1 accuracy over labelled rows, detached)."""
        logits = self.head(features.detach().float())
        labelled = labels >= 0
        hits = (logits.argmax(1) == labels)[labelled].float()
        acc = hits.mean() if hits.numel() else torch.zeros((), device=logits.device)
        if not labelled.any():  # keep the graph (and DDP's reducer) alive with a zero loss
            return logits.sum() * 0.0, acc.detach()
        return F.cross_entropy(logits, labels, ignore_index=-1), acc.detach()

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=0.0)
