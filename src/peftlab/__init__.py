"""peftlab: parameter-efficient fine-tuning for PyTorch / Transformers, with HF PEFT's API and file format."""
from .core.config import PeftConfig
from .core.functional import hf_peft_numerics
from .core.model import PeftModel, get_peft_model
from .core.registry import get_method, list_methods
from .methods.lora import (EvaConfig, LoftQConfig, LoraConfig, get_eva_state_dict, initialize_lora_eva_weights,
                           replace_lora_weights_loftq)
from .auto import (AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForFeatureExtraction,
                   AutoPeftModelForQuestionAnswering, AutoPeftModelForSeq2SeqLM,
                   AutoPeftModelForSequenceClassification, AutoPeftModelForTokenClassification)
from .helpers import (TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status,
                      get_peft_model_state_dict, inject_adapter_in_model, prepare_model_for_kbit_training,
                      set_peft_model_state_dict)

__version__ = "0.1.0"

__all__ = ["PeftConfig", "PeftModel", "hf_peft_numerics", "get_peft_model", "get_method", "list_methods", "LoraConfig",
           "EvaConfig", "LoftQConfig", "get_eva_state_dict", "initialize_lora_eva_weights",
           "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
           "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
           "AutoPeftModelForTokenClassification", "TunerLayerStatus", "TunerModelStatus", "get_layer_status",
           "get_model_status", "get_peft_model_state_dict", "inject_adapter_in_model",
           "prepare_model_for_kbit_training", "replace_lora_weights_loftq", "set_peft_model_state_dict", "__version__"]


def __getattr__(name: str):
    # Every registered method's config class is importable from the top level (peftlab.VeraConfig, ...),
    # without this file listing each one: method files stay the only place a method is declared.
    if name.endswith("Config"):
        for info in list_methods():
            if info.config_cls.__name__ == name:
                return info.config_cls
    if name == "Trainer":  # transformers.Trainer that writes and resumes HF PEFT's adapter checkpoints
        from .train.hf_trainer import Trainer
        return Trainer
    for attr in ("TaskType",):
        if name == attr:
            from .core import config
            return getattr(config, attr)
    raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
