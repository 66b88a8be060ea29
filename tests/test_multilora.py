"""MultiLoRA against its equation y = W x + b + c·Σ_i s_i B_i A_i x, written out in plain torch with one leaf tensor
per A_i, B_i and s_i: layer outputs and every gradient (fused, unfused, sibling groups, float64 gradcheck), the
paper's initialisation, files, merging, mixed batches, config errors and trainable counts."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

import peftlab
from conftest import perturb_trainable, tiny_gpt2, tiny_llama, token_batch
from peftlab.core.tuner import adapted_layers
from peftlab.methods.lora.multi import MultiLoraConfig, MultiLoraLinear

D_IN, D_OUT, N, R = 6, 5, 3, 2


def _layer(scaling="module", conv1d=False, dropout=0.0, dtype=torch.float32, seed=0, n=N, r=R, scale=1.5):
    torch.manual_seed(seed)
    base = (Conv1D(D_OUT, D_IN) if conv1d else nn.Linear(D_IN, D_OUT)).to(dtype).requires_grad_(False)
    with torch.no_grad():
        base.bias.normal_()  # Conv1D starts with a zero bias
    a = MultiLoraLinear(n, scaling, d_in=D_IN, d_out=D_OUT, r=r, scale=scale, dropout=dropout,
                        fan_in_fan_out=conv1d).to(dtype)
    with torch.no_grad():
        a.multilora_scaling.normal_()  # off its zero init, so the update is not zero
    return base, a


def _modules(a):
    """Fresh leaf copies of every A_i (r, d_in), B_i (d_out, r) and s_i (scalar or (d_out,)), from the layer."""
    def leaves(ts):
        return [t.detach().clone().requires_grad_(True) for t in ts]
    return (leaves(a.lora_A.split(a.module_rank, 0)), leaves(a.lora_B.split(a.module_rank, 1)),
            leaves(a.multilora_scaling.unbind(0)))


def _paper(x, W, b, As, Bs, ss, c):
    """The paper's MultiLoRA written out: W x + b + c·Σ_i s_i·(B_i (A_i x)); s_i scales each output feature."""
    out = F.linear(x, W, b)
    for A_i, B_i, s_i in zip(As, Bs, ss):
        out = out + c * s_i * F.linear(F.linear(x, A_i), B_i)
    return out


def _module_grads(a):
    """The layer's gradients cut into the per-module pieces _modules() returns."""
    r = a.module_rank
    return (list(a.lora_A.grad.split(r, 0)), list(a.lora_B.grad.split(r, 1)), list(a.multilora_scaling.grad.unbind(0)))


@pytest.mark.parametrize("scaling", ["module", "feature"])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "base-output-given"])
def test_layer_output_and_gradients_follow_the_equation(fused, conv1d, scaling):
    base, a = _layer(scaling, conv1d)
    W = base.weight.t() if conv1d else base.weight
    x = torch.randn(4, 3, D_IN, requires_grad=True)
    y = a(x, base, None if fused else base(x))
    As, Bs, ss = _modules(a)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = _paper(x_ref, W, base.bias, As, Bs, ss, a.scale)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    for mine, want in zip(_module_grads(a), (As, Bs, ss)):
        for got, leaf in zip(mine, want):
            torch.testing.assert_close(got, leaf.grad)
    assert all(s.grad.abs().sum() > 0 for s in ss)  # the learnable scalings really receive gradient
    with torch.no_grad():  # the inference kernel (W + c·BA formed once for many rows), and merging
        torch.testing.assert_close(a(x, base, None), y_ref)
        delta = a.delta_weight(base)
        torch.testing.assert_close(F.linear(x, W + (delta.t() if conv1d else delta), base.bias), y_ref)


