"""LoraConfig fields beyond plain LoRA against the real `peft`: lora_bias, init_lora_weights="olora",
trainable_token_indices, target_parameters, layer_replication. Adapters load both ways with identical outputs, with
PEFT's keys and shapes and config fields; plus each feature's own semantics (what trains, merging, fused paths)."""
from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftlab
from conftest import perturb_trainable, tiny_bert, tiny_gpt2, tiny_llama, token_batch

TOL = 1e-5


def tiny_mixtral(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, pad_token_id=0)
    return MixtralForCausalLM(cfg).eval()


CASES = {
    "lora-bias-bert": (tiny_bert, dict(r=4, lora_bias=True, task_type="SEQ_CLS",
                                       target_modules=["query", "value", "dense"])),
    "lora-bias-llama-no-base-bias": (tiny_llama, dict(r=4, lora_bias=True, target_modules="all-linear")),
    "olora": (tiny_llama, dict(r=4, lora_alpha=8, init_lora_weights="olora",
                               target_modules=["q_proj", "v_proj", "up_proj"])),
    "trainable-tokens": (tiny_llama, dict(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 5, 7])),
    "trainable-tokens-tied-gpt2": (tiny_gpt2, dict(r=4, target_modules=["c_attn"], trainable_token_indices=[3, 9])),
    "trainable-tokens-dict": (tiny_llama, dict(r=4, target_modules=["v_proj"],
                                               trainable_token_indices={"embed_tokens": [1, 2], "lm_head": [4]})),
    "target-parameters-2d": (tiny_llama, dict(r=4, target_modules=[],
                                              target_parameters=["self_attn.q_proj.weight", "mlp.down_proj.weight"])),
    "target-parameters-moe": (tiny_mixtral, dict(r=4, lora_alpha=8, target_modules=[],
                                                 target_parameters=["mlp.experts.gate_up_proj",
                                                                    "mlp.experts.down_proj"])),
    "target-parameters-and-modules": (tiny_mixtral, dict(r=2, target_modules=["q_proj"],
                                                         target_parameters=["mlp.experts.down_proj"])),
    "layer-replication": (tiny_llama, dict(r=4, target_modules=["q_proj", "v_proj"],
                                           layer_replication=[[0, 2], [1, 2]])),
}


def _logits(model, batch=None):
    with torch.no_grad():
        return model(**(batch or token_batch())).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_in_peftlab(case, tmp_path):
    make, kw = CASES[case]
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**kw))
    perturb_trainable(theirs)
    theirs.eval().save_pretrained(tmp_path)
    ours = peftlab.PeftModel.from_pretrained(make(), tmp_path)
    assert (_logits(ours) - _logits(theirs)).abs().max() <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftlab_adapter_loads_in_peft_with_peft_keys(case, tmp_path):
    make, kw = CASES[case]
    ours = peftlab.get_peft_model(make(), peftlab.LoraConfig(**kw))
    if "layer_replication" not in kw:  # a replicated model computes something else from the start, as in PEFT
        assert (_logits(ours) - _logits(make())).abs().max() <= TOL
    perturb_trainable(ours)
    ours.eval().save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    assert (_logits(ours) - _logits(theirs)).abs().max() <= TOL
    ref = peft.get_peft_model(make(), peft.LoraConfig(**kw))
    ref.save_pretrained(tmp_path / "ref")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "ref"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    ours_cfg, ref_cfg = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "ref"))
    for cfg in (ours_cfg, ref_cfg):  # PEFT keeps these as sets for some models (Mixtral): written in any order
        for key in ("target_modules", "target_parameters"):
            if isinstance(cfg[key], list):
                cfg[key] = sorted(cfg[key])
    skip = {"base_model_name_or_path", "peft_version"}
    assert {k: v for k, v in ours_cfg.items() if k not in skip} == {k: v for k, v in ref_cfg.items() if k not in skip}


# -- lora_bias ---------------------------------------------------------------------------------------------------
def _bias_model(make=tiny_bert, targets=("query", "key", "value")):
    model = peftlab.get_peft_model(make(), peftlab.LoraConfig(r=4, lora_bias=True, target_modules=list(targets)))
    perturb_trainable(model)
    return model


def test_lora_bias_has_no_lowrank_operands_and_fused_paths_compute_it(tmp_path):
    """The layer's function is W x + b + s(B A x + b_B): the operand protocol must not describe it as plain LoRA, and
    the training forward/backward (siblings q/k/v share one input) equals PEFT's on the same weights."""
    ours = _bias_model(tiny_llama, ("q_proj", "k_proj", "v_proj", "up_proj"))
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    adapter = layer.adapters["default"]
    x = torch.randn(2, 3, 32, requires_grad=True)
    assert adapter.lowrank_operands(layer.base_layer) is None
    assert not adapter.joins_sibling_group(x, layer.base_layer)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    batch = dict(token_batch(), labels=token_batch()["input_ids"])
    losses = []
    for model in (ours, theirs):
        model.train()
        model(**batch)  # the first training forward lets sibling fusion learn its groups
        out = model(**batch)
        out.loss.backward()
        losses.append(out.loss.detach())
    assert (losses[0] - losses[1]).abs() <= 1e-5
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    checked = 0
    for name, p in ours.named_parameters():
        if name.endswith("lora_B_bias"):
            ref = grads[name.replace("adapters.default.lora_B_bias", "lora_B.default.bias")]
            assert (p.grad - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())
            checked += 1
    assert checked == 8


