"""The training loop, data, metrics and tasks, on tiny in-process models (and the real WordNet for tasks).

Also home of the tiny character-level tokenizer and on-disk tiny model the CLI and resume tests use.
"""
from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

import peftlab
from conftest import tiny_llama
from peftlab.train import checkpoint as ckpt
from peftlab.train import data as D
from peftlab.train import metrics as M
from peftlab.train.loop import TrainConfig, TrainingDiverged, TrainingInterrupted, lr_lambda, train

CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;?!\"'\n-<>|_/")
WORDS = ["abc", "hello", "world", "cat", "dog", "bird", "fish", "tree", "sun", "moon", "star", "rain"]


def char_tokenizer():
    """A character-level fast tokenizer (ids < 128, fits tiny_llama), with a small chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    t.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    return tok


def pc_records(words=WORDS):
    return [{"prompt": f"Q: {w}?\nA:", "completion": " " + w[::-1]} for w in words]


def tiny_lm(seed: int = 0, **kw):
    """tiny_llama with a final-norm gain of 10: with the random head's small weights and RMSNorm's fixed output
    scale, the unscaled toy cannot express confident logits, so adapters on its layers could barely lower the loss."""
    model = tiny_llama(seed, **kw)
    with torch.no_grad():
        model.model.norm.weight.fill_(10.0)
    return model


def save_tiny_model_dir(path, seed: int = 0):
    """A tiny LLaMA + char tokenizer saved as a local HF model directory (what --model DIR takes)."""
    model = tiny_lm(seed)
    model.config.eos_token_id = 1
    model.save_pretrained(str(path))
    char_tokenizer().save_pretrained(str(path))
    return path


def lora_model(seed: int = 0, adapter_seed: int = 0, **kw):
    base = tiny_lm(seed)
    torch.manual_seed(adapter_seed)
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear")
    cfg.update(kw)
    return peftlab.get_peft_model(base, peftlab.LoraConfig(**cfg))


def adapter_tensors(model):
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


# -- data ------------------------------------------------------------------------------------------------------
def test_jsonl_errors_name_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": \n')
    with pytest.raises(D.DataError, match=rf"{f}:3: not valid JSON"):
        D.read_jsonl(f)
    f.write_text('{"prompt": "a", "completion": "b"}\n{"text": "x"}\n')
    with pytest.raises(D.DataError, match=rf"{f}:2: .*'text'.*line 1 was 'prompt-completion'"):
        D.read_jsonl(f)
    f.write_text('{"question": "a"}\n')
    with pytest.raises(D.DataError, match=rf"{f}:1: the object has keys \['question'\]"):
        D.read_jsonl(f)
    f.write_text('{"text": "a", "label": 1.5}\n')
    with pytest.raises(D.DataError, match=rf"{f}:1: 'label' must be a string or an integer"):
        D.read_jsonl(f)
    f.write_text('[1, 2]\n')
    with pytest.raises(D.DataError, match=rf"{f}:1: expected a JSON object"):
        D.read_jsonl(f)
    f.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n')
    recs = D.read_jsonl(f)
    assert D.data_format(recs) == "classification" and recs.where(1) == f"{f}:3"
    with pytest.raises(D.DataError, match=rf"{f}:3: label 'y' is not one of"):
        D.encode_classification(recs, char_tokenizer(), ["x", "z"])


def test_encode_causal_puts_loss_on_completion_only():
    tok = char_tokenizer()
    [ex] = D.encode_causal([{"prompt": "Q: ab?\nA:", "completion": " ba"}], tok)
    p = tok("Q: ab?\nA:")["input_ids"]
    assert ex["input_ids"] == p + tok(" ba", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["labels"] == [-100] * len(p) + ex["input_ids"][len(p):]
    [t] = D.encode_causal([{"text": "hi there"}], tok)
    assert t["labels"] == t["input_ids"] and t["input_ids"][-1] == tok.eos_token_id
    # chat template: the prompt becomes a user turn; the completion carries the template's end of turn
    [c] = D.encode_causal([{"prompt": "ab", "completion": " ba"}], tok, chat_template=True)
    text = tok.decode(c["input_ids"])
    assert text == "<user>ab<eos><assistant>ba<eos>"
    labelled = tok.decode([i for i, lab in zip(c["input_ids"], c["labels"]) if lab != -100])
    assert labelled == "ba<eos>"
    # over-long: prompt tokens go from the left, the completion stays whole
    [s] = D.encode_causal([{"prompt": "x" * 50, "completion": " yz"}], tok, max_length=10)
    assert len(s["input_ids"]) == 10 and sum(lab != -100 for lab in s["labels"]) == 4


def test_collator_left_pads_with_positions_and_stream_is_deterministic():
    tok = char_tokenizer()
    ex = D.encode_causal(pc_records(), tok)
    b = D.Collator(tok.pad_token_id)(ex[:2])
    n0 = len(ex[0]["input_ids"])
    assert b["input_ids"].shape[1] == max(n0, len(ex[1]["input_ids"]))
    row = b["attention_mask"][0]
    assert row[-n0:].all() and not row[:-n0].any()  # left padded
    assert b["position_ids"][0, -n0:].tolist() == list(range(n0))
    cls = D.Collator(tok.pad_token_id, "right")([{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [5], "labels": 0}])
    assert cls["labels"].tolist() == [1, 0] and cls["attention_mask"][1].tolist() == [1, 0, 0]
    # the resume state of the data is one integer: the same position gives the same batches
    s1 = D.BatchStream(ex, 5, D.Collator(0), seed=3)
    seq = [s1.next()["input_ids"] for _ in range(6)]  # crosses epoch boundaries (12 examples)
    s2 = D.BatchStream(ex, 5, D.Collator(0), seed=3, position=4)
    assert torch.equal(s2.next()["input_ids"], seq[4]) and torch.equal(s2.next()["input_ids"], seq[5])
    assert D.sample_order(12, 3, 0) != D.sample_order(12, 3, 1)


def test_logits_to_keep_loss_equals_full_loss():
    """The loop only computes logits where labels are (left padding): the loss must not change."""
    tok = char_tokenizer()
    model = lora_model()
    batch = D.Collator(tok.pad_token_id)(D.encode_causal(pc_records()[:4], tok))
    full = model(**batch).loss
    labels = batch["labels"]
    first = int((labels != -100).any(0).nonzero()[0])
    keep = labels.shape[1] - first + 1
    short = model(**{**batch, "labels": labels[:, -keep:]}, logits_to_keep=keep).loss
    torch.testing.assert_close(short, full, atol=1e-6, rtol=1e-6)


# -- metrics ---------------------------------------------------------------------------------------------------
def test_plain_metrics():
    assert M.normalize_answer(' Present.\n\nQ: What') == "present"
    assert M.exact_match([" hot", " Cold.", "warm"], [["hot"], ["cold", "icy"], ["cool"]]) == pytest.approx(2 / 3)
    assert M.accuracy([1, 0, 2], [1, 1, 2]) == pytest.approx(2 / 3)
    # class 0: tp1 fp0 fn1 -> 2/3; class 1: tp0 fp1 fn0 -> 0; class 2: tp1 -> 1
    assert M.macro_f1([0, 1, 2], [0, 0, 2]) == pytest.approx((2 / 3 + 0 + 1) / 3)
    ch = M.forgetting_change({"general_ppl": 10.0, "x_acc": 0.5, "x_n": 3}, {"general_ppl": 12.0, "x_acc": 0.25})
    assert ch["general_ppl"]["relative_change"] == pytest.approx(0.2) and ch["x_acc"]["change"] == -0.25
    assert "x_n" not in ch


def test_logprobs_and_perplexity_match_unbatched_reference():
    tok = char_tokenizer()
    model = tiny_llama().eval()
    texts = ["the cat sat.", "a dog", "hello world again"]
    ppl = M.perplexity(model, tok, texts)
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in texts:  # one unpadded sequence at a time, HF's own loss
            ids = torch.tensor([tok(t)["input_ids"]])
            nll += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    assert ppl == pytest.approx(math.exp(nll / n), rel=1e-5)
    pairs = [("Q: ab?\nA:", " ba"), ("Q: hello?\nA:", " olleh"), ("x", " y")]
    batched = M.sequence_logprobs(model, tok, pairs, batch_size=3)
    for (ctx, cont), (lp, k) in zip(pairs, batched):
        c, ids = tok(ctx)["input_ids"], tok(ctx)["input_ids"] + tok(cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
        ref = sum(float(logp[i - 1, ids[i]]) for i in range(len(c), len(ids)))
        assert k == len(ids) - len(c) and lp == pytest.approx(ref, abs=1e-4)


def test_generation_eval_is_batch_independent():
    tok = char_tokenizer()
    model = lora_model()
    recs = [dict(r, answers=[r["completion"].strip()]) for r in pc_records()]
    one = [M.generate_answers(model, tok, [r["prompt"]], max_new_tokens=4)[0] for r in recs[:5]]
    batched = M.generate_answers(model, tok, [r["prompt"] for r in recs[:5]], max_new_tokens=4, batch_size=5)
    assert one == batched
    r = M.eval_generation(model, tok, recs, max_new_tokens=4)
    assert r["n"] == len(recs) and 0.0 <= r["exact_match"] <= 1.0


def test_kv_cache_shortcuts_match_the_plain_paths(monkeypatch):
    """Few-shot prefixes and multiple-choice contexts run once and are reused from the KV cache: same results."""
    tok = char_tokenizer()
    model = lora_model()
    train(model, D.encode_causal(pc_records(), tok), D.Collator(0),
          TrainConfig(steps=30, batch_size=4, lr=2e-2, progress=False, group_by_length=False))  # answers differ by prompt
    recs = [dict(r, answers=[r["completion"].strip()]) for r in pc_records()]
    pairs = [("Q: abc?\nA:", c) for c in (" cba", " x", " hello")] + [("Q: sun?\nA:", c) for c in (" nus", " ab")]
    cached_lp = M.sequence_logprobs(model, tok, pairs, batch_size=8)
    cached_gen = M.eval_generation(model, tok, recs[2:], few_shot=recs[:2], max_new_tokens=5)["predictions"]
    monkeypatch.setattr(M, "_cache_ok", lambda m: False)
    plain_lp = M.sequence_logprobs(model, tok, pairs, batch_size=8)
    plain_gen = M.eval_generation(model, tok, recs[2:], few_shot=recs[:2], max_new_tokens=5)["predictions"]
    assert len(set(plain_gen)) > 1 and cached_gen == plain_gen
    for (a, n), (b, m) in zip(cached_lp, plain_lp):
        assert n == m and a == pytest.approx(b, abs=1e-4)


# -- the loop --------------------------------------------------------------------------------------------------
def test_lr_schedule():
    f = lr_lambda(total=100, warmup=10, schedule="cosine", min_ratio=0.0)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0, abs=1e-12)
    g = lr_lambda(total=100, warmup=0, schedule="linear", min_ratio=0.1)
    assert g(0) == pytest.approx(1.0) and g(50) == pytest.approx(0.55)


def test_train_lowers_loss_logs_and_saves(tmp_path):
    tok = char_tokenizer()
    model = lora_model()
    start = adapter_tensors(model)
    ex = D.encode_causal(pc_records(), tok)
    r = train(model, ex, D.Collator(tok.pad_token_id),
              TrainConfig(output_dir=str(tmp_path), steps=40, batch_size=4, lr=1e-2, log_every=10, save_every=20,
                          progress=False, eval_every=20),
              eval_examples=ex[:4])
    assert r["steps"] == 40 and r["loss_last"] < 0.8 * r["loss_first"]
    assert any(not torch.equal(v, adapter_tensors(model)[k]) for k, v in start.items())
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in log if "loss" in x]
    assert [x["step"] for x in train_lines] == [10, 20, 30, 40]
    assert all(x["tokens_per_s"] > 0 and x["lr"] > 0 for x in train_lines)
    assert [x["step"] for x in log if "eval_loss" in x] == [20, 40]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000040"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-000020", "step-000040"]
    with pytest.raises(FileExistsError, match="--resume"):  # never silently mixes two runs in one directory
        train(lora_model(), ex, D.Collator(0), TrainConfig(output_dir=str(tmp_path), steps=2, progress=False))


def test_grad_accumulation_matches_one_big_batch():
    tok = char_tokenizer()
    same_len = [{"prompt": f"Q: {w}?\nA:", "completion": " " + w} for w in ["abc", "dog", "cat", "sun"]]
    ex = D.encode_causal(same_len, tok)  # equal lengths: the mean of micro-batch means is the batch mean
    results = []
    for accum in (1, 2):
        model = lora_model(seed=1)
        train(model, ex, D.Collator(0), TrainConfig(steps=3, batch_size=4, grad_accum=accum, lr=1e-2, progress=False))
        results.append(adapter_tensors(model))
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_trains_the_same_and_needs_a_transformers_model():
    tok = char_tokenizer()
    ex = D.encode_causal(pc_records(), tok)
    results = []
    for checkpointing in (False, True):
        model = lora_model(seed=1)
        train(model, ex, D.Collator(0), TrainConfig(steps=3, batch_size=4, lr=1e-2, progress=False,
                                                    gradient_checkpointing=checkpointing))
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
        results.append(adapter_tensors(model))
    for k in results[0]:  # recomputing the activations in the backward changes no gradient
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="Linear does not support gradient checkpointing"):
        train(torch.nn.Linear(2, 2), ex, D.Collator(0), TrainConfig(steps=1, gradient_checkpointing=True,
                                                                    progress=False))


def test_method_hook_runs_after_each_optimizer_step_with_gradients():
    tok = char_tokenizer()
    model = lora_model()
    seen = []

    def hook(step):  # after the optimizer step, before zero_grad: the gradients are still there
        seen.append((step, all(p.grad is not None for p in model.parameters() if p.requires_grad)))

    model.on_step_end = hook
    train(model, D.encode_causal(pc_records(), tok), D.Collator(0), TrainConfig(steps=3, batch_size=4, progress=False))
    assert seen == [(0, True), (1, True), (2, True)]


def test_adalora_trains_through_the_loop():
    """AdaLoRA's budget update (on_step_end) and orthogonality loss (in outputs.loss) plug in without special cases."""
    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = peftlab.get_method("adalora").make_config(init_r=4, target_r=2, total_step=12, tinit=2, tfinal=4, deltaT=1,
                                                    target_modules=["q_proj", "v_proj"])
    model = peftlab.get_peft_model(tiny_lm(), cfg)
    r = train(model, D.encode_causal(pc_records(), tok), D.Collator(0),
              TrainConfig(steps=12, batch_size=4, lr=1e-2, progress=False))
    assert r["steps"] == 12
    kept = [sum(v) for v in model.peft_config["default"].rank_pattern.values()]
    assert kept and sum(kept) == 2 * len(kept)  # the budget reached target_r per layer on average


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    tok = char_tokenizer()
    model = lora_model()

    def poison(step):
        if step == 4:  # after step 5's optimizer step: step 6's loss is NaN
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    model.on_step_end = poison
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 6.*last good checkpoint is .*step-000004"):
        train(model, D.encode_causal(pc_records(), tok), D.Collator(0),
              TrainConfig(output_dir=str(tmp_path), steps=20, batch_size=4, save_every=2, progress=False))
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step-000004"
    from safetensors.torch import load_file
    assert all(torch.isfinite(t).all() for t in load_file(str(latest / "trainable.safetensors")).values())


