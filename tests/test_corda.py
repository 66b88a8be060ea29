"""CorDA: HF PEFT parity (init and files both ways), the model unchanged at step 0, IPM/KPM components, caches."""
from __future__ import annotations

import dataclasses
import os
import sys
import types

import pytest
import torch

import peftlab
from conftest import tiny_gpt2, tiny_llama, token_batch
from peftlab.methods.lora.corda import CordaConfig, CordaLoraConfig, collect_covariance, preprocess_corda

# HF PEFT 0.21's corda.py imports `dataclass` from the `attrs` package only for a 3-field record; the stdlib
# dataclass is equivalent, and keeps the reference usable without adding attrs to the test dependencies.
sys.modules.setdefault("attr", types.SimpleNamespace(dataclass=dataclasses.dataclass))
peft = pytest.importorskip("peft")
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
SAMPLES = [token_batch(seed=s, batch=1, length=12)["input_ids"] for s in range(40)]  # unpadded, one per call


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _ours(method="ipm", r=4, model=None, **cc):
    model = model if model is not None else tiny_llama()
    cfg = peftlab.LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                             corda_config=CordaConfig(corda_method=method, **cc))
    preprocess_corda(model, cfg, [{"input_ids": x} for x in SAMPLES])
    return peftlab.get_peft_model(model, cfg).eval(), cfg


def _theirs(method="ipm", r=4, model=None):
    model = model if model is not None else tiny_llama()
    cfg = peft.LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                          corda_config=peft.tuners.lora.config.CordaConfig(corda_method=method))
    peft_preprocess(model, cfg, run_model=lambda: [model(input_ids=x) for x in SAMPLES])
    return model, cfg


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_init_matches_hf_peft(method):
    ours, _ = _ours(method)
    model, cfg = _theirs(method)
    theirs = peft.get_peft_model(model, cfg).eval()
    ref = {k.replace(".default", ""): v for k, v in theirs.state_dict().items()}
    for k, v in ours.state_dict().items():
        k = k.replace("adapters.default.lora_A", "lora_A.weight").replace("adapters.default.lora_B", "lora_B.weight")
        assert (ref[k] - v).abs().max().item() <= 1e-5, k           # A, B and the residual base weights
    batch = token_batch()
    assert (_logits(ours, batch) - _logits(theirs, batch)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_model_unchanged_at_step_0_with_padded_batches(method):
    batch = token_batch()
    base = _logits(tiny_llama(), batch)
    model = tiny_llama()
    cfg = peftlab.get_method("corda").make_config(r=4, target_modules="all-linear",
                                                  corda_config=CordaConfig(corda_method=method))
    assert cfg.calibration_data == ("knowledge" if method == "kpm" else "task")
    cfg.prepare(model, [token_batch(seed=s) for s in range(4)])     # padded (B, T) batches with a mask
    pm = peftlab.get_peft_model(model, cfg).eval()
    torch.testing.assert_close(_logits(pm, batch), base, atol=1e-5, rtol=1e-5)
    assert pm.model.model.layers[0].self_attn.q_proj.adapters["default"].lora_B.abs().sum() > 0


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_adapter_takes_the_largest_or_smallest_context_components(method):
    """s·BA·C' = U_r S_r Vh_r: its singular values are the r largest (IPM) / smallest (KPM) of W C'."""
    model = tiny_llama()
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    name = "model.layers.0.self_attn.q_proj"
    cov = collect_covariance(model, [(name, model.get_submodule(name))], [{"input_ids": x} for x in SAMPLES])[name]
    pm, _ = _ours(method, model=model)
    ad = pm.model.model.layers[0].self_attn.q_proj.adapters["default"]
    damp = 0.01
    while True:
        fixed = cov + torch.eye(32) * torch.diag(cov).mean() * damp
        if torch.dist(fixed @ torch.linalg.inv(fixed), torch.eye(32)) < 0.05:
            break
        damp *= 2
    full = torch.linalg.svdvals(w @ fixed)
    part = torch.linalg.svdvals(ad.scale * ad.lora_B.detach() @ ad.lora_A.detach() @ fixed)[:4]
    want = full[:4] if method == "ipm" else full[-4:]
    torch.testing.assert_close(part, want, atol=1e-4, rtol=1e-4)


def test_padded_batches_give_the_per_sample_covariance():
    model = tiny_llama()
    targets = [("model.layers.1.mlp.down_proj", model.model.layers[1].mlp.down_proj)]
    rows = [token_batch(seed=s, batch=1, length=5 + s)["input_ids"][0] for s in range(6)]
    one_by_one = collect_covariance(model, targets, [{"input_ids": r.unsqueeze(0)} for r in rows])
    batched = collect_covariance(model, targets, [{"input_ids": r.tolist()} for r in rows], batch_size=4)
    torch.testing.assert_close(batched["model.layers.1.mlp.down_proj"], one_by_one["model.layers.1.mlp.down_proj"])


def test_files_interoperate_with_hf_peft_both_ways(tmp_path):
    batch = token_batch()
    ours, _ = _ours("kpm")
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    expected = _logits(ours, batch)
    ours.save_pretrained(tmp_path / "ours")
    # PEFT loads a CorDA adapter after its own preprocessing of the base (the adapter's base is the residual).
    model, _ = _theirs("kpm")
    loaded = peft.PeftModel.from_pretrained(model, tmp_path / "ours").eval()
    assert (_logits(loaded, batch) - expected).abs().max().item() <= 1e-5

    model, cfg = _theirs("ipm")
    theirs = peft.get_peft_model(model, cfg).eval()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    their_out = _logits(theirs, batch)
    theirs.save_pretrained(tmp_path / "theirs")
    base = tiny_llama()
    cfg = peftlab.PeftConfig.from_pretrained(tmp_path / "theirs")
    preprocess_corda(base, cfg, [{"input_ids": x} for x in SAMPLES])
    mine = peftlab.PeftModel.from_pretrained(base, tmp_path / "theirs").eval()
    assert (_logits(mine, batch) - their_out).abs().max().item() <= 1e-5


def test_cache_files_are_safetensors_and_rebuild_the_residual(tmp_path):
    from safetensors.torch import load_file
    batch = token_batch()
    cache, cov = tmp_path / "c" / "eigens.safetensors", tmp_path / "c" / "cov.safetensors"
    pm, cfg = _ours("kpm", cache_file=str(cache), covariance_file=str(cov))
    assert sorted(os.listdir(cache.parent)) == ["cov.safetensors", "eigens.safetensors"]   # no temp files left
    assert "model.layers.0.self_attn.q_proj.eigens.U_WC" in load_file(cache)
    with torch.no_grad():
        pm.model.model.layers[1].mlp.down_proj.adapters["default"].lora_B.add_(0.1)
    expected = _logits(pm, batch)
    pm.save_pretrained(tmp_path / "a")
    loaded = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()   # residual from the cache
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=1e-5, rtol=1e-5)
    # The covariance file serves another rank without data; the cache (rank 4) refuses rank 2 clearly.
    cfg2 = cfg.replace(r=2, corda_config=CordaConfig(corda_method="kpm", covariance_file=str(cov)))
    preprocess_corda(tiny_llama(), cfg2)
    with pytest.raises(ValueError, match="holds rank 4.*r=2"):
        preprocess_corda(tiny_llama(), cfg.replace(r=2))
    with pytest.raises(ValueError, match="different weights"):
        preprocess_corda(tiny_llama(seed=3), cfg)


