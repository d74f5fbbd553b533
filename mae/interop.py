"""Weights from elsewhere into the project's MAE, strictly and without unpickling code.

``load_weights(path)`` reads:

- the official facebookresearch/mae checkpoints (``{"model": state_dict}`` ``.pth`` files; the
  ``_full`` variants with the decoder, the others encoder only), with
  ``torch.load(weights_only=True)`` — a file that needs full unpickling is refused;
- a timm ``VisionTransformer`` (an export folder, or a ``.safetensors`` file);
- a Hugging Face ``ViTMAEForPreTraining`` / ``ViTMAEModel`` ``save_pretrained`` folder (``from_hf``;
  ``to_hf`` goes the other way, ``python -m mae.export RUN --format hf`` writes one);
- a run's checkpoint folder or ``model.safetensors`` of the project.

``load_into(model, state)`` maps the names onto ``MaskedAutoencoder`` (the official encoder keys
gain the ``encoder.`` prefix of the timm encoder; decoder keys are shared) and loads strictly; when
the patch grid differs, the position embeddings (fixed 2-D sin-cos in MAE) are the model's own for
its grid (reported); an unknown key or a shape that cannot be
fixed is an error naming the key and both shapes; a missing decoder is left at its fresh
initialisation and reported. ``pretrain.py init=PATH`` uses both before the first step.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from mae.errors import UserError

_DECODER = ("decoder_", "mask_token")
_POS = ("encoder.pos_embed", "decoder_pos_embed")


class WeightsError(UserError, ValueError):
    """Weights that cannot be loaded as asked; the message names the key or file and the fix."""


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict in the project's MAE naming, from any supported file or folder."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file() and '"vit_mae"' in (p / "config.json").read_text():
        return from_hf(p)[0].state_dict()  # a Hugging Face ViTMAE save_pretrained folder
    if p.is_dir():
        if (p / "model.safetensors").is_file():
            return _to_ours(load_file(str(p / "model.safetensors")))
        raise WeightsError(f"init={path}: the folder holds no model.safetensors (an export or a checkpoint folder)")
    if not p.is_file():
        raise WeightsError(f"init={path} does not exist; give a checkpoint file or folder")
    if p.suffix == ".safetensors":
        return _to_ours(load_file(str(p)))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"init={path} needs full unpickling (it could run code), which is never done; convert it to "
            "safetensors where you trust it, or give the official {'model': state_dict} checkpoint"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightsError(f"init={path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"init={path} holds no state dict of tensors (expected {{'model': state_dict}})")
    return _to_ours(state)


def _to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official / timm names -> the project's (already-prefixed names pass through)."""
    out = {}
    for k, v in state.items():
        if k.startswith(("encoder.", *_DECODER)):
            out[k] = v
        elif k.startswith(("head.", "fc_norm.")):  # a classifier's, not an encoder's
            continue
        else:
            out[f"encoder.{k}"] = v
    return out


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """Load ``state`` into ``model`` strictly (see the module docstring); returns what was done."""
    ours = model.state_dict()
    unknown = sorted(k for k in state if k not in ours)
    if unknown:
        raise WeightsError(f"init={source}: keys {unknown[:5]} have no counterpart in model.name=mae")
    resampled, merged = {}, dict(ours)
    for k, v in state.items():
        want = ours[k].shape
        if v.shape != want:
            if k in _POS and v.ndim == 3 and v.shape[-1] == want[-1]:
                # fixed 2-D sin-cos in MAE: the model's own, computed for its grid, is exact there
                resampled[k] = [list(v.shape), list(want)]
                continue
            else:
                raise WeightsError(
                    f"init={source}: {k} has shape {tuple(v.shape)} in the file and {tuple(want)} in the model; "
                    "choose the matching model.preset / model.* dimensions"
                )
        merged[k] = v.to(ours[k].dtype)
    missing = sorted(k for k in ours if k not in state)
    bad = [k for k in missing if not k.startswith(_DECODER)]
    if bad:
        raise WeightsError(f"init={source}: the file lacks encoder weights {bad[:5]}; is it an MAE / ViT checkpoint?")
    model.load_state_dict(merged, strict=True)
    return {"source": source, "loaded": len(state) - len(resampled), "fresh": missing, "pos_embed_regrid": resampled}


# ---------------------------------------------------------------------------------------------- Hugging Face


