"""UniPELT and MAM: the gate equations on small tensors, both hybrids against their parts stacked as separate
adapters, limits of the gates, generate() with padded batches and caches, saving, the unmergeable contract."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import peftlab
from conftest import tiny_bert, tiny_llama, token_batch
from peftlab.core.config import PEFT_FORMAT_VERSION, PeftConfig
from peftlab.core.prompt import SAVED_KEY, encoders, prefix_cache
from peftlab.methods.unipelt import PrefixGate

N = 3  # virtual tokens


def _unipelt(make=tiny_llama, **kw):
    cfg = dict(num_virtual_tokens=N, r=4, lora_alpha=4, bottleneck_size=6, encoder_hidden_size=12)
    return peftlab.get_peft_model(make(), peftlab.UniPeltConfig(**{**cfg, **kw}))


def _mam(make=tiny_llama, **kw):
    cfg = dict(num_virtual_tokens=N, bottleneck_size=6, encoder_hidden_size=12, scaling=2.0)
    return peftlab.get_peft_model(make(), peftlab.MamConfig(**{**cfg, **kw}))


def _perturb(model, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def _logits(model, batch, **kw):
    with torch.no_grad():
        return model(**batch, **kw).logits


def _set_gates(model, bias: float):
    """Gates of every kind to a constant σ(bias)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "gate" in name:  # lora_gate, adapter_gate, prefix_gates
                p.fill_(bias if name.endswith("bias") else 0.0)


def _copy_layer_adapters(src, dst, src_name="default", rename=None):
    """Copy layer-adapter tensors between models with the same modules (adapter names swapped)."""
    own = dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in src.named_parameters():
            if f".adapters.{src_name}." in name and "gate" not in name:
                target = rename(name) if rename else name
                if target in own:
                    own[target].copy_(p)


def test_gated_lora_and_gated_adapter_equations():
    model = _unipelt().eval()
    _perturb(model, std=0.3)
    q = model.model.model.layers[0].self_attn.q_proj
    gated = q.adapters["default"]
    x = torch.randn(2, 5, 32)
    g = torch.sigmoid(x @ gated.lora_gate.weight.t() + gated.lora_gate.bias)                  # (2, 5, 1)
    lora = gated.lora
    expected = q.base_layer(x) + g * lora.scale * (x @ lora.lora_A.t() @ lora.lora_B.t())
    torch.testing.assert_close(q(x), expected, atol=1e-6, rtol=1e-5)
    down = model.model.model.layers[1].mlp.down_proj
    ad = down.adapters["default"]
    u = torch.randn(2, 5, 64)
    h = down.base_layer(u)
    f = ad.adapter_up(torch.relu(ad.adapter_down(h)))
    torch.testing.assert_close(down(u), h + torch.sigmoid(ad.adapter_gate(h)) * f, atol=1e-6, rtol=1e-5)


