"""Weights from elsewhere into the project's MAE, strictly and without unpickling code.

``load_weights(path)`` reads:

- the official facebookresearch/mae checkpoints (``{"model": state_dict}`` ``.pth`` files; the
  ``_full`` variants with the decoder, the others encoder only), with
  ``torch.load(weights_only=True)`` — a file that needs full unpickling is refused;
- a timm ``VisionTransformer`` (an export folder, or a ``.safetensors`` file);
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
    if p.is_dir():
        for name in ("model.safetensors",):
            if (p / name).is_file():
                return _to_ours(load_file(str(p / name)))
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
