"""Default target modules per Transformers architecture (HF PEFT's tables), used when target_modules is omitted."""
from __future__ import annotations

# model_type -> module-name suffixes, as HF PEFT defaults for LoRA-style methods.
LORA_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "opt": ["q_proj", "v_proj"], "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "xlm-roberta": ["query", "value"], "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"], "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"], "falcon": ["query_key_value"], "stablelm": ["q_proj", "v_proj"],
    "gpt_bigcode": ["c_attn"], "olmo": ["q_proj", "v_proj"], "smollm3": ["q_proj", "v_proj"],
}

# Classification heads HF PEFT trains and saves automatically with task_type="SEQ_CLS".
SEQ_CLS_HEAD_NAMES = ["classifier", "score"]

# The heads HF PEFT adds to modules_to_save for each task type (its PeftModelForSequenceClassification,
# ...ForTokenClassification and ...ForQuestionAnswering do; CAUSAL_LM, SEQ_2_SEQ_LM and FEATURE_EXTRACTION add
# none): a randomly initialised head must train and be saved with the adapter, or it is random again after loading.
TASK_HEAD_NAMES: dict[str, list[str]] = {"SEQ_CLS": SEQ_CLS_HEAD_NAMES, "TOKEN_CLS": SEQ_CLS_HEAD_NAMES,
                                         "QUESTION_ANS": ["qa_outputs"]}


def default_targets(model_type: str | None, table: dict[str, list[str]] = LORA_TARGETS) -> list[str]:
    if model_type in table:
        return list(table[model_type])
    known = ", ".join(sorted(table))
    raise ValueError(f"no default target_modules for model type {model_type!r}; pass target_modules explicitly "
                     f"(e.g. ['q_proj', 'v_proj'] or 'all-linear'). Architectures with defaults: {known}")
