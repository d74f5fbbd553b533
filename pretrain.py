"""Pretrain an autoencoder: ``accelerate launch pretrain.py [--config FILE] [dotted.key=value ...]``.

With no arguments: the default recipe (MAE ViT-Tiny/4) on the CIFAR-10 sample shipped in the
package. See README.md for datasets, multi-GPU/multi-node launches and resuming.
"""

import argparse
import sys

from mae.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML recipe holding only what differs from the defaults")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.max_steps=30 output_dir=runs/x")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # heavy imports (torch, datasets) only once the config is known to be valid
    from mae.data import DataError
    from mae.engine import NonFiniteLossError, train

    try:
        train(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
