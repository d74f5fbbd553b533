"""MAE architecture presets: named records of the ``model.*`` architecture keys.

They would sit in ``mae/models/`` beside the model they size (DESIGN: presets next to their model),
but the config fills the architecture keys a recipe leaves unset from a preset, so ``mae.config``
imports them, and anything under ``mae/models/`` runs ``mae/models/__init__.py`` first, which
imports ``mae.config`` (the builders take a Config): a cycle. So they live in this leaf module of
the configuration, which imports nothing from ``mae``; config, interop and the models can all
import it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Preset:
    """A ViT encoder and its MAE decoder; each field is the ``model.*`` key of the same name."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int


PRESET_KEYS = tuple(f.name for f in dataclasses.fields(Preset))

# The first three are the paper's (decoder 512 x 8); the patch-4 ones are for 32x32 (CIFAR-scale)
# images.
_PAPER_DECODER = {"decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16}
PRESETS: dict[str, Preset] = {
    "vit_base_patch16": Preset(
        patch_size=16, embed_dim=768, depth=12, num_heads=12, **_PAPER_DECODER
    ),
    "vit_large_patch16": Preset(
        patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_PAPER_DECODER
    ),
    "vit_huge_patch14": Preset(
        patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_PAPER_DECODER
    ),
    "vit_small_patch4": Preset(
        patch_size=4,
        embed_dim=384,
        depth=12,
        num_heads=6,
        decoder_embed_dim=256,
        decoder_depth=4,
        decoder_num_heads=8,
    ),
    "vit_tiny_patch4": Preset(
        patch_size=4,
        embed_dim=192,
        depth=12,
        num_heads=3,
        decoder_embed_dim=128,
        decoder_depth=2,
        decoder_num_heads=4,
    ),
}
DEFAULT_PRESET = "vit_tiny_patch4"
