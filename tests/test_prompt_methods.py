"""Prompt tuning, P-tuning, prefix tuning, P-tuning v2: HF PEFT interop both ways (causal LM and sequence
classification, LLaMA and BERT), generate() with caches and padded batches, training, folding, errors."""
from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftlab
from conftest import tiny_bert, tiny_llama, token_batch

TOL = 1e-5
METHODS = ("prompt-tuning", "p-tuning", "prefix-tuning", "p-tuning-v2")
CONFIGS = {  # HF PEFT config class name -> fields (the same names in peftlab)
    "prompt": ("PromptTuningConfig", dict(num_virtual_tokens=4)),
    "p-tuning-mlp": ("PromptEncoderConfig", dict(num_virtual_tokens=4, encoder_hidden_size=16)),
    "p-tuning-lstm": ("PromptEncoderConfig", dict(num_virtual_tokens=3, encoder_reparameterization_type="LSTM")),
    "prefix": ("PrefixTuningConfig", dict(num_virtual_tokens=4)),
    "prefix-projection": ("PrefixTuningConfig", dict(num_virtual_tokens=4, prefix_projection=True,
                                                     encoder_hidden_size=24)),
}
MODELS = {
    "llama-causal": (tiny_llama, "CAUSAL_LM"),
    "llama-cls": (lambda: tiny_llama(num_labels=3), "SEQ_CLS"),
    "bert-cls": (tiny_bert, "SEQ_CLS"),
}
CASES = [(m, c) for m in MODELS for c in CONFIGS]


def _perturb(model, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _diff(ours, theirs):
    """Max abs difference; the shapes are PEFT's (causal logits cover the n virtual positions too)."""
    assert ours.shape == theirs.shape
    return (ours - theirs).abs().max()


def _ours(name, make=tiny_llama, **kw):
    return peftlab.get_peft_model(make(), peftlab.get_method(name).make_config(num_virtual_tokens=4, **kw))


@pytest.mark.parametrize("model_name,config_name", CASES)
def test_peft_to_peftlab(model_name, config_name, tmp_path):
    make, task = MODELS[model_name]
    cls, kw = CONFIGS[config_name]
    theirs = peft.get_peft_model(make(), getattr(peft, cls)(task_type=task, **kw))
    _perturb(theirs)
    theirs.eval().save_pretrained(tmp_path)
    ours = peftlab.PeftModel.from_pretrained(make(), tmp_path).eval()
    batch = token_batch()
    assert _diff(_logits(ours, batch), _logits(theirs, batch)) <= TOL


@pytest.mark.parametrize("model_name,config_name", CASES)
def test_peftlab_to_peft(model_name, config_name, tmp_path):
    make, task = MODELS[model_name]
    cls, kw = CONFIGS[config_name]
    ours = peftlab.get_peft_model(make(), getattr(peftlab, cls)(task_type=task, **kw))
    _perturb(ours)
    ours.eval().save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    batch = token_batch()
    assert _diff(_logits(ours, batch), _logits(theirs, batch)) <= TOL
    # The same tensor names and shapes (and config fields) PEFT writes for the same config.
    peft.get_peft_model(make(), getattr(peft, cls)(task_type=task, **kw)).save_pretrained(tmp_path / "ref")
    a = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    ref_cfg = json.loads((tmp_path / "ref" / "adapter_config.json").read_text())
    for key in ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers", "peft_type",
                "num_transformer_submodules", "encoder_hidden_size", "prefix_projection"):
        assert ours_cfg.get(key) == ref_cfg.get(key), key


@pytest.mark.parametrize("config_name", ["prompt", "p-tuning-lstm", "prefix"])
def test_generate_matches_peft(config_name, tmp_path):
    cls, kw = CONFIGS[config_name]
    theirs = peft.get_peft_model(tiny_llama(), getattr(peft, cls)(task_type="CAUSAL_LM", **kw))
    _perturb(theirs, std=0.5)
    theirs.eval().save_pretrained(tmp_path)
    ours = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    ids = token_batch(seed=4)["input_ids"]  # unpadded: PEFT counts left padding in positions, we skip it
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(input_ids=ids, **gen), theirs.generate(input_ids=ids, **gen))


@pytest.mark.parametrize("name", METHODS)
def test_generate_batched_left_padded_equals_each_row_alone(name):
    model = _ours(name).eval()
    _perturb(model, std=0.5)
    ids = torch.tensor([[0, 0, 0, 17, 5, 9], [3, 44, 8, 61, 12, 7], [0, 25, 30, 2, 99, 4]])
    mask = (ids != 0).long()
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    out = model.generate(input_ids=ids, attention_mask=mask, **gen)
    assert out.shape == (3, 11) and torch.equal(out[:, :6], ids)  # prompt then new tokens, as the base model
    for row in range(3):
        alone = ids[row:row + 1, mask[row].bool()]
        assert torch.equal(model.generate(input_ids=alone, **gen)[0, -5:], out[row, -5:]), row
    # Positional input ids work too (moved to input_ids for the prompt methods).
    assert torch.equal(model.generate(ids, attention_mask=mask, **gen), out)