@pytest.mark.parametrize("scaling", ["module", "feature"])
def test_fused_layer_gradcheck_float64(scaling):
    base, a = _layer(scaling, dtype=torch.float64)
    x = torch.randn(2, 3, D_IN, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in (a.lora_A, a.lora_B, a.multilora_scaling)]

    def fn(x, A, B, s):
        return torch.func.functional_call(a, {"lora_A": A, "lora_B": B, "multilora_scaling": s}, (x, base, None))

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_adapter_dropout_takes_the_unfused_path_with_the_same_equation():
    base, a = _layer(dropout=0.4)
    a.train()
    x = torch.randn(4, D_IN)
    assert a.lowrank_operands(base) is None and not a.joins_sibling_group(x, base)
    torch.manual_seed(3)
    y = a(x, base, None)
    torch.manual_seed(3)
    h = F.dropout(x, 0.4)
    As, Bs, ss = _modules(a)
    expected = F.linear(x, base.weight, base.bias) + sum(
        a.scale * s * F.linear(F.linear(h, A), B) for A, B, s in zip(As, Bs, ss))
    torch.testing.assert_close(y, expected)


def test_one_module_with_unit_scaling_is_lora():
    from peftlab.methods.lora import LoraLinear
    base, a = _layer(n=1, r=3)
    lora = LoraLinear(D_IN, D_OUT, 3, a.scale)
    with torch.no_grad():
        a.multilora_scaling.fill_(1.0)
        lora.lora_A.copy_(a.lora_A), lora.lora_B.copy_(a.lora_B)
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(a(x, base, None), lora(x, base, None))


def test_the_papers_initialisation():
    torch.manual_seed(0)
    n, r, d_in, d_out = 4, 2, 64, 48
    a = MultiLoraLinear(n, d_in=d_in, d_out=d_out, r=r, scale=1.0)
    assert torch.equal(a.multilora_scaling, torch.zeros(n))
    assert a.lora_A.shape == (n * r, d_in) and a.lora_B.shape == (d_out, n * r)
    # Kaiming-uniform(a=√5) is U(−1/√fan_in, 1/√fan_in): fan-in d_in for A_i, r for each B_i (not n·r)
    assert a.lora_A.abs().max() <= 1 / math.sqrt(d_in) and a.lora_A.abs().max() > 0.9 / math.sqrt(d_in)
    for B_i in a.lora_B.split(r, 1):
        assert B_i.abs().max() <= 1 / math.sqrt(r) and B_i.abs().max() > 1 / math.sqrt(n * r)
    # the modules start in different random subspaces (not copies of one another)
    blocks = a.lora_B.split(r, 1)
    assert all(not torch.allclose(blocks[0], b) for b in blocks[1:])
    assert (a.delta_weight(nn.Linear(d_in, d_out)) == 0).all()
    random = MultiLoraLinear(n, "feature", d_in=d_in, d_out=d_out, r=r, scale=1.0, init=False)
    assert torch.equal(random.multilora_scaling, torch.ones(n, d_out))


def _model(**kw):
    return peftlab.get_peft_model(tiny_llama(), MultiLoraConfig(**{"r": 2, "target_modules": "all-linear", **kw}))


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_model_unchanged_at_init_and_first_gradients_reach_only_the_scalings():
    batch = token_batch()
    base = _logits(tiny_llama(), batch)
    model = _model()
    torch.testing.assert_close(_logits(model, batch), base, atol=0, rtol=0)
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for _, layer in adapted_layers(model.model):
        a = layer.adapters["default"]
        assert a.multilora_scaling.grad.abs().min() > 0  # ∂L/∂s_i = c·<g, B_i A_i x>, B_i A_i ≠ 0
        assert not a.lora_A.grad.any() and not a.lora_B.grad.any()  # both ∝ s_i = 0
    assert (_logits(_model(init_lora_weights=False), batch) - base).abs().max() > 1e-3


class _PaperLinear(nn.Module):
    """A target layer written out as the paper's equation, with its modules' A_i, B_i, s_i as plain leaves."""

    def __init__(self, linear: nn.Linear, modules, scale: float):
        super().__init__()
        self.linear, self.modules_, self.scale = linear, modules, scale

    def forward(self, x):
        return _paper(x, self.linear.weight, self.linear.bias, *self.modules_, self.scale)


