"""EVA: HF PEFT parity (ranks, A, config, files both ways), rank-0 layers, condensed targets, options and errors.

Tolerance: both sides run the same incremental PCA (scikit-learn's update; torch.svd_lowrank with q = 2k,
4 iterations, seed 42) on identical layer inputs, so A comes out equal up to float64 summation order in the running
moments (~1e-15); 1e-10 is far below anything a wrong formula, a wrong batch order or a wrong convergence step
would give, and the ranks (integers) must be equal exactly.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import peftlab
from conftest import randomize_adapters, tiny_llama, token_batch
from peftlab.core.layer import AdaptedLayer
from peftlab.core.targets import resolve_targets

peft = pytest.importorskip("peft")
from peft.tuners.lora.layer import LoraLayer  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = 1e-10


def _batches(n: int = 6, labels: bool = True) -> list[dict]:
    """Deterministic batches: 4 rows of 16 tokens, one left-padded row, the first 3 labels ignored."""
    out = []
    for s in range(n):
        b = token_batch(seed=10 + s, batch=4, length=16)
        if labels:
            b["labels"] = b["input_ids"].clone()
            b["labels"][:, :3] = -100
        out.append(b)
    return out


def _llama(layers: int = 2):
    if layers == 2:
        return tiny_llama()
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, pad_token_id=0)).eval()


def _pair(targets=ALL, r=4, layers=2, labels=True, dora=False, **eva):
    """(PEFT's model, ours), each EVA-initialised on the same batches."""
    kw = dict(r=r, lora_alpha=8, target_modules=targets, init_lora_weights="eva", use_dora=dora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_llama(layers), peft.LoraConfig(**kw, eva_config=peft.EvaConfig(**eva)))
        peft.initialize_lora_eva_weights(theirs, _batches(labels=labels), show_progress_bar=False)
        ours = peftlab.get_peft_model(_llama(layers), peftlab.LoraConfig(**kw, eva_config=peftlab.EvaConfig(**eva)))
        peftlab.initialize_lora_eva_weights(ours, _batches(labels=labels), show_progress_bar=False)
    return theirs.eval(), ours.eval()


def _their_a(model) -> dict[str, torch.Tensor]:
    return {n.replace("base_model.model.", ""): m.lora_A["default"].weight for n, m in model.named_modules()
            if isinstance(m, LoraLayer)}


def _our_a(model) -> dict[str, torch.Tensor]:
    return {n: m.adapters["default"].lora_A for n, m in model.model.named_modules() if isinstance(m, AdaptedLayer)}


def _same_rows_up_to_sign(a: torch.Tensor, b: torch.Tensor) -> float:
    signs = torch.sign((a * b).sum(dim=1, keepdim=True))
    return (a.double() - signs * b.double()).abs().max().item()


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_eva_state_dict_matches_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=ALL, init_lora_weights="eva"))
        ref = peft.get_eva_state_dict(theirs, _batches(), show_progress_bar=False)
    ours = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, target_modules=ALL, init_lora_weights="eva"))
    got = peftlab.get_eva_state_dict(ours, _batches(), show_progress_bar=False)
    assert list(got) == list(ref)                                   # PEFT's keys, in PEFT's order
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
    assert len({v.shape[0] for v in ref.values()}) > 1              # the ranks really were redistributed
    for k in ref:
        assert _same_rows_up_to_sign(got[k], ref[k]) <= TOL, k


# (targets, r, layers, labels, eva options, how many layers end with rank 0)
CASES = [(ALL, 4, 2, True, {}, 0),                                     # q/k/v and gate/up share inputs
         (["q_proj", "down_proj"], 2, 3, False, {"rho": 4.0}, 1),      # layers.1.mlp.down_proj gets rank 0
         (["o_proj", "down_proj", "up_proj"], 3, 3, False, {"rho": 3.0, "adjust_scaling_factors": False}, 3),
         ("all-linear", 4, 3, True, {}, 0),                            # 21 modules: target_modules condensed
         (["q_proj", "o_proj", "down_proj"], 4, 2, True, {"whiten": True, "tau": 0.9}, 0)]


