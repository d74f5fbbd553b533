"""An encoder of any source as a classifier with a fresh head, for fine-tuning.

A timm encoder (an export, a run of a token model, timm:NAME) is rebuilt by timm with its own
classifier; any other family's encoder gives ``encode`` features to a linear head
(``EncodeClassifier``). Either way every pretrained weight is kept, and what was added or dropped
is recorded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from timm.models import get_model_args
from torch import nn

from mae.config import ConfigError
from mae.config.checks import size_hw
from mae.config.evaluation import EvalConfig
from mae.eval.encoders import FrozenEncoder, load_encoder
from mae.export import replace_dir, save_timm

# Parameters a timm classifier may add to or drop from its encoder's weights.
_FRESH = ("head.", "fc_norm.")  # the new classifier and its pooled-feature norm
_DROPPED = ("norm.", "fc_norm.", "head.")  # a final norm avg pooling replaces; an old head


@dataclasses.dataclass
class Classifier:
    model: nn.Module  # a timm model with a num_classes head, or an ``EncodeClassifier``
    data_config: dict[str, Any]  # timm's, at the fine-tuning resolution
    init: dict[str, Any]  # where the weights came from and what was changed
    kind: str  # the encoder's: "timm" or "autoencoder"
    arch: str  # what the weights do not say (``FrozenEncoder.arch``)


class EncodeClassifier(nn.Module):
    """A classic autoencoder's ``encode`` features (B, D) and a linear head, trained end to end
    (``_encode_classifier`` freezes what ``encode`` does not reach, e.g. the decoder)."""

    def __init__(self, autoencoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.head = nn.Linear(autoencoder.feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.autoencoder.encode(images))  # (B, num_classes)


def build_classifier(cfg: EvalConfig, num_classes: int) -> Classifier:
    """The encoder of ``cfg.encoder`` as a classifier with a fresh head: a timm model rebuilt with
    its classifier (``_timm_classifier``), any other family's ``encode`` features with a linear
    head."""
    encoder = load_encoder(cfg.encoder, cfg.seed, cfg.num_heads)
    if encoder.kind == "timm":
        model, init, data_config = _timm_classifier(cfg, encoder, num_classes)
    else:
        model, init, data_config = _encode_classifier(cfg, encoder, num_classes)
    return Classifier(
        model,
        data_config,
        {"source": cfg.encoder, "sha256": encoder.sha256, **init},
        encoder.kind,
        encoder.arch,
    )


def _init_head(head: nn.Linear) -> None:
    """The paper's head init."""
    nn.init.trunc_normal_(head.weight, std=2e-5)
    nn.init.zeros_(head.bias)


