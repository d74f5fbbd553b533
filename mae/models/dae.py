"""Denoising autoencoder (Vincent et al. 2008): the encoder sees a corrupted image, the loss
compares the reconstruction with the clean one.

Corruptions (``model.corruption``, level ``model.noise_level``), applied to pixels in [0, 1], every
channel of a location alike:

- ``gaussian``: additive isotropic noise of std ``noise_level``;
- ``masking``: a fraction ``noise_level`` of pixels — or of ``corruption_patch``-sided squares —
  set to 0;
- ``salt_pepper``: a fraction ``noise_level`` of pixels set to 0 or 1 with equal odds.

``encode`` sees clean images. In eval mode the forward still corrupts (reconstruction grids show
noisy | restored | clean).
"""

from __future__ import annotations

from typing import Any

import torch

from mae.models.conv import ClassicAutoencoder


def corrupt_pixels(pixels: torch.Tensor, kind: str, level: float, patch: int = 1) -> torch.Tensor:
    """Corrupt (B, C, H, W) pixels in [0, 1] (see the module docstring); draws from the global
    RNG."""
    if kind == "gaussian":
        return pixels + level * torch.randn_like(pixels)
    b, _, h, w = pixels.shape
    if kind == "masking":
        grid = torch.rand(b, 1, -(-h // patch), -(-w // patch), device=pixels.device) < level
        hit = grid.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[:, :, :h, :w]
        return pixels.masked_fill(hit, 0.0)
    if kind == "salt_pepper":
        u = torch.rand(b, 1, h, w, device=pixels.device)
        salt = (u < level / 2).to(pixels.dtype)
        hit = u < level
        return torch.where(hit, salt.expand_as(pixels), pixels)
    raise ValueError(f"unknown corruption {kind!r}")


class DenoisingAutoencoder(ClassicAutoencoder):
    code_activation = "identity"
    config_keys = ("corruption", "noise_level", "corruption_patch")

    def __init__(
        self,
        *,
        corruption: str = "gaussian",
        noise_level: float = 0.3,
        corruption_patch: int = 1,
        **shared: Any,
    ) -> None:
        super().__init__(**shared)
        self.corruption, self.noise_level = corruption, noise_level
        self.corruption_patch = corruption_patch

    def corrupt(self, images: torch.Tensor) -> torch.Tensor:
        # not clamped: the clean image is recovered exactly at level 0
        pixels = images * self.std + self.mean
        noisy = corrupt_pixels(pixels, self.corruption, self.noise_level, self.corruption_patch)
        return (noisy - self.mean) / self.std
