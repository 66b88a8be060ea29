"""HF Trainer as a PEFT user runs it: default TrainingArguments, adapter checkpoints, resuming; against the real `peft`.

The same user script runs with `import peft` + transformers.Trainer and with `import peftlab as peft` +
peftlab.Trainer; the checkpoints must hold the same files (adapter files, no model.safetensors), HF PEFT must read
ours, and a resumed run must end where the uninterrupted one does.
"""
from __future__ import annotations

import copy
import inspect
import json
import pickle

import peft as hf_peft
import pytest
import torch
from safetensors.torch import load_file

import peftlab
from conftest import tiny_bert, tiny_gpt2, tiny_llama, token_batch
from test_train import char_tokenizer, tiny_lm

LENGTH = 16
WORDS = ["abc", "hello", "world", "cat", "dog", "bird", "fish", "tree", "sun", "moon", "star", "rain"]


class Records(torch.utils.data.Dataset):
    """A torch Dataset of dicts, as PEFT tutorials build one: token ids, mask, labels, and the raw text beside them
    (a column the model does not take, which Trainer's default remove_unused_columns=True drops)."""

    def __init__(self, tok):
        self.rows = []
        for w in WORDS * 2:
            text = f"Q: {w}?\nA: {w[::-1]}"
            enc = tok(text, padding="max_length", max_length=LENGTH, truncation=True)
            labels = [t if m else -100 for t, m in zip(enc["input_ids"], enc["attention_mask"])]
            self.rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                              "labels": labels, "text": text})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def lora(peft):
    return peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def user_script(peft, trainer_cls, out_dir, steps=4, resume=None, adapter_seed=0, config=lora):
    """What a PEFT user writes; `peft` is either package. Only output_dir, the run length, lr and the save
    interval are set: every other TrainingArguments field keeps its default (remove_unused_columns=True, ...)."""
    from transformers import TrainingArguments
    tok = char_tokenizer()
    torch.manual_seed(adapter_seed)
    model = peft.get_peft_model(tiny_lm(), config(peft))
    args = TrainingArguments(output_dir=str(out_dir), max_steps=steps, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1)
    assert args.remove_unused_columns
    trainer = trainer_cls(model=model, args=args, train_dataset=Records(tok), processing_class=tok)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def _adapter(model):
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


def test_peft_script_with_trainer_defaults_writes_peft_checkpoints(tmp_path):
    from transformers import Trainer as HFTrainer
    ours, trainer = user_script(peftlab, peftlab.Trainer, tmp_path / "ours")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]
    user_script(hf_peft, HFTrainer, tmp_path / "peft")
    for step in (2, 4):
        mine = sorted(p.name for p in (tmp_path / "ours" / f"checkpoint-{step}").iterdir())
        theirs = sorted(p.name for p in (tmp_path / "peft" / f"checkpoint-{step}").iterdir())
        assert "model.safetensors" not in mine and {"adapter_config.json", "adapter_model.safetensors"} <= set(mine)
        assert mine == [f for f in theirs if f != "README.md"]  # PEFT also writes a model card
    a = load_file(tmp_path / "ours" / "checkpoint-4" / "adapter_model.safetensors")
    b = load_file(tmp_path / "peft" / "checkpoint-4" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    # HF PEFT reads our Trainer checkpoint: the same model as the one the run ended with.
    loaded = hf_peft.PeftModel.from_pretrained(tiny_lm(), tmp_path / "ours" / "checkpoint-4").eval()
    batch = token_batch()
    with torch.no_grad(), peftlab.hf_peft_numerics():
        torch.testing.assert_close(ours.eval()(**batch).logits, loaded(**batch).logits, atol=1e-6, rtol=1e-6)


def test_resume_from_a_trainer_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path):
    whole, _ = user_script(peftlab, peftlab.Trainer, tmp_path / "whole")
    ckpt = tmp_path / "whole" / "checkpoint-2"
    # Another adapter init: only loading the checkpoint's adapter can bring the run back on track.
    resumed, trainer = user_script(peftlab, peftlab.Trainer, tmp_path / "resumed", resume=str(ckpt), adapter_seed=7)
    assert trainer.state.global_step == 4
    end, again = _adapter(whole), _adapter(resumed)
    assert end.keys() == again.keys()
    for k in end:
        torch.testing.assert_close(again[k], end[k], atol=1e-6, rtol=1e-6)


def test_resume_refuses_a_checkpoint_without_adapter_files(tmp_path):
    model, trainer = user_script(peftlab, peftlab.Trainer, tmp_path / "run", steps=2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="no adapter_config.json"):
        trainer._load_from_checkpoint(str(tmp_path / "empty"))


def test_load_adapter_onto_an_existing_name_replaces_its_tensors_as_peft_does(tmp_path):
    trained = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, target_modules=["q_proj"]))
    for p in trained.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    trained.save_pretrained(tmp_path / "a")
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, target_modules=["q_proj"]))
    model.load_adapter(tmp_path / "a", "default", is_trainable=True)
    assert all(torch.equal(v, _adapter(trained)[k]) for k, v in _adapter(model).items())
    assert model.get_nb_trainable_parameters() == trained.get_nb_trainable_parameters()
    other = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=2, target_modules=["q_proj"]))
    before = _adapter(other)
    with pytest.raises(ValueError, match="shape"):
        other.load_adapter(tmp_path / "a", "default")
    assert all(torch.equal(v, before[k]) for k, v in _adapter(other).items())  # a failed load changes nothing
    ia3 = peftlab.get_peft_model(tiny_llama(), peftlab.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="new adapter_name"):
        ia3.load_adapter(tmp_path / "a", "default")