@pytest.mark.parametrize("targets,r,layers,labels,eva,dropped", CASES)
def test_initialisation_matches_peft(targets, r, layers, labels, eva, dropped):
    theirs, ours = _pair(targets, r, layers, labels, **eva)
    ct, co = theirs.peft_config["default"], ours.peft_config["default"]
    assert co.rank_pattern == ct.rank_pattern and co.rank_pattern
    assert co.alpha_pattern == ct.alpha_pattern
    assert sorted(co.target_modules) == sorted(ct.target_modules)
    ref, got = _their_a(theirs), _our_a(ours)
    assert got.keys() == ref.keys()                                 # rank-0 layers lost their adapter on both sides
    wanted = peftlab.LoraConfig(target_modules=targets)
    assert len(resolve_targets(_llama(layers), wanted)) - len(got) == dropped
    for k in ref:
        assert _same_rows_up_to_sign(got[k], ref[k]) <= TOL, k
    batch = token_batch()
    base = _logits(_llama(layers), batch)
    assert torch.equal(_logits(ours, batch), base)                  # B = 0: the model is unchanged at init


def test_rank_zero_and_condensed_targets_are_exercised():
    _, ours = _pair(["q_proj", "down_proj"], 2, 3, labels=False, rho=4.0)
    assert isinstance(ours.model.model.layers[1].mlp.down_proj, torch.nn.Linear)   # unwrapped: no adapter left
    _, ours = _pair("all-linear", 4, 3)
    assert ours.peft_config["default"].target_modules == sorted(ALL)


def test_files_load_both_ways(tmp_path):
    theirs, ours = _pair()
    randomize_adapters(ours, seed=1)
    with torch.no_grad():                                           # trained-looking B on PEFT's side too
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    ref = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for key in ("eva_config", "rank_pattern", "alpha_pattern", "init_lora_weights", "r", "lora_alpha"):
        assert mine[key] == ref[key], key
    batch = token_batch()
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    loaded = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs").eval()
    with peftlab.hf_peft_numerics():
        assert torch.equal(_logits(back, batch), _logits(ours, batch))
        assert torch.equal(_logits(loaded, batch), _logits(theirs, batch))
    assert not torch.equal(_logits(loaded, batch), _logits(tiny_llama(), batch))


def test_dora_matches_peft():
    theirs, ours = _pair(dora=True)
    assert ours.peft_config["default"].rank_pattern == theirs.peft_config["default"].rank_pattern
    ref, got = _their_a(theirs), _our_a(ours)
    assert all(_same_rows_up_to_sign(got[k], ref[k]) <= TOL for k in ref)
    batch = token_batch()
    assert (_logits(ours, batch) - _logits(theirs, batch)).abs().max().item() <= 1e-6  # magnitudes: ‖W‖ rounding


def test_without_label_mask_matches_peft():
    theirs, ours = _pair(ALL, 4, 2, labels=True, use_label_mask=False)
    assert ours.peft_config["default"].rank_pattern == theirs.peft_config["default"].rank_pattern
    _, masked = _pair(ALL, 4, 2, labels=True)
    assert not torch.equal(_our_a(ours)["model.layers.0.self_attn.o_proj"],
                           _our_a(masked)["model.layers.0.self_attn.o_proj"])  # the mask changes what is seen


def test_state_dict_from_the_plain_model():
    """get_eva_state_dict on the base model (module names as keys) initialises the PeftModel the same way."""
    cfg = peftlab.LoraConfig(r=4, target_modules=ALL, init_lora_weights="eva")
    state = peftlab.get_eva_state_dict(tiny_llama(), _batches(), peft_config=cfg, show_progress_bar=False)
    assert next(iter(state)).startswith("model.layers.")
    direct = peftlab.get_peft_model(tiny_llama(), cfg)
    peftlab.initialize_lora_eva_weights(direct, _batches(), show_progress_bar=False)
    loaded = peftlab.get_peft_model(tiny_llama(), cfg)
    peftlab.initialize_lora_eva_weights(loaded, eva_state_dict=state)
    assert loaded.peft_config["default"].rank_pattern == direct.peft_config["default"].rank_pattern
    for k, a in _our_a(direct).items():
        assert torch.equal(_our_a(loaded)[k], a), k
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all("adapters.default" in n for n in trainable)


