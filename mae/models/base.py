"""The one interface every autoencoder of the project implements."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class AEOutput:
    """What ``forward`` returns.

    loss: the scalar the engine back-propagates. terms: detached named parts for logging.
    recon: (B, C, H, W) reconstruction in the input's (normalised) space, or None (e.g. in
    training mode, where nothing reads it). mask: (B, 1, H, W), 1 where the input was hidden
    from the encoder, for models that hide parts of it; else None. features: (B, D) detached
    representation computed by this forward (for the online probe), or None. corrupted: (B, C, H, W)
    the corrupted input of a denoising model, else None.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    recon: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    features: torch.Tensor | None = None
    # the input the encoder saw, when the model corrupts it (denoising)
    corrupted: torch.Tensor | None = None


class Autoencoder(nn.Module, abc.ABC):
    """``forward(images) -> AEOutput``; ``encode(images) -> (B, feature_dim)``; ``encoder``
    submodule.

    ``encode`` is deterministic (no masking, noise or sampling). ``encoder`` is the part that is
    exported and fine-tuned.
    """

    encoder: nn.Module
    feature_dim: int

    @abc.abstractmethod
    def forward(self, images: torch.Tensor) -> AEOutput: ...

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the model's reconstruction in the same normalised space, deterministic
        but for the model's own masking (no corruption, no sampling). Call in eval mode."""
        out = self.forward(images)
        if out.recon is None:
            raise ValueError(
                f"{type(self).__name__} returned no reconstruction; call it in eval mode"
            )
        return out.recon

    def set_step(self, step: int) -> None:
        """Called by the engine before each optimizer step's forward passes with the number of
        optimizer steps taken so far (for schedules inside the model, e.g. a KL warm-up)."""
