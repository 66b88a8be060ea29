"""Every HF PEFT task type against the real `peft`: the same modules_to_save (the task's head), the same saved keys
and shapes, identical outputs loading in either direction, and the head trains and survives a reload."""
from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftlab
from conftest import perturb_trainable, token_batch

TOL = 1e-5


def _bert(kind: str, seed: int = 0):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64,
                                  num_labels=2 if "QuestionAnswering" in kind else 5)  # QA heads: start and end
    return getattr(transformers, kind)(cfg).eval()


def _llama(kind: str, seed: int = 0):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, num_labels=2 if "QuestionAnswering" in kind else 5)
    return getattr(transformers, kind)(cfg).eval()


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


CASES = {
    "token-cls-bert": (lambda: _bert("BertForTokenClassification"), "TOKEN_CLS", ["query", "value"]),
    "token-cls-llama": (lambda: _llama("LlamaForTokenClassification"), "TOKEN_CLS", ["q_proj", "v_proj"]),
    "qa-bert": (lambda: _bert("BertForQuestionAnswering"), "QUESTION_ANS", ["query", "value"]),
    "qa-llama": (lambda: _llama("LlamaForQuestionAnswering"), "QUESTION_ANS", ["q_proj", "v_proj"]),
    "seq-cls-bert": (lambda: _bert("BertForSequenceClassification"), "SEQ_CLS", ["query", "value"]),
    "feature-extraction-bert": (lambda: _bert("BertModel"), "FEATURE_EXTRACTION", ["query", "value"]),
    "causal-lm-llama": (lambda: _llama("LlamaForCausalLM"), "CAUSAL_LM", ["q_proj", "v_proj"]),
    "seq2seq-t5": (tiny_t5, "SEQ_2_SEQ_LM", None),
}


def _inputs(case: str) -> dict:
    batch = token_batch()
    if case.startswith("seq2seq"):
        batch["decoder_input_ids"] = token_batch(seed=2, length=5)["input_ids"]
    return batch


def _outputs(model, batch) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**batch)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert (a[k] - b[k]).abs().max() <= TOL, k


def _cfg(lib, task_type, targets):
    return lib.LoraConfig(r=4, lora_alpha=8, task_type=task_type, target_modules=targets)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_in_peftlab(case, tmp_path):
    make, task, targets = CASES[case]
    theirs = peft.get_peft_model(make(), _cfg(peft, task, targets))
    perturb_trainable(theirs)
    theirs.eval().save_pretrained(tmp_path)
    ours = peftlab.PeftModel.from_pretrained(make(), tmp_path)
    _assert_same(_outputs(ours, _inputs(case)), _outputs(theirs, _inputs(case)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftlab_adapter_loads_in_peft_with_peft_keys(case, tmp_path):
    make, task, targets = CASES[case]
    ours = peftlab.get_peft_model(make(), _cfg(peftlab, task, targets))
    perturb_trainable(ours)  # the head too: a head left out of modules_to_save would stay at its random init
    ours.eval().save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    _assert_same(_outputs(ours, _inputs(case)), _outputs(theirs, _inputs(case)))
    ref = peft.get_peft_model(make(), _cfg(peft, task, targets))
    ref.save_pretrained(tmp_path / "ref")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "ref"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    ours_cfg, ref_cfg = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "ref"))
    assert ours_cfg["modules_to_save"] == ref_cfg["modules_to_save"]
    assert sorted(ours_cfg["target_modules"]) == sorted(ref_cfg["target_modules"])


@pytest.mark.parametrize("kind,task,head", [("BertForTokenClassification", "TOKEN_CLS", "classifier"),
                                             ("BertForQuestionAnswering", "QUESTION_ANS", "qa_outputs")])
def test_head_trains_and_is_restored_after_reload(kind, task, head, tmp_path):
    model = peftlab.get_peft_model(_bert(kind), _cfg(peftlab, task, ["query", "value"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(f"{head}.copies.default." in n for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    out = model(**token_batch())
    sum(v.float().pow(2).mean() for k, v in out.items() if k.endswith("logits")).backward()
    opt.step()
    model.eval()
    model.save_pretrained(tmp_path)
    # the head moved, and a fresh base (same seed, so the same random head) gets the trained head back
    assert not torch.equal(getattr(model.base_model.model, head).copies["default"].weight,
                           getattr(_bert(kind), head).weight)
    reloaded = peftlab.PeftModel.from_pretrained(_bert(kind), tmp_path)
    _assert_same(_outputs(reloaded, token_batch()), _outputs(model, token_batch()))