def test_sigint_writes_checkpoint_and_resume_matches_uninterrupted(tmp_path):
    tok = char_tokenizer()
    ex = D.encode_causal(pc_records(), tok)
    cfg = dict(steps=12, batch_size=4, lr=1e-2, progress=False, save_every=100)

    ref = lora_model(lora_dropout=0.1)  # dropout: the RNG state must be restored too
    train(ref, ex, D.Collator(0), TrainConfig(**cfg))

    model = lora_model(lora_dropout=0.1)
    model.on_step_end = lambda step: os.kill(os.getpid(), signal.SIGINT) if step == 4 else None
    with pytest.raises(TrainingInterrupted, match="SIGINT received: stopped after step 5/12.*--resume"):
        train(model, ex, D.Collator(0), TrainConfig(output_dir=str(tmp_path), **cfg))
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000005"
    resumed = lora_model(adapter_seed=7, lora_dropout=0.1)  # other init: everything must come from the checkpoint
    r = train(resumed, ex, D.Collator(0), TrainConfig(output_dir=str(tmp_path), resume=True, **cfg))
    assert r["steps"] == 12
    want = adapter_tensors(ref)
    for k, v in adapter_tensors(resumed).items():
        assert torch.equal(v, want[k]), k
    with pytest.raises(ValueError, match="lr=0.01 there, 0.001 now"):
        train(lora_model(), ex, D.Collator(0), TrainConfig(output_dir=str(tmp_path), **{**cfg, "lr": 1e-3},
                                                           resume=True))


