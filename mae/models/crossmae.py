"""CrossMAE (Fu, Lian et al., "Rethinking Patch Dependence for Masked Autoencoders", TMLR 2025).

The encoder, its masking and the loss are MAE's (``mae.models.mae``); only the decoder differs:

- it predicts ``reconstruct_ratio`` of all patches, not every removed one: the removed patches with
  the largest noise (``mae.masking.predicted_patches``), so the noise that fixes the mask fixes them
  too;
- each prediction is a query, the shared mask token plus the decoder's sin-cos position of its
  patch, that cross-attends to the encoder's tokens and (by default) not to the other queries, so
  its prediction does not depend on which other patches are predicted;
- ``features="weighted"``: each decoder block reads its own learned mix of the encoder's input and
  its blocks' outputs (CrossMAE's weighted feature maps, with its recipe's input map), layer-normed;
  ``"last"``: every block reads the encoder's output.
  The last block's output enters the mix through the encoder's final norm, so that norm (part of the
  export, read by probes and fine-tuning) trains as in MAE instead of being left unused.

Encoder tokens are projected to the decoder width once (``decoder_embed``, as in MAE) and each
block's keys and values come from that. In eval mode the decoder predicts every removed patch (it
can query any position), so reconstructions are whole whatever the training ratio.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import nn

from mae.losses import masked_mse, normalize_patches
from mae.masking import num_kept, num_predicted, predicted_patches, unpatchify
from mae.models.base import AEOutput
from mae.models.mae import NORM_LAYER, DecoderParts, MaskedAutoencoder, sincos_pos_embed
from mae.run import hardware


class CrossAttention(nn.Module):
    """Multi-head attention from queries (B, Q, D) to a memory (B, T, D), through
    ``F.scaled_dot_product_attention``.

    timm's ``Attention`` computes queries, keys and values from one sequence (a fused qkv) and its
    ``AttentionPoolLatent`` pools to learned latents; neither takes queries and memory apart.
    ``mae.run.hardware.set_attention`` turns it into ``MathCrossAttention`` and back, as it does the
    encoder's blocks.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        batch, queries, dim = x.shape
        q = self.q(x).view(batch, queries, self.heads, -1).transpose(1, 2)  # (B, h, Q, d)
        k, v = (
            self.kv(memory).view(batch, memory.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        )
        out = self.core(q, k, v)  # (B, h, Q, d)
        return self.proj(out.transpose(1, 2).reshape(batch, queries, dim))

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


class MathCrossAttention(CrossAttention):
    """``CrossAttention`` with the core written out for memories of at most
    ``mae.run.hardware.MATH_MAX_TOKENS`` tokens (the softmax in fp32), as
    ``mae.run.hardware.MathAttention`` does for self-attention; longer ones take the fused path."""

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if k.shape[2] > hardware.MATH_MAX_TOKENS:
            return super().core(q, k, v)
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        return attn.float().softmax(dim=-1).to(v.dtype) @ v


hardware.register_attention(CrossAttention, MathCrossAttention)


class CrossBlock(nn.Module):
    """Pre-norm block: [self-attention among the queries], cross-attention to the memory, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, norm_layer, self_attn: bool) -> None:
        super().__init__()
        if self_attn:
            self.norm0 = norm_layer(dim)
            self.attn = Attention(dim, heads, qkv_bias=True)
        self.self_attn = self_attn
        self.norm1 = norm_layer(dim)
        self.cross_attn = CrossAttention(dim, heads)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        if self.self_attn:
            x = x + self.attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), memory)
        return x + self.mlp(self.norm2(x))


def cross_decoder(
    *,
    embed_dim: int,
    encoder_depth: int,
    width: int,
    depth: int,
    heads: int,
    grid: tuple[int, int],
    patch_pixels: int,
    mlp_ratio: float = 4.0,
    self_attn: bool = False,
    features: str = "last",
) -> DecoderParts:
    """CrossMAE's decoder: projection of the encoder tokens, mask token, positions, cross blocks,
    norm, prediction; for ``features="weighted"`` the (decoder blocks x feature maps) mixing
    weights and one norm per decoder block (``extra``: ``feature_mix``, ``feature_norms``)."""
    embed = nn.Linear(embed_dim, width)
    mask_token = nn.Parameter(torch.zeros(1, 1, width))
    pos_embed = sincos_pos_embed(width, grid)
    blocks = [CrossBlock(width, heads, mlp_ratio, NORM_LAYER, self_attn) for _ in range(depth)]
    norm = NORM_LAYER(width)
    extra: dict[str, nn.Module | nn.Parameter] = {}
    if features == "weighted":
        maps = 1 + encoder_depth  # the encoder's input and each block's output
        extra["feature_mix"] = nn.Parameter(torch.empty(depth, maps))
        extra["feature_norms"] = nn.ModuleList(NORM_LAYER(embed_dim) for _ in range(depth))
    pred = nn.Linear(width, patch_pixels)
    return DecoderParts(embed, mask_token, pos_embed, nn.ModuleList(blocks), norm, pred, extra)


class CrossMaskedAutoencoder(MaskedAutoencoder):
    """``MaskedAutoencoder`` with CrossMAE's decoder (``cross_decoder``); ``encode`` and
    ``encoder`` are MAE's, unchanged."""

    def __init__(
        self, *, encoder: nn.Module, decoder: DecoderParts, reconstruct_ratio: float, **mae: Any
    ) -> None:
        """``mae``: the rest of ``MaskedAutoencoder``'s keywords (mask ratio, loss, masks per
        image, teacher)."""
        super().__init__(encoder=encoder, decoder=decoder, **mae)
        self.reconstruct_ratio = reconstruct_ratio
        self.features = "weighted" if "feature_mix" in decoder.extra else "last"
        if self.features == "weighted":  # after MAE's: N(0, 1/maps), as CrossMAE's
            mix = self.decoder_feature_mix
            nn.init.normal_(mix, std=mix.shape[1] ** -0.5)

    def encoder_outputs(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        """-> (what each decoder block reads, projected to the decoder width: (B, 1 + L_keep, Dd)
        each; the encoder's normed output (B, 1 + L_keep, D); mask; ids_restore)."""
        x, mask, ids_restore = self.embed_and_mask(images, noise)
        if self.features == "last":  # one projection that every block reads
            latent = self.encoder.norm(self.encoder.blocks(x))
            return (
                [self.decoder_embed(latent)] * len(self.decoder_blocks),
                latent,
                mask,
                ids_restore,
            )
        outputs = [x]  # the encoder's input is one of the maps (CrossMAE's recipe: --use_input)
        for block in self.encoder.blocks:
            x = block(x)
            outputs.append(x)
        latent = outputs[-1] = self.encoder.norm(x)
        # (B, T, D, decoder blocks)
        mixed = torch.stack(outputs, dim=-1) @ self.decoder_feature_mix.T
        memories = [
            self.decoder_embed(norm(mixed[..., i]))
            for i, norm in enumerate(self.decoder_feature_norms)
        ]
        return memories, latent, mask, ids_restore

    def forward_decoder(self, memories: list[torch.Tensor], ids_pred: torch.Tensor) -> torch.Tensor:
        """One memory per decoder block (B, T, Dd) and the patches to predict (B, Q)
        -> (B, Q, p*p*C)."""
        pos = self.decoder_pos_embed[:, 1:].expand(ids_pred.shape[0], -1, -1)
        x = self.mask_token + torch.gather(
            pos, 1, ids_pred.unsqueeze(-1).expand(-1, -1, pos.shape[-1])
        )
        for block, memory in zip(self.decoder_blocks, memories, strict=True):
            x = block(x, memory)
        return self.decoder_pred(self.decoder_norm(x))

    def predicted(self, ids_restore: torch.Tensor) -> torch.Tensor:
        """The patches this forward predicts: ``reconstruct_ratio`` of them in training, every
        removed one in eval mode."""
        length = ids_restore.shape[1]
        count = length - num_kept(length, self.mask_ratio)
        if self.training:
            count = min(count, num_predicted(length, self.reconstruct_ratio))
        return predicted_patches(ids_restore, count)

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> AEOutput:
        """images (B, C, H, W); noise (B, L) optionally fixes the mask and the predicted patches."""
        memories, latent, mask, ids_restore = self.encoder_outputs(images, noise)
        ids_pred = self.predicted(ids_restore)
        pred = self.forward_decoder(memories, ids_pred).float()  # (B, Q, p*p*C)
        target = self.targets(images)  # every view's
        target = torch.gather(target, 1, ids_pred.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
        pixels = None if self.teacher is not None else pred.detach()
        if self.norm_pix_loss and pixels is not None:
            target, mean, std = normalize_patches(target)
            pixels = pixels * std + mean
        loss = masked_mse(pred, target, torch.ones(pred.shape[:2], device=pred.device))
        features = latent[: len(images), 0].detach()  # the first mask's, one per image
        out = AEOutput(loss=loss, terms={"mse": loss.detach()}, features=features)
        if not self.training and pixels is not None:
            p, c = self.patch_size, self.channels
            index = ids_pred.unsqueeze(-1).expand(-1, -1, pixels.shape[-1])
            full = torch.zeros(*mask.shape, pixels.shape[-1], device=pixels.device).scatter(
                1, index, pixels
            )
            shown = torch.zeros_like(mask).scatter(1, ids_pred, 1.0)  # == mask: every removed patch
            out.recon = unpatchify(full, p, c, self.grid)
            out.mask = unpatchify(shown.unsqueeze(-1).expand(-1, -1, p * p), p, 1, self.grid)
        return out