def _encode_classifier(
    cfg: EvalConfig, encoder: FrozenEncoder, num_classes: int
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """``EncodeClassifier`` of a project autoencoder; the parameters ``encode`` does not reach
    (found by one backward pass on a blank batch, in eval mode) stay frozen, kept as they are and
    listed as frozen."""
    f, data_config = cfg.finetune, dict(encoder.data_config)
    size = tuple(data_config["input_size"][1:])
    if not any(True for _ in encoder.module.parameters()):
        raise ConfigError(
            f"mode=finetune needs an encoder with weights to train; {cfg.encoder!r} has none: "
            "evaluate it with mode=linear or mode=knn"
        )
    if f.image_size is not None and size_hw(f.image_size) != size:
        raise ConfigError(
            f"finetune.image_size={f.image_size}: {cfg.encoder!r} works at its own size only "
            f"({list(size)})"
        )
    torch.manual_seed(cfg.seed)
    model = EncodeClassifier(encoder.module, num_classes)
    _init_head(model.head)
    net = encoder.module.requires_grad_(True)
    net.encode(
        torch.zeros(2, *data_config["input_size"])
    ).float().sum().backward()  # eval mode: no BN update
    unused = sorted(n for n, p in net.named_parameters() if p.grad is None)
    for name, p in net.named_parameters():
        p.grad = None
        p.requires_grad_(name not in unused)
    model.train()
    init = {
        "fresh": ["head.bias", "head.weight"],
        "dropped": [],
        "frozen": unused,
        "pos_embed_resampled": None,
    }
    return model, init, data_config


def _timm_classifier(
    cfg: EvalConfig, encoder: FrozenEncoder, num_classes: int
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The same timm architecture with a classifier, its weights loaded strictly except for the
    fresh head (and ``fc_norm``) and a final norm that average pooling replaces; position embeddings
    resampled for ``finetune.image_size``."""
    f, src = cfg.finetune, encoder.module
    # the pooling decides fc_norm
    args = {k: v for k, v in get_model_args(src).items() if k != "fc_norm"}
    args |= {
        "num_classes": num_classes,
        "global_pool": f.global_pool,
        "drop_path_rate": f.drop_path,
    }
    if f.global_pool == "token" and getattr(src, "cls_token", None) is None:
        raise ConfigError(
            f"finetune.global_pool=token: {cfg.encoder!r} has no cls token; use "
            "finetune.global_pool=avg"
        )
    torch.manual_seed(cfg.seed)
    try:
        model = timm.create_model(src.pretrained_cfg["architecture"], pretrained=False, **args)
    except TypeError as e:  # an architecture without drop path or pooling options
        raise ConfigError(
            f"mode=finetune cannot rebuild {cfg.encoder!r} as a classifier ({e})"
        ) from e
    names = model.pretrained_cfg.get("classifier") or "head"
    # "head.", "fc.", "head.fc."
    head = tuple(f"{n}." for n in ([names] if isinstance(names, str) else names))
    state = {k: v for k, v in src.state_dict().items() if not k.startswith(head)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    fresh, dropped = (*head, *_FRESH), (*head, *_DROPPED)
    bad = [k for k in missing if not k.startswith(fresh)] + [
        k for k in unexpected if not k.startswith(dropped)
    ]
    if bad:
        raise ConfigError(
            f"{cfg.encoder!r} does not match its classifier: parameters {bad} are missing or "
            "unexpected"
        )
    if isinstance(model.get_classifier(), nn.Linear):
        _init_head(model.get_classifier())
    data_config = dict(encoder.data_config)
    channels, *size = data_config["input_size"]
    resampled = None
    if f.image_size is not None and size_hw(f.image_size) != tuple(size):
        if not hasattr(model, "set_input_size"):
            raise ConfigError(
                f"finetune.image_size={f.image_size}: {cfg.encoder!r} cannot change its input size"
            )
        before = (
            tuple(model.pos_embed.shape) if getattr(model, "pos_embed", None) is not None else None
        )
        # timm resamples the position embeddings
        model.set_input_size(img_size=size_hw(f.image_size))
        if before is not None:
            resampled = {"from": list(before), "to": list(model.pos_embed.shape)}
        data_config["input_size"] = (channels, *size_hw(f.image_size))
    init = {
        "fresh": sorted(missing),
        "dropped": sorted(unexpected),
        "pos_embed_resampled": resampled,
    }
    return model, init, data_config


def save_classifier(net: nn.Module, clf: Classifier, out_dir: Path, num_classes: int) -> None:
    """A fine-tuned classifier: timm's format for a timm model
    (``timm.create_model("local-dir:...")`` loads it); otherwise ``model.safetensors`` with
    ``classifier.json`` (the encoder's architecture, classes and preprocessing)."""
    if clf.kind == "timm":
        save_timm(net, out_dir, clf.data_config, f"finetuned_{num_classes}cls")
        return
    meta = {
        "encoder_arch": json.loads(clf.arch),
        "num_classes": num_classes,
        "data_config": clf.data_config,
    }

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        save_file(
            {k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / "model.safetensors")
        )
        (tmp / "classifier.json").write_text(json.dumps(meta, indent=1, default=list))

    replace_dir(out_dir, write)