def test_lora_bias_in_mixed_batches_and_merging():
    model = _bias_model()
    model.add_adapter("other", peftlab.LoraConfig(r=4, target_modules=["query", "value"]))
    perturb_trainable(model, seed=3)
    model.eval()
    batch = token_batch()
    mixed = model(**batch, adapter_names=["default", "other", "__base__"]).logits
    rows = []
    for i, name in enumerate(["default", "other"]):
        model.set_adapter(name)
        rows.append(_logits(model)[i])
    with model.disable_adapter():
        rows.append(_logits(model)[2])
    assert (mixed - torch.stack(rows)).abs().max() <= TOL
    model.set_adapter("default")
    before = _logits(model)
    merged = model.merge_and_unload()
    assert (_logits(merged) - before).abs().max() <= 1e-5


def test_lora_bias_cannot_merge_without_a_base_bias():
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, lora_bias=True))
    with pytest.raises(RuntimeError, match="without a bias"):
        model.merge_and_unload()


# -- trainable_token_indices ---------------------------------------------------------------------------------------
def test_only_the_given_token_rows_train_and_tied_head_follows():
    model = peftlab.get_peft_model(tiny_gpt2(), peftlab.LoraConfig(r=4, target_modules=["c_attn"],
                                                                     trainable_token_indices=[3, 9]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum("trainable_tokens" in n or n.endswith(".delta") for n in names) == 1
    wte = model.base_model.model.transformer.wte
    frozen = wte.base_layer.weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    model(**token_batch(), labels=token_batch()["input_ids"]).loss.backward()
    opt.step()
    model.eval()
    assert torch.equal(wte.base_layer.weight, frozen)  # the matrix itself never changes
    merged_w = wte.adapters["default"].merged_weight(wte.base_layer)
    changed = (merged_w != frozen).any(1).nonzero().flatten().tolist()
    assert changed == [3, 9]
    # the tied lm_head reads the same rows: merging gives the same logits, unmerging the original weight back
    before = _logits(model)
    model.merge_adapter()
    assert (_logits(model) - before).abs().max() <= TOL
    model.unmerge_adapter()
    assert torch.equal(wte.base_layer.weight, frozen)
    with model.disable_adapter():
        assert (_logits(model) - _logits(tiny_gpt2())).abs().max() <= TOL


def test_trainable_tokens_refuse_clashes():
    with pytest.raises(ValueError, match="modules_to_save"):
        peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, modules_to_save=["embed_tokens"],
                                                                  trainable_token_indices=[1]))
    with pytest.raises(ValueError, match="target_modules"):
        peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, target_modules=["embed_tokens"],
                                                                  trainable_token_indices=[1]))
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, trainable_token_indices=[500]))


# -- target_parameters -------------------------------------------------------------------------------------------
def test_target_parameters_merge_disable_unload_and_refusals():
    model = peftlab.get_peft_model(tiny_mixtral(), peftlab.LoraConfig(
        r=4, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    perturb_trainable(model)
    model.eval()
    before = _logits(model)
    assert (before - _logits(tiny_mixtral())).abs().max() > 1e-3
    with model.disable_adapter():
        assert (_logits(model) - _logits(tiny_mixtral())).abs().max() <= TOL
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        model(**token_batch(), adapter_names=["default", "__base__", "default"])
    model.merge_adapter()
    assert (_logits(model) - before).abs().max() <= 1e-5
    model.unmerge_adapter()
    plain = model.unload()
    assert type(plain.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert (_logits(plain) - _logits(tiny_mixtral())).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="lora_dropout"):
        peftlab.LoraConfig(target_parameters=["experts.down_proj"], lora_dropout=0.1)
    with pytest.raises(ValueError, match="matched no parameter"):
        peftlab.get_peft_model(tiny_mixtral(), peftlab.LoraConfig(target_modules=[], target_parameters=["nope"]))


# -- layer_replication -------------------------------------------------------------------------------------------
def test_layer_replication_shares_base_weights_and_refuses_merge():
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, layer_replication=[[0, 2], [1, 2]]))
    layers = model.base_model.model.model.layers
    assert len(layers) == 3 and model.config.num_hidden_layers == 3
    assert layers[1].mlp.up_proj.weight is layers[2].mlp.up_proj.weight
    assert layers[1].self_attn.q_proj.adapters["default"] is not layers[2].self_attn.q_proj.adapters["default"]
    assert [l.self_attn.layer_idx for l in layers] == [0, 1, 2]
    with pytest.raises(TypeError, match="replicated"):
        model.merge_and_unload()
    out = model.generate(**token_batch(), max_new_tokens=3, do_sample=False)  # the KV cache sees 3 layers
    assert out.shape[1] == 10


# -- fields not implemented stay refused, and variants refuse what they do not implement ---------------------------
@pytest.mark.parametrize("kw,match", [(dict(init_lora_weights="loftq"), "needs a loftq_config"),
                                      (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 2}), "4 .NF4. or 8"),
                                      (dict(use_qalora=True), "use_qalora")])
def test_unimplemented_fields_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        peftlab.LoraConfig(**kw)


def test_variants_refuse_features_they_do_not_implement():
    with pytest.raises(ValueError, match="LoraFaConfig"):
        peftlab.LoraFaConfig(lora_bias=True)
    with pytest.raises(ValueError, match="init_lora_weights"):
        peftlab.AdaLoraConfig(total_step=10, init_lora_weights="olora")
    with pytest.raises(ValueError, match="lora_bias=True works with"):
        peftlab.LoraConfig(lora_bias=True, init_lora_weights="olora")