def test_gated_prefix_attention_equation():
    """softmax over [q·P_k/√d + log g(x), q·k/√d (causal)] against [P_v; v], by hand, for layer 0."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    model = _unipelt().eval()
    _perturb(model, std=0.5)  # gates vary per token; LoRA on q/v is part of the projections below
    llama = model.model
    attn = llama.model.layers[0].self_attn
    b, q_len, heads, kv_heads, hd = 2, 5, 4, 2, 8
    h = torch.randn(b, q_len, 32)
    pos = torch.arange(N, N + q_len).unsqueeze(0).expand(b, -1)
    cos, sin = llama.model.rotary_emb(h, pos)
    cache = prefix_cache(llama, encoders(llama)["default"](), model.peft_config["default"], b)
    cache.peftlab_prefix_owner = "default"
    pk, pv = cache.layers[0].keys.clone(), cache.layers[0].values.clone()         # (b, kv_heads, N, hd)
    with torch.no_grad():
        got, _ = attn(hidden_states=h, position_embeddings=(cos, sin), attention_mask=None, past_key_values=cache)
        qs = attn.q_proj(h).view(b, q_len, heads, hd).transpose(1, 2)
        ks = attn.k_proj(h).view(b, q_len, kv_heads, hd).transpose(1, 2)
        vs = attn.v_proj(h).view(b, q_len, kv_heads, hd).transpose(1, 2)
        qs, ks = apply_rotary_pos_emb(qs, ks, cos, sin)
        K = torch.cat([pk, ks], 2).repeat_interleave(heads // kv_heads, 1)         # (b, heads, N+q, hd)
        V = torch.cat([pv, vs], 2).repeat_interleave(heads // kv_heads, 1)
        logits = qs @ K.transpose(-1, -2) / math.sqrt(hd)                          # (b, heads, q, N+q)
        gate = encoders(llama)["default"].prefix_gates[0]
        logits[..., :N] += torch.log(torch.sigmoid(gate(h))).transpose(1, 2).unsqueeze(-1)
        causal = torch.ones(q_len, q_len, dtype=torch.bool).tril()
        logits[..., N:] = logits[..., N:].masked_fill(~causal, float("-inf"))
        out = (logits.softmax(-1) @ V).transpose(1, 2).reshape(b, q_len, heads * hd)
        torch.testing.assert_close(got, attn.o_proj(out), atol=1e-5, rtol=1e-5)
    assert any(isinstance(hk, PrefixGate) for hk in attn._forward_pre_hooks.values())


def test_unipelt_with_open_gates_is_lora_plus_prefix_plus_adapter():
    batch = token_batch()
    model = _unipelt().eval()
    _perturb(model)
    _set_gates(model, 40.0)  # σ = 1: UniPELT reduces to its three parts
    ref = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, lora_alpha=4), adapter_name="l")
    ref.add_adapter("p", peftlab.PrefixTuningConfig(num_virtual_tokens=N))
    ref.add_adapter("a", peftlab.BottleneckConfig(bottleneck_size=6, placement="ffn"))
    ref.set_adapter(["l", "p", "a"])
    encoders(ref.model)["p"].load_folded(model.adapter_state_dict()["base_model.model." + SAVED_KEY], "p")
    _copy_layer_adapters(model, ref, rename=lambda n: n.replace(".adapters.default.lora.", ".adapters.l.")
                         .replace(".adapters.default.", ".adapters.a."))
    torch.testing.assert_close(_logits(ref.eval(), batch), _logits(model, batch), atol=1e-5, rtol=1e-5)


def test_unipelt_with_closed_gates_is_the_base_model():
    batch = token_batch()
    model = _unipelt().eval()
    _perturb(model)
    _set_gates(model, -40.0)  # σ ≈ 4e-18: every part switched off, the prefix included
    real = batch["attention_mask"].bool()  # (a padding position attends only to the prefix: its output is moot)
    base = _logits(tiny_llama(), batch)
    torch.testing.assert_close(_logits(model, batch)[real], base[real], atol=1e-5, rtol=1e-5)


def test_mam_is_prefix_plus_parallel_adapter():
    batch = token_batch()
    model = _mam().eval()
    _perturb(model)
    ref = peftlab.get_peft_model(tiny_llama(), peftlab.PrefixTuningConfig(num_virtual_tokens=N), adapter_name="p")
    ref.add_adapter("a", peftlab.BottleneckConfig(adapter_type="parallel", bottleneck_size=6, scaling=2.0))
    ref.set_adapter(["p", "a"])
    encoders(ref.model)["p"].load_folded(model.adapter_state_dict()["base_model.model." + SAVED_KEY], "p")
    _copy_layer_adapters(model, ref, rename=lambda n: n.replace(".adapters.default.", ".adapters.a."))
    torch.testing.assert_close(_logits(ref.eval(), batch), _logits(model, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build", [_unipelt, _mam], ids=["unipelt", "mam"])
def test_generate_padded_rows_and_cache_match(build):
    model = build().eval()
    _perturb(model, std=0.5)
    ids = torch.tensor([[0, 0, 0, 17, 5, 9], [3, 44, 8, 61, 12, 7]])
    mask = (ids != 0).long()
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    out = model.generate(input_ids=ids, attention_mask=mask, **gen)
    for row in range(2):
        alone = ids[row:row + 1, mask[row].bool()]
        assert torch.equal(model.generate(input_ids=alone, **gen)[0, -5:], out[row, -5:]), row
    with torch.no_grad():  # per-token gates: a cached step computes what the full forward computes
        full = model(input_ids=ids[1:]).logits[:, -1]
        first = model(input_ids=ids[1:, :-1], use_cache=True)
        step = model(input_ids=ids[1:, -1:], past_key_values=first.past_key_values).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build", [_unipelt, _mam], ids=["unipelt", "mam"])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_train_save_load_disable_merge_unload(build, arch, tmp_path):
    make = tiny_llama if arch == "llama" else tiny_bert
    task = "CAUSAL_LM" if arch == "llama" else "SEQ_CLS"
    batch = token_batch()
    labels = batch["input_ids"] if arch == "llama" else torch.tensor([0, 1, 2])
    model = build(make, task_type=task)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.eval()  # dropout off for a deterministic curve
    losses = []
    for _ in range(10):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.03, losses
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path)
    loaded = peftlab.PeftModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=1e-5, rtol=1e-5)
    base = _logits(make(), batch)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, batch), base, atol=1e-6, rtol=1e-6)
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="mixed-adapter"):
        model(**batch, adapter_names=["default"] * 3)
    plain = copy.deepcopy(model).unload()
    assert not any(type(m).__module__.startswith("peftlab") for m in plain.modules())
    assert not any(isinstance(h, PrefixGate) for m in plain.modules() for h in m._forward_pre_hooks.values())
    if task == "CAUSAL_LM":  # (unload keeps a trained classification head, as HF PEFT's does)
        torch.testing.assert_close(_logits(plain, batch), base, atol=1e-6, rtol=1e-6)


def test_registered_as_hybrids():
    for name in ("unipelt", "mam"):
        info = peftlab.get_method(name)
        assert (info.category, info.mergeable, info.identity_at_init) == ("hybrid", False, False)
    with pytest.raises(ValueError, match="bottleneck_size"):
        peftlab.MamConfig(bottleneck_size=0)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        peftlab.UniPeltConfig(num_virtual_tokens=0)


@pytest.mark.parametrize("cls", ["MamConfig", "UniPeltConfig"])
def test_prefix_part_checked_as_prefix_tuning(cls):
    with pytest.raises(ValueError, match="init_weights"):
        getattr(peftlab, cls)(init_weights="zeros")


def test_unipelt_target_modules_move_only_its_lora():
    """target_modules is LoRA's: the gated adapter stays after every FFN (it once followed the LoRA targets)."""
    layer = _unipelt(target_modules=["q_proj"]).model.model.layers[0]
    assert type(layer.self_attn.q_proj.adapters["default"]).__name__ == "GatedLora"
    assert not hasattr(layer.self_attn.v_proj, "adapters")
    assert layer.mlp.down_proj.adapters["default"].adapter_gate is not None


