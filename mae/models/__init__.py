"""Model registry: every family registers a builder taking the resolved config."""

from __future__ import annotations

from collections.abc import Callable

from mae.config import Config
from mae.models.ae import VanillaAutoencoder
from mae.models.base import AEOutput, Autoencoder
from mae.models.cae import ContractiveAutoencoder
from mae.models.dae import DenoisingAutoencoder
from mae.models.mae import MaskedAutoencoder
from mae.models.sparse import SparseAutoencoder
from mae.models.stacked import StackedAutoencoder
from mae.models.vae import VariationalAutoencoder


def _build_mae(cfg: Config) -> MaskedAutoencoder:
    m = cfg.model
    return MaskedAutoencoder(
        image_size=cfg.data.image_size,
        channels=cfg.data.channels,
        patch_size=m.patch_size,
        embed_dim=m.embed_dim,
        depth=m.depth,
        num_heads=m.num_heads,
        decoder_embed_dim=m.decoder_embed_dim,
        decoder_depth=m.decoder_depth,
        decoder_num_heads=m.decoder_num_heads,
        mlp_ratio=m.mlp_ratio,
        mask_ratio=m.mask_ratio,
        norm_pix_loss=m.norm_pix_loss,
    )


MODELS: dict[str, Callable[[Config], Autoencoder]] = {
    "mae": _build_mae,
    "ae": VanillaAutoencoder,
    "dae": DenoisingAutoencoder,
    "sparse_ae": SparseAutoencoder,
    "cae": ContractiveAutoencoder,
    "vae": VariationalAutoencoder,
    "stacked_ae": StackedAutoencoder,
}


def build_model(cfg: Config) -> Autoencoder:
    return MODELS[cfg.model.name](cfg)


__all__ = [
    "AEOutput",
    "Autoencoder",
    "ContractiveAutoencoder",
    "DenoisingAutoencoder",
    "MaskedAutoencoder",
    "MODELS",
    "SparseAutoencoder",
    "StackedAutoencoder",
    "VanillaAutoencoder",
    "VariationalAutoencoder",
    "build_model",
]
