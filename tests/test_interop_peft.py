"""HF PEFT interop, both ways: adapters written by PEFT 0.21 load in peftlab with identical outputs, and ours
load in PEFT with identical outputs (fp32, max abs difference <= 1e-5)."""
from __future__ import annotations

import json

import peft
import pytest
import torch

import peftlab
from conftest import perturb_trainable as _perturb_trainable, tiny_bert, tiny_gpt2, tiny_llama, token_batch

TOL = 1e-5

CASES = {
    "lora-all-linear": (tiny_llama, dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "lora-default-targets": (tiny_llama, dict(r=8, lora_alpha=16)),
    "rslora": (tiny_llama, dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj"])),
    "dora": (tiny_llama, dict(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear")),
    "patterns": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                  rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                                  alpha_pattern={"down_proj": 3})),
    "layers-to-transform": (tiny_llama, dict(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    "regex-targets": (tiny_llama, dict(r=4, target_modules=r".*\.(q_proj|o_proj)")),
    "exclude": (tiny_llama, dict(r=4, target_modules="all-linear", exclude_modules=["gate_proj"])),
    "embedding": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "gpt2-conv1d": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])),
    "gpt2-dora": (tiny_gpt2, dict(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_fc"])),
    "seq-cls-llama": (lambda: tiny_llama(num_labels=3), dict(r=4, task_type="SEQ_CLS", target_modules="all-linear")),
    "seq-cls-bert": (tiny_bert, dict(r=4, task_type="SEQ_CLS")),
    "bert-bias-all": (tiny_bert, dict(r=4, task_type="SEQ_CLS", bias="all")),
    "bert-bias-lora-only": (tiny_bert, dict(r=4, task_type="SEQ_CLS", bias="lora_only", target_modules=["query", "dense"])),
    "dropout-saved": (tiny_llama, dict(r=4, lora_dropout=0.1)),
}


def _out(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_to_peftlab(case, tmp_path):
    make, kw = CASES[case]
    batch = token_batch()
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**kw))
    _perturb_trainable(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = peftlab.PeftModel.from_pretrained(make(), tmp_path)
    assert (_out(ours, batch) - _out(theirs, batch)).abs().max() <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftlab_to_peft(case, tmp_path):
    make, kw = CASES[case]
    batch = token_batch()
    ours = peftlab.get_peft_model(make(), peftlab.LoraConfig(**kw))
    _perturb_trainable(ours)
    ours.eval()
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path)
    assert (_out(ours, batch) - _out(theirs, batch)).abs().max() <= TOL
    # Same tensors under the same names and shapes as PEFT would write for the same config.
    ref = peft.get_peft_model(make(), peft.LoraConfig(**kw))
    ref.save_pretrained(tmp_path / "ref")
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "adapter_model.safetensors"), load_file(tmp_path / "ref" / "adapter_model.safetensors")
    # Both store the full embedding matrix beside an embedding LoRA (save_embedding_layers="auto", PEFT's rule).
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    ours_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    ref_cfg = json.loads((tmp_path / "ref" / "adapter_config.json").read_text())
    assert set(ours_cfg) == set(ref_cfg)
    for cfg in (ours_cfg, ref_cfg):  # PEFT writes python sets as lists in arbitrary order
        if isinstance(cfg["target_modules"], list):
            cfg["target_modules"] = sorted(cfg["target_modules"])
    assert {k: ours_cfg[k] for k in ours_cfg if k != "base_model_name_or_path"} == \
        {k: ref_cfg[k] for k in ref_cfg if k != "base_model_name_or_path"}


def test_pissa_matches_peft_and_converts(tmp_path):
    batch = token_batch()
    kw = dict(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["q_proj", "v_proj", "up_proj"])
    ours = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(**kw)).eval()
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kw)).eval()
    # Same SVD -> same residual base and factors (up to sign conventions, which are LAPACK's in both).
    torch.testing.assert_close(_out(ours, batch), _out(tiny_llama(), batch), atol=1e-5, rtol=1e-5)
    q_ours = ours.base_model.model.model.layers[0].self_attn.q_proj
    q_theirs = theirs.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q_ours.base_layer.weight, q_theirs.base_layer.weight)
    torch.testing.assert_close(q_ours.adapters["default"].lora_A, q_theirs.lora_A["default"].weight)
    # PEFT's recipe: save the initial adapter, train, save with conversion -> plain LoRA of rank 2r.
    ours.peft_config["default"].init_lora_weights = True
    ours.save_pretrained(tmp_path / "init")
    ours.peft_config["default"].init_lora_weights = "pissa"
    _perturb_trainable(ours)
    trained = _out(ours, batch)
    ours.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    cfg = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["init_lora_weights"] is True
    for loader in (peftlab.PeftModel.from_pretrained, peft.PeftModel.from_pretrained):
        on_original = loader(tiny_llama(), str(tmp_path / "converted"))
        assert (_out(on_original, batch) - trained).abs().max() <= 1e-4


