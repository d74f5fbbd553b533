"""Run by test_ddp.py under ``accelerate launch``: train, then dump this process's weights and the
(epoch, index) pairs it loaded."""

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import save_file

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

    images.ImageDataset.__getitem__ = recording_getitem  # data.num_workers=0: loading happens in this process
    load_keys = on_device.DecodedImages.__getitems__

    def recording_getitems(self, indices):  # data.on_device=true: batches of keys
        seen.extend(list(i) for i in indices)
        return load_keys(self, indices)

    on_device.DecodedImages.__getitems__ = recording_getitems
    # train.compile=true: dynamo traces and guards as usual, without inductor's minutes of C++ compiling
    real_compile = torch.compile
    torch.compile = lambda model, **kwargs: real_compile(model, **{**kwargs, "backend": "eager"})
    result = train(cfg)
    state = PartialState()
    weights = {k: v.detach().clone().contiguous() for k, v in result.model.state_dict().items()}
    out = Path(cfg.output_dir) / f"rank{state.process_index}_of_{state.num_processes}"
    save_file(weights, f"{out}.safetensors")
    Path(f"{out}.json").write_text(json.dumps(seen))
