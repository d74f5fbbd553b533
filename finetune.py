"""Evaluate an encoder: ``python finetune.py [--config FILE] encoder=SOURCE [dotted.key=value ...]``.

``mode=linear`` (default) fits a linear probe on frozen features, ``mode=knn`` a kNN classifier;
both write ``results.json`` (top-1, top-5, per-class accuracy, config, encoder digest) into
``output_dir`` and print one line per metric. SOURCE: an export dir, a run dir, timm:NAME,
random:DIR (the same architecture at random init) or pixels:SIZE (raw pixels). See README.md.
"""

import argparse
import sys

from mae.config import ConfigError, load_eval_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML recipe holding only what differs from the defaults")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. encoder=runs/mae mode=knn")
    args = parser.parse_args(argv)
    try:
        cfg = load_eval_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # heavy imports (torch, datasets) only once the config is known to be valid
    from mae.data import DataError
    from mae.probe import evaluate

    try:
        results = evaluate(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for key in ("top1", "top5"):
        print(f"{key}: {results[key]:.4f}")
    print(f"results: {cfg.output_dir}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
