"""Pretrain an autoencoder:
``accelerate launch pretrain.py [--config FILE] [dotted.key=value ...]``.

With no arguments: the default recipe (MAE ViT-Tiny/4) on the CIFAR-10 sample shipped in the
package. See docs/pretraining.md, docs/data.md and docs/distributed.md.
"""

import sys

from mae.cli import main
from mae.config import Config
from mae.interop import load_pretrain_config  # the recipe, with an init= checkpoint's architecture


def pretrain(cfg: Config) -> None:
    from mae.pretrain import train  # torch, datasets: only once the config is known to be valid

    train(cfg)


if __name__ == "__main__":
    description = __doc__.split("\n\n")[0]
    sys.exit(main(description, Config, load_pretrain_config, pretrain, sys.argv[1:]))
