"""SMILE: the training-free mixture of SVD experts, against its equations written out on small tensors."""
from __future__ import annotations

import json

import pytest
import torch

import peftlab
from conftest import perturb_trainable, tiny_llama, token_batch
from peftlab.methods.smile import SmileConfig


def _lora_sources(tmp_path, n=3, r=4):
    dirs = []
    for i in range(n):
        targets = ["q_proj", "v_proj"] if i < 2 else ["q_proj", "o_proj"]   # the third leaves v_proj alone
        m = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=r, lora_alpha=8, target_modules=targets,
                                                                   use_rslora=i == 1))
        perturb_trainable(m, seed=i, std=0.3)
        m.save_pretrained(tmp_path / f"task{i}")
        dirs.append(str(tmp_path / f"task{i}"))
    return dirs


def _reference(x, base_out, deltas, gate_k, top_k, k):
    """y = W x + Σ_{top-k} p_i U_i,k Σ_i,k V_i,kᵀ x with p = renormalised top-k of softmax_i ‖V_i,gᵀ x‖ (per token)."""
    logits, experts = [], []
    for dw in deltas:
        if not dw.any():   # a source that leaves this layer alone: a zero expert, gate logit 0 (not random SVD axes)
            logits.append(x.new_zeros(x.shape[0]))
            experts.append(x.new_zeros(x.shape[0], dw.shape[0]))
            continue
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        logits.append((x @ vh[:gate_k].t()).norm(dim=-1))
        experts.append(x @ (u[:, :k] @ torch.diag(s[:k]) @ vh[:k]).t())
    p = torch.stack(logits, -1).softmax(-1)
    top, idx = p.topk(top_k, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    out = base_out.clone()
    for t in range(x.shape[0]):
        for j in range(top_k):
            out[t] += top[t, j] * experts[int(idx[t, j])][t]
    return out


@pytest.mark.parametrize("top_k,gate_k,k", [(1, 4, None), (2, 1, None), (2, 2, 3), (3, 4, 2)])
def test_smile_layer_is_the_equations(tmp_path, top_k, gate_k, k):
    dirs = _lora_sources(tmp_path)
    sources = [peftlab.PeftModel.from_pretrained(tiny_llama(), d) for d in dirs]
    model = peftlab.get_peft_model(tiny_llama(), SmileConfig(adapter_dirs=dirs, top_k=top_k, gate_k=gate_k,
                                                            k=k)).eval()
    cfg = model.peft_config["default"]
    assert cfg.k == (k or 4) and cfg.adapter_dirs is None and cfg.expert_names == ["task0", "task1", "task2"]
    # per layer K·(g·d_in + k·(d_in + d_out)): 3 experts on q, v and o of both blocks
    sizes = [(layer.in_features, layer.out_features) for layer in (
        getattr(block.self_attn, n).base_layer for block in model.base_model.model.model.layers
        for n in ("q_proj", "v_proj", "o_proj"))]
    assert model.get_nb_trainable_parameters()[0] == sum(3 * (gate_k * i + (k or 4) * (i + o)) for i, o in sizes)
    for site in ("q_proj", "v_proj"):
        layer = getattr(model.base_model.model.model.layers[1].self_attn, site)
        seen = {}
        hooks = [layer.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o)),
                 layer.base_layer.register_forward_hook(lambda m, i, o: seen.update(base=o.clone()))]  # the
        # experts are added into the base output in place
        with torch.no_grad():
            model(**token_batch())
        for h in hooks:
            h.remove()
        x = seen["x"].reshape(-1, seen["x"].shape[-1])
        deltas = []
        for src in sources:   # a source that does not adapt this layer contributes ΔW = 0
            adapted = getattr(src.base_model.model.model.layers[1].self_attn, site)
            deltas.append(adapted.adapters["default"].delta_weight(adapted.base_layer).detach()
                          if hasattr(adapted, "adapters") else torch.zeros_like(adapted.weight))
        want = _reference(x, seen["base"].reshape(x.shape[0], -1), deltas, gate_k, top_k, k or 4)
        torch.testing.assert_close(seen["y"].reshape(want.shape), want, atol=1e-5, rtol=1e-4)