def _paper_model(peft_model):
    reference = tiny_llama()
    leaves = {}
    for name, layer in adapted_layers(peft_model.model):
        adapter = layer.adapters["default"]
        leaves[name] = _modules(adapter)
        parent, _, child = name.rpartition(".")
        target = reference.get_submodule(parent)
        setattr(target, child, _PaperLinear(getattr(target, child), leaves[name], adapter.scale))
    return reference.requires_grad_(False), leaves


def _step(model, batch):
    out = model(**batch).logits
    out.pow(2).mean().backward()
    return out.detach()


@pytest.mark.parametrize("scaling", ["module", "feature"])
def test_model_matches_the_equation_on_the_per_layer_and_sibling_paths(scaling):
    """Whole-model outputs and the gradients of every A_i, B_i, s_i against plain autograd, on the per-layer path
    (first training step) and with sibling fusion (q/k/v and gate/up as one node, from the second step on)."""
    model = _model(scaling=scaling)
    perturb_trainable(model, seed=3, std=0.2)
    reference, leaves = _paper_model(model)
    model.train(), reference.train()
    batch = token_batch()
    expected = _step(reference, batch)
    for step in range(2):
        grad_fns = []
        hooks = [layer.register_forward_hook(lambda m, i, o: grad_fns.append(type(o.grad_fn).__name__))
                 for _, layer in adapted_layers(model.model)]
        torch.testing.assert_close(_step(model, batch), expected, atol=1e-5, rtol=1e-5)
        for h in hooks:
            h.remove()
        assert ("_LowRankGroupBackward" in grad_fns) == (step == 1), grad_fns
        for name, layer in adapted_layers(model.model):
            for mine, want in zip(_module_grads(layer.adapters["default"]), leaves[name]):
                for got, leaf in zip(mine, want):
                    torch.testing.assert_close(got, leaf.grad, atol=1e-6, rtol=1e-5, msg=name)
        model.zero_grad()


@pytest.mark.parametrize("scaling", ["module", "feature"])
def test_save_load_round_trip(scaling, tmp_path):
    model = _model(scaling=scaling, n_modules=2)
    perturb_trainable(model, seed=1, std=0.2)
    batch = token_batch()
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["n_modules"], config["scaling"], config["r"]) == ("MULTILORA", 2, scaling, 2)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.mlp.down_proj."  # 64 -> 32
    assert tensors[prefix + "lora_A.weight"].shape == (4, 64) and tensors[prefix + "lora_B.weight"].shape == (32, 4)
    assert tensors[prefix + "multilora_scaling"].shape == ((2,) if scaling == "module" else (2, 32))
    assert len(tensors) == 3 * 14
    loaded = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=0, rtol=0)
    trainable = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()


def test_a_file_saved_with_another_n_is_a_clear_error(tmp_path):
    _model(n_modules=2).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    message = r"does not fit.*layers\.0\.mlp\.down_proj: lora_A\.weight.*\(4, 64\).*needs \(6, 64\)"
    with pytest.raises(ValueError, match=message):
        peftlab.set_peft_model_state_dict(_model(n_modules=3), tensors)


def test_merge_unmerge_merge_and_unload_and_unload():
    batch = token_batch()
    model = _model()
    perturb_trainable(model, seed=2, std=0.2)
    base_state = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    unmerged = _logits(model, batch)
    assert (unmerged - _logits(tiny_llama(), batch)).abs().max() > 1e-3
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, batch), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for k, v in model.get_base_model().state_dict().items():
        if k in base_state:
            torch.testing.assert_close(v, base_state[k], atol=1e-6, rtol=1e-6, msg=k)
    torch.testing.assert_close(_logits(model, batch), unmerged, atol=1e-6, rtol=1e-6)
    merged = _model()
    perturb_trainable(merged, seed=2, std=0.2)
    plain = merged.merge_and_unload()
    assert not any(type(m).__module__.startswith("peftlab") for m in plain.modules())
    torch.testing.assert_close(_logits(plain, batch), unmerged, atol=1e-5, rtol=1e-5)
    restored = _model()
    perturb_trainable(restored, seed=2, std=0.2)
    for k, v in restored.unload().state_dict().items():
        torch.testing.assert_close(v, base_state[k], atol=0, rtol=0, msg=k)