def test_full_fine_tuning_trains_every_parameter():
    tok = char_tokenizer()
    model = peftlab.get_peft_model(tiny_llama(), peftlab.get_method("full").make_config())
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == total
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, D.encode_causal(pc_records(), tok), D.Collator(0),
          TrainConfig(steps=3, batch_size=4, lr=1e-3, progress=False))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    merged = model.merge_and_unload()
    assert not any(type(m).__module__.startswith("peftlab") for m in merged.modules())


def test_classification_with_head_in_modules_to_save():
    tok = char_tokenizer()
    recs = [{"text": w, "label": "long" if len(w) > 3 else "short"} for w in WORDS]
    names = D.label_names(recs)
    ex = D.encode_classification(recs, tok, names)
    model = peftlab.get_peft_model(tiny_lm(num_labels=2), peftlab.LoraConfig(r=4, target_modules="all-linear",
                                                                               task_type="SEQ_CLS"))
    assert any(".copies." in n for n, p in model.named_parameters() if p.requires_grad)  # the head trains
    r = train(model, ex, D.Collator(0, "right"), TrainConfig(steps=30, batch_size=6, lr=1e-2, progress=False))
    assert r["loss_last"] < r["loss_first"]
    res = M.eval_classification(model, tok, ex, 2)
    assert res["accuracy"] > 0.6 and 0 <= res["macro_f1"] <= 1


