"""The PEFT helpers scripts import, each against the real `peft`: get/set_peft_model_state_dict,
inject_adapter_in_model, prepare_model_for_kbit_training, get_layer_status/get_model_status, the AutoPeftModel
classes, from_pretrained(subfolder=...) and save_pretrained(save_embedding_layers=...)."""
from __future__ import annotations

import dataclasses
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

import peftlab
from conftest import perturb_trainable, tiny_bert, tiny_llama, token_batch

TOL = 1e-5
LORA = dict(r=4, lora_alpha=8, target_modules="all-linear")


def _logits(model, batch=None):
    with torch.no_grad():
        return model(**(batch or token_batch())).logits


def _shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # PEFT's AutoPeftModel asks the Hub about tokenizers otherwise


def _pair(make, **kw):
    ours = peftlab.get_peft_model(make(), peftlab.LoraConfig(**kw))
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**kw))
    perturb_trainable(ours, seed=1)
    perturb_trainable(theirs, seed=2)
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("make,kw", [(tiny_llama, LORA), (tiny_bert, dict(r=4, task_type="SEQ_CLS"))],
                         ids=["llama-all-linear", "bert-seq-cls-head"])
def test_state_dicts_round_trip_with_peft_both_ways(make, kw):
    ours, theirs = _pair(make, **kw)
    a, b = peftlab.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert _shapes(a) == _shapes(b)
    # PEFT's tensors into our model: same outputs; and the same missing keys (the base model's) are reported
    fresh = peftlab.get_peft_model(make(), peftlab.LoraConfig(**kw)).eval()
    res = peftlab.set_peft_model_state_dict(fresh, b)
    ref = peft.set_peft_model_state_dict(peft.get_peft_model(make(), peft.LoraConfig(**kw)), b)
    assert res.unexpected_keys == [] == ref.unexpected_keys
    assert sorted(res.missing_keys) == sorted(ref.missing_keys)
    assert (_logits(fresh) - _logits(theirs)).abs().max() <= TOL
    # ours into PEFT's
    other = peft.get_peft_model(make(), peft.LoraConfig(**kw)).eval()
    peft.set_peft_model_state_dict(other, a)
    assert (_logits(other) - _logits(ours)).abs().max() <= TOL


def test_state_dict_takes_values_from_a_given_state_dict_and_names_other_adapters():
    ours, _ = _pair(tiny_llama, **LORA)
    full = {k: torch.zeros_like(v) for k, v in ours.state_dict().items()}  # e.g. gathered elsewhere
    sd = peftlab.get_peft_model_state_dict(ours, state_dict=full)
    assert sd and all(torch.count_nonzero(v) == 0 for v in sd.values())
    with pytest.raises(ValueError, match="no adapter named 'other'; this model has: default"):
        peftlab.get_peft_model_state_dict(ours, adapter_name="other")
    with pytest.raises(TypeError, match="needs a peftlab PeftModel"):
        peftlab.get_peft_model_state_dict(tiny_llama())
    bad = {k: v[..., :1] for k, v in peftlab.get_peft_model_state_dict(ours).items()}
    with pytest.raises(ValueError, match="adapter does not fit this base model"):
        peftlab.set_peft_model_state_dict(ours, bad)


