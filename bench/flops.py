"""Training FLOPs per image of a pretraining recipe: one forward + backward of the model the
recipe builds, counted by ``torch.utils.flop_counter.FlopCounterMode`` (attention written out as
matmuls; with the recipe's masks per image and its teacher's forward). No noise moves the count,
so it explains a time-to-quality table in arithmetic (``budget.py`` runs this in a process of its
own).

    python bench/flops.py --config configs/mae_vit_tiny_cifar10_budget.yaml [key=value ...]

Prints one JSON line: {"flops_per_image": ...}.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from common import step_flops

from mae.config import load_config
from mae.models import build_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a pretraining recipe")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    print(json.dumps({"flops_per_image": step_flops(model, cfg, torch.device("cpu"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
