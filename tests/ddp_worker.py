"""Run by test_ddp.py under ``accelerate launch``: train, then dump this process's weights."""

import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file

from mae.config import load_config
from mae.engine import train

if __name__ == "__main__":
    cfg = load_config(None, sys.argv[1:])
    result = train(cfg)
    state = PartialState()
    weights = {k: v.detach().clone().contiguous() for k, v in result.model.state_dict().items()}
    out = Path(cfg.output_dir) / f"rank{state.process_index}_of_{state.num_processes}.safetensors"
    save_file(weights, str(out))