@pytest.mark.parametrize("name", METHODS)
def test_forward_continues_from_its_own_cache(name):
    model = _ours(name).eval()
    _perturb(model, std=0.5)
    ids = token_batch(seed=5)["input_ids"]
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        first = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=first.past_key_values,
                     attention_mask=torch.ones_like(ids)).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_right_padded_classification_rows_equal_unpadded(name):
    model = _ours(name, make=lambda: tiny_llama(num_labels=3), task_type="SEQ_CLS").eval()
    _perturb(model, std=0.5)
    ids = torch.tensor([[17, 5, 9, 0, 0], [3, 44, 8, 61, 12], [25, 30, 0, 0, 0]])
    mask = (ids != 0).long()
    got = _logits(model, dict(input_ids=ids, attention_mask=mask))
    for row in range(3):
        alone = _logits(model, dict(input_ids=ids[row:row + 1, mask[row].bool()]))
        torch.testing.assert_close(got[row], alone[0], atol=1e-5, rtol=1e-5)


TRAIN_CASES = [(n, "llama") for n in METHODS] + [(n, "llama-cls") for n in METHODS] + \
    [("prefix-tuning", "bert"), ("p-tuning-v2", "bert")]


@pytest.mark.parametrize("name,arch", TRAIN_CASES)
def test_trains(name, arch):
    # (BERT with prompt tuning pools a virtual token at [CLS]'s place, as HF PEFT does; in a random 2-layer
    # toy that position barely depends on the input, so it is left out here.)
    batch = token_batch()
    if arch == "llama":
        model, labels = _ours(name), batch["input_ids"]
    elif arch == "llama-cls":
        model, labels = _ours(name, make=lambda: tiny_llama(num_labels=3), task_type="SEQ_CLS"), torch.tensor([0, 1, 2])
    else:
        model, labels = _ours(name, make=tiny_bert, task_type="SEQ_CLS"), torch.tensor([0, 1, 2])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.eval()  # dropout off: a deterministic loss curve (gradients flow all the same)
    losses = []
    for _ in range(12):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.03 and losses == sorted(losses, reverse=True), losses


@pytest.mark.parametrize("name", ["prompt-tuning", "p-tuning"])
def test_outputs_cover_the_virtual_positions_first(name):
    model = _ours(name).eval()
    _perturb(model, std=0.5)
    batch = token_batch()
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        tail = model(**batch, logits_to_keep=2).logits
        hidden = model.model.model(inputs_embeds=torch.cat(  # the decoder run by hand on [virtual; inputs]
            [model.prompt_encoder["default"]().expand(3, -1, -1), model.get_input_embeddings()(batch["input_ids"])], 1),
            attention_mask=torch.cat([torch.ones(3, 4, dtype=torch.long), batch["attention_mask"]], 1))
    # HF PEFT's shape: n virtual positions, then one per input token
    assert out.logits.shape[1] == 4 + 7 and all(h.shape[1] == 4 + 7 for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[-1], hidden.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tail, out.logits[:, -2:], atol=1e-5, rtol=1e-5)


def test_prefix_projection_is_folded_on_save_and_trains_on_after_loading(tmp_path):
    model = _ours("prefix-tuning", encoder_hidden_size=24).eval()
    # table (n, kv width 16) -> Linear(16, 24) -> tanh -> Linear(24, layers·2·16)
    assert model.get_nb_trainable_parameters()[0] == 4 * 16 + (16 * 24 + 24) + (24 * 64 + 64)
    _perturb(model)
    batch = token_batch()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape == (4, 2 * 2 * 16)  # L·2·kv
    loaded = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=1e-6, rtol=1e-6)
    resumed = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert resumed.get_nb_trainable_parameters()[0] == 4 * 64  # the folded table trains on directly
    torch.testing.assert_close(_logits(resumed, batch), _logits(model, batch), atol=1e-6, rtol=1e-6)


def test_inits_sample_vocab_and_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hot": 5, "cold": 9}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    words = tiny_llama().get_input_embeddings().weight
    model = _ours("prompt-tuning", prompt_tuning_init="TEXT", prompt_tuning_init_text="hot cold",
                  tokenizer_name_or_path=str(tmp_path))
    torch.testing.assert_close(model.prompt_encoder["default"](), words[[5, 9, 5, 9]])  # repeated to n
    sampled = _ours("prompt-tuning").prompt_encoder["default"]()  # the registry name samples vocabulary rows
    assert all(any(torch.equal(row, w) for w in words) for row in sampled)  # rows of the vocabulary


def test_disable_merge_mixed_batch_and_errors():
    batch = token_batch()
    base = _logits(tiny_llama(), batch)
    model = _ours("prompt-tuning").eval()
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, batch), base)
    assert _logits(model, batch).shape == (3, 4 + 7, 128)  # the n virtual positions first, as in HF PEFT
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        model(**batch, adapter_names=["default"] * 3)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        peftlab.PromptTuningConfig()
    with pytest.raises(ValueError, match="TEXT"):
        peftlab.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match="MLP"):
        peftlab.PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="GRU")
    with pytest.raises(ValueError, match="inputs_embeds"):
        _ours("p-tuning-v2")(attention_mask=batch["attention_mask"])
    checkpointed = _ours("p-tuning-v2")
    checkpointed.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="gradient checkpointing"):
        checkpointed.train()(**batch, labels=batch["input_ids"])
    plain = model.unload()
    assert not hasattr(plain, "prompt_encoder")
    torch.testing.assert_close(_logits(plain, batch), base)


def test_registered_as_input_methods():
    for name in METHODS:
        info = peftlab.get_method(name)
        assert (info.kind, info.mergeable, info.hf_peft_compatible) == ("input", False, True)
