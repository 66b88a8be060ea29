"""AdaLoRA: HF PEFT interop both ways (also after rank pruning), the allocator against PEFT's RankAllocator on the
same gradients, and the budget schedule / masking / orthogonality loss against docs/METHODS.md's equations."""
from __future__ import annotations

import warnings

import pytest
import torch

import peftlab
from conftest import randomize_adapters, tiny_llama, token_batch
from peftlab.methods.adalora import SvdLinear, _mask_to_budget, budget_schedule

peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", message=".*(ignores|is not used in AdaLora).*")

KW = dict(init_r=6, target_r=3, lora_alpha=16, total_step=8, tinit=1, tfinal=2, deltaT=2,
          target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _close(a, b):
    assert (a - b).abs().max().item() <= 1e-5


def _peft_model(**kw):
    return peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**{**KW, **kw}))


def test_peft_to_peftlab_and_back(tmp_path):
    batch = token_batch()
    ref = _peft_model()
    randomize_adapters(ref, seed=3)
    ref.eval()
    ref.save_pretrained(tmp_path / "peft")
    ours = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()
    _close(_logits(ours, batch), _logits(ref, batch))

    mine = peftlab.get_peft_model(tiny_llama(), peftlab.AdaLoraConfig(**KW)).eval()
    randomize_adapters(mine, seed=4)
    mine.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    _close(_logits(back, batch), _logits(mine, batch))
    # merged weights equal the unmerged forward
    _close(_logits(mine.merge_and_unload(), batch), _logits(back, batch))


def _train_pair(tmp_path, steps):
    """PEFT and peftlab from the same initial adapter, trained side by side with SGD on the same batch."""
    batch = token_batch(batch=4, length=9)
    ref = _peft_model()
    randomize_adapters(ref, seed=5)
    ref.save_pretrained(tmp_path / "init")
    ours = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path / "init", is_trainable=True)
    ours.peft_config["default"].total_step = ref.peft_config["default"].total_step  # the file has it; same value
    ref.train(), ours.train()
    opt_r = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.5)
    opt_o = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    history = []
    for step in range(1, steps + 1):
        loss_r = ref(**batch, labels=batch["input_ids"]).loss
        loss_o = ours(**batch, labels=batch["input_ids"]).loss
        loss_r.backward(), loss_o.backward()
        opt_r.step(), opt_o.step()
        ref.base_model.update_and_allocate(step)
        ours.base_model.update_and_allocate(step)   # HF PEFT's call, found through attribute forwarding
        opt_r.zero_grad(), opt_o.zero_grad()
        history.append((loss_r.item(), loss_o.item(), ref.peft_config["default"].rank_pattern,
                        ours.peft_config["default"].rank_pattern))
    return ref, ours, history, batch


def test_allocator_matches_peft_rank_allocator(tmp_path):
    ref, ours, history, batch = _train_pair(tmp_path, steps=8)
    # the orthogonality term is in the loss of both (PEFT adds it in forward; we through aux_loss)
    for loss_r, loss_o, pat_r, pat_o in history:
        assert abs(loss_r - loss_o) < 1e-5
        if pat_r is not None:
            assert {k.replace(".default", ""): v for k, v in pat_r.items()} == pat_o
    final = history[-1][3]
    assert sum(sum(m) for m in final.values()) == KW["target_r"] * len(final)   # budget b_T reached
    assert any(not all(m) for m in final.values())
    ref.eval(), ours.eval()
    _close(_logits(ours, batch), _logits(ref, batch))
    # E entries of pruned triplets are zero in both
    for name, module in ours.named_modules():
        if isinstance(module, SvdLinear):
            key = name.split(".base_model.model.", 1)[-1].replace("base_model.model.", "").rsplit(".adapters", 1)[0]
            keep = torch.tensor(final[key + ".lora_E"])
            assert torch.all(module.lora_E[~keep] == 0)


