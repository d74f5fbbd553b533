"""Reconstruction grids: one row per image, (masked or corrupted input | reconstruction | original).

Every grid the project writes goes through ``save_tiles``, which enlarges small tiles (nearest
neighbour, by a whole factor) to at least ``MIN_TILE`` pixels, so that 32-px images can be read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

from mae.config import DataConfig
from mae.models.base import AEOutput

MIN_TILE = 96  # pixels: the shorter side of a tile in a saved grid, at least
PADDING = 2  # pixels between tiles
TITLE_HEIGHT = 16  # pixels: the strip of column titles


def save_tiles(
    tiles: torch.Tensor, path: str | Path, nrow: int, titles: Sequence[str] | None = None
) -> None:
    """(N, C, H, W) in [0, 1] as one image of ``nrow`` tiles a row, each enlarged to at least
    MIN_TILE px (an array of other than 1, 3 or 4 channels: its first three, ``shown_channels``);
    ``titles``: one per column, written above it."""
    tiles = shown_channels(tiles, None)
    factor = -(-MIN_TILE // min(tiles.shape[-2:]))  # ceil
    if factor > 1:
        # nearest neighbour
        tiles = tiles.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    grid = make_grid(tiles, nrow=nrow, padding=PADDING, pad_value=1.0)
    # rounded to 8 bits as torchvision's save_image does
    image = to_pil_image(grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8))
    if titles:
        image = with_titles(image, titles, tiles.shape[-1])
    image.save(path)


def with_titles(image: Image.Image, titles: Sequence[str], tile_width: int) -> Image.Image:
    """``image`` with a white strip on top holding each column's title, centred over it."""
    font = ImageFont.load_default()
    strip = Image.new(image.mode, (image.width, TITLE_HEIGHT), "white")
    draw = ImageDraw.Draw(strip)
    for i, title in enumerate(titles):
        centre = PADDING + i * (tile_width + PADDING) + tile_width / 2
        draw.text((centre, TITLE_HEIGHT / 2), title, fill="black", font=font, anchor="mm")
    titled = Image.new(image.mode, (image.width, image.height + TITLE_HEIGHT), "white")
    titled.paste(strip, (0, 0))
    titled.paste(image, (0, TITLE_HEIGHT))
    return titled


def denormalize(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], clamp: bool = True
) -> torch.Tensor:
    """(B, C, H, W) normalised -> pixel units, clamped to [0, 1] unless ``clamp`` is false."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1) if clamp else x * s + m


def shown_channels(x: torch.Tensor, channels: Sequence[int] | None) -> torch.Tensor:
    """The channels a grid shows: ``data.grid_channels``; by default all of a grey, RGB or RGBA
    image, else the first three (the first one of a two-channel array)."""
    if channels is None:
        if x.shape[1] in (1, 3, 4):
            return x
        channels = range(3) if x.shape[1] >= 3 else range(1)
    return x[:, list(channels)]


def stretch(panels: list[torch.Tensor], reference: torch.Tensor) -> list[torch.Tensor]:
    """Arrays (16-bit, float) rarely fill [0, 1]: each channel of every panel is mapped linearly
    from the reference's 1st-99th percentile to [0, 1], as remote-sensing viewers do."""
    flat = reference.transpose(0, 1).flatten(1).float()
    lo, hi = flat.quantile(0.01, dim=1), flat.quantile(0.99, dim=1)
    span = (hi - lo).clamp(min=1e-8)
    return [((p - lo.view(1, -1, 1, 1)) / span.view(1, -1, 1, 1)).clamp(0, 1) for p in panels]


def recon_titles(out: AEOutput) -> list[str]:
    """The column titles of ``recon_panels``' panels, in their order."""
    if out.corrupted is not None:
        return ["noisy input", "restored", "original"]
    if out.mask is None:
        return ["reconstruction", "original"]
    return ["masked input", "reconstruction", "original"]


def recon_panels(images: torch.Tensor, out: AEOutput) -> list[torch.Tensor]:
    """Panels in normalised space. With a mask: masked input (hidden parts grey), reconstruction
    with the visible patches pasted back, original; without: reconstruction, original."""
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
    path: str | Path, images: torch.Tensor, out: AEOutput, data: DataConfig, arrays: bool = False
) -> None:
    """Panels of ``recon_panels`` in ``data``'s pixel units, the channels ``shown_channels`` picks;
    arrays ``stretch``ed to the originals' range."""
    panels = [
        shown_channels(
            denormalize(p.cpu(), data.mean, data.std, clamp=not arrays), data.grid_channels
        )
        for p in recon_panels(images, out)
    ]
    if arrays:
        panels = stretch(panels, panels[-1])
    rows = torch.stack(panels, dim=1).flatten(0, 1)  # (B * panels, C, H, W), row-major
    save_tiles(rows, path, nrow=len(panels), titles=recon_titles(out))


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (imported only by the tasks that plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
