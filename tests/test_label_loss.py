"""The causal-LM loss taken at label positions only (train/label_loss.py) equals transformers' own loss and gradients;
length-grouped batches (train/data.length_grouped_order) are a deterministic, resumable, less padded permutation."""
from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.train import data as D
from peftlab.train import label_loss as LL
from peftlab.train.loop import TrainConfig, train
from peftlab.train.metrics import eval_loss

from conftest import tiny_gpt2, tiny_llama


def _randomised(pm):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pm


def _batch(vocab=128):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    labels = ids.clone()
    labels[:, :5] = -100          # completion-only: a few labelled positions per row
    labels[0, :7] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(pm, batch, gather: bool):
    pm.zero_grad(set_to_none=True)
    hf = pm.get_base_model()
    ctx = LL.gathered_loss(hf, LL.head_of(hf)) if gather else torch.enable_grad()
    torch.manual_seed(0)   # the same dropout masks (GPT-2 has dropout) in both forwards
    with ctx:
        loss = pm(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("build,config", [
    (tiny_llama, lambda: peftlab.LoraConfig(r=4, target_modules="all-linear")),
    (tiny_gpt2, lambda: peftlab.LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    (tiny_llama, lambda: peftlab.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")),
    (tiny_llama, lambda: peftlab.LoraConfig(r=4, target_modules="all-linear", use_dora=True)),
])
@pytest.mark.parametrize("chunk_bytes", [None, 4 * 128 * 2])   # one chunk; chunks of 2 rows (recomputed backward)
def test_gathered_loss_and_gradients_equal_transformers(build, config, chunk_bytes, monkeypatch):
    if chunk_bytes:
        monkeypatch.setattr(LL, "CHUNK_BYTES", chunk_bytes)
    pm = _randomised(peftlab.get_peft_model(build(), config()))
    pm.train()
    batch = _batch()
    stock, stock_grads = _loss_and_grads(pm, batch, gather=False)
    ours, our_grads = _loss_and_grads(pm, batch, gather=True)
    torch.testing.assert_close(ours, stock, rtol=1e-6, atol=1e-6)
    for name, g in stock_grads.items():
        torch.testing.assert_close(our_grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
    hf = pm.get_base_model()
    assert type(hf.lm_head) is torch.nn.Linear and "_loss_function" not in vars(hf)  # restored


def test_a_batch_without_labels_gives_a_zero_loss_with_a_graph():
    pm = _randomised(peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, target_modules="all-linear")))
    batch = _batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    hf = pm.get_base_model()
    with LL.gathered_loss(hf, LL.head_of(hf)):
        loss = pm(**batch).loss
    loss.backward()
    assert float(loss) == 0.0


def test_gathered_loss_under_bf16_autocast_is_close():
    pm = _randomised(peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, target_modules="all-linear")))
    pm.train()
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock, _ = _loss_and_grads(pm, batch, gather=False)
        ours, _ = _loss_and_grads(pm, batch, gather=True)
    torch.testing.assert_close(ours, stock, rtol=2e-2, atol=2e-2)


def test_heads_the_gathered_loss_leaves_alone():
    # an adapter on the head, a trained head, a model class that rescales its logits, a classification model
    on_head = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert LL.head_of(on_head.get_base_model()) is None
    trained = tiny_llama()
    trained.lm_head.weight.requires_grad_(True)
    assert LL.head_of(trained) is None
    from transformers import GraniteConfig, GraniteForCausalLM
    granite = GraniteForCausalLM(GraniteConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, logits_scaling=4.0))
    assert LL.head_of(granite) is None
    assert LL.head_of(tiny_llama(num_labels=3)) is None
    frozen = tiny_llama().requires_grad_(False)
    assert LL.head_of(frozen) is frozen.lm_head


def _examples(n=24):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        k = int(torch.randint(3, 12, (1,), generator=g))
        ids = torch.randint(1, 128, (k,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (k - 2) + ids[-2:]})
    return out


