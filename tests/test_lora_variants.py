"""LoRA-FA and LoRA-dropout against their equations on small tensors, and their files against HF PEFT's LoRA."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peftlab
from conftest import tiny_llama, token_batch
from peftlab.methods.lora.dropout import LoraDropoutLinear
from peftlab.methods.lora.fa import LoraFaLinear


def _fa(d_in=12, d_out=7, r=3, scale=2.0, project=False, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    a = LoraFaLinear(project_gradient=project, d_in=d_in, d_out=d_out, r=r, scale=scale)
    with torch.no_grad():
        a.lora_B.normal_()
    return base, a


def test_lora_fa_a_is_frozen_buffer():
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraFaConfig(r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("lora_B") for n in trainable)
    assert any(n.endswith("lora_A") for n, _ in model.named_buffers())
    # q_proj (32→32) and v_proj (32→16) in two layers: only B, d_out·r each
    assert model.get_nb_trainable_parameters()[0] == 2 * (32 * 4 + 16 * 4)


def test_lora_fa_fused_matches_autograd_and_keeps_no_input():
    base, a = _fa()
    x = torch.randn(5, 4, 12, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = a(x, base, None)
    assert (5, 4, 12) not in saved and (20, 12) not in saved      # x is not kept; x·Aᵀ (20, 3) is
    assert (20, 3) in saved
    g = torch.randn_like(y)
    y.backward(g)
    x_ref = x.detach().clone().requires_grad_(True)
    B = a.lora_B.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, base.weight, base.bias) + a.scale * (x_ref @ a.lora_A.T) @ B.T
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(a.lora_B.grad, B.grad)


def test_lora_fa_gradient_projection():
    """g_B ← g_B (AAᵀ)⁻¹ / s², on both the fused and the unfused (base output given) paths."""
    for given_result in (False, True):
        base, plain = _fa(project=False)
        _, proj = _fa(project=True)
        x = torch.randn(6, 12)
        for adapter in (plain, proj):
            out = adapter(x, base, base(x) if given_result else None)
            out.pow(2).sum().backward()
        A, s = plain.lora_A, plain.scale
        expected = plain.lora_B.grad @ torch.linalg.inv(A @ A.T) / s ** 2
        torch.testing.assert_close(proj.lora_B.grad, expected, atol=1e-5, rtol=1e-4)


def test_lora_fa_file_is_a_plain_lora_that_peft_loads(tmp_path):
    peft = pytest.importorskip("peft")
    batch = token_batch()
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraFaConfig(r=4, lora_alpha=8,
                                                                      target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    model.eval().save_pretrained(tmp_path / "fa")
    cfg = json.loads((tmp_path / "fa" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA_FA" and cfg["project_gradient"] is False
    expected = model(**batch).logits
    # Resuming keeps A frozen; the outputs are identical.
    again = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path / "fa", is_trainable=True)
    assert all(n.endswith("lora_B") for n, p in again.named_parameters() if p.requires_grad)
    assert (again.eval()(**batch).logits - expected).abs().max() <= 1e-5
    # HF PEFT reads the same tensors as a LoRA adapter once the config is the plain LoRA one.
    plain = model.peft_config["default"].to_lora_config()
    plain.save_pretrained(tmp_path / "fa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "fa").eval()
        assert (ref(**batch).logits - expected).abs().max() <= 1e-5


def _dropout_adapter(p=0.3, d_in=40, d_out=30, r=4, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    a = LoraDropoutLinear(p, d_in=d_in, d_out=d_out, r=r, scale=1.5)
    with torch.no_grad():
        a.lora_B.normal_()
    return base, a


def test_lora_dropout_masks_input_features_of_A_and_output_features_of_B():
    base, a = _dropout_adapter()
    x = torch.randn(8, 40)
    a.train()
    torch.manual_seed(123)
    y = a(x, base, None)
    torch.manual_seed(123)
    m_A = torch.bernoulli(torch.full((40,), 0.7))
    m_B = torch.bernoulli(torch.full((30,), 0.7))
    delta = torch.diag(m_B) @ a.lora_B @ a.lora_A @ torch.diag(m_A) * a.scale      # diag(m_B)·B·A·diag(m_A)
    torch.testing.assert_close(y, base(x) + x @ delta.T)
    y.sum().backward()
    assert torch.all(a.lora_A.grad[:, m_A == 0] == 0) and torch.all(a.lora_B.grad[m_B == 0] == 0)
    assert a.lora_A.grad[:, m_A == 1].abs().sum() > 0
    a.eval()                                   # evaluation: the full A, B
    torch.testing.assert_close(a(x, base, None), base(x) + a.scale * x @ (a.lora_B @ a.lora_A).T)


def test_lora_dropout_sparsity_is_2p_minus_p2():
    """An entry of ΔW survives only if its row and its column do: dropped with probability 2p − p²."""
    base, a = _dropout_adapter(p=0.2, d_in=300, d_out=200)
    a.train()
    eye = torch.eye(300)
    torch.manual_seed(0)
    with torch.no_grad():
        delta = (a(eye, base, None) - base(eye)).T     # (d_out, d_in): column j is ΔW e_j
    dropped = (delta == 0).float().mean().item()
    assert abs(dropped - (2 * 0.2 - 0.2 ** 2)) < 0.03


def test_lora_dropout_trains_and_saves_plain_lora(tmp_path):
    peft = pytest.importorskip("peft")
    batch = token_batch()
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraDropoutConfig(r=4, sparsity_dropout=0.5))
    model.train()
    out1 = model(**batch, labels=batch["input_ids"])
    out1.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    model.eval().save_pretrained(tmp_path)
    expected = model(**batch).logits
    model.peft_config["default"].to_lora_config().save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
        assert (ref(**batch).logits - expected).abs().max() <= 1e-5


def test_configs_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="DoRA"):
        peftlab.LoraFaConfig(use_dora=True)
    with pytest.raises(ValueError, match="frozen|random init"):
        peftlab.LoraFaConfig(init_lora_weights="pissa")
    with pytest.raises(ValueError, match="sparsity_dropout"):
        peftlab.LoraDropoutConfig(sparsity_dropout=1.0)
