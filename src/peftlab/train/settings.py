"""What a training run is asked to do (TrainConfig), its optimizer, learning-rate schedule and precision, and the
two ways it ends early (TrainingDiverged, TrainingInterrupted); train/loop.py runs it."""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the weights were not updated with it."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived; a checkpoint was written (when there is an output directory)."""


@dataclass
class TrainConfig:
    output_dir: Optional[str] = None   # checkpoints and metrics.jsonl; None: neither (an in-memory run)
    steps: Optional[int] = None        # optimizer steps; or
    epochs: Optional[float] = None     # passes over the training data (default 1 when steps is not given)
    batch_size: int = 8                # examples per optimizer step (split into grad_accum micro-batches)
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"           # cosine | linear | constant, after warmup
    warmup_steps: Optional[int] = None
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    precision: str = "auto"            # auto (CUDA: bf16 if supported else fp16; CPU: fp32) | fp32 | bf16 | fp16
    gradient_checkpointing: bool = False
    group_by_length: Optional[bool] = None  # batches of similar-length examples (data.BatchStream); None: when
    #                                         random batches would be >= 25% padding
    fsdp: bool = False                 # under torch.distributed: shard the frozen base with FSDP2 (train/sharding.py)
    eval_every: Optional[int] = None
    save_every: Optional[int] = None   # checkpoint every N steps (and at the end, and on SIGINT/SIGTERM)
    keep_checkpoints: int = 2          # newest checkpoints kept (0: all); the newest and the best always stay
    log_every: int = 10
    seed: int = 0
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be a positive multiple of grad_accum "
                             f"({self.grad_accum}): each optimizer step sees batch_size examples in grad_accum parts")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.keep_checkpoints < 0:
            raise ValueError(f"keep_checkpoints must be >= 0 (0 keeps every checkpoint), got {self.keep_checkpoints}")

    def total_steps(self, n_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil((self.epochs or 1.0) * n_examples / self.batch_size))

    def resume_signature(self) -> dict:
        """Settings a resumed run must share with the run that wrote the checkpoint."""
        keys = ("batch_size", "grad_accum", "lr", "weight_decay", "schedule", "warmup_steps", "warmup_ratio",
                "min_lr_ratio", "max_grad_norm", "seed", "precision", "group_by_length")
        return {k: getattr(self, k) for k in keys}


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(total: int, warmup: int, schedule: str, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak lr for the optimizer step that comes after `step` steps."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
        return min_ratio + (1 - min_ratio) * decay
    return f


def _fused_adam_ok(params) -> bool:
    """AdamW's fused kernel: one pass over all the adapter tensors instead of a dozen small ops per tensor (on CPU
    ~3× faster for a LoRA's few hundred tensors); it takes floating-point tensors on CPU or CUDA."""
    return all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16,
                                                                torch.float64) for p in params)


def adamw(params, cfg: TrainConfig) -> torch.optim.AdamW:
    """The run's optimizer: AdamW with the config's settings, fused where every tensor allows it."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=_fused_adam_ok(params))


def autocast_for(device: torch.device, precision: str):
    """(autocast context, dtype or None, needs a GradScaler)."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision == "fp32":
        return contextlib.nullcontext(), None, False
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device; use precision bf16 or fp32 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype), dtype, precision == "fp16"
