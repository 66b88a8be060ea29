"""WeGeFT against its equation y = W x + b + s·(W φᵀ)(ψ x) on small tensors and through a tiny LLaMA written out
with plain autograd; φ/ψ sharing across blocks, files, merging, unloading, refusals and config errors."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

import peftlab
from conftest import perturb_trainable, tiny_gpt2, tiny_llama, token_batch
from peftlab.core.tuner import adapted_layers
from peftlab.methods.wegeft import WeGeFTFactors, WeGeFTLinear
from test_qlora import load as load_quantised, tiny_dir  # noqa: F401 - tiny_dir is a fixture used below


def _layer(d_in=6, d_out=5, r=3, scale=1.5, conv1d=False, dropout=0.0, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    base = (Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out)).to(dtype).requires_grad_(False)
    with torch.no_grad():
        base.bias.normal_()  # Conv1D starts with a zero bias
    factors = WeGeFTFactors(r, d_in).to(dtype)
    with torch.no_grad():
        factors.wegeft_phi.normal_()  # off its zero init, so the update is not zero
    return base, WeGeFTLinear(factors, True, scale, dropout, fan_in_fan_out=conv1d)


def _paper(x, W, b, phi, psi, s):
    """The paper's equation, plain autograd: W x + b + s·(W φᵀ)(ψ x), W as (d_out, d_in)."""
    return F.linear(x, W, b) + s * F.linear(F.linear(x, psi), W @ phi.t())


def _grads(y, g, *tensors):
    return torch.autograd.grad(y, tensors, g)


def _leaf_copies(factors):
    """φ and ψ as fresh leaves, for the plain-autograd reference."""
    return tuple(t.detach().clone().requires_grad_(True) for t in (factors.wegeft_phi, factors.wegeft_psi))


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "base-output-given"])
def test_layer_output_and_gradients_follow_the_equation(fused, conv1d):
    base, a = _layer(conv1d=conv1d)
    W = base.weight.t() if conv1d else base.weight
    x = torch.randn(4, 3, 6, requires_grad=True)
    y = a(x, base, None if fused else base(x))
    phi, psi = _leaf_copies(a.factors)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = _paper(x_ref, W, base.bias, phi, psi, a.scale)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    got = _grads(y, g, x, a.factors.wegeft_phi, a.factors.wegeft_psi)
    for mine, want in zip(got, _grads(y_ref, g, x_ref, phi, psi)):
        torch.testing.assert_close(mine, want)
    with torch.no_grad():  # the inference kernel (W + s·BA formed once for many rows), and merging
        torch.testing.assert_close(a(x, base, None), y_ref)
        delta = a.delta_weight(base)
        torch.testing.assert_close(F.linear(x, W + (delta.t() if conv1d else delta), base.bias), y_ref)


def test_fused_layer_gradcheck_float64():
    base, a = _layer(dtype=torch.float64)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    phi, psi = _leaf_copies(a.factors)

    def fn(x, phi, psi):
        params = {"factors.wegeft_phi": phi, "factors.wegeft_psi": psi}
        return torch.func.functional_call(a, params, (x, base, None))

    assert torch.autograd.gradcheck(fn, (x, phi, psi))


def test_dropout_drops_W_inside_the_generated_factor_only():
    base, a = _layer(dropout=0.3)
    x = torch.randn(4, 6)
    a.train()
    torch.manual_seed(7)
    y = a(x, base, None)
    torch.manual_seed(7)
    dropped = F.dropout(base.weight, 0.3)
    phi, psi = a.factors.wegeft_phi, a.factors.wegeft_psi
    expected = F.linear(x, base.weight, base.bias) + a.scale * F.linear(F.linear(x, psi), dropped @ phi.t())
    torch.testing.assert_close(y, expected)
    a.eval()
    torch.testing.assert_close(a(x, base, None), _paper(x, base.weight, base.bias, phi, psi, a.scale))


def _model(**kw):
    return peftlab.get_peft_model(tiny_llama(), peftlab.WeGeFTConfig(**{"r": 4, "target_modules": "all-linear", **kw}))


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_model_unchanged_at_init_and_changed_with_random_phi():
    batch = token_batch()
    base = _logits(tiny_llama(), batch)
    torch.testing.assert_close(_logits(_model(), batch), base, atol=0, rtol=0)
    assert (_logits(_model(init_wegeft_weights=False), batch) - base).abs().max() > 1e-3


class _PaperLinear(nn.Module):
    """A target layer written out as the paper's equation, with its group's φ/ψ passed in (shared objects)."""

    def __init__(self, linear: nn.Linear, phi: torch.Tensor, psi: torch.Tensor, scale: float):
        super().__init__()
        self.linear, self.phi, self.psi, self.scale = linear, phi, psi, scale

    def forward(self, x):
        return _paper(x, self.linear.weight, self.linear.bias, self.phi, self.psi, self.scale)