def test_pissa_adapter_saved_as_is_reloads_through_peft(tmp_path):
    batch = token_batch()
    kw = dict(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["q_proj", "v_proj"])
    ours = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(**kw)).eval()
    _perturb_trainable(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)  # re-derives the residual, as we do
    assert (_out(ours, batch) - _out(theirs, batch)).abs().max() <= TOL


def test_multiple_adapters_subfolders_both_ways(tmp_path):
    batch = token_batch()
    ours = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, target_modules=["q_proj"]))
    ours.add_adapter("second", peftlab.LoraConfig(r=2, target_modules=["v_proj"]))
    _perturb_trainable(ours)
    ours.set_adapter("second")
    _perturb_trainable(ours, seed=1)
    ours.eval()
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    theirs.load_adapter(str(tmp_path / "second"), adapter_name="second")
    for name in ("default", "second"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        assert (_out(ours, batch) - _out(theirs, batch)).abs().max() <= TOL


def test_mixed_batch_matches_peft(tmp_path):
    batch = token_batch()
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules="all-linear"))
    theirs.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
    _perturb_trainable(theirs)
    theirs.set_adapter("b")
    _perturb_trainable(theirs, seed=3)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    ours.load_adapter(tmp_path / "b", adapter_name="b")
    names = ["b", "__base__", "default"]
    with torch.no_grad():
        expected = theirs(**batch, adapter_names=names).logits
        got = ours(**batch, adapter_names=names).logits
    assert (got - expected).abs().max() <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_smollm2_interop_both_ways(tmp_path, dora):
    from peftlab.models import load_model
    model, tok = load_model("smollm2-135m")
    batch = tok(["The capital of France is", "A dog is an"], return_tensors="pt", padding=True)
    kw = dict(r=8, lora_alpha=16, target_modules="all-linear", use_dora=dora)
    ours = peftlab.get_peft_model(model, peftlab.LoraConfig(**kw))
    _perturb_trainable(ours, seed=5)
    ours.eval()
    ours.save_pretrained(tmp_path / "ours")
    with peftlab.hf_peft_numerics():  # PEFT's summation order: bit-identical outputs
        expected = _out(ours, batch)
    fast = _out(ours, batch)          # the default fast kernels: the same function, rounded differently
    fresh, _ = load_model("smollm2-135m")
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
    reference = _out(theirs, batch)
    diff1 = (reference - expected).abs().max().item()
    theirs.save_pretrained(tmp_path / "theirs")
    fresh2, _ = load_model("smollm2-135m")
    back = peftlab.PeftModel.from_pretrained(fresh2, tmp_path / "theirs").eval()
    with peftlab.hf_peft_numerics():
        diff2 = (_out(back, batch) - reference).abs().max().item()
    fast_rel = ((fast - reference).abs().max() / reference.abs().max()).item()
    print(f"SmolLM2 {'DoRA' if dora else 'LoRA'} interop max|diff|: peftlab->peft {diff1:.2e}, peft->peftlab "
          f"{diff2:.2e}; fast kernels vs PEFT: {fast_rel:.1e} of the largest logit")
    assert diff1 <= TOL and diff2 <= TOL
    assert fast_rel <= 1e-4  # measured 5e-6 with adapters perturbed far beyond trained ones (std 0.1)


def _perturbed_in_both(theirs, names, tmp_path):
    """Perturb each of HF PEFT's adapters `names` (distinct seeds), save them, and load the same files into peftlab."""
    for i, name in enumerate(names):
        theirs.set_adapter(name)
        _perturb_trainable(theirs, seed=i)
    theirs.save_pretrained(tmp_path)
    ours = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    for name in names[1:]:
        ours.load_adapter(tmp_path / name, adapter_name=name)
    return ours