def test_inject_adapter_in_model_matches_peft():
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    ours = peftlab.inject_adapter_in_model(peftlab.LoraConfig(**cfg), tiny_llama())
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**cfg), tiny_llama())
    assert type(ours) is LlamaForCausalLM and isinstance(ours.peft_config["default"], peftlab.LoraConfig)
    trainable = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, theirs)]
    assert trainable[0] == trainable[1] > 0
    perturb_trainable(theirs)
    b = peft.get_peft_model_state_dict(theirs)
    assert not any(k.startswith("base_model.") for k in b)  # a model adapted in place: keys without the prefix
    assert _shapes(peftlab.get_peft_model_state_dict(ours)) == _shapes(b)
    res = peftlab.set_peft_model_state_dict(ours, b)
    assert res.unexpected_keys == [] and sorted(res.missing_keys) == sorted(
        peft.set_peft_model_state_dict(peft.inject_adapter_in_model(peft.LoraConfig(**cfg), tiny_llama()),
                                       b).missing_keys)
    assert (_logits(ours) - _logits(theirs)).abs().max() <= TOL
    # targets from a state dict's keys, whatever the config says (PEFT's state_dict= argument)
    by_keys = peftlab.inject_adapter_in_model(peftlab.LoraConfig(r=4, target_modules=["o_proj"]), tiny_llama(),
                                              state_dict=b)
    assert sorted(peftlab.get_peft_model_state_dict(by_keys)) == sorted(b)
    with pytest.raises(ValueError, match="does not support PROMPT_TUNING"):
        peftlab.inject_adapter_in_model(peftlab.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"),
                                        tiny_llama())


def _kbit_state(model):
    emb = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    return ({n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}, model.is_gradient_checkpointing,
            emb.requires_grad)


@pytest.mark.parametrize("quantised", [False, True])
def test_prepare_model_for_kbit_training_matches_peft(quantised):
    models = [tiny_llama().to(torch.bfloat16) for _ in range(2)]
    for m in models:
        m.model.norm.weight.data = m.model.norm.weight.data.half()  # mixed half dtypes: every one goes to fp32
        m.is_loaded_in_4bit = quantised  # transformers' marker of a bitsandbytes model (no bnb needed here)
    ours = peftlab.prepare_model_for_kbit_training(models[0])
    theirs = peft.prepare_model_for_kbit_training(models[1])
    assert ours is models[0]
    assert _kbit_state(ours) == _kbit_state(theirs)
    params, checkpointing, input_grad = _kbit_state(ours)
    assert all(d == torch.float32 and not g for d, g in params.values())
    assert checkpointing is quantised and input_grad is quantised  # PEFT does neither for a model not quantised


def _status(items):
    return {s.name: dataclasses.asdict(s) for s in items}


def test_layer_and_model_status_match_peft():
    kw = dict(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    ours, theirs = _pair(lambda: tiny_llama(num_labels=3), **kw)
    assert _status(ours.get_layer_status()) == _status(theirs.get_layer_status())
    assert dataclasses.asdict(ours.get_model_status()) == dataclasses.asdict(theirs.get_model_status())
    assert _status(peftlab.get_layer_status(ours)) == _status(peft.get_layer_status(theirs))
    ours.add_adapter("other", peftlab.LoraConfig(**kw))
    theirs.add_adapter("other", peft.LoraConfig(**kw))
    # one layer merged, the others not: the model-level value is "irregular", as PEFT says
    ours.base_model.model.model.layers[0].self_attn.q_proj.merge(["default"])
    theirs.base_model.model.model.layers[0].self_attn.q_proj.merge(adapter_names=["default"])
    a, b = dataclasses.asdict(ours.get_model_status()), dataclasses.asdict(theirs.get_model_status())
    assert a == b and a["merged_adapters"] == "irregular" and a["available_adapters"] == ["default", "other"]
    injected = peftlab.inject_adapter_in_model(peftlab.LoraConfig(r=4, target_modules=["q_proj"]), tiny_llama())
    ref = peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["q_proj"]), tiny_llama())
    assert dataclasses.asdict(peftlab.get_model_status(injected)) == dataclasses.asdict(peft.get_model_status(ref))
    with pytest.raises(TypeError, match="prompt-learning"):
        peftlab.get_peft_model(tiny_llama(), peftlab.PromptTuningConfig(num_virtual_tokens=2,
                                                                         task_type="CAUSAL_LM")).get_layer_status()


# -- AutoPeftModel ------------------------------------------------------------------------------------------------
def _saved_base(path, make=tiny_llama):
    make().save_pretrained(path)
    return path