def test_training_with_the_gathered_loss_matches_the_stock_loss(monkeypatch):
    """Three optimizer steps through the loop: same adapter whether the loss is gathered or the stock one."""
    ex = _examples()
    adapters = []
    for gather in (True, False):
        if not gather:
            monkeypatch.setattr("peftlab.train.loop.head_of", lambda hf: None)
        torch.manual_seed(0)
        pm = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, target_modules="all-linear"))
        summary = train(pm, ex, D.Collator(0), TrainConfig(steps=3, batch_size=4, lr=1e-2, progress=False))
        adapters.append(({n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad},
                         summary["losses"]))
    assert adapters[0][1] == pytest.approx(adapters[1][1], rel=1e-6)
    for name, w in adapters[1][0].items():   # Adam turns float rounding of near-zero gradients into ~1e-6 steps
        torch.testing.assert_close(adapters[0][0][name], w, rtol=1e-4, atol=2e-5, msg=name)


def test_eval_loss_gathered_equals_full_logits(monkeypatch):
    pm = _randomised(peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, target_modules="all-linear")))
    ex = _examples(10)
    ours = eval_loss(pm, ex, D.Collator(0), batch_size=4)
    monkeypatch.setattr(LL, "head_of", lambda hf: None)
    assert eval_loss(pm, ex, D.Collator(0), batch_size=4) == pytest.approx(ours, rel=1e-6)


# -- length-grouped batches --------------------------------------------------------------------------------------
def _padding(stream, n_batches):
    pad = 0
    for _ in range(n_batches):
        pad += int((stream.next()["attention_mask"] == 0).sum())
    return pad


def test_length_grouped_batches_pad_less_and_are_a_permutation_per_epoch():
    ex = [{"input_ids": [1] * (1 + (i * 7) % 40), "labels": [1] * (1 + (i * 7) % 40)} for i in range(400)]
    lengths = [len(e["input_ids"]) for e in ex]
    for epoch, offset in ((0, 0), (1, 3)):
        order = D.length_grouped_order(lengths, 8, seed=1, epoch=epoch, offset=offset)
        assert sorted(order) == list(range(400))
        assert order == D.length_grouped_order(lengths, 8, seed=1, epoch=epoch, offset=offset)  # deterministic
    assert D.length_grouped_order(lengths, 8, 1, 0) != D.length_grouped_order(lengths, 8, 1, 1)
    grouped = _padding(D.BatchStream(ex, 8, D.Collator(0), seed=1, group_by_length=True), 50)
    plain = _padding(D.BatchStream(ex, 8, D.Collator(0), seed=1, group_by_length=False), 50)
    assert grouped < 0.2 * plain, (grouped, plain)


def test_length_grouped_stream_resumes_and_keeps_batches_across_epochs():
    ex = _examples(21)    # 21 examples, batches of 4: batches straddle the epoch boundaries
    s1 = D.BatchStream(ex, 4, D.Collator(0), seed=3, group_by_length=True)
    seq = [s1.next()["input_ids"] for _ in range(16)]   # three epochs and a bit
    s2 = D.BatchStream(ex, 4, D.Collator(0), seed=3, position=11, group_by_length=True)
    for i in range(11, 16):
        assert torch.equal(s2.next()["input_ids"], seq[i])
    # every epoch sees every example once, though its batches run on into the next epoch
    s3 = D.BatchStream(ex, 4, lambda rows: rows, seed=3, group_by_length=True)
    rows = [id(r) for _ in range(16) for r in s3.next()]
    for e in range(3):
        assert len(set(rows[21 * e:21 * (e + 1)])) == 21


def test_length_grouping_by_default_only_where_random_batches_pad_a_lot():
    even = [{"input_ids": [1] * (20 + i % 3), "labels": [1] * (20 + i % 3)} for i in range(64)]
    uneven = [{"input_ids": [1] * (2 + (i * 7) % 40), "labels": [1] * (2 + (i * 7) % 40)} for i in range(64)]
    assert D.padding_fraction([len(e["input_ids"]) for e in even], 8, 0) < D.AUTO_GROUP_PADDING
    assert D.padding_fraction([len(e["input_ids"]) for e in uneven], 8, 0) > D.AUTO_GROUP_PADDING
    assert not D.BatchStream(even, 8, D.Collator(0)).grouped
    assert D.BatchStream(uneven, 8, D.Collator(0)).grouped
    assert D.BatchStream(even, 8, D.Collator(0), group_by_length=True).grouped
    assert not D.BatchStream(uneven, 8, D.Collator(0), group_by_length=False).grouped
