"""Reconstruction grids: one row per image, (masked or corrupted input | reconstruction | original).

Every grid the project writes goes through ``save_tiles``, which enlarges small tiles (nearest
neighbour, by a whole factor) to at least ``MIN_TILE`` pixels, so that 32-px images can be read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torchvision.utils import save_image

from mae.models.base import AEOutput

MIN_TILE = 96  # pixels: the shorter side of a tile in a saved grid, at least


def save_tiles(tiles: torch.Tensor, path: str | Path, nrow: int) -> None:
    """(N, C, H, W) in [0, 1] as one image of ``nrow`` tiles a row, each enlarged to at least MIN_TILE px."""
    factor = -(-MIN_TILE // min(tiles.shape[-2:]))  # ceil
    if factor > 1:
        tiles = tiles.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)  # nearest neighbour
    save_image(tiles, str(path), nrow=nrow, padding=2, pad_value=1.0)


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, C, H, W) normalised -> [0, 1]."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


def recon_panels(images: torch.Tensor, out: AEOutput) -> list[torch.Tensor]:
    """Panels in normalised space. With a mask: masked input (hidden parts grey), reconstruction with
    the visible patches pasted back, original; without: reconstruction, original."""
    if out.recon is None:
        raise ValueError("the model returned no reconstruction; call it in eval mode")
    recon = out.recon.float()
    if out.corrupted is not None:  # denoising: noisy input | restored | clean
        return [out.corrupted.float(), recon, images]
    if out.mask is None:
        return [recon, images]
    keep = 1 - out.mask
    return [images * keep, images * keep + recon * out.mask, images]


def save_recon_grid(
    path: str | Path, images: torch.Tensor, out: AEOutput, mean: Sequence[float], std: Sequence[float]
) -> None:
    panels = [denormalize(p.cpu(), mean, std) for p in recon_panels(images, out)]
    rows = torch.stack(panels, dim=1).flatten(0, 1)  # (B * panels, C, H, W), row-major
    save_tiles(rows, path, nrow=len(panels))