def test_conv1d_model_merges_to_the_same_outputs():
    batch = token_batch()
    model = peftlab.get_peft_model(tiny_gpt2(), MultiLoraConfig(r=2, target_modules="all-linear", scaling="feature"))
    perturb_trainable(model, seed=4, std=0.2)
    unmerged = _logits(model, batch)
    torch.testing.assert_close(_logits(model.merge_and_unload(), batch), unmerged, atol=1e-5, rtol=1e-5)


def test_mixed_batch_rows_get_their_own_adapter():
    batch = token_batch()
    model = _model()
    model.add_adapter("other", MultiLoraConfig(r=3, n_modules=2, target_modules="all-linear", scaling="feature"))
    perturb_trainable(model, seed=5, std=0.2)
    model.eval()
    per_adapter = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        per_adapter[name] = _logits(model, batch)
    names = ["other", "default", "__base__"]
    mixed = _logits(model, {**batch, "adapter_names": names})
    base = _logits(tiny_llama(), batch)
    for row, name in enumerate(names):
        want = base[row] if name == "__base__" else per_adapter[name][row]
        torch.testing.assert_close(mixed[row], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scaling,per_layer", [("module", lambda d_in, d_out: 3 * 4 * (d_in + d_out) + 3),
                                               ("feature", lambda d_in, d_out: 3 * 4 * (d_in + d_out) + 3 * d_out)])
def test_trainable_parameter_count(scaling, per_layer):
    model = peftlab.get_peft_model(tiny_llama(), MultiLoraConfig(r=4, scaling=scaling))
    # LoRA's default targets on LLaMA: q_proj (32→32) and v_proj (32→16) in each of the 2 blocks
    assert model.get_nb_trainable_parameters()[0] == 2 * (per_layer(32, 32) + per_layer(32, 16))
    assert sorted({n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad}) == \
        ["lora_A", "lora_B", "multilora_scaling"]


@pytest.mark.parametrize("field,value,message", [
    ("n_modules", 0, "n_modules must be a positive integer"),
    ("n_modules", 2.0, "n_modules must be a positive integer"),
    ("n_modules", True, "n_modules must be a positive integer"),
    ("r", 0, "r must be a positive integer"),
    ("r", 1.5, "r must be a positive integer"),
    ("scaling", "layer", "scaling must be 'module'.*or 'feature'"),
    ("init_lora_weights", "gaussian", r"init_lora_weights must be True \(the paper's init"),
    ("init_lora_weights", "pissa", r"init_lora_weights must be True \(the paper's init"),
    ("use_dora", True, "does not combine with DoRA"),
    ("lora_bias", True, r"MultiLoraConfig \(MULTILORA\) does not implement lora_bias"),
    ("lora_dropout", 1.0, r"lora_dropout must be in \[0, 1\)"),
])
def test_bad_config_values_are_clear_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        MultiLoraConfig(**{field: value})


def test_non_linear_targets_are_refused_with_the_module_named():
    with pytest.raises(ValueError, match=r"MultiLoRA cannot adapt model\.embed_tokens \(Embedding\)"):
        peftlab.get_peft_model(tiny_llama(), MultiLoraConfig(target_modules=["embed_tokens"]))


def test_registered_with_its_defaults():
    info = peftlab.get_method("multilora")
    assert (info.category, info.kind, info.mergeable, info.identity_at_init) == \
        ("reparameterized", "delta-weight", True, True)
    assert info.config_cls is peftlab.MultiLoraConfig and info.default_lr == 1e-2
    cfg = info.make_config()
    assert (cfg.n_modules, cfg.r, cfg.lora_alpha, cfg.scaling, cfg.init_lora_weights) == (3, 8, 8, "module", True)
    assert (info.rank_field, info.alpha_field, info.dropout_field) == ("r", "lora_alpha", "lora_dropout")
