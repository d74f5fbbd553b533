"""Model registry: every family registers a builder taking the resolved config.

A new family is one file defining an ``Autoencoder`` and one ``register`` call: its builder and
what it trains with by default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mae.config import Config
from mae.config.families import FAMILY_DEFAULTS, MAE
from mae.config.presets import PRESET_KEYS
from mae.models.ae import VanillaAutoencoder
from mae.models.base import AEOutput, Autoencoder
from mae.models.cae import ContractiveAutoencoder
from mae.models.crossmae import CrossMaskedAutoencoder
from mae.models.dae import DenoisingAutoencoder
from mae.models.mae import MaskedAutoencoder
from mae.models.sparse import SparseAutoencoder
from mae.models.stacked import StackedAutoencoder
from mae.models.vae import VariationalAutoencoder


def _build_mae(cfg: Config) -> MaskedAutoencoder:
    """MAE with the paper's decoder (``model.decoder=mae``) or CrossMAE's (``cross``)."""
    m = cfg.model
    mae = {
        "image_size": cfg.data.image_size,
        "channels": cfg.data.channels,
        "mlp_ratio": m.mlp_ratio,
        "mask_ratio": m.mask_ratio,
        "norm_pix_loss": m.norm_pix_loss,
    } | {k: getattr(m, k) for k in PRESET_KEYS}
    if m.decoder == "mae":
        return MaskedAutoencoder(**mae)
    cross = {"reconstruct_ratio": m.reconstruct_ratio, "self_attn": m.decoder_self_attn}
    return CrossMaskedAutoencoder(**mae, **cross, features=m.decoder_features)


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
