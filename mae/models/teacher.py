"""Teacher targets (data2vec 2.0, Baevski et al. 2022): what a masked autoencoder predicts at its
hidden patches when ``model.target=teacher``, in place of their pixels.

The teacher is an exponential moving average of the student's encoder, never trained by the
gradient. It sees the whole image, once per image whatever the masks per image; the target at a
patch is the average of the top ``layers`` blocks' outputs there, each instance-normalised over
the tokens, then layer-normalised (fairseq ``examples/data2vec/models/data2vec2.py`` with
``config/v2/base_images_only_task.yaml``: ``instance_norm_target_layer``, ``layer_norm_targets``,
``average_top_k_layers: 10`` of 12 blocks). The decay anneals linearly from ``decay`` to
``end_decay`` over ``anneal_steps`` optimizer steps, then stays (that file: 0.9998 to 0.99999 over
100,000 steps; a run of a thousand steps needs a faster teacher, ``mae/config/pretraining.py``).
It lives inside the model, so every checkpoint holds it and a resumed run continues it exactly;
the export and the probes read the student encoder alone.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class Teacher(nn.Module):
    """The EMA copy of ``student`` (a timm ViT) and the targets it gives."""

    def __init__(
        self,
        student: nn.Module,
        *,
        layers: int,
        decay: float,
        end_decay: float,
        anneal_steps: int,
    ) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(student).requires_grad_(False)
        self.layers, self.decay, self.end_decay = layers, decay, end_decay
        self.anneal_steps = anneal_steps
        self.updated_for = -1  # the optimizer step whose update was made (once per step)

    def decay_at(self, step: int) -> float:
        """The EMA decay used before optimizer step ``step``."""
        if step >= self.anneal_steps:
            return self.end_decay
        return self.decay + (self.end_decay - self.decay) * step / self.anneal_steps

    @torch.no_grad()
    def follow(self, student: nn.Module, step: int) -> None:
        """teacher <- decay x teacher + (1 - decay) x student, once per optimizer step (the
        first micro-batch of ``step``; the student is then what step ``step - 1`` left)."""
        if step == self.updated_for:
            return
        self.updated_for = step
        weight = 1.0 - self.decay_at(step)
        for mine, theirs in zip(self.encoder.parameters(), student.parameters(), strict=True):
            mine.lerp_(theirs.detach(), weight)

    @torch.no_grad()
    def copy_from(self, student: nn.Module) -> None:
        """Start again from ``student``'s weights (e.g. after ``init=`` loaded them)."""
        for mine, theirs in zip(self.encoder.parameters(), student.parameters(), strict=True):
            mine.copy_(theirs.detach())

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> (B, L, D) fp32 targets, one per patch, in patch order."""
        enc = self.encoder
        x = enc.patch_embed(images) + enc.pos_embed[:, 1:]
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        first = len(enc.blocks) - self.layers
        total = torch.zeros((), device=x.device)
        for i, block in enumerate(enc.blocks):
            x = block(x)
            if i >= first:  # instance norm: each channel over the tokens of its image
                total = total + F.instance_norm(x[:, 1:].float().transpose(1, 2)).transpose(1, 2)
        average = total / self.layers
        return F.layer_norm(average, average.shape[-1:])
