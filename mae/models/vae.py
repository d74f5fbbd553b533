"""Variational autoencoder (Kingma & Welling 2014): Gaussian posterior q(z|x) =
N(mu, diag(sigma^2)), reparameterised samples, a standard normal prior, and a decoder likelihood
on pixels in [0, 1] (``model.likelihood``):

- ``bernoulli``: the decoder gives logits; -log p(x|z) is the binary cross-entropy;
- ``gaussian``: the decoder gives the mean; one learned scale sigma for every pixel.

Loss per image: -log p(x|z) + beta_t KL(q || p), divided by the number of pixel values D (the
scale of the other models' per-pixel losses), beta_t ramping from 0 to ``model.beta`` over
``model.beta_warmup_steps`` optimizer steps. Logged per image: ``elbo`` (nats), ``recon_nll``,
``kl``, ``beta``, and ``bits_per_dim`` = -ELBO / (D ln 2), plus 8 for the Gaussian likelihood
(its density on [0, 1] read as a probability of one of 256 levels; an estimate, without
dequantisation noise). ``encode`` returns the posterior mean; ``sample(n)`` decodes prior draws.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mae.losses import kl_to_standard_normal
from mae.models.base import AEOutput
from mae.models.conv import ClassicAutoencoder


class VariationalAutoencoder(ClassicAutoencoder):
    config_keys = ("likelihood", "beta", "beta_warmup_steps")

    def __init__(
        self,
        *,
        likelihood: str = "gaussian",
        beta: float = 1.0,
        beta_warmup_steps: int = 0,
        latent_dim: int = 128,
        **shared: Any,
    ) -> None:
        super().__init__(latent_dim=latent_dim, encoder_out=2 * latent_dim, **shared)
        self.likelihood, self.beta, self.warmup = likelihood, beta, beta_warmup_steps
        self.log_sigma = nn.Parameter(torch.zeros(())) if likelihood == "gaussian" else None
        self.step = 0

    def set_step(self, step: int) -> None:
        self.step = step

    def beta_now(self) -> float:
        return self.beta * min(1.0, self.step / self.warmup) if self.warmup else self.beta

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(images).float().chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.posterior(images)[0]

    def nll(self, out: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """-log p(x|z) per image (nats), x the pixels in [0, 1]."""
        x = self.to_unit(images)
        if self.likelihood == "bernoulli":
            per = F.binary_cross_entropy_with_logits(out, x, reduction="none")
        else:
            sigma = self.log_sigma.exp()
            per = 0.5 * ((x - out) / sigma).pow(2) + self.log_sigma + 0.5 * math.log(2 * math.pi)
        return per.flatten(1).sum(dim=1)

    def to_image(self, out: torch.Tensor) -> torch.Tensor:
        pixels = torch.sigmoid(out) if self.likelihood == "bernoulli" else out.clamp(0, 1)
        return self.from_unit(pixels)

    def forward(self, images: torch.Tensor) -> AEOutput:
        mu, logvar = self.posterior(images)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        out = self.decoder(z).float()
        nll, kl = self.nll(out, images), kl_to_standard_normal(mu, logvar)
        dims = images[0].numel()
        beta = self.beta_now()
        loss = (nll + beta * kl).mean() / dims
        neg_elbo = (nll + kl).detach()
        bpd = neg_elbo.mean() / (dims * math.log(2)) + (
            8.0 if self.likelihood == "gaussian" else 0.0
        )
        terms = {
            "elbo": -neg_elbo.mean(),
            "recon_nll": nll.detach().mean(),
            "kl": kl.detach().mean(),
            "bits_per_dim": bpd,
            "beta": loss.new_tensor(beta).detach(),
        }
        result = AEOutput(loss=loss, terms=terms, features=mu.detach())
        if not self.training:
            result.recon = self.to_image(out.detach())
        return result

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Decoded from the posterior mean."""
        return self.to_image(self.decoder(self.encode(images)).float())

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Codes (n, latent_dim) -> images in the data's normalised space."""
        return self.to_image(self.decoder(z).float())

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images decoded from prior draws, in the data's normalised space: (n, C, H, W)."""
        device = self.mean.device
        return self.decode(torch.randn(n, self.latent_dim, generator=generator, device=device))