def test_hf_trainer_trains_the_adapted_model_unchanged(tmp_path):
    from transformers import Trainer, TrainingArguments
    tok = char_tokenizer()
    model = lora_model()
    start = adapter_tensors(model)
    calls = []
    model.on_step_end = lambda step: calls.append(step)
    ex = D.encode_causal(pc_records(), tok) * 4
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False)
    from peftlab.train import method_hooks_callback
    trainer = Trainer(model=model, args=args, train_dataset=ex, data_collator=D.Collator(tok.pad_token_id),
                      callbacks=[method_hooks_callback()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3])
    assert any(not torch.equal(v, adapter_tensors(model)[k]) for k, v in start.items())
    assert calls == list(range(8))  # the method hook ran once per optimizer step
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".adapters." not in n)


def test_hf_trainer_with_default_arguments_keeps_the_model_inputs(tmp_path):
    # remove_unused_columns=True (the default) keeps the batch keys the forward's signature names: the wrapper
    # presents the base model's, so input_ids/attention_mask/labels stay and the extra "text" column goes.
    from transformers import Trainer, TrainingArguments
    tok = char_tokenizer()
    model = lora_model()
    rows = [dict(e, text=r["prompt"]) for e, r in zip(D.encode_causal(pc_records(), tok), pc_records())] * 4
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    assert args.remove_unused_columns
    seen = []
    collate = D.Collator(tok.pad_token_id)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=lambda feats: seen.append(sorted(feats[0])) or collate(feats))
    trainer.train()
    assert seen[0] == ["input_ids", "labels"]  # what encode_causal gives, without "text"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]


