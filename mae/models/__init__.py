"""Model registry: every family registers a builder taking the resolved config.

A new family is one file defining an ``Autoencoder`` and one ``register`` call: its builder and
what it trains with by default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mae.config import Config
from mae.family_defaults import FAMILY_DEFAULTS, MAE
from mae.models.ae import VanillaAutoencoder
from mae.models.base import AEOutput, Autoencoder
from mae.models.cae import ContractiveAutoencoder
from mae.models.crossmae import CrossMaskedAutoencoder
from mae.models.dae import DenoisingAutoencoder
from mae.models.mae import MaskedAutoencoder
from mae.models.sparse import SparseAutoencoder
from mae.models.stacked import StackedAutoencoder
from mae.models.vae import VariationalAutoencoder
from mae.presets import PRESET_KEYS


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


Builder = Callable[[Config], Autoencoder]
# The built-in families; their defaults are in mae.family_defaults, which the config reads
# without importing the models.
MODELS: dict[str, Builder] = {
    "mae": _build_mae,
    "ae": VanillaAutoencoder,
    "dae": DenoisingAutoencoder,
    "sparse_ae": SparseAutoencoder,
    "cae": ContractiveAutoencoder,
    "vae": VariationalAutoencoder,
    "stacked_ae": StackedAutoencoder,
}


def register(name: str, build: Builder, defaults: dict[str, Any]) -> None:
    """Add a family: ``model.name=NAME`` builds ``build(cfg)``. ``defaults``: what the family
    trains with where a recipe leaves it unset, the keys of ``mae.family_defaults.MAE`` (augment,
    blr, weight_decay, warmup_epochs)."""
    if name in MODELS:
        raise ValueError(f"model family {name!r} is already registered")
    missing = set(MAE) - set(defaults)
    if missing:
        raise ValueError(f"family {name!r} registered without defaults for {sorted(missing)}")
    MODELS[name] = build
    FAMILY_DEFAULTS[name] = dict(defaults)


def build_model(cfg: Config) -> Autoencoder:
    return MODELS[cfg.model.name](cfg)


__all__ = [
    "AEOutput",
    "Autoencoder",
    "ContractiveAutoencoder",
    "CrossMaskedAutoencoder",
    "DenoisingAutoencoder",
    "MaskedAutoencoder",
    "MODELS",
    "SparseAutoencoder",
    "StackedAutoencoder",
    "VanillaAutoencoder",
    "VariationalAutoencoder",
    "build_model",
    "register",
]
