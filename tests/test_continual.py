"""Continual learning: EWC-LoRA's Fisher and penalty against their equations, MTIL's metrics, `peftlab continual`."""
from __future__ import annotations

import json

import pytest
import torch

import peftlab
from conftest import perturb_trainable, tiny_llama, token_batch
from peftlab.methods.lora import EwcLoraConfig
from peftlab.train.jobs.continual import mtil_metrics


def _batches():
    out = []
    for s in (0, 1):
        b = token_batch(seed=s)
        out.append({**b, "labels": b["input_ids"]})
    return out


def _params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_mtil_metrics_written_out():
    a = [[0.5, 0.1, 0.0],
         [0.3, 0.6, 0.2],
         [0.2, 0.4, 0.7]]
    m = mtil_metrics(a)
    assert m["transfer"] == pytest.approx((0.1 + (0.0 + 0.2) / 2) / 2)   # above the diagonal, per task
    assert m["average"] == pytest.approx(sum(map(sum, a)) / 9) and m["last"] == pytest.approx((0.2 + 0.4 + 0.7) / 3)


def test_ewc_fisher_and_penalty_are_the_equations():
    cfg = EwcLoraConfig(r=2, target_modules=["q_proj", "v_proj"], ewc_lambda=50.0, ewc_gamma=0.5, fisher_batches=2)
    model = peftlab.get_peft_model(tiny_llama(), cfg)
    perturb_trainable(model, std=0.2)
    batches = _batches()
    model.train()
    assert model(**batches[0]).loss is not None and model.last_aux_losses == {}   # nothing consolidated yet
    # the Fisher by hand: mean over the batches of the squared gradient of the task loss
    params = _params(model)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in batches:
        model.zero_grad()
        model.get_base_model()(**b).loss.backward()
        for n, p in params.items():
            fisher[n] += p.grad.detach() ** 2 / len(batches)
    model.zero_grad()
    model.end_task(iter(batches))
    anchor = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():   # move away from the anchor, then the penalty is (λ/2) Σ F (θ − θ*)²
        for p in params.values():
            p.add_(0.05)
    want = 0.5 * 50.0 * sum((fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in params.items())
    base_loss = model.get_base_model()(**batches[0]).loss
    out = model(**batches[0])
    torch.testing.assert_close(model.last_aux_losses["default"], want.detach(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.loss, base_loss + want, rtol=1e-5, atol=1e-6)
    # its gradient is λ F (θ − θ*)
    model.zero_grad()
    model(**batches[0]).loss.backward()
    grads = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad()
    model.get_base_model()(**batches[0]).loss.backward()
    for n, p in params.items():
        torch.testing.assert_close(grads[n] - p.grad, 50.0 * fisher[n] * (p.detach() - anchor[n]), rtol=1e-4,
                                   atol=1e-6)
    # a second task: F ← γ F + F_new, the anchor moves to the current θ
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"]
    old = layer.ewc_fisher.lora_A.clone()
    model.zero_grad()
    model.end_task(iter(batches))
    assert model.peft_config["default"].ewc_tasks == 2
    assert torch.equal(layer.ewc_anchor.lora_A, layer.lora_A.detach())
    assert (layer.ewc_fisher.lora_A >= 0.5 * old - 1e-12).all() and not torch.equal(layer.ewc_fisher.lora_A, old)


def test_ewc_state_is_saved_and_reloaded(tmp_path):
    model = peftlab.get_peft_model(tiny_llama(), EwcLoraConfig(r=2, target_modules=["q_proj"]))
    perturb_trainable(model, std=0.2)
    model.end_task(iter(_batches()))
    model.save_pretrained(tmp_path)
    back = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert back.peft_config["default"].ewc_tasks == 1
    a = model.base_model.model.model.layers[1].self_attn.q_proj.adapters["default"]
    b = back.base_model.model.model.layers[1].self_attn.q_proj.adapters["default"]
    assert torch.equal(a.ewc_fisher.lora_B, b.ewc_fisher.lora_B) and torch.equal(a.ewc_anchor.lora_A,
                                                                                 b.ewc_anchor.lora_A)
    with pytest.raises(ValueError, match="EWC on DoRA adapters is not supported"):
        EwcLoraConfig(use_dora=True)


@pytest.mark.parametrize("method", ["lora", "ewc-lora"])
def test_peftlab_continual_on_two_tasks(method, tmp_path, capsys):
    from peftlab import cli
    from test_train import save_tiny_model_dir
    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    out = tmp_path / "run"
    assert cli.main(["continual", "--model", str(model_dir), "--method", method, "--tasks",
                     "wordnet-antonyms,wordnet-hypernyms", "--steps", "3", "--batch-size", "4", "--r", "2",
                     "--eval-size", "4", "--max-new-tokens", "3", "--forgetting-size", "4", "--no-progress",
                     "--output", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    a = res["matrix"]
    assert len(a) == 2 and all(len(row) == 2 for row in a)
    assert res["transfer"] == pytest.approx(a[0][1]) and res["last"] == pytest.approx(sum(a[1]) / 2)
    assert res["forgotten"]["wordnet-antonyms"] == pytest.approx(a[0][0] - a[1][0])
    assert set(res["forgetting"]) >= {"general_ppl"}
    assert json.loads((out / "continual.json").read_text())["matrix"] == a
    saved = json.loads((out / "stage-2-wordnet-hypernyms" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == ("EWC_LORA" if method == "ewc-lora" else "LORA")
    if method == "ewc-lora":
        assert saved["ewc_tasks"] == 2
    assert cli.main(["continual", "--model", str(model_dir), "--tasks", "wordnet-antonyms", "--output",
                     str(tmp_path / "x")]) == 2
    assert "at least two built-in tasks" in capsys.readouterr().err