# -- the forward signature: what Trainer reads off the model --------------------------------------------------
TASK_MODELS = {
    "llama-causal": (tiny_llama, "CAUSAL_LM"),
    "gpt2-causal": (tiny_gpt2, "CAUSAL_LM"),
    "llama-seq-cls": (lambda: tiny_llama(num_labels=3), "SEQ_CLS"),
    "bert-seq-cls": (tiny_bert, "SEQ_CLS"),
    "bert-token-cls": (lambda: _bert("BertForTokenClassification"), "TOKEN_CLS"),
    "bert-qa": (lambda: _bert("BertForQuestionAnswering"), "QUESTION_ANS"),
    "bert-features": (lambda: _bert("BertModel"), "FEATURE_EXTRACTION"),
}


def _bert(cls_name):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    return getattr(transformers, cls_name)(cfg).eval()


def _columns_and_labels(trainer_cls, model, tmp_path):
    from transformers import TrainingArguments
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = trainer_cls(model=model, args=args)
    trainer._set_signature_columns_if_needed()
    return set(trainer._signature_columns), trainer.label_names


@pytest.mark.parametrize("name", TASK_MODELS)
def test_forward_presents_the_base_models_signature(name, tmp_path):
    from transformers import Trainer as HFTrainer
    make, task = TASK_MODELS[name]
    base = make()
    ours = peftlab.get_peft_model(base, peftlab.LoraConfig(r=2, target_modules=["query", "q_proj", "c_attn"],
                                                          task_type=task))
    names = list(inspect.signature(type(base).forward).parameters)[1:]  # without self
    want = [*names[:-1], "adapter_names", names[-1]] if names[-1] == "kwargs" else [*names, "adapter_names"]
    assert list(inspect.signature(ours.forward).parameters) == want
    assert isinstance(ours, peftlab.PeftModel) and type(ours).__name__ == "PeftModel"
    # What Trainer keeps from a batch and which columns it takes for labels: HF PEFT's, plus adapter_names.
    theirs = hf_peft.get_peft_model(make(), hf_peft.LoraConfig(r=2, target_modules=["query", "q_proj", "c_attn"],
                                                               task_type=task))
    our_cols, our_labels = _columns_and_labels(peftlab.Trainer, ours, tmp_path)
    peft_cols, peft_labels = _columns_and_labels(HFTrainer, theirs, tmp_path)
    assert our_cols - peft_cols == {"adapter_names"} and peft_cols <= our_cols
    assert our_labels == peft_labels
    plain_cols, _ = _columns_and_labels(HFTrainer, ours, tmp_path)  # a plain transformers.Trainer sees the same
    assert plain_cols == our_cols


def test_the_paired_class_copies_pickles_and_reloads(tmp_path):
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=2, target_modules=["q_proj"])).eval()
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    batch = token_batch()
    with torch.no_grad():
        want = model(**batch).logits
        for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert type(other) is type(model)
            torch.testing.assert_close(other(**batch).logits, want)
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tiny_llama(), tmp_path)  # from_pretrained on the paired class
    assert type(again) is type(model)
    seq = peftlab.get_peft_model(tiny_bert(), peftlab.LoraConfig(r=2, target_modules=["query"]))
    assert "token_type_ids" in inspect.signature(seq.forward).parameters
    assert "token_type_ids" not in inspect.signature(again.forward).parameters


def test_prompt_tuning_trains_checkpoints_and_resumes_under_trainer(tmp_path):
    def prompt(peft):
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    whole, trainer = user_script(peftlab, peftlab.Trainer, tmp_path / "whole", config=prompt)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert list(load_file(tmp_path / "whole" / "checkpoint-2" / "adapter_model.safetensors")) == ["prompt_embeddings"]
    resumed, _ = user_script(peftlab, peftlab.Trainer, tmp_path / "resumed", config=prompt, adapter_seed=3,
                             resume=str(tmp_path / "whole" / "checkpoint-2"))
    torch.testing.assert_close(_adapter(resumed)["prompt_embeddings"], _adapter(whole)["prompt_embeddings"],
                               atol=1e-6, rtol=1e-6)


def test_p_tuning_resume_explains_why_its_checkpoint_cannot_continue_the_encoder(tmp_path):
    def p_tuning(peft):
        return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=8)
    user_script(peftlab, peftlab.Trainer, tmp_path / "whole", steps=2, config=p_tuning)
    with pytest.raises(ValueError, match="folded form"):
        user_script(peftlab, peftlab.Trainer, tmp_path / "resumed", config=p_tuning,
                    resume=str(tmp_path / "whole" / "checkpoint-2"))


def test_prompt_tuning_returns_peft_shape(tmp_path):
    theirs = hf_peft.get_peft_model(tiny_llama(), hf_peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=4))
    theirs.eval().save_pretrained(tmp_path / "pt")
    ours = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path / "pt").eval()
    batch = token_batch()
    with torch.no_grad():
        mine, ref = ours(**batch, output_hidden_states=True), theirs(**batch, output_hidden_states=True)
    assert mine.logits.shape == ref.logits.shape == (3, 4 + 7, 128)
    torch.testing.assert_close(mine.logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert [h.shape for h in mine.hidden_states] == [h.shape for h in ref.hidden_states]
    assert json.loads((tmp_path / "pt" / "adapter_config.json").read_text())["num_virtual_tokens"] == 4