# adapter_config.json's keys and defaults as MAM and UniPELT wrote them while each config declared its own prefix and
# bottleneck fields (before they composed PrefixFields and BottleneckFields): frozen, so that files saved then load
# and files saved now are the same
_PARTS = dict(auto_mapping=None, base_model_name_or_path=None, inference_mode=False, peft_version=PEFT_FORMAT_VERSION,
              revision=None, task_type=None, modules_to_save=None, token_dim=None, num_attention_heads=None,
              num_layers=None, num_transformer_submodules=None, init_weights=None, prefix_projection=True,
              encoder_hidden_size=512, non_linearity="relu", adapter_dropout=0.0, layers_to_transform=None)
_SAVED_BEFORE = {
    "MAM": dict(_PARTS, peft_type="MAM", num_virtual_tokens=30, bottleneck_size=512, scaling=4.0),
    "UNIPELT": dict(_PARTS, peft_type="UNIPELT", num_virtual_tokens=10, bottleneck_size=48, scaling=1.0, r=8,
                    lora_alpha=8, lora_dropout=0.0, target_modules=None),
}


@pytest.mark.parametrize("peft_type", sorted(_SAVED_BEFORE))
def test_config_file_keys_and_defaults_unchanged(peft_type):
    saved = _SAVED_BEFORE[peft_type]
    assert PeftConfig.from_dict({"peft_type": peft_type}).to_dict() == saved
    filled = dict(saved, inference_mode=True, token_dim=16, num_attention_heads=2, num_layers=2,
                  num_transformer_submodules=1, non_linearity="gelu", layers_to_transform=[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unknown key would be dropped with a warning
        assert PeftConfig.from_dict(filled).to_dict() == filled
