"""PeftConfig: the fields every adapter config shares, and reading/writing adapter_config.json as HF PEFT does."""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .io import atomic_write_text

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
# The PEFT version whose file format we write; PEFT reads `peft_version` only to warn about newer files.
PEFT_FORMAT_VERSION = "0.21.2"

# Config fields that name modules; any config that has one gets the same normalisation.
MODULE_LIST_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules")
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


@dataclass
class PeftConfig:
    peft_type: Optional[str] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = field(default=PEFT_FORMAT_VERSION)
    # Modules trained and saved whole beside the adapter (HF PEFT's field; a task head is added to it for
    # SEQ_CLS/TOKEN_CLS/QUESTION_ANS). Every method has it, so it is declared once here, not probed for.
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self) -> None:
        # Module-name lists may be given as sets or tuples (HF PEFT keeps sets); stored sorted, as JSON lists.
        for name in MODULE_LIST_FIELDS:
            value = getattr(self, name, None)
            if isinstance(value, (set, frozenset, tuple)):
                setattr(self, name, sorted(value))
        if self.task_type is not None:
            self.task_type = str(self.task_type).upper()
            if self.task_type not in TASK_TYPES:
                raise ValueError(f"task_type {self.task_type!r} is not one of {', '.join(TASK_TYPES)}")

    # -- declared capabilities: data-driven methods override both ---------------------------------------------
    @property
    def calibration_data(self) -> Optional[str]:
        """Which data `prepare` must see before get_peft_model: None (none: the method needs no data), "task"
        (batches of the training data: Child-tuning's Fisher mask, CorDA IPM) or "knowledge" (general text whose
        knowledge the adapter should keep: CorDA KPM)."""
        return None

    def prepare(self, model, data: Any, **kwargs: Any) -> None:
        """Look at calibration data before get_peft_model (see calibration_data)."""
        raise TypeError(f"{type(self).__name__} ({self.peft_type}) needs no calibration data: its calibration_data is "
                        f"None, so there is nothing to prepare; call get_peft_model directly")

    # -- serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = sorted(v) if isinstance(v, (set, frozenset)) else v
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        d = dict(self.to_dict(), inference_mode=True)  # PEFT writes saved configs as inference configs
        atomic_write_text(Path(directory) / CONFIG_NAME, json.dumps(d, indent=2, sort_keys=True))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PeftConfig":
        """Build the right config class for data['peft_type']; unknown keys (newer PEFT) are dropped with a warning."""
        from .registry import config_class_for
        if "peft_type" not in data:
            raise ValueError("adapter config has no 'peft_type'; it is not an adapter_config.json written by "
                             "peftlab or HF PEFT")
        target = config_class_for(data["peft_type"]) if cls is PeftConfig or cls.__name__ == "PeftConfig" else cls
        names = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(f"{target.__name__}: ignoring config keys this version does not know: {unknown}",
                          stacklevel=2)
        return target(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "PeftConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not an adapter directory "
                                    f"(expected {CONFIG_NAME} + {WEIGHTS_NAME})")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); the adapter config is corrupted") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "PeftConfig":
        return dataclasses.replace(self, **changes)


class TaskType:
    """HF PEFT's task types, as plain strings (configs store strings)."""
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"
