"""Training: one loop for every method (loop.py), data and built-in tasks, metrics and forgetting, checkpoints.

Names are imported lazily, so `peftlab.train.wordnet` (stdlib only) stays cheap to import on its own.
"""
_EXPORTS = ("TrainConfig", "TrainingDiverged", "TrainingInterrupted", "method_hooks_callback", "train")
__all__ = list(_EXPORTS) + ["Trainer"]


def __getattr__(name: str):
    if name == "Trainer":  # transformers.Trainer with HF PEFT's adapter checkpoints for peftlab models
        from .hf_trainer import Trainer
        return Trainer
    if name in _EXPORTS:
        from . import loop
        return getattr(loop, name)
    raise AttributeError(f"module 'peftlab.train' has no attribute {name!r}")