def test_clear_error_without_calibration():
    cfg = CordaLoraConfig(r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="preprocess_corda"):
        peftlab.get_peft_model(tiny_llama(), cfg)
    with pytest.raises(ValueError, match="needs calibration data"):
        preprocess_corda(tiny_llama(), cfg)
    with pytest.raises(ValueError, match="corda_method"):
        CordaConfig(corda_method="both")


def test_conversion_to_plain_lora_for_the_original_base(tmp_path):
    batch = token_batch()
    pm, _ = _ours("ipm")
    pm.save_pretrained(tmp_path / "init")
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    expected = _logits(pm, batch)
    pm.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    plain = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain").eval()
    assert plain.peft_config["default"].r == 8 and plain.peft_config["default"].init_lora_weights is True
    torch.testing.assert_close(_logits(plain, batch), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_conv1d_and_dora_unchanged_at_step_0(dora):
    batch = token_batch()
    base = _logits(tiny_gpt2(), batch)
    model = tiny_gpt2()
    cfg = CordaLoraConfig(r=4, target_modules=["c_attn", "c_fc"], use_dora=dora)
    preprocess_corda(model, cfg, [token_batch(seed=s) for s in range(4)])
    pm = peftlab.get_peft_model(model, cfg).eval()
    torch.testing.assert_close(_logits(pm, batch), base, atol=1e-5, rtol=1e-5)