def _paper_model(peft_model):
    """The base model with every adapted layer replaced by _PaperLinear, one φ/ψ copy per WeGeFT group."""
    reference = tiny_llama()
    copies = {}
    for name, layer in adapted_layers(peft_model.model):
        adapter = layer.adapters["default"]
        pair = copies.setdefault(id(adapter.factors), _leaf_copies(adapter.factors))
        parent, _, child = name.rpartition(".")
        target = reference.get_submodule(parent)
        setattr(target, child, _PaperLinear(getattr(target, child), *pair, adapter.scale))
    return reference.requires_grad_(False), copies  # φ/ψ are plain leaf tensors, not the module's parameters


def _step(model, batch):
    out = model(**batch).logits
    out.pow(2).mean().backward()
    return out.detach()


def test_model_matches_the_equation_written_out_with_shared_factors():
    """Whole-model outputs and φ/ψ gradients against plain autograd, on the per-layer path (first training step)
    and with sibling fusion (q/k/v and gate/up as one node, from the second step on)."""
    model = _model()
    perturb_trainable(model, seed=3, std=0.2)
    reference, copies = _paper_model(model)
    model.train(), reference.train()
    batch = token_batch()
    expected = _step(reference, batch)
    for step in range(2):  # step 0 records which layers share an input, step 1 computes them as groups
        grad_fns = []
        hooks = [layer.register_forward_hook(lambda m, i, o: grad_fns.append(type(o.grad_fn).__name__))
                 for _, layer in adapted_layers(model.model)]
        torch.testing.assert_close(_step(model, batch), expected, atol=1e-5, rtol=1e-5)
        for h in hooks:
            h.remove()
        assert ("_LowRankGroupBackward" in grad_fns) == (step == 1), grad_fns
        for _, layer in adapted_layers(model.model):
            factors = layer.adapters["default"].factors
            phi, psi = copies[id(factors)]
            torch.testing.assert_close(factors.wegeft_phi.grad, phi.grad, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(factors.wegeft_psi.grad, psi.grad, atol=1e-6, rtol=1e-5)
        model.zero_grad()


def test_one_pair_per_module_type_across_blocks():
    shared, separate = _model(), _model(share_across_layers=False)
    groups = {}
    for name, layer in adapted_layers(shared.model):
        groups.setdefault(id(layer.adapters["default"].factors), []).append(name)
    # 7 linear types in each of the 2 blocks: one pair per type, owned by block 0's layer
    assert sorted(len(names) for names in groups.values()) == [2] * 7
    assert all(n[0].replace(".0.", ".1.") == n[1] for n in groups.values())
    assert {id(layer.adapters["default"].factors) for _, layer in adapted_layers(separate.model)}.__len__() == 14
    # φ, ψ are r × d_in: d_in = 32 everywhere but down_proj (64)
    per_block = 2 * 4 * (6 * 32 + 64)
    assert shared.get_nb_trainable_parameters()[0] == per_block
    assert separate.get_nb_trainable_parameters()[0] == 2 * per_block


def test_shared_gradient_accumulates_from_every_layer_of_the_group():
    base_a, a = _layer(seed=0)
    base_b, _ = _layer(seed=1)
    b = WeGeFTLinear(a.factors, False, a.scale)  # the second layer of a's group
    x, z = torch.randn(5, 6), torch.randn(5, 6)
    (a(x, base_a, None).sum() + b(z, base_b, None).sum()).backward()
    phi, psi = _leaf_copies(a.factors)
    each = [torch.autograd.grad(_paper(v, base.weight, base.bias, phi, psi, a.scale).sum(), (phi, psi))
            for v, base in ((x, base_a), (z, base_b))]
    torch.testing.assert_close(a.factors.wegeft_phi.grad, each[0][0] + each[1][0])
    torch.testing.assert_close(a.factors.wegeft_psi.grad, each[0][1] + each[1][1])
    assert each[1][0].abs().sum() > 0  # the second layer really contributes


@pytest.mark.parametrize("share", [True, False], ids=["shared", "per-layer"])
def test_save_load_round_trip(share, tmp_path):
    model = _model(share_across_layers=share)
    perturb_trainable(model, seed=1, std=0.2)
    batch = token_batch()
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "WEGEFT" and config["share_across_layers"] is share and config["r"] == 4
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    blocks = {k.split("layers.")[1].split(".")[0] for k in keys}
    assert len(keys) == 2 * (7 if share else 14) and blocks == ({"0"} if share else {"0", "1"})
    assert "base_model.model.model.layers.0.mlp.down_proj.wegeft_psi" in keys
    loaded = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=0, rtol=0)
    trainable = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()


