"""HF Trainer for peftlab models: adapter checkpoints as HF PEFT's, resuming from them, and the methods' step hooks.

transformers treats a model as an adapter model only when it is `peft.PeftModel` (an isinstance check, and only
with the `peft` package installed): then a checkpoint holds `adapter_config.json` + `adapter_model.safetensors` and
resuming calls `model.load_adapter(checkpoint, active_adapter)`. Any other model is saved and restored as one whole
state dict (`model.safetensors`, every frozen base weight included). A peftlab PeftModel is not that class, so
`peftlab.Trainer` gives it PEFT's treatment at the three places that decide it — `_save` (what a checkpoint holds),
`_load_from_checkpoint` (`train(resume_from_checkpoint=...)`) and `_load_best_model` (`load_best_model_at_end`) —
and adds the per-step method hooks (AdaLoRA's budget update). Every other model goes through transformers' own code.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import transformers
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import can_return_loss, find_labels

from ..core.config import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from ..core.model import PeftModel


def peftlab_model(model) -> Optional[PeftModel]:
    """The peftlab PeftModel inside DDP / accelerate wrappers (they keep the model at `.module`), or None."""
    while not isinstance(model, PeftModel) and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model if isinstance(model, PeftModel) else None


class MethodHooks(transformers.TrainerCallback):
    """Runs `PeftModel.on_step_end` at the point peftlab's loop does: after the optimizer step, before the gradients
    are zeroed (AdaLoRA's rank budget; HF PEFT asks its users to call `update_and_allocate` there themselves), and
    `PeftModel.before_optimizer_step` where both loops clip first and update next (LoRA-Pro's gradients)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        target = peftlab_model(model)
        if target is not None:
            target.before_optimizer_step(state.global_step)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        target = peftlab_model(model)
        if target is not None:
            target.on_step_end(state.global_step)


def _has_adapter_files(directory: Path) -> bool:
    return (directory / CONFIG_NAME).is_file() and any((directory / f).is_file()
                                                       for f in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME))


def load_adapter_checkpoint(model: PeftModel, checkpoint: str | os.PathLike) -> None:
    """Put a checkpoint's adapters into the model's adapters of the same names (`default` at the top, others in
    subfolders, as save_pretrained writes them), as transformers does for HF PEFT models."""
    root = Path(checkpoint)
    dirs = {name: root if name == "default" else root / name for name in model.peft_config}
    active = model.active_adapter
    if not _has_adapter_files(dirs[active]):
        raise ValueError(f"cannot resume from {root}: it has no {CONFIG_NAME} + {WEIGHTS_NAME} for the active "
                         f"adapter {active!r} (in {dirs[active]}); peftlab.Trainer writes them in every checkpoint "
                         f"(a checkpoint of transformers.Trainer holds model.safetensors instead: resume it with "
                         f"transformers.Trainer)")
    shapes = _trainable_shapes(model)
    for name, directory in dirs.items():
        if _has_adapter_files(directory):
            model.load_adapter(directory, name, is_trainable=True)
    if _trainable_shapes(model) != shapes:
        raise ValueError(f"the adapter files in {root} hold a folded form of what trains (e.g. P-tuning's prompt "
                         f"encoder or a prefix projection is saved as its output table), so the optimizer state in "
                         f"the checkpoint no longer fits the trainable tensors; start a new run from the adapter "
                         f"instead: PeftModel.from_pretrained(base, {str(root)!r}, is_trainable=True)")


def _trainable_shapes(model: PeftModel) -> list[tuple]:
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


class Trainer(transformers.Trainer):
    """transformers.Trainer, with HF PEFT's checkpoints for peftlab models (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = peftlab_model(self.model)
        if model is not None:
            # What transformers reads off the base class of an HF PEFT model: find_labels matches "label" in the
            # forward's parameter names, and start/end_positions only for a class named *QuestionAnswering.
            base = type(model.get_base_model())
            self.label_names = find_labels(base) if self.args.label_names is None else self.args.label_names
            self.can_return_loss = can_return_loss(base)
        if not any(isinstance(c, MethodHooks) for c in self.callback_handler.callbacks):
            self.add_callback(MethodHooks())

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        model = peftlab_model(self.model)
        if model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)
        # The rest as transformers writes it beside a PEFT adapter: the tokenizer and the training arguments.
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = peftlab_model(model if model is not None else self.model)
        if target is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter_checkpoint(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        target = peftlab_model(self.model)
        if target is None:
            return super()._load_best_model()
        load_adapter_checkpoint(target, self.state.best_model_checkpoint)