# -- built-in tasks (real WordNet) -----------------------------------------------------------------------------
def test_builtin_tasks_have_fixed_disjoint_splits():
    from peftlab.train.tasks import forgetting_inputs, get_task
    ant = get_task("wordnet-antonyms")
    words = {s: {r["prompt"].split('"')[1] for r in getattr(ant, s)} for s in ("train", "eval", "test")}
    assert not (words["train"] & words["eval"]) and not (words["train"] & words["test"])
    assert not (words["eval"] & words["test"])
    assert len(ant.eval) == 400 and all(r["completion"].strip() in r["answers"] for r in ant.eval)
    assert ant.few_shot(3) == get_task("wordnet-antonyms").few_shot(3)  # fixed
    ss = get_task("wordnet-supersense")
    assert len(ss.labels) == 26 and {r["label"] for r in ss.train} <= set(ss.labels)
    assert not ({r["text"] for r in ss.train} & {r["text"] for r in ss.test})
    de = get_task("wordnet-definitions")
    assert all(len(r["choices"]) == 4 and r["choices"][r["answer"]] == r["completion"] for r in de.test)
    assert not ({r["completion"] for r in de.train} & {r["completion"] for r in de.test})
    texts, questions = forgetting_inputs(n_passages=5, n_questions=7)
    assert len(texts) == 5 and len(questions) == 7 and all(t.endswith((".", "!", "?")) for t in texts)
    with pytest.raises(ValueError, match="Did you mean 'wordnet-antonyms'"):
        get_task("wordnet-antonym")


