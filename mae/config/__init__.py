"""The run configurations: typed, frozen dataclasses loaded from YAML recipes and dotted
``key=value`` overrides, checked before any work starts.

- ``pretraining``: the schema of ``pretrain.py`` (model, data, train), its resolution and the
  quantities derived from it; what this package exports is its public surface.
- ``evaluation``: the schema of ``finetune.py`` (linear probe, kNN, fine-tuning).
- ``training``: the training settings both schemas' training sections share.
- ``loader``: YAML 1.2 recipes + overrides -> dataclasses; ``checks``: what the checks share.
- ``presets``: named ViT sizes; ``families``: each model family's training defaults.
"""

from mae.config.loader import ConfigError, read_yaml, to_dict
from mae.config.pretraining import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Columns,
    Config,
    DataConfig,
    Derived,
    ModelConfig,
    TrainConfig,
    derive,
    derive_schedule,
    from_dict,
    load_config,
    preset_values,
    resolve,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Columns",
    "Config",
    "ConfigError",
    "DataConfig",
    "Derived",
    "ModelConfig",
    "TrainConfig",
    "derive",
    "derive_schedule",
    "from_dict",
    "load_config",
    "preset_values",
    "read_yaml",
    "resolve",
    "to_dict",
]
