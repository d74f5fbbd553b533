"""Run by test_ddp.py and test_distributed.py under ``accelerate launch``: train, then dump this
process's weights (unless they are an FSDP slice), the (epoch, index) pairs it loaded, and how many
parameter elements it held at the end of training against the model's total (``held_R.json``)."""

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from mae import pretrain
from mae.config import load_config
from mae.data import images, on_device
from mae.pretrain import train

if __name__ == "__main__":
    cfg = load_config(None, sys.argv[1:])
    seen = []
    load = images.ImageDataset.__getitem__

    def recording_getitem(self, index):
        if isinstance(index, tuple):  # training samples (the grid images are plain ints)
            seen.append(list(index))
        return load(self, index)

    # data.num_workers=0: loading happens in this process
    images.ImageDataset.__getitem__ = recording_getitem
    load_keys = on_device.DecodedImages.__getitems__

    def recording_getitems(self, indices):  # data.on_device=true: batches of keys
        seen.extend(list(i) for i in indices)
        return load_keys(self, indices)

    on_device.DecodedImages.__getitems__ = recording_getitems
    # train.compile=true: dynamo traces and guards as usual, without inductor's minutes of
    # C++ compiling
    real_compile = torch.compile
    torch.compile = lambda model, **kwargs: real_compile(model, **{**kwargs, "backend": "eager"})
    held = {}
    gathered = pretrain.gathered

    # the prepared model, as this process holds it
    def counting_gathered(accelerator, model, build):
        params = list(model.parameters())
        held["held"] = sum(
            p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params
        )
        held["total"] = sum(p.numel() for p in params)  # (a DTensor's numel is the whole tensor's)
        return gathered(accelerator, model, build)

    pretrain.gathered = counting_gathered
    result = train(cfg)
    state = PartialState()
    out = Path(cfg.output_dir) / f"rank{state.process_index}_of_{state.num_processes}"
    Path(cfg.output_dir, f"held_{state.process_index}.json").write_text(json.dumps(held))
    # FSDP: only the main one
    if not any(isinstance(v, DTensor) for v in result.model.state_dict().values()):
        weights = {k: v.detach().clone().contiguous() for k, v in result.model.state_dict().items()}
        save_file(weights, f"{out}.safetensors")
    Path(f"{out}.json").write_text(json.dumps(seen))