def test_first_line_generation_stops_early_with_the_same_answers():
    """Exact match reads an answer's first line: rows stop once it is complete, and every answer normalises to what
    the full-length generation gives (leading newlines are not taken for the end of the line)."""
    tok = char_tokenizer()
    model = tiny_lm(3)
    nl, sp = tok.convert_tokens_to_ids("\n"), tok.convert_tokens_to_ids(" ")
    with torch.no_grad():   # make newlines and spaces compete with letters, so some answers end early
        model.lm_head.weight[nl] = model.lm_head.weight[tok.convert_tokens_to_ids("e")] * 1.02
        model.lm_head.weight[sp] = model.lm_head.weight[tok.convert_tokens_to_ids("t")] * 1.02
    prompts = [f"Q: {w}{i}?\nA:" for i in range(6) for w in WORDS]
    full = M.generate_answers(model, tok, prompts, max_new_tokens=10, batch_size=16)
    short = M.generate_answers(model, tok, prompts, max_new_tokens=10, batch_size=16, first_line=True)
    assert [M.normalize_answer(a) for a in short] == [M.normalize_answer(a) for a in full]
    ended = [i for i, a in enumerate(full) if "\n" in a.lstrip() and a.lstrip().index("\n") < len(a.lstrip()) - 1]
    assert ended, "no answer ended its first line before max_new_tokens: the test does not exercise stopping"
    assert all(len(short[i]) < len(full[i]) for i in ended)