def test_random_state_is_left_alone():
    """The seeded SVDs draw from a forked generator (re-created adapters of a new rank do draw, as in PEFT)."""
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, target_modules=ALL, init_lora_weights="eva"))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    peftlab.get_eva_state_dict(model, _batches(), show_progress_bar=False)
    assert torch.equal(torch.rand(3), expected)


def test_errors():
    eva = peftlab.LoraConfig(r=4, target_modules=ALL, init_lora_weights="eva")
    with pytest.raises(ValueError, match="needs a PeftModel"):
        peftlab.initialize_lora_eva_weights(tiny_llama(), _batches())
    plain = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, target_modules=ALL))
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        peftlab.initialize_lora_eva_weights(plain, _batches())
    model = peftlab.get_peft_model(tiny_llama(), eva)
    with pytest.raises(ValueError, match="dataloader"):
        peftlab.initialize_lora_eva_weights(model)
    with pytest.raises(ValueError, match="empty"):
        peftlab.initialize_lora_eva_weights(model, [])
    with pytest.raises(ValueError, match="needs peft_config"):
        peftlab.get_eva_state_dict(tiny_llama(), _batches())
    tiny = [token_batch(seed=s, batch=1, length=4) for s in range(3)]  # 4 rows per batch, 8 components needed
    with pytest.raises(ValueError, match="fewer rows than components"):
        peftlab.initialize_lora_eva_weights(model, tiny, show_progress_bar=False)
    with pytest.raises(ValueError, match="rho"):
        peftlab.EvaConfig(rho=0.5)
    with pytest.raises(ValueError, match="tau"):
        peftlab.LoraConfig(init_lora_weights="eva", eva_config={"tau": 1.5})
    with pytest.raises(TypeError, match="no field"):
        peftlab.EvaConfig(rank=3)


def test_config_fills_peft_defaults_and_variants_refuse_eva():
    cfg = peftlab.LoraConfig(init_lora_weights="eva")
    assert dict(cfg.eva_config) == peft.LoraConfig(init_lora_weights="eva").eva_config.__dict__
    assert isinstance(peftlab.LoraConfig(init_lora_weights="eva", eva_config={"rho": 3.0}).eva_config,
                      peftlab.EvaConfig)
    for cls, extra in ((peftlab.AdaLoraConfig, {"total_step": 10}), (peftlab.LoraFaConfig, {}),
                       (peftlab.LoraDropoutConfig, {})):
        with pytest.raises(ValueError, match="init_lora_weights"):
            cls(init_lora_weights="eva", **extra)
        with pytest.raises(ValueError, match="eva_config"):
            cls(eva_config={"rho": 2.0}, **extra)


def test_whitening_of_layers_that_share_an_input():
    """Deliberate difference: each layer's A is whitened once (rows / √σ, so row norms are 1/√σ). HF PEFT 0.21
    divides the shared PCA's components in place once per layer of the group, so with q/k sharing an input both
    come out divided twice; everything else about whitening matches (test_initialisation_matches_peft)."""
    theirs, ours = _pair(["q_proj", "k_proj"], 4, 2, whiten=True)
    ref, got = _their_a(theirs), _our_a(ours)
    for k in ref:
        once = got[k].double()
        assert torch.allclose(once, got[k.replace("k_proj", "q_proj")].double())
        twice = once * once.norm(dim=1, keepdim=True)          # a second division by √σ = · ‖row‖
        assert _same_rows_up_to_sign(ref[k], twice) <= 1e-7, k