def test_one_lora_source_at_full_rank_is_that_lora(tmp_path):
    dirs = _lora_sources(tmp_path, n=1)
    smile = peftlab.get_peft_model(tiny_llama(), SmileConfig(adapter_dirs=dirs)).eval()
    lora = peftlab.PeftModel.from_pretrained(tiny_llama(), dirs[0]).eval()
    with torch.no_grad():
        torch.testing.assert_close(smile(**token_batch()).logits, lora(**token_batch()).logits, atol=1e-5, rtol=1e-5)


def test_saved_smile_reloads_without_its_sources(tmp_path):
    dirs = _lora_sources(tmp_path)
    model = peftlab.get_peft_model(tiny_llama(), SmileConfig(adapter_dirs=dirs, top_k=2)).eval()
    model.save_pretrained(tmp_path / "smile")
    saved = json.loads((tmp_path / "smile" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SMILE" and saved["adapter_dirs"] is None and saved["num_experts"] == 3
    for d in dirs:   # the file stands alone
        for f in (tmp_path / d).iterdir():
            f.unlink()
    back = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path / "smile").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**token_batch()).logits, model(**token_batch()).logits, atol=0, rtol=0)
    stats = back.get_routing_stats()["default"]["all"]
    assert len(stats["mean_load"]) == 3 and abs(sum(stats["mean_load"]) - 1) < 1e-5   # shares of the assignments


def test_fine_tuned_models_as_sources(tmp_path):
    """ΔW = W_i − W of a fine-tuned model's linear weights; at full rank one source reproduces the model."""
    tuned = tiny_llama()
    with torch.no_grad():
        for name in ("q_proj", "v_proj"):
            for layer in tuned.model.layers:
                w = getattr(layer.self_attn, name).weight
                w += 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(w.numel()))
    tuned.save_pretrained(tmp_path / "tuned")
    smile = peftlab.get_peft_model(tiny_llama(), SmileConfig(model_dirs=[str(tmp_path / "tuned")], k=32)).eval()
    assert sorted({m.rsplit(".", 1)[-1] for m in smile.peft_config["default"].target_modules}) == ["q_proj", "v_proj"]
    with torch.no_grad():
        torch.testing.assert_close(smile(**token_batch()).logits, tuned.eval()(**token_batch()).logits,
                                   atol=1e-4, rtol=1e-4)


def test_bad_sources_say_what_smile_takes(tmp_path):
    with pytest.raises(ValueError, match="SMILE needs its sources: adapter_dirs"):
        peftlab.get_peft_model(tiny_llama(), SmileConfig())
    dora = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=2, use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="holds a DoRA adapter; SMILE builds its experts from LoRA adapters"):
        peftlab.get_peft_model(tiny_llama(), SmileConfig(adapter_dirs=[str(tmp_path / "dora")]))
    with pytest.raises(ValueError, match="top_k=3 exceeds the 2 experts"):
        SmileConfig(adapter_dirs=["a", "b"], top_k=3)


def test_compose_smile_from_the_cli(tmp_path, capsys):
    from peftlab import cli
    from test_train import save_tiny_model_dir
    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    dirs = _lora_sources(tmp_path)
    assert cli.main(["compose", "smile", "--model", str(model_dir), "--adapters", ",".join(dirs), "--top-k", "2",
                     "--output", str(tmp_path / "smile"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["experts"] == ["task0", "task1", "task2"] and res["layers"] == 6 and res["adapter_params"] > 0
    from transformers import AutoModelForCausalLM
    loaded = peftlab.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "smile")
    built = peftlab.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                   SmileConfig(adapter_dirs=dirs, top_k=2))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**token_batch()).logits, built.eval()(**token_batch()).logits,
                                   atol=0, rtol=0)
    assert cli.main(["compose", "smile", "--model", str(model_dir), "--adapters", dirs[0],
                     "--output", str(tmp_path / "one")]) == 2
    assert "needs at least two sources" in capsys.readouterr().err
