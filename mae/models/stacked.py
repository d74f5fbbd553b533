"""Stacked autoencoder (Bengio et al. 2007; Vincent et al. 2010): greedy layer-wise pretraining,
then optional end-to-end fine-tuning of the stack.

The encoder is a stack of layers (``arch=conv``: one stride-2 conv + GELU per width, then a linear
map to the code; ``arch=mlp``: one linear + GELU per width, then the code), each with its own
decoder layer mapping its output back to its input. Stage k (optimizer steps
[k x ``stage_steps``, (k + 1) x ``stage_steps``)) trains layer k and its decoder to reconstruct
the codes of the frozen layers below (stage 0: the image, with the model's loss); with
``stack_denoising`` each layer is a denoising autoencoder (stage 0: ``model.corruption``; above:
masking noise zeroing a fraction ``noise_level`` of the code units). After the last layer's stage,
the rest of the run trains the whole stack end to end (encoder, then the decoders in reverse) on the
image. Logged: ``recon`` (the stage's reconstruction error: of the image, or of the codes below) and
``stage``. The stage is a function of the optimizer step, so checkpoints and resume work across
stage boundaries. Evaluation mode always runs the whole stack.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mae.models.base import AEOutput
from mae.models.conv import ClassicAutoencoder
from mae.models.dae import corrupt_pixels


def _layers(
    arch: str, widths: tuple[int, ...], latent_dim: int, channels: int, hw: tuple[int, int]
) -> tuple[list[nn.Module], list[nn.Module]]:
    enc: list[nn.Module] = []
    dec: list[nn.Module] = []
    if arch == "conv":
        c, (h, wd) = channels, hw
        for w in widths:
            enc.append(nn.Sequential(nn.Conv2d(c, w, 4, stride=2, padding=1), nn.GELU()))
            dec.append(nn.ConvTranspose2d(w, c, 4, stride=2, padding=1))
            c, h, wd = w, h // 2, wd // 2
        enc.append(nn.Sequential(nn.Flatten(), nn.Linear(c * h * wd, latent_dim)))
        dec.append(nn.Sequential(nn.Linear(latent_dim, c * h * wd), nn.Unflatten(1, (c, h, wd))))
    else:
        d = channels * hw[0] * hw[1]
        enc.append(nn.Flatten())  # no parameters: not a stage
        dec.append(nn.Unflatten(1, (channels, *hw)))
        for w in widths:
            enc.append(nn.Sequential(nn.Linear(d, w), nn.GELU()))
            dec.append(nn.Linear(w, d))
            d = w
        enc.append(nn.Linear(d, latent_dim))
        dec.append(nn.Linear(latent_dim, d))
    return enc, dec


class StackedAutoencoder(ClassicAutoencoder):
    code_activation = "identity"
    # a greedy stage trains one layer: data parallel must expect idle ones (registered so:
    # mae.models.MODELS)

    config_keys = (
        "stage_steps",
        "stack_denoising",
        "corruption",
        "noise_level",
        "corruption_patch",
    )

    def __init__(
        self,
        *,
        stage_steps: int = 100,
        stack_denoising: bool = False,
        corruption: str = "gaussian",
        noise_level: float = 0.3,
        corruption_patch: int = 1,
        **shared: Any,
    ) -> None:
        super().__init__(nets=False, **shared)
        enc, dec = _layers(self.arch, self.widths, self.latent_dim, self.channels, self.size)
        # the stages: layers with parameters (an mlp's leading Flatten has none)
        self.stages = [i for i, layer in enumerate(enc) if any(True for _ in layer.parameters())]
        # a decoder layer that reconstructs a hidden code (a GELU output) ends with a GELU too,
        # which also makes the whole decoder non-linear; the first stage's decoder outputs the image
        dec = [
            nn.Sequential(layer, nn.GELU()) if i > self.stages[0] else layer
            for i, layer in enumerate(dec)
        ]
        self.encoder = nn.Sequential(*enc)
        self.decoders = nn.ModuleList(dec)  # one decoder layer per encoder layer
        self.stage_steps, self.denoising = stage_steps, stack_denoising
        self.corruption, self.noise_level = corruption, noise_level
        self.corruption_patch = corruption_patch
        self.step = 0

    def set_step(self, step: int) -> None:
        self.step = step

    def stage(self) -> int:
        """Index into ``stages`` of the greedy stage now trained; ``len(stages)``: end to end."""
        return min(self.step // self.stage_steps, len(self.stages))

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.decoders):
            code = layer(code)
        return code

    def _corrupt_input(self, h: torch.Tensor, first: bool) -> torch.Tensor:
        if not self.denoising:
            return h
        if first:  # the image: the configured pixel corruption
            noisy = corrupt_pixels(
                h * self.std + self.mean, self.corruption, self.noise_level, self.corruption_patch
            )
            return (noisy - self.mean) / self.std
        return h * (torch.rand_like(h) >= self.noise_level)  # codes: masking noise

    def forward(self, images: torch.Tensor) -> AEOutput:
        stage = self.stage() if self.training else len(self.stages)
        if stage < len(self.stages):
            index = self.stages[stage]
            first = index == self.stages[0]
            if first:  # the image (an mlp's parameter-free Flatten comes first)
                x = self.encoder[:index](self._corrupt_input(images, True))
            else:
                with torch.no_grad():  # the frozen layers below
                    h = self.encoder[:index](images)
                x = self._corrupt_input(h, False)
            out = self.decoders[index](self.encoder[index](x)).float()
            if first:
                # back to image shape (an mlp's Unflatten)
                for layer in reversed(self.decoders[:index]):
                    out = layer(out)
                loss = self.reconstruction_loss(out, images)
            else:
                loss = F.mse_loss(out, h.float())
            return AEOutput(
                loss=loss,
                terms={"recon": loss.detach(), "stage": loss.new_tensor(float(stage)).detach()},
            )
        code = self.encoder(images)
        out = self.decode(code).float()
        loss = self.reconstruction_loss(out, images)
        terms = {"recon": loss.detach(), "stage": loss.new_tensor(float(stage)).detach()}
        result = AEOutput(loss=loss, terms=terms, features=code.detach())
        if not self.training:
            result.recon = self.to_image(out.detach())
        return result

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.to_image(self.decode(self.encoder(images)).float())
