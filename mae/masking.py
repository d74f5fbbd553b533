"""Patchify / unpatchify / random masking: the one place where patch index rules live.

Conventions (those of the official MAE code, so masks and losses can be compared with it):

- patch order is row-major over the patch grid; within a patch, pixels are (row, col, channel),
  i.e. ``(B, C, H, W) -> (B, L, p*p*C)`` with ``L = (H/p) * (W/p)``;
- ``mask`` is 0 for kept (visible) patches and 1 for removed ones;
- with noise ``(B, L)``, patches are ranked by ascending noise and the first
  ``int(L * (1 - mask_ratio))`` are kept.
"""

from __future__ import annotations

import torch
from einops import rearrange


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C). H and W must be multiples of ``patch_size``."""
    return rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(
    patches: torch.Tensor, patch_size: int, channels: int, grid: tuple[int, int]
) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, H, W) for a patch grid ``(H/p, W/p)``."""
    return rearrange(
        patches,
        "b (h w) (p q c) -> b c (h p) (w q)",
        h=grid[0],
        w=grid[1],
        p=patch_size,
        q=patch_size,
        c=channels,
    )


def num_kept(num_patches: int, mask_ratio: float) -> int:
    return int(num_patches * (1 - mask_ratio))


def random_masking(
    tokens: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of noise.

    tokens: (B, L, D); noise: optional (B, L), uniform in [0, 1) when not given.
    Returns ``(kept (B, L_keep, D), mask (B, L) with 0 keep / 1 remove, ids_restore (B, L))``
    where ``ids_restore`` puts a sequence in shuffled order (kept first) back in patch order.
    """
    batch, length, dim = tokens.shape
    keep = num_kept(length, mask_ratio)
    if noise is None:
        noise = torch.rand(batch, length, device=tokens.device)
    elif noise.shape != (batch, length):
        raise ValueError(
            f"noise must have shape {(batch, length)} (batch, patches), got {tuple(noise.shape)}"
        )
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))  # (B, L_keep, D)
    mask = torch.ones(batch, length, device=tokens.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # (B, L), back in patch order
    return kept, mask, ids_restore


def mask_views(noise: torch.Tensor, views: int, mask_ratio: float) -> torch.Tensor:
    """(B, L) noise -> (views * B, L) noise for ``views`` masks of each sample, view-major (the
    k-th block of B rows is every sample's k-th mask).

    The patches are ranked once by the sample's noise; mask k keeps those ranked
    ``k * L_keep`` to ``(k + 1) * L_keep - 1`` (cyclically past L). So the visible sets of the
    masks are disjoint while ``views * L_keep <= L``, and at ``views = L / L_keep`` every patch is
    visible in exactly one mask and hidden in the others. Mask 0 is the sample's own mask. The
    returned values are ranks / L: distinct, so ``random_masking``'s argsort has no ties."""
    length = noise.shape[1]
    keep = num_kept(length, mask_ratio)
    ranks = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    shifted = [(ranks - k * keep) % length for k in range(views)]
    return torch.cat(shifted).to(noise.dtype) / length


def num_predicted(num_patches: int, reconstruct_ratio: float) -> int:
    """How many patches a decoder predicts and the loss scores: ``int(L * reconstruct_ratio)``."""
    return int(num_patches * reconstruct_ratio)


def predicted_patches(ids_restore: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) indices (patch order) of the ``count`` patches with the largest noise of each
    sample.

    ``ids_restore`` (B, L) is ``random_masking``'s: the rank of each patch's noise. The patches
    ranked last are removed first, so for ``count <= L - L_keep`` the subset lies inside the removed
    patches, is fixed by the same noise as the mask, and grows with ``count`` (a larger subset
    contains a smaller one). They come in ascending rank, so ``count = L - L_keep`` lists the
    removed patches in ``ids_shuffle`` order.
    """
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    return ids_shuffle[:, ids_shuffle.shape[1] - count :]