def _block_pairs(ours: str, hf: str) -> list[tuple[str, str]]:
    """(our name, HF name) for one transformer block's tensors except the fused qkv."""
    pairs = [("norm1", "layernorm_before"), ("attn.proj", "attention.o_proj"), ("norm2", "layernorm_after")]
    pairs += [("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]
    return [(f"{ours}.{a}.{p}", f"{hf}.{b}.{p}") for a, b in pairs for p in ("weight", "bias")]


def _name_pairs(depth: int, decoder_depth: int) -> list[tuple[str, str]]:
    pairs = [
        ("encoder.cls_token", "vit.embeddings.cls_token"),
        ("encoder.pos_embed", "vit.embeddings.position_embeddings"),
        ("encoder.patch_embed.proj.weight", "vit.embeddings.patch_embeddings.projection.weight"),
        ("encoder.patch_embed.proj.bias", "vit.embeddings.patch_embeddings.projection.bias"),
        ("encoder.norm.weight", "vit.layernorm.weight"),
        ("encoder.norm.bias", "vit.layernorm.bias"),
        ("mask_token", "decoder.mask_token"),
        ("decoder_pos_embed", "decoder.decoder_pos_embed"),
    ]
    for ours in ("decoder_embed", "decoder_norm", "decoder_pred"):
        pairs += [(f"{ours}.{p}", f"decoder.{ours}.{p}") for p in ("weight", "bias")]
    for i in range(depth):
        pairs += _block_pairs(f"encoder.blocks.{i}", f"vit.layers.{i}")
    for i in range(decoder_depth):
        pairs += _block_pairs(f"decoder_blocks.{i}", f"decoder.decoder_layers.{i}")
    return pairs


def _qkv_prefixes(depth: int, decoder_depth: int) -> list[tuple[str, str]]:
    return [(f"encoder.blocks.{i}.attn.qkv", f"vit.layers.{i}.attention") for i in range(depth)] + [
        (f"decoder_blocks.{i}.attn.qkv", f"decoder.decoder_layers.{i}.attention") for i in range(decoder_depth)
    ]


def hf_config(cfg: Any) -> Any:
    """The ``ViTMAEConfig`` of a project config (``model.name=mae``)."""
    from transformers import ViTMAEConfig

    m, d = cfg.model, cfg.data
    return ViTMAEConfig(
        hidden_size=m.embed_dim,
        num_hidden_layers=m.depth,
        num_attention_heads=m.num_heads,
        intermediate_size=int(m.embed_dim * m.mlp_ratio),
        decoder_hidden_size=m.decoder_embed_dim,
        decoder_num_hidden_layers=m.decoder_depth,
        decoder_num_attention_heads=m.decoder_num_heads,
        decoder_intermediate_size=int(m.decoder_embed_dim * m.mlp_ratio),
        image_size=d.image_size,
        patch_size=m.patch_size,
        num_channels=d.channels,
        mask_ratio=m.mask_ratio,
        norm_pix_loss=m.norm_pix_loss,
        layer_norm_eps=1e-6,  # timm's and the official code's (HF's default is 1e-12)
        hidden_act="gelu",
        qkv_bias=True,
    )


def to_hf(model: nn.Module, cfg: Any) -> Any:
    """The project's MAE as a ``ViTMAEForPreTraining`` with the same weights (``save_pretrained`` it)."""
    from transformers import ViTMAEForPreTraining

    m = cfg.model
    hf = ViTMAEForPreTraining(hf_config(cfg)).eval()
    ours = model.state_dict()
    state = {h: ours[o] for o, h in _name_pairs(m.depth, m.decoder_depth)}
    for o, h in _qkv_prefixes(m.depth, m.decoder_depth):
        for p in ("weight", "bias"):
            q, k, v = ours[f"{o}.{p}"].chunk(3, dim=0)
            state |= {f"{h}.q_proj.{p}": q, f"{h}.k_proj.{p}": k, f"{h}.v_proj.{p}": v}
    hf.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)
    return hf


def from_hf(source: Any) -> tuple[nn.Module, Any]:
    """A ``ViTMAEForPreTraining`` (in memory, or a ``save_pretrained`` folder) -> (the project's MAE with
    the same weights, its Config). A bare ``ViTMAEModel`` gives the encoder; the decoder stays fresh."""
    from transformers import ViTMAEForPreTraining, ViTMAEModel

    from mae.config import load_config
    from mae.models import build_model

    if isinstance(source, (str, Path)):
        try:
            source = ViTMAEForPreTraining.from_pretrained(str(source))
        except (OSError, ValueError) as e:
            raise WeightsError(f"{source} is not a Hugging Face ViTMAE folder ({e})") from e
    c = source.config
    if c.hidden_act != "gelu" or not c.qkv_bias:
        raise WeightsError(f"ViTMAE with hidden_act={c.hidden_act!r}, qkv_bias={c.qkv_bias} has no counterpart here")
    overrides = [
        "model.name=mae",
        f"model.embed_dim={c.hidden_size}",
        f"model.depth={c.num_hidden_layers}",
        f"model.num_heads={c.num_attention_heads}",
        f"model.mlp_ratio={c.intermediate_size / c.hidden_size}",
        f"model.decoder_embed_dim={c.decoder_hidden_size}",
        f"model.decoder_depth={c.decoder_num_hidden_layers}",
        f"model.decoder_num_heads={c.decoder_num_attention_heads}",
        f"model.patch_size={c.patch_size}",
        f"model.mask_ratio={c.mask_ratio}",
        f"model.norm_pix_loss={str(c.norm_pix_loss).lower()}",
        f"data.image_size={c.image_size}",
        f"data.channels={c.num_channels}",
    ]
    cfg = load_config(None, overrides)
    model = build_model(cfg)
    theirs = source.state_dict()
    if isinstance(source, ViTMAEModel):  # the encoder alone, its names without the "vit." prefix
        theirs = {f"vit.{k}": v for k, v in theirs.items()}
    ours = dict(model.state_dict())
    for o, h in _name_pairs(c.num_hidden_layers, c.decoder_num_hidden_layers):
        if h in theirs:
            ours[o] = theirs[h]
    for o, h in _qkv_prefixes(c.num_hidden_layers, c.decoder_num_hidden_layers):
        for p in ("weight", "bias"):
            if f"{h}.q_proj.{p}" in theirs:
                ours[f"{o}.{p}"] = torch.cat([theirs[f"{h}.{n}_proj.{p}"] for n in ("q", "k", "v")], dim=0)
    model.load_state_dict(ours, strict=True)
    return model, cfg
