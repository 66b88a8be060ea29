"""run_merge: an adapter merged into its base model and saved as a plain Transformers model (`peftlab merge`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import JobError, MergeConfig
from .evaluate import Say, adapter_kind, quiet
from .inputs import adapter_directory, load_base, with_run_defaults


def run_merge(config: MergeConfig, say: Say = quiet) -> dict:
    from ...core.model import PeftModel
    from ..data import save_labels
    config = with_run_defaults(dataclasses.replace(config, adapter=adapter_directory(config.adapter)))
    for flag, value in (("adapter", config.adapter), ("output", config.output),
                        ("model (or --adapter RUN, a train run's --output, whose run.json names it)", config.model)):
        if not value:
            raise JobError(f"merge needs --{flag}")
    task_type, labels = adapter_kind(config.adapter)
    kind = "classification" if task_type == "SEQ_CLS" else "generation"
    if kind == "classification" and not labels:
        raise JobError(f"{config.adapter} is a classification adapter without labels.json; cannot size the head")
    model, tok = load_base(config.model, config.device, kind, labels, config)
    pm = PeftModel.from_pretrained(model, config.adapter)
    try:
        merged = pm.merge_and_unload(requantize=bool(config.requantize))
    except TypeError as e:  # a prompt method: its virtual tokens are inputs, not weights
        raise JobError(str(e)) from None
    dest = Path(config.output)
    merged.save_pretrained(str(dest))
    tok.save_pretrained(str(dest))
    if labels:
        save_labels(dest, labels)
    form = ""
    if config.quantize:
        form = f" ({config.quantize} base: {'requantised' if config.requantize else 'saved dense, dequantised'})"
    say(f"merged {config.adapter} into {config.model}{form}: {dest} (load it with transformers' from_pretrained)")
    return {"command": "merge", "model": config.model, "adapter": config.adapter, "output": str(dest),
            "quantize": config.quantize, "requantize": bool(config.requantize)}