def test_auto_peft_model_for_causal_lm_loads_the_named_base_both_ways(tmp_path):
    base_dir = _saved_base(tmp_path / "base")
    ours = peftlab.get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), peftlab.LoraConfig(**LORA))
    perturb_trainable(ours)
    ours.save_pretrained(tmp_path / "a")
    theirs = peft.get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), peft.LoraConfig(**LORA))
    perturb_trainable(theirs, seed=5)
    theirs.save_pretrained(tmp_path / "b")
    for adapter, trained in ((tmp_path / "a", ours), (tmp_path / "b", theirs)):
        mine = peftlab.AutoPeftModelForCausalLM.from_pretrained(adapter)
        ref = peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
        assert isinstance(mine, peftlab.PeftModel) and not mine.training
        assert (_logits(mine) - _logits(ref)).abs().max() <= TOL
        assert (_logits(mine) - _logits(trained.eval())).abs().max() <= TOL


def _auto_both_ways(tmp_path, cls_name, base_cls, make, **kw):
    """Our adapter on a saved base, loaded by our and PEFT's AutoPeftModel class of that name: same outputs."""
    base_dir = _saved_base(tmp_path / "base", make)
    ours = peftlab.get_peft_model(base_cls.from_pretrained(base_dir), peftlab.LoraConfig(**kw))
    perturb_trainable(ours)
    ours.save_pretrained(tmp_path / "a")
    mine = getattr(peftlab, cls_name).from_pretrained(tmp_path / "a")
    ref = getattr(peft, cls_name).from_pretrained(tmp_path / "a")
    assert type(mine.get_base_model()) is base_cls
    assert (_logits(mine) - _logits(ref)).abs().max() <= TOL
    return tmp_path / "a"


def test_auto_peft_model_classes_pick_the_task_class_and_refuse_the_wrong_one(tmp_path):
    adapter = _auto_both_ways(tmp_path, "AutoPeftModelForSequenceClassification", LlamaForSequenceClassification,
                              lambda: tiny_llama(num_labels=3), r=4, task_type="SEQ_CLS",
                              target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="task_type is SEQ_CLS; use AutoPeftModelForSequenceClassification"):
        peftlab.AutoPeftModelForCausalLM.from_pretrained(adapter)
    with pytest.raises(ValueError, match="Cannot use `AutoPeftModel` with a task type"):
        peftlab.AutoPeftModel.from_pretrained(adapter)
    with pytest.raises(OSError, match="from_pretrained"):
        peftlab.AutoPeftModelForCausalLM()


def test_auto_peft_model_without_task_type_uses_auto_mapping(tmp_path):
    adapter = _auto_both_ways(tmp_path, "AutoPeftModel", LlamaForCausalLM, tiny_llama, **LORA)
    with pytest.raises(ValueError, match="not in the import allowlist"):
        peftlab.AutoPeftModel.from_pretrained(adapter, import_allowlist=["diffusers"])


@pytest.mark.parametrize("cls,task,make", [
    ("AutoPeftModelForFeatureExtraction", "FEATURE_EXTRACTION", "BertModel"),
    ("AutoPeftModelForTokenClassification", "TOKEN_CLS", "BertForTokenClassification"),
    ("AutoPeftModelForQuestionAnswering", "QUESTION_ANS", "BertForQuestionAnswering"),
])
def test_auto_peft_model_other_tasks_with_an_embedded_model_name(tmp_path, monkeypatch, cls, task, make):
    import transformers
    from peftlab import models
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))  # an "embedded" minilm-l6 that is a tiny BERT
    torch.manual_seed(0)
    embedded = tmp_path / "cache" / "models" / "minilm-l6"
    getattr(transformers, make)(tiny_bert(num_labels=2).config).save_pretrained(embedded)
    assert models.is_fetched("minilm-l6")
    base = getattr(transformers, make).from_pretrained(models.model_path("minilm-l6"))
    pm = peftlab.get_peft_model(base, peftlab.LoraConfig(r=4, task_type=task, target_modules=["query", "value"]))
    pm.peft_config["default"].base_model_name_or_path = "minilm-l6"
    perturb_trainable(pm)
    pm.save_pretrained(tmp_path / "a")
    loaded = getattr(peftlab, cls).from_pretrained(tmp_path / "a")
    assert type(loaded.get_base_model()).__name__ == make
    batch = token_batch()
    with torch.no_grad():
        got, want = loaded(**batch), pm.eval()(**batch)
    key = "last_hidden_state" if task == "FEATURE_EXTRACTION" else list(want.keys())[0]
    assert (got[key] - want[key]).abs().max() <= TOL