def test_pruned_adapter_interop(tmp_path):
    ref, ours, history, batch = _train_pair(tmp_path, steps=8)
    ref.eval(), ours.eval()
    ref.save_pretrained(tmp_path / "peft_pruned")
    ours.save_pretrained(tmp_path / "ours_pruned")
    from safetensors.torch import load_file
    a = load_file(tmp_path / "peft_pruned" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ours_pruned" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert any(k.endswith("lora_A") and a[k].shape[0] < KW["init_r"] for k in a)   # pruned on save
    expected = _logits(ref, batch)
    loaded = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft_pruned").eval()
    _close(_logits(loaded, batch), expected)
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours_pruned").eval()
    _close(_logits(back, batch), _logits(ours, batch))


def test_budget_schedule_equation():
    b0, bT, ti, tf, T = 120, 40, 10, 20, 100
    for t in range(0, T + 5):
        budget, mask = budget_schedule(t, b0, bT, ti, tf, T, delta_t=5)
        if t <= ti:
            assert (budget, mask) == (b0, False)
        elif t > T - tf:
            assert (budget, mask) == (bT, True)
        else:
            expected = bT + (b0 - bT) * (1 - (t - ti) / (T - tf - ti)) ** 3
            assert budget == int(expected) and mask == (t % 5 == 0)
    assert budget_schedule(T - tf, b0, bT, ti, tf, T, 5)[0] == bT


def test_importance_scores_and_masking():
    torch.manual_seed(0)
    layers = []
    for i in range(2):
        a = SvdLinear(5, 4, r=3, lora_alpha=8, ranknum=3)
        with torch.no_grad():
            a.lora_E.fill_(1.0)
        layers.append((f"l{i}", None, a))
    # two steps of the EMAs with known gradients: I = |w·g|, Ī ← β1Ī + (1−β1)I, Ū ← β2Ū + (1−β2)|I − Ī|
    grads = [{n: torch.randn_like(getattr(a, n)) for n in SvdLinear.FACTORS} for _, _, a in layers]
    expected = []
    for (_, _, a), g in zip(layers, grads):
        avg = {n: torch.zeros_like(getattr(a, n)) for n in g}
        unc = {n: torch.zeros_like(getattr(a, n)) for n in g}
        for _ in range(2):
            for n in g:
                getattr(a, n).grad = g[n]
                ipt = (getattr(a, n) * g[n]).abs()
                avg[n] = 0.85 * avg[n] + 0.15 * ipt
                unc[n] = 0.85 * unc[n] + 0.15 * (ipt - avg[n]).abs()
            a.update_importance(0.85, 0.85, "test")
        s = {n: avg[n] * unc[n] for n in g}
        expected.append(s["lora_E"].view(-1) + s["lora_A"].mean(1) + s["lora_B"].mean(0))
        torch.testing.assert_close(a.triplet_scores(), expected[-1])
    flat = torch.cat(expected)
    pattern = _mask_to_budget(layers, n_prune=2)
    dropped = set(flat.argsort()[:2].tolist())
    for i, (name, _, a) in enumerate(layers):
        keep = pattern[f"{name}.lora_E"]
        for j in range(3):
            assert keep[j] == ((3 * i + j) not in dropped)
            assert (a.lora_E[j, 0].item() == 0.0) == (not keep[j])


def test_orthogonality_loss_formula():
    model = peftlab.get_peft_model(tiny_llama(), peftlab.AdaLoraConfig(**KW)).train()
    randomize_adapters(model, seed=1)
    batch = token_batch()
    with_reg = model(**batch, labels=batch["input_ids"]).loss
    terms = []
    for m in model.modules():
        if isinstance(m, SvdLinear):
            eye = torch.eye(m.r)
            terms += [torch.linalg.norm(m.lora_A @ m.lora_A.T - eye), torch.linalg.norm(m.lora_B.T @ m.lora_B - eye)]
    model.eval()
    plain = model(**batch, labels=batch["input_ids"]).loss      # eval: the regulariser is a training loss
    torch.testing.assert_close(with_reg - plain, 0.5 * torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)


def test_entry_points_and_errors(tmp_path):
    with pytest.raises(ValueError, match="total_step"):
        peftlab.AdaLoraConfig()
    with pytest.raises(ValueError, match="budgeting phase"):
        peftlab.AdaLoraConfig(total_step=10, tinit=5, tfinal=5)
    model = peftlab.get_peft_model(tiny_llama(), peftlab.AdaLoraConfig(**KW))
    with pytest.raises(RuntimeError, match="after loss.backward"):
        model.update_and_allocate(1)          # no gradients yet
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.add_adapter("second", peftlab.AdaLoraConfig(**KW))
    model.add_adapter("frozen", peftlab.AdaLoraConfig(**KW, inference_mode=True))   # fine: not trainable
    model.save_pretrained(tmp_path)
    loaded = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(RuntimeError, match="is_trainable=True"):
        loaded.base_model.update_and_allocate(1)
    base = model.unload()
    assert not hasattr(base, "update_and_allocate")
