"""HF PEFT's AutoPeftModel classes: load the base model that adapter_config.json names, then the adapter on it.

`base_model_name_or_path` may be a local model directory, one of peftlab's embedded model names (smollm2-135m,
minilm-l6: resolved through peftlab.models, fetched once like load_model does), or anything else Transformers'
from_pretrained accepts (a Hub id, read from the local HF cache or downloaded, as in PEFT). The base is built
with the Transformers Auto class of the task (AutoPeftModelForCausalLM -> AutoModelForCausalLM, ...) or, for an
adapter without a task type, the class recorded in `auto_mapping` (only from allow-listed libraries, as in PEFT).
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Optional

from .core import adapter_files as files
from .core.config import PeftConfig
from .core.model import PeftModel

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"


def get_default_import_allowlist() -> list[str]:
    """Libraries whose classes an adapter's auto_mapping may name (PEFT's list)."""
    return ["diffusers", "lerobot", "megatron-core", "transformers"]


def _allowed(allowlist: list[str], library: str) -> bool:
    return library in allowlist or any(library.startswith(f"{a}.") for a in allowlist)


class _BaseAutoPeftModel:
    _target_class: Optional[str] = None   # the transformers Auto class of the task
    _task_type: Optional[str] = None      # the task_type its adapters carry

    def __init__(self, *args, **kwargs):
        raise EnvironmentError(f"{type(self).__name__} is designed to be instantiated using the "
                               f"`{type(self).__name__}.from_pretrained(pretrained_model_name_or_path)` method.")

    @classmethod
    def _base_class(cls, cfg: PeftConfig, allowlist: list[str]):
        """The Transformers class that builds the base model, chosen as PEFT chooses it."""
        if cfg.task_type is not None:
            if cls._task_type is None:
                raise ValueError("Cannot use `AutoPeftModel` with a task type, please use a specific class for your "
                                 f"task type (task_type={cfg.task_type!r}: use {_CLASS_FOR_TASK[cfg.task_type]})")
            if cfg.task_type != cls._task_type:
                raise ValueError(f"{cls.__name__} loads {cls._task_type} adapters, but this adapter's task_type is "
                                 f"{cfg.task_type}; use {_CLASS_FOR_TASK[cfg.task_type]}")
            return getattr(importlib.import_module("transformers"), cls._target_class)
        if cfg.auto_mapping is None:
            raise ValueError("Cannot infer the auto class from the config: the adapter has neither a task_type nor an "
                             "auto_mapping; load the base model yourself and use PeftModel.from_pretrained")
        library, name = cfg.auto_mapping["parent_library"], cfg.auto_mapping["base_model_class"]
        if not _allowed(allowlist, library):
            raise ValueError(f"The auto mapping wants to import '{library}' which is not in the import allowlist. If "
                             f"you are sure that importing this library is safe, specify "
                             f"`import_allowlist=['{library}']` in `from_pretrained()`.")
        return getattr(importlib.import_module(library), name)

    @classmethod
    def _base_path(cls, cfg: PeftConfig) -> str:
        name = cfg.base_model_name_or_path
        if not name:
            raise ValueError(f"the adapter's {files.CONFIG_NAME} has no base_model_name_or_path, so {cls.__name__} "
                             f"cannot tell which base to load; load it yourself and use PeftModel.from_pretrained")
        from .models import EMBEDDED_MODELS, model_path
        return str(model_path(name)) if name in EMBEDDED_MODELS else name

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        revision: Optional[str] = None, import_allowlist: Optional[list[str]] = None,
                        subfolder: Optional[str] = None, **kwargs) -> PeftModel:
        """The base named in adapter_config.json with the adapter loaded on it; `kwargs` go to the base model's
        from_pretrained (dtype=..., num_labels=...). A classification adapter written by `peftlab train` sizes the
        head from its labels.json unless num_labels is given."""
        directory = files.adapter_dir(pretrained_model_name_or_path, subfolder)
        cfg = PeftConfig.from_pretrained(directory)
        target = cls._base_class(cfg, import_allowlist or get_default_import_allowlist())
        kwargs.update(_label_kwargs(directory, kwargs))
        if cfg.revision is not None:
            kwargs.setdefault("revision", cfg.revision)
        base = target.from_pretrained(cls._base_path(cfg), **kwargs)
        _resize_to_tokenizer(base, directory)
        return PeftModel.from_pretrained(base, directory, adapter_name=adapter_name, is_trainable=is_trainable,
                                         config=config)


def _label_kwargs(directory: Path, kwargs: dict) -> dict:
    """The head's size and names from the labels.json `peftlab train` writes beside a classification adapter."""
    from .train.data import load_labels
    labels = None if "num_labels" in kwargs else load_labels(directory)
    if not labels:
        return {}
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {n: i for i, n in enumerate(labels)}}


def _resize_to_tokenizer(base, directory: Path) -> None:
    """PEFT: a tokenizer saved beside the adapter with more tokens than the base's embedding grows the embedding."""
    if not (directory / TOKENIZER_CONFIG_NAME).is_file():
        return
    from transformers import AutoTokenizer, PreTrainedModel
    if not isinstance(base, PreTrainedModel):
        return
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(_BaseAutoPeftModel):
    """Adapters without a task type: the base class comes from the adapter's auto_mapping."""


def _for_task(name: str, target: str, task_type: str) -> type:
    """PEFT's AutoPeftModelFor<Task>: adapters of `task_type` on a base built by transformers.<target>."""
    doc = f"Loads {task_type} adapters on a base built by transformers.{target}.from_pretrained."
    return type(name, (_BaseAutoPeftModel,), {"_target_class": target, "_task_type": task_type, "__doc__": doc,
                                              "__module__": __name__})


# (the task classes PEFT has; each a subclass, so isinstance checks and pickling by name work as for PEFT's)
AutoPeftModelForCausalLM = _for_task("AutoPeftModelForCausalLM", "AutoModelForCausalLM", "CAUSAL_LM")
AutoPeftModelForSeq2SeqLM = _for_task("AutoPeftModelForSeq2SeqLM", "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM")
AutoPeftModelForSequenceClassification = _for_task("AutoPeftModelForSequenceClassification",
                                                   "AutoModelForSequenceClassification", "SEQ_CLS")
AutoPeftModelForTokenClassification = _for_task("AutoPeftModelForTokenClassification",
                                                "AutoModelForTokenClassification", "TOKEN_CLS")
AutoPeftModelForQuestionAnswering = _for_task("AutoPeftModelForQuestionAnswering", "AutoModelForQuestionAnswering",
                                              "QUESTION_ANS")
AutoPeftModelForFeatureExtraction = _for_task("AutoPeftModelForFeatureExtraction", "AutoModel", "FEATURE_EXTRACTION")

_CLASS_FOR_TASK = {c._task_type: c.__name__ for c in _BaseAutoPeftModel.__subclasses__() if c._task_type}

__all__ = ["AutoPeftModel", "get_default_import_allowlist"] + sorted(_CLASS_FOR_TASK.values())
