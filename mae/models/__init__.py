"""Model registry: every family registers a builder taking the resolved config.

A new family is one file defining an ``Autoencoder`` and one ``register`` call: its builder and
what it trains with by default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mae.config import Config, ModelConfig
from mae.config.families import FAMILY_DEFAULTS, MAE
from mae.models.ae import VanillaAutoencoder
from mae.models.base import AEOutput, Autoencoder
from mae.models.cae import ContractiveAutoencoder
from mae.models.crossmae import CrossMaskedAutoencoder, cross_decoder
from mae.models.dae import DenoisingAutoencoder
from mae.models.mae import MaskedAutoencoder, paper_decoder, vit_encoder
from mae.models.sparse import SparseAutoencoder
from mae.models.stacked import StackedAutoencoder
from mae.models.vae import VariationalAutoencoder


def _build_mae(cfg: Config) -> MaskedAutoencoder:
    """MAE with the paper's decoder (``model.decoder=mae``) or CrossMAE's (``cross``): the
    encoder, then the decoder, handed to the model."""
    m, d = cfg.model, cfg.data
    encoder = vit_encoder(
        image_size=d.image_size,
        channels=d.channels,
        patch_size=m.patch_size,
        embed_dim=m.embed_dim,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
    )
    decoder = {
        "embed_dim": m.embed_dim,
        "width": m.decoder_embed_dim,
        "depth": m.decoder_depth,
        "heads": m.decoder_num_heads,
        "grid": tuple(encoder.patch_embed.grid_size),
        # what each patch's prediction is: its pixels, or the teacher's features there
        "patch_pixels": m.embed_dim if m.target == "teacher" else m.patch_size**2 * d.channels,
        "mlp_ratio": m.mlp_ratio,
    }
    loss = {
        "mask_ratio": m.mask_ratio,
        "norm_pix_loss": m.norm_pix_loss,
        "masks_per_image": cfg.train.masks_per_image,
        "teacher": None if m.target == "pixels" else _teacher_settings(m),
    }
    if m.decoder == "mae":
        return MaskedAutoencoder(encoder=encoder, decoder=paper_decoder(**decoder), **loss)
    cross = cross_decoder(
        **decoder,
        encoder_depth=m.depth,
        self_attn=m.decoder_self_attn,
        features=m.decoder_features,
    )
    return CrossMaskedAutoencoder(
        encoder=encoder, decoder=cross, reconstruct_ratio=m.reconstruct_ratio, **loss
    )


def _teacher_settings(m: ModelConfig) -> dict[str, float]:
    """``mae.models.teacher.Teacher``'s settings from the ``model`` keys."""
    return {
        "layers": m.teacher_layers,
        "decay": m.ema_decay,
        "end_decay": m.ema_end_decay,
        "anneal_steps": m.ema_anneal_steps,
    }


@dataclass(frozen=True)
class Family:
    """A model family of the registry."""

    build: Callable[[Config], Autoencoder]  # the model a resolved config describes
    # data parallel must expect parameters without gradients in some steps (greedy stages)
    unused_parameters: bool = False


# The built-in families; their defaults are in mae.config.families, which the config reads
# without importing the models.
MODELS: dict[str, Family] = {
    "mae": Family(_build_mae),
    "ae": Family(VanillaAutoencoder.from_config),
    "dae": Family(DenoisingAutoencoder.from_config),
    "sparse_ae": Family(SparseAutoencoder.from_config),
    "cae": Family(ContractiveAutoencoder.from_config),
    "vae": Family(VariationalAutoencoder.from_config),
    "stacked_ae": Family(StackedAutoencoder.from_config, unused_parameters=True),
}


def register(
    name: str,
    build: Callable[[Config], Autoencoder],
    defaults: dict[str, Any],
    unused_parameters: bool = False,
) -> None:
    """Add a family: ``model.name=NAME`` builds ``build(cfg)``. ``defaults``: what the family
    trains with where a recipe leaves it unset, the keys of ``mae.config.families.MAE`` (augment,
    blr, weight_decay, warmup_epochs)."""
    if name in MODELS:
        raise ValueError(f"model family {name!r} is already registered")
    missing = set(MAE) - set(defaults)
    if missing:
        raise ValueError(f"family {name!r} registered without defaults for {sorted(missing)}")
    MODELS[name] = Family(build, unused_parameters)
    FAMILY_DEFAULTS[name] = dict(defaults)


def build_model(cfg: Config) -> Autoencoder:
    return MODELS[cfg.model.name].build(cfg)


__all__ = [
    "AEOutput",
    "Autoencoder",
    "ContractiveAutoencoder",
    "CrossMaskedAutoencoder",
    "DenoisingAutoencoder",
    "Family",
    "MaskedAutoencoder",
    "MODELS",
    "SparseAutoencoder",
    "StackedAutoencoder",
    "VanillaAutoencoder",
    "VariationalAutoencoder",
    "build_model",
    "register",
]
