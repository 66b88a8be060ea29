"""Run by test_distributed.py under torchrun (2 processes, gloo): a PEFT user's HF Trainer script with a peftlab
model. Each rank writes its adapter after training, so the test can check DDP kept them equal."""
from __future__ import annotations

import os
import sys

import torch.distributed as dist
from safetensors.torch import save_file

import peftlab
from test_trainer_dropin import _adapter, user_script

if __name__ == "__main__":
    out = sys.argv[1]
    model, trainer = user_script(peftlab, peftlab.Trainer, out, steps=4)
    assert trainer.args.world_size == 2 and trainer.args.parallel_mode.value == "distributed"
    save_file({k: v.contiguous() for k, v in _adapter(model).items()},
              os.path.join(out, f"rank{trainer.args.process_index}.safetensors"))
    # As torch asks of every script that joins a process group: leave it before exiting. Trainer (accelerate)
    # does not; a gloo process exiting with the group alive can die in `terminate called without an active exception`.
    dist.barrier()
    dist.destroy_process_group()
