"""What each model family trains with when the recipe does not say: augmentation and optimiser.

MAE keeps the paper's: RandomResizedCrop (0.2-1) and flip, blr 1e-3 (swept for the default run,
docs/sweep_mae_sample.md), weight decay 0.05, one warm-up epoch. The classic autoencoders are judged
by how well they reconstruct the images they are given (and what their codes probe), and crops teach
a reconstruction model zoomed-in, smoother images than those it is tested on; their defaults come
from the CIFAR-10 sweep in docs/sweep_classic_cifar10.md. A leaf module (no ``mae`` imports), read
by ``mae.config.resolve``; the resolved config records the values.
"""

from __future__ import annotations

from typing import Any

MAE = {"augment": "crop", "blr": 1.0e-3, "weight_decay": 0.05, "warmup_epochs": 1.0}
CLASSIC = {"augment": "flip", "blr": 5.0e-3, "weight_decay": 0.0, "warmup_epochs": 0.1}
# A penalty on the code (sparsity, contraction) is met for free by shrinking what varies in the code
# and growing the decoder to read it, unless the weights decay: without weight decay the codes
# become mostly one offset that every image shares, more so with every step
# (docs/sweep_classic_cifar10.md, "Weight decay for the sparse and contractive autoencoders")
PENALISED = CLASSIC | {"weight_decay": 0.5}

# Every model family the config accepts as model.name, with its defaults: the built-in ones
# (mae.models.MODELS builds them); ``mae.models.register`` adds a family to both tables.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "mae": MAE,
    "ae": CLASSIC,
    "dae": CLASSIC,
    "sparse_ae": PENALISED,
    "cae": PENALISED,
    "vae": CLASSIC,
    "stacked_ae": CLASSIC,
}