def test_a_file_with_tensors_for_a_non_owning_layer_is_a_clear_error(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    extra = {k.replace("layers.0.", "layers.1."): v for k, v in tensors.items() if "q_proj" in k}
    with pytest.raises(KeyError, match=r"layers\.1\.self_attn\.q_proj.*expected nothing"):
        peftlab.set_peft_model_state_dict(_model(), {**tensors, **extra})


def test_merge_unmerge_merge_and_unload_and_unload():
    batch = token_batch()
    model = _model()
    perturb_trainable(model, seed=2, std=0.2)
    base_state = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    unmerged = _logits(model, batch)
    assert (unmerged - _logits(tiny_llama(), batch)).abs().max() > 1e-3
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, batch), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()  # W recovered from the merged W' through an r × r solve, not from a kept copy
    for k, v in model.get_base_model().state_dict().items():
        if k in base_state:
            torch.testing.assert_close(v, base_state[k], atol=1e-6, rtol=1e-6, msg=k)
    merged = _model()
    perturb_trainable(merged, seed=2, std=0.2)
    plain = merged.merge_and_unload()
    assert not any(type(m).__module__.startswith("peftlab") for m in plain.modules())
    torch.testing.assert_close(_logits(plain, batch), unmerged, atol=1e-5, rtol=1e-5)
    never_merged = _model()
    perturb_trainable(never_merged, seed=2, std=0.2)
    restored = never_merged.unload()
    assert restored.state_dict().keys() == base_state.keys()
    for k, v in restored.state_dict().items():
        torch.testing.assert_close(v, base_state[k], atol=0, rtol=0, msg=k)


def test_conv1d_model_merges_to_the_same_outputs():
    batch = token_batch()
    model = peftlab.get_peft_model(tiny_gpt2(), peftlab.WeGeFTConfig(r=4, target_modules="all-linear"))
    perturb_trainable(model, seed=4, std=0.2)
    groups = {id(layer.adapters["default"].factors) for _, layer in adapted_layers(model.model)}
    assert len(groups) == 4  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj: one pair each over both blocks
    unmerged = _logits(model, batch)
    torch.testing.assert_close(_logits(model.merge_and_unload(), batch), unmerged, atol=1e-5, rtol=1e-5)


def test_mixed_batch_rows_get_their_own_adapter():
    batch = token_batch()
    model = _model()
    model.add_adapter("other", peftlab.WeGeFTConfig(r=2, target_modules="all-linear", init_wegeft_weights=False))
    perturb_trainable(model, seed=5, std=0.2)
    model.eval()
    per_adapter = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        per_adapter[name] = _logits(model, batch)
    names = ["other", "default", "other"]
    mixed = _logits(model, {**batch, "adapter_names": names})
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], per_adapter[name][row], atol=1e-5, rtol=1e-5)


def test_quantised_base_is_refused_and_left_unwrapped(tiny_dir):  # noqa: F811 - the imported fixture
    base = load_quantised(tiny_dir, "nf4")
    with pytest.raises(ValueError, match=r"WeGeFT cannot adapt model\.layers\.0\.self_attn\.q_proj: its weight is "
                                         r"quantised \(nf4\).*unquantised.*LoRA"):
        peftlab.get_peft_model(base, peftlab.WeGeFTConfig(r=4, target_modules="all-linear"))
    assert not list(adapted_layers(base))


@pytest.mark.parametrize("field,value,message", [
    ("r", 0, "r must be a positive integer"),
    ("r", -2, "r must be a positive integer"),
    ("r", 2.5, "r must be a positive integer"),
    ("wegeft_alpha", 0, "wegeft_alpha must be a positive finite number"),
    ("wegeft_alpha", float("nan"), "wegeft_alpha must be a positive finite number"),
    ("wegeft_dropout", 1.0, r"wegeft_dropout is a probability in \[0, 1\)"),
    ("wegeft_dropout", -0.1, r"wegeft_dropout is a probability in \[0, 1\)"),
    ("init_wegeft_weights", "gaussian", "init_wegeft_weights must be True"),
    ("layers_pattern", "layers", "layers_pattern needs layers_to_transform"),
])
def test_bad_config_values_are_clear_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        peftlab.WeGeFTConfig(**{field: value})


def test_registered_with_the_papers_defaults():
    info = peftlab.get_method("wegeft")
    assert (info.category, info.kind, info.mergeable) == ("reparameterized", "delta-weight", True)
    assert info.default_lr == 2e-3
    cfg = info.make_config()
    assert (cfg.r, cfg.wegeft_alpha, cfg.share_across_layers) == (64, 128.0, True)
    assert (info.rank_field, info.alpha_field, info.dropout_field) == ("r", "wegeft_alpha", "wegeft_dropout")
