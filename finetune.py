"""Evaluate an encoder: ``python finetune.py [--config FILE] encoder=SOURCE [dotted.key=value ...]``.

``mode=linear`` (default) fits a linear probe on frozen features, ``mode=knn`` a kNN classifier;
both write ``results.json`` (top-1, top-5, per-class accuracy, config, encoder digest) into
``output_dir`` and print one line per metric. SOURCE: an export dir, a run dir, timm:NAME,
random:DIR (the same architecture at random init) or pixels:SIZE (raw pixels). See README.md.
"""

import sys

from mae.cli import main
from mae.config import EvalConfig, load_eval_config


def probe(cfg: EvalConfig) -> None:
    from mae.probe import evaluate  # torch, datasets: only once the config is known to be valid

    results = evaluate(cfg)
    for key in ("top1", "top5"):
        print(f"{key}: {results[key]:.4f}")
    print(f"results: {cfg.output_dir}/results.json")


if __name__ == "__main__":
    sys.exit(main(__doc__.split("\n\n")[0], load_eval_config, probe, sys.argv[1:]))
