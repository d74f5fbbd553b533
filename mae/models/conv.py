"""Encoder/decoder networks of the classic autoencoders, and the base class they share.

``arch=conv``: each width of ``model.widths`` is a stride-2 4x4 convolution + GELU (the image
side halves per stage), then a linear map to the code; the decoder mirrors it with transposed
convolutions. ``arch=mlp``: flattened pixels through hidden layers of ``model.widths``. No
batch norm anywhere: a code is a function of its own image only, which the contractive
penalty's per-image Jacobian and ``encode``'s determinism rely on.

The networks work in the data pipeline's normalised space. Reconstruction losses: ``mse`` between
the decoder output and the normalised image (mean over pixels); ``bce`` treats the decoder
output as logits of pixels in [0, 1] (the image un-normalised with the data's mean/std).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mae.config import Config
from mae.models.base import AEOutput, Autoencoder


class ConvEncoder(nn.Module):
    def __init__(
        self, channels: int, hw: tuple[int, int], widths: Sequence[int], out_dim: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 4, stride=2, padding=1), nn.GELU()]
            c = w
        self.features = nn.Sequential(*layers)
        h, wd = (side // 2 ** len(widths) for side in hw)
        self.fc = nn.Linear(c * h * wd, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class ConvDecoder(nn.Module):
    def __init__(
        self, channels: int, hw: tuple[int, int], widths: Sequence[int], latent_dim: int
    ) -> None:
        super().__init__()
        rev = list(widths)[::-1]
        self.side = tuple(side // 2 ** len(rev) for side in hw)  # (h, w) of the first feature map
        self.fc = nn.Linear(latent_dim, rev[0] * self.side[0] * self.side[1])
        layers: list[nn.Module] = [nn.GELU()]
        for a, b in zip(rev, [*rev[1:], channels], strict=True):
            layers += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1), nn.GELU()]
        self.net = nn.Sequential(*layers[:-1])  # no activation on the output
        self.first = rev[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).view(len(z), self.first, *self.side))


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:], strict=False):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers[:-1])


class MLPEncoder(nn.Module):
    def __init__(
        self, channels: int, hw: tuple[int, int], widths: Sequence[int], out_dim: int
    ) -> None:
        super().__init__()
        self.net = _mlp([channels * hw[0] * hw[1], *widths, out_dim])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class MLPDecoder(nn.Module):
    def __init__(
        self, channels: int, hw: tuple[int, int], widths: Sequence[int], latent_dim: int
    ) -> None:
        super().__init__()
        self.shape = (channels, *hw)
        self.net = _mlp([latent_dim, *list(widths)[::-1], channels * hw[0] * hw[1]])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(len(z), *self.shape)


class ClassicAutoencoder(Autoencoder):
    """Encoder -> code (``code_activation``) -> decoder, reconstruction loss, and hooks subclasses
    fill: ``corrupt`` (the encoder's input), ``penalty`` (terms added to the loss).

    Built from keywords: the images (``channels``, ``size`` (H, W), the ``mean`` and ``std`` they
    were normalised with), the networks (``arch``, ``widths``, ``latent_dim``) and the
    reconstruction ``loss``; each family adds its own keywords, the ``model.*`` keys of the same
    names (``config_keys``), which ``from_config`` reads."""

    code_activation: str = "identity"  # identity | relu | sigmoid
    config_keys: ClassVar[tuple[str, ...]] = ()  # the family's own model.* keys

    def __init__(
        self,
        *,
        channels: int,
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        arch: str = "conv",
        widths: Sequence[int] = (32, 64, 128),
        latent_dim: int = 128,
        loss: str = "mse",
        encoder_out: int | None = None,
        nets: bool = True,
    ) -> None:
        """``encoder_out``: the encoder's output size when it is not the code's (a VAE's mean and
        log-variance). ``nets=False``: the subclass builds its own encoder and decoder."""
        super().__init__()
        self.channels, self.size, self.arch = channels, tuple(size), arch
        self.widths, self.latent_dim = tuple(widths), latent_dim
        if nets:
            enc, dec = (ConvEncoder, ConvDecoder) if arch == "conv" else (MLPEncoder, MLPDecoder)
            self.encoder = enc(channels, self.size, self.widths, encoder_out or latent_dim)
            self.decoder = dec(channels, self.size, self.widths, latent_dim)
        self.feature_dim, self.loss_kind = latent_dim, loss
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg: Config) -> Any:
        """The family as ``cfg`` describes it: the shared keywords from ``data`` and ``model``,
        and the family's own ``config_keys``."""
        m, d = cfg.model, cfg.data
        shared = {
            "channels": d.channels,
            "size": d.hw,
            "mean": d.mean,
            "std": d.std,
            "arch": m.arch,
            "widths": m.widths,
            "latent_dim": m.latent_dim,
            "loss": m.loss,
        }
        return cls(**shared, **{k: getattr(m, k) for k in cls.config_keys})

    # --- pieces
    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.code_activation == "relu":
            return F.relu(pre)
        if self.code_activation == "sigmoid":
            return torch.sigmoid(pre)
        return pre

    def code(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.encoder(x))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.code(images)

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images -> pixels in [0, 1]."""
        return (images * self.std + self.mean).clamp(0, 1)

    def from_unit(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std

    def reconstruction_loss(self, out: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        if self.loss_kind == "bce":
            return F.binary_cross_entropy_with_logits(out, self.to_unit(images))
        return F.mse_loss(out, images)

    def to_image(self, out: torch.Tensor) -> torch.Tensor:
        """Decoder output -> a reconstruction in the normalised space of the data."""
        return self.from_unit(torch.sigmoid(out)) if self.loss_kind == "bce" else out

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.to_image(self.decoder(self.code(images)).float())

    # --- hooks
    def corrupt(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def penalty(self, x: torch.Tensor, code: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted terms added to the loss (logged under their names)."""
        return {}

    def stats(self, code: torch.Tensor) -> dict[str, torch.Tensor]:
        """Detached numbers logged with the loss terms."""
        return {}

    def forward(self, images: torch.Tensor) -> AEOutput:
        x = self.corrupt(images)
        code = self.code(x)
        out = self.decoder(code).float()
        recon = self.reconstruction_loss(out, images)
        extra = self.penalty(x, code)
        loss = recon + sum(extra.values())
        terms = {self.loss_kind: recon.detach(), **{k: v.detach() for k, v in extra.items()}}
        result = AEOutput(
            loss=loss, terms=terms | self.stats(code.detach()), features=code.detach()
        )
        if not self.training:
            result.recon = self.to_image(out.detach())
            result.corrupted = x.detach() if x is not images else None
        return result