COMBINATIONS = [("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"svd_rank": 3, "svd_clamp": 0.9}),
                ("ties", {"density": 0.5}), ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
                ("ties_svd", {"density": 0.5}), ("dare_linear", {"density": 0.5}), ("dare_ties", {"density": 0.6}),
                ("dare_linear_svd", {"density": 0.5}), ("dare_ties_svd", {"density": 0.5}),
                ("magnitude_prune", {"density": 0.4}), ("magnitude_prune_svd", {"density": 0.4, "svd_rank": 2})]


@pytest.mark.parametrize("combination,options", COMBINATIONS, ids=lambda v: str(v))
def test_add_weighted_adapter_matches_peft(combination, options, tmp_path):
    """Every combination type of HF PEFT's add_weighted_adapter, on three adapters with mixed signs of weights,
    gives PEFT's merged factors to the bit — DARE's random drops included, given the same torch seed."""
    batch = token_batch()
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    theirs.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"]))
    theirs.add_adapter("c", peft.LoraConfig(r=4, lora_alpha=16, target_modules=["v_proj", "o_proj"]))
    ours = _perturbed_in_both(theirs, ("default", "b", "c"), tmp_path)
    generator_after = []
    for model in (theirs, ours):
        torch.manual_seed(11)   # DARE draws its masks from the global generator
        model.add_weighted_adapter(["default", "b", "c"], [0.7, -0.4, 0.5], "mix", combination_type=combination,
                                   **options)
        generator_after.append(torch.get_rng_state())
        model.set_adapter("mix")
        model.eval()
    assert torch.equal(*generator_after)   # and the generator is left where PEFT leaves it
    mine = ours.adapter_state_dict("mix")
    reference = peft.get_peft_model_state_dict(theirs, adapter_name="mix")
    assert mine.keys() == reference.keys() and mine
    for k in mine:
        assert torch.equal(mine[k], reference[k]), f"{k}: max |diff| {(mine[k] - reference[k]).abs().max():.2e}"
    assert (_out(ours, batch) - _out(theirs, batch)).abs().max() <= 1e-5


@pytest.mark.parametrize("combination", ["dare_ties", "dare_linear_svd"])
def test_dare_on_embedding_adapters_matches_peft(combination, tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8,
                                                               target_modules=["embed_tokens", "q_proj"]))
    theirs.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"]))
    ours = _perturbed_in_both(theirs, ("default", "b"), tmp_path)
    for model in (theirs, ours):
        torch.manual_seed(5)
        model.add_weighted_adapter(["default", "b"], [0.6, 0.8], "mix", combination_type=combination, density=0.5)
    mine = ours.adapter_state_dict("mix")
    reference = {k: v for k, v in peft.get_peft_model_state_dict(theirs, adapter_name="mix").items()
                 if "lora_" in k}   # PEFT also stores the (unchanged) embedding weight beside an embedding adapter
    assert mine.keys() == reference.keys() and any("embed_tokens" in k for k in mine)
    for k in mine:
        assert torch.equal(mine[k], reference[k]), k


def test_ia3_add_weighted_adapter_matches_peft(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                              feedforward_modules=["down_proj"]))
    theirs.add_adapter("b", peft.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ours = _perturbed_in_both(theirs, ("default", "b"), tmp_path)
    for model in (theirs, ours):
        model.add_weighted_adapter(["default", "b"], [0.7, 0.6], "mix")
        model.set_adapter("mix")
        model.eval()
    mine, reference = ours.adapter_state_dict("mix"), peft.get_peft_model_state_dict(theirs, adapter_name="mix")
    assert mine.keys() == reference.keys() and len(mine) == 6   # k, v and down in each of the 2 blocks
    for k in mine:
        assert torch.equal(mine[k], reference[k]), k
    assert (_out(ours, token_batch()) - _out(theirs, token_batch())).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="combine as a weighted sum.*combination_type='ties' does not apply"):
        ours.add_weighted_adapter(["default", "b"], [1, 1], "m2", combination_type="ties", density=0.5)


def test_add_weighted_adapter_errors_name_the_fix():
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("b", peftlab.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="'ties' merges the factors entry by entry and needs equal ranks"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "m", combination_type="ties", density=0.5)
    with pytest.raises(ValueError, match="give density=..."):
        model.add_weighted_adapter(["default", "b"], [1, 1], "m", combination_type="dare_ties_svd")
    with pytest.raises(ValueError, match="combination_type must be one of linear, ties, .*; got 'tie'"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "m", combination_type="tie")
    with pytest.raises(ValueError, match="majority_sign_method must be one of"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "m", combination_type="ties_svd", density=0.5,
                                   majority_sign_method="most")
    with pytest.raises(ValueError, match="an adapter named 'b' exists already"):
        model.add_weighted_adapter(["default"], [1], "b")
