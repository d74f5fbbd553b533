"""Masked autoencoder (He et al., 2022) on timm Vision Transformer blocks.

Follows the official implementation step by step (``forward_encoder``, ``forward_decoder``,
``forward_loss``): fixed 2-D sin-cos position embeddings added before masking, a cls token,
the encoder seeing only visible patches, a narrow decoder with a shared mask token and its own
position embeddings, and MSE on removed patches (optionally of per-patch normalised pixels).
The encoder *is* a timm ``VisionTransformer`` (num_classes=0, cls-token pooling), so it exports
as-is in timm's format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import timm
import torch
from timm.models.vision_transformer import Block
from torch import nn

from mae.losses import masked_mse, normalize_patches
from mae.masking import mask_views, patchify, random_masking, unpatchify
from mae.models.base import AEOutput, Autoencoder
from mae.models.teacher import Teacher

# timm builds a VisionTransformer from any registered ViT name plus explicit arguments; every
# architecture argument below overrides the named model's, so the name only labels the export
# (``architecture`` in its config.json): the ViT of the same width.
TIMM_ARCH_BY_WIDTH = {
    192: "vit_tiny_patch16_224",
    384: "vit_small_patch16_224",
    768: "vit_base_patch16_224",
    1024: "vit_large_patch16_224",
    1280: "vit_huge_patch14_224",
}


def sincos_pos_embed(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + H*W, dim) fixed 2-D sin-cos embedding, zeros for the cls token.

    The official MAE ``get_2d_sincos_pos_embed`` layout: the first half encodes the column, the
    second half the row, each as [sin(pos * omega), cos(pos * omega)] with
    omega = 1 / 10000^(k / (dim/4)). (timm's ``build_sincos2d_pos_embed`` orders them differently.)
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")

    def one_d(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1).double() * omega  # (H*W, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([one_d(cols), one_d(rows)], dim=1).float()  # (H*W, dim)
    return torch.cat([torch.zeros(1, dim), emb], dim=0).unsqueeze(0)


NORM_LAYER = partial(nn.LayerNorm, eps=1e-6)  # the official decoder's (timm's ViT uses the same)


def vit_encoder(
    *,
    image_size: int | tuple[int, int],
    channels: int,
    patch_size: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
) -> nn.Module:
    """The MAE encoder: a timm ``VisionTransformer`` (num_classes=0, cls-token pooling) whose
    fixed sin-cos position embeddings ``MaskedAutoencoder`` writes and freezes."""
    return timm.create_model(
        TIMM_ARCH_BY_WIDTH.get(embed_dim, "vit_base_patch16_224"),
        pretrained=False,
        num_classes=0,
        global_pool="token",
        img_size=image_size,
        patch_size=patch_size,
        in_chans=channels,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=True,
    )


@dataclass
class DecoderParts:
    """A masked autoencoder's decoder, built before the model and handed to it. The model
    registers the parts under the official MAE names (``decoder_embed``, ``mask_token``,
    ``decoder_pos_embed``, ``decoder_blocks``, ``decoder_norm``, then ``decoder_NAME`` for each
    of ``extra``, then ``decoder_pred``), so checkpoints, official weights and the parameter
    order every optimizer state is indexed by stay what they were."""

    embed: nn.Linear  # encoder width -> decoder width
    mask_token: nn.Parameter  # (1, 1, width), shared by every hidden patch
    pos_embed: torch.Tensor  # (1, 1 + L, width) fixed sin-cos
    blocks: nn.Module
    norm: nn.Module
    pred: nn.Linear  # decoder width -> p*p*C pixels
    extra: dict[str, nn.Module | nn.Parameter] = field(default_factory=dict)


def paper_decoder(
    *,
    embed_dim: int,
    width: int,
    depth: int,
    heads: int,
    grid: tuple[int, int],
    patch_pixels: int,
    mlp_ratio: float = 4.0,
) -> DecoderParts:
    """The paper's decoder: embedding, mask token, positions, ``depth`` self-attention blocks
    over every patch, norm, and the linear prediction of each patch's ``patch_pixels`` values."""
    embed = nn.Linear(embed_dim, width)
    mask_token = nn.Parameter(torch.zeros(1, 1, width))
    pos_embed = sincos_pos_embed(width, grid)
    blocks = [
        Block(width, heads, mlp_ratio, qkv_bias=True, norm_layer=NORM_LAYER) for _ in range(depth)
    ]
    norm = NORM_LAYER(width)
    pred = nn.Linear(width, patch_pixels)
    return DecoderParts(embed, mask_token, pos_embed, nn.Sequential(*blocks), norm, pred)