def test_auto_peft_model_resizes_to_the_saved_tokenizer_and_loads_the_embeddings(tmp_path):
    from test_train import char_tokenizer
    base_dir = _saved_base(tmp_path / "base")
    tok = char_tokenizer()
    tok.add_tokens([f"<new{i}>" for i in range(134 - len(tok))])  # 134 tokens > the base's 128 embeddings
    base = LlamaForCausalLM.from_pretrained(base_dir)
    base.resize_token_embeddings(len(tok))
    ours = peftlab.get_peft_model(base, peftlab.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb_trainable(ours)
    with pytest.warns(UserWarning, match="embedding layer has been resized"):
        ours.save_pretrained(tmp_path / "a")  # "auto": the vocabulary changed, so the embeddings are stored
    tok.save_pretrained(tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert saved["base_model.model.model.embed_tokens.weight"].shape == (134, 32)
    assert saved["base_model.model.lm_head.weight"].shape == (134, 32)
    batch = token_batch(vocab=134)
    mine = peftlab.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a")
    ref = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a")
    assert (_logits(mine, batch) - _logits(ref, batch)).abs().max() <= TOL
    assert (_logits(mine, batch) - _logits(ours.eval(), batch)).abs().max() <= TOL
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        peftlab.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), tmp_path / "a")


# -- save_embedding_layers and subfolder ----------------------------------------------------------------------------
@pytest.mark.parametrize("save", [True, False, "auto"])
@pytest.mark.parametrize("targets", [["q_proj"], ["embed_tokens", "q_proj"]])
def test_save_embedding_layers_stores_what_peft_stores(tmp_path, save, targets):
    base_dir = _saved_base(tmp_path / "base")
    kw = dict(r=4, target_modules=targets)
    ours = peftlab.get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), peftlab.LoraConfig(**kw))
    theirs = peft.get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), peft.LoraConfig(**kw))
    perturb_trainable(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.save_pretrained(tmp_path / "a", save_embedding_layers=save)
        theirs.save_pretrained(tmp_path / "b", save_embedding_layers=save)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in "ab")
    assert _shapes(a) == _shapes(b)
    for k in (k for k in a if "lora_" not in k):  # the stored embedding matrices are the same base tensors
        torch.testing.assert_close(a[k], b[k])
    reloaded = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), tmp_path / "a")
    assert (_logits(reloaded) - _logits(ours.eval())).abs().max() <= TOL


def test_subfolder_is_honoured_by_from_pretrained_and_load_adapter(tmp_path):
    ours = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(**LORA))
    perturb_trainable(ours)
    ours.eval().save_pretrained(tmp_path / "repo" / "x")
    want = _logits(ours)
    loaded = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path / "repo", subfolder="x")
    assert (_logits(loaded) - want).abs().max() <= TOL
    ref = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "repo"), subfolder="x")
    assert (_logits(ref) - want).abs().max() <= TOL
    other = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(**LORA))
    other.load_adapter(tmp_path / "repo", "loaded", subfolder="x")
    other.set_adapter("loaded")
    assert (_logits(other.eval()) - want).abs().max() <= TOL
    with pytest.raises(FileNotFoundError, match="subfolder 'y' of"):
        peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path / "repo", subfolder="y")


def test_safe_serialization_false_is_refused_with_the_reason(tmp_path):
    ours = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(**LORA))
    with pytest.raises(ValueError, match="can run arbitrary code when it is loaded"):
        ours.save_pretrained(tmp_path, safe_serialization=False)
    assert not any(tmp_path.iterdir())