class MaskedAutoencoder(Autoencoder):
    """An encoder (``vit_encoder``) and a decoder (``paper_decoder``), both built by the caller:
    ``mae.models`` builds them from the config, the encoder first.

    ``masks_per_image`` K > 1: in training, each image is embedded once and masked K times
    (``mae.masking.mask_views``: disjoint visible sets while they fit); the encoder and decoder
    see the K * B masked views, view-major, and the loss is the mean over them. Evaluation
    (``eval()``) masks each image once.

    ``teacher``: the settings of a ``Teacher`` (``mae.models.teacher``), whose targets the
    decoder predicts at the hidden patches instead of their pixels (its prediction layer is then
    as wide as the encoder). No reconstruction in pixels then."""

    def __init__(
        self,
        *,
        encoder: nn.Module,
        decoder: DecoderParts,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        masks_per_image: int = 1,
        teacher: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.channels = encoder.patch_embed.proj.in_channels
        self.grid = tuple(encoder.patch_embed.grid_size)
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.masks_per_image = masks_per_image
        self.feature_dim = encoder.embed_dim
        self.encoder = encoder
        self.encoder.pos_embed.requires_grad_(False)  # fixed sin-cos
        self.decoder_embed = decoder.embed
        self.mask_token = decoder.mask_token
        self.register_buffer("decoder_pos_embed", decoder.pos_embed, persistent=True)
        self.decoder_blocks = decoder.blocks
        self.decoder_norm = decoder.norm
        for name, part in decoder.extra.items():
            setattr(self, f"decoder_{name}", part)
        self.decoder_pred = decoder.pred
        self.initialize_weights()
        # after the initialisation, which it must not draw from: a copy of the student as built
        self.teacher = None if teacher is None else Teacher(self.encoder, **teacher)

    def initialize_weights(self) -> None:
        """The official initialisation: sin-cos positions, xavier Linear/patch conv, N(0, .02)
        tokens."""
        with torch.no_grad():
            self.encoder.pos_embed.copy_(sincos_pos_embed(self.feature_dim, self.grid))
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (biases and norms are exempted by ndim)."""
        return {"encoder.cls_token", "encoder.pos_embed", "mask_token"}

    def set_step(self, step: int) -> None:
        """The teacher follows the student before each optimizer step's forward passes."""
        if self.teacher is not None:
            self.teacher.follow(self.encoder, step)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """What is predicted at each patch, for every view: (V * B, L, dim): the teacher's
        targets, else the patches' pixels."""
        if self.teacher is not None:
            return self.teacher.targets(images).repeat(self.views, 1, 1)
        return patchify(images, self.patch_size).repeat(self.views, 1, 1)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def views(self) -> int:
        """Masks per image in this forward: ``masks_per_image`` in training, else 1."""
        return self.masks_per_image if self.training else 1

    def embed_and_mask(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        """images (B, C, H, W) -> the encoder's input (V * B, 1 + L_keep, D), mask (V * B, L),
        ids_restore (V * B, L), for V = ``views`` masks of each image."""
        enc = self.encoder
        x = enc.patch_embed(images)  # (B, L, D)
        x = x + enc.pos_embed[:, 1:]
        if self.views > 1:  # the image embedded once, masked V times
            if noise is None:
                noise = torch.rand(x.shape[:2], device=x.device)
            noise = mask_views(noise, self.views, self.mask_ratio)
            x = x.repeat(self.views, 1, 1)
        x, mask, ids_restore = random_masking(x, self.mask_ratio, noise)  # (V * B, L_keep, D)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1), mask, ids_restore

    def forward_encoder(
        self, images: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) -> latent (B, 1 + L_keep, D), mask (B, L), ids_restore (B, L)."""
        x, mask, ids_restore = self.embed_and_mask(images, noise)
        return self.encoder.norm(self.encoder.blocks(x)), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + L_keep, D) -> pixel predictions (B, L, p*p*C) in patch order."""
        x = self.decoder_embed(latent)  # (B, 1 + L_keep, Dd)
        batch, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(batch, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, L, Dd), shuffled order
        # patch order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # (B, 1 + L, Dd)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, 1:]  # (B, L, p*p*C), cls dropped

    def forward_loss(
        self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MSE on removed patches (of every view). Returns (loss, pred in pixel space
        (V * B, L, p*p*C), detached; None for teacher targets)."""
        target = self.targets(images)  # (V * B, L, p*p*C or D)
        if self.teacher is not None:
            return masked_mse(pred, target, mask), None
        if not self.norm_pix_loss:
            return masked_mse(pred, target, mask), pred.detach()
        target, mean, std = normalize_patches(target)
        return masked_mse(pred, target, mask), (pred.detach() * std + mean)

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> AEOutput:
        """images (B, C, H, W); noise (B, L) optionally fixes the mask (see ``mae.masking``)."""
        latent, mask, ids_restore = self.forward_encoder(images, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss, pixels = self.forward_loss(images, pred.float(), mask)
        # features: the cls token of the visible patches (what this step's encoder saw; the first
        # mask's, one per image)
        features = latent[: len(images), 0].detach()
        out = AEOutput(loss=loss, terms={"mse": loss.detach()}, features=features)
        if not self.training and pixels is not None:
            p, c = self.patch_size, self.channels
            out.recon = unpatchify(pixels, p, c, self.grid)
            out.mask = unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p), p, 1, self.grid)
        return out

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """The visible patches as they are, the hidden ones (``mask_ratio``, global RNG)
        predicted."""
        if self.teacher is not None:
            raise ValueError(
                "this model predicts teacher targets, not pixels: it reconstructs none"
            )
        out = self.forward(images)
        return images * (1 - out.mask) + out.recon * out.mask

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D): the cls token of the full (unmasked) image, after the final
        norm."""
        return self.encoder(images)
