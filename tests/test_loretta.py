"""LoRETTA against its equations on small tensors: tensorised matrices rebuilt by einsum contraction of the cores,
the rep layer y = W x + b + s·(x M_A) M_B and the adp layer h + s·(act(h M_down + b_d) M_up + b_u), written out
with plain autograd, on single layers and through a tiny LLaMA; inits, parameter counts, sites, files, merging."""
from __future__ import annotations

import json
import math
import string

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

import peftlab
from conftest import perturb_trainable, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from peftlab.core.tuner import adapted_layers
from peftlab.methods.loretta import (LorettaAdpConfig, LorettaRepConfig, LorettaRepLinear, TensorizedBottleneck,
                                     TensorizedLinear)


def _contract(cores, rows, cols):
    """M (rows, cols) from the cores by one einsum over the whole train: G_1 … G_d summed over every inner rank
    (the boundary ranks are 1), the modes kept in order, then the row-major reshape."""
    ranks, modes = string.ascii_lowercase[:len(cores) + 1], string.ascii_uppercase[:len(cores)]
    spec = ",".join(f"{ranks[j]}{modes[j]}{ranks[j + 1]}" for j in range(len(cores)))
    full = torch.einsum(f"{spec}->{ranks[0]}{modes}{ranks[-1]}", *cores)
    return full.reshape(rows, cols)


def _leaves(train: TensorizedLinear):
    return [c.detach().clone().requires_grad_(True) for c in train.cores]


def _core_size(modes, rank):
    ranks = [1] + [rank] * (len(modes) - 1) + [1]
    return sum(ranks[j] * k * ranks[j + 1] for j, k in enumerate(modes))


@pytest.mark.parametrize("rows,cols", [(6, 8), (4, 12)], ids=["split-on-a-mode", "split-inside-a-mode"])
def test_tensorized_matrix_is_the_row_major_train(rows, cols):
    torch.manual_seed(0)
    t = TensorizedLinear(rows, cols, [3, 2, 4, 2], tensor_rank=3, bias=True).double()
    c = [p.detach() for p in t.cores]
    explicit = torch.einsum("aib,bjc,ckd,dle->ijkl", *c).reshape(rows, cols)  # the four-mode case spelled out
    torch.testing.assert_close(t.matrix(), explicit)
    torch.testing.assert_close(_contract(c, rows, cols), explicit)
    i, o = rows - 1, 3                                  # one entry from the definition: digits of i·cols + o
    flat, digits = i * cols + o, []
    for k in reversed([3, 2, 4, 2]):
        flat, d = divmod(flat, k)
        digits.insert(0, d)
    chain = c[0][:, digits[0], :] @ c[1][:, digits[1], :] @ c[2][:, digits[2], :] @ c[3][:, digits[3], :]
    torch.testing.assert_close(t.matrix()[i, o], chain.squeeze())
    x = torch.randn(5, rows, dtype=torch.float64)
    torch.testing.assert_close(t(x), x @ explicit + t.bias)
    with pytest.raises(ValueError, match=r"multiply to 48, not 5 × 8 = 40"):
        TensorizedLinear(5, 8, [3, 2, 4, 2], tensor_rank=3)


def test_modes_come_from_balanced_factors_or_the_factorization_field():
    cfg = LorettaRepConfig()
    assert cfg.modes(576, 8) == [12, 8, 6, 8] and cfg.modes(8, 1536) == [8, 16, 12, 8]
    cfg = LorettaRepConfig(factorization={768: [8, 8, 12]})   # the authors' table: 768 × r=8 is [8, 8, 12, 8]
    assert cfg.modes(768, 8) == [8, 8, 12, 8] and cfg.factorization == {"768": [8, 8, 12]}
    assert LorettaAdpConfig(max_factor=64).modes(576, 64) == [24, 24, 64]


def test_gaussian_init_gives_entries_of_the_authors_std_and_zero_init_a_zero_matrix():
    torch.manual_seed(0)
    rows, cols, draws = 16, 8, 400
    second_moment = sum(TensorizedLinear(rows, cols, [4, 4, 8], 3).matrix().detach().pow(2).mean()
                        for _ in range(draws)) / draws
    assert abs(second_moment.item() * (rows + cols) - 1) < 0.1   # E[M²] = σ² = 1/(rows + cols)
    t = TensorizedLinear(rows, cols, [4, 4, 8], 3, bias=True)
    assert t.bias.abs().max() <= 1 / math.sqrt(cols) and t.bias.abs().max() > 0
    z = TensorizedLinear(rows, cols, [4, 4, 8], 3, bias=True, zero=True)
    assert not z.matrix().any() and not z.bias.any() and all(c.abs().sum() > 0 for c in z.cores[:-1])


def _rep_layer(d_in=12, d_out=6, r=4, conv1d=False, dropout=0.0, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    base = (Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out)).to(dtype).requires_grad_(False)
    with torch.no_grad():
        base.bias.normal_()
    cfg = LorettaRepConfig(r=r, tensor_rank=3)
    a = LorettaRepLinear(d_in, d_out, r, 1.5, 3, cfg.modes(d_in, r), cfg.modes(r, d_out), dropout,
                         fan_in_fan_out=conv1d)
    return base, a.to(dtype)


def _rep_reference(x, W, b, cores_A, cores_B, a, s):
    """W x + b + s·(x M_A) M_B, M_A (d_in, r) and M_B (r, d_out) contracted from the cores by einsum."""
    M_A, M_B = _contract(cores_A, a.loretta_A.rows, a.loretta_A.cols), _contract(cores_B, a.loretta_B.rows,
                                                                                   a.loretta_B.cols)
    return F.linear(x, W, b) + s * (x @ M_A) @ M_B


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "base-output-given"])
def test_rep_layer_output_and_gradients_follow_the_equation(fused, conv1d):
    base, a = _rep_layer(conv1d=conv1d)
    W = base.weight.t() if conv1d else base.weight
    x = torch.randn(4, 3, 12, requires_grad=True)
    y = a(x, base, None if fused else base(x))
    cA, cB = _leaves(a.loretta_A), _leaves(a.loretta_B)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = _rep_reference(x_ref, W, base.bias, cA, cB, a, a.scale)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    mine = torch.autograd.grad(y, [x, *a.loretta_A.cores, *a.loretta_B.cores], g)
    want = torch.autograd.grad(y_ref, [x_ref, *cA, *cB], g)
    for m, w in zip(mine, want):
        torch.testing.assert_close(m, w)
    with torch.no_grad():  # the inference kernel, and the delta merging adds
        torch.testing.assert_close(a(x, base, None), y_ref)
        delta = a.delta_weight(base)
        torch.testing.assert_close(F.linear(x, W + (delta.t() if conv1d else delta), base.bias), y_ref)


def test_rep_fused_layer_gradcheck_float64():
    base, a = _rep_layer(d_in=6, d_out=4, r=2, dtype=torch.float64)
    names = [f"loretta_{w}.cores.{j}" for w in "AB" for j in range(len(getattr(a, f"loretta_{w}").cores))]
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    cores = [c.detach().clone().requires_grad_(True) for c in (*a.loretta_A.cores, *a.loretta_B.cores)]

    def fn(x, *cores):
        return torch.func.functional_call(a, dict(zip(names, cores)), (x, base, None))

    assert torch.autograd.gradcheck(fn, (x, *cores))


def test_rep_dropout_drops_the_input_of_A_only():
    base, a = _rep_layer(dropout=0.3)
    x = torch.randn(5, 12)
    a.train()
    torch.manual_seed(7)
    y = a(x, base, None)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.3)
    M_A, M_B = a.loretta_A.matrix(), a.loretta_B.matrix()
    torch.testing.assert_close(y, base(x) + a.scale * (dropped @ M_A) @ M_B)
    assert a.lowrank_operands(base) is None  # not of the low-rank protocol's form while dropout is on
    a.eval()
    torch.testing.assert_close(a(x, base, None), base(x) + a.scale * (x @ M_A) @ M_B)


def _adp_layer(d=12, b=4, act="relu", dropout=0.0, scaling=2.0, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(10, d).requires_grad_(False)
    cfg = LorettaAdpConfig(bottleneck_size=b, tensor_rank=3)
    return base, TensorizedBottleneck(d, b, 3, cfg.modes(d, b), cfg.modes(b, d), act, dropout, scaling)


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_adp_layer_output_and_gradients_follow_the_equation(act):
    base, a = _adp_layer(act=act)
    x = torch.randn(4, 3, 10)
    h = base(x).requires_grad_(True)
    y = a(x, base, h)
    cd, cu = _leaves(a.adapter_down), _leaves(a.adapter_up)
    bd, bu = (t.detach().clone().requires_grad_(True) for t in (a.adapter_down.bias, a.adapter_up.bias))
    h_ref = h.detach().clone().requires_grad_(True)
    act_fn = torch.relu if act == "relu" else torch.tanh
    inner = act_fn(h_ref @ _contract(cd, 12, 4) + bd)
    y_ref = h_ref + 2.0 * (inner @ _contract(cu, 4, 12) + bu)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    own = [h, *a.adapter_down.cores, a.adapter_down.bias, *a.adapter_up.cores, a.adapter_up.bias]
    for m, w in zip(torch.autograd.grad(y, own, g), torch.autograd.grad(y_ref, [h_ref, *cd, bd, *cu, bu], g)):
        torch.testing.assert_close(m, w)
    d_train = _adp_layer(dropout=0.25)[1].train()  # dropout on the adapter's input, the residual untouched
    torch.manual_seed(3)
    y = d_train(x, base, base(x))
    torch.manual_seed(3)
    dropped = F.dropout(base(x), 0.25)
    expected = base(x) + 2.0 * d_train.adapter_up(torch.relu(d_train.adapter_down(dropped)))
    torch.testing.assert_close(y, expected)


def _model(name, base=None, **kw):
    cfg = (LorettaRepConfig if name == "rep" else LorettaAdpConfig)(**kw)
    return peftlab.get_peft_model(base if base is not None else tiny_llama(), cfg)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("name", ["rep", "adp"])
def test_zero_init_is_the_base_model_and_the_authors_init_is_not(name):
    batch = token_batch()
    base = _logits(tiny_llama(), batch)
    torch.testing.assert_close(_logits(_model(name, init_weights="zero"), batch), base, atol=1e-6, rtol=1e-6)
    assert (_logits(_model(name), batch) - base).abs().max() > 1e-3


class _Written(nn.Module):
    """A target layer as the equation, with the adapter's tensors as plain leaves (rep, or adp on the output)."""

    def __init__(self, layer: nn.Module, adapter):
        super().__init__()
        self.layer, self.adapter = layer, adapter
        trains = ["loretta_A", "loretta_B"] if isinstance(adapter, LorettaRepLinear) else ["adapter_down",
                                                                                            "adapter_up"]
        self.trains = [(getattr(adapter, t).rows, getattr(adapter, t).cols, _leaves(getattr(adapter, t)),
                        None if getattr(adapter, t).bias is None else
                        getattr(adapter, t).bias.detach().clone().requires_grad_(True)) for t in trains]

    def forward(self, x):
        (r1, c1, g1, b1), (r2, c2, g2, b2) = self.trains
        if isinstance(self.adapter, LorettaRepLinear):
            return self.layer(x) + self.adapter.scale * (x @ _contract(g1, r1, c1)) @ _contract(g2, r2, c2)
        h = self.layer(x)
        return h + self.adapter.scaling * (torch.relu(h @ _contract(g1, r1, c1) + b1) @ _contract(g2, r2, c2) + b2)


def _written_model(peft_model):
    reference, written = tiny_llama().requires_grad_(False), {}
    for name, layer in adapted_layers(peft_model.model):
        parent, _, child = name.rpartition(".")
        target = reference.get_submodule(parent)
        written[name] = _Written(getattr(target, child), layer.adapters["default"])
        setattr(target, child, written[name])
    return reference, written


def _step(model, batch):
    out = model(**batch).logits
    out.pow(2).mean().backward()
    return out.detach()


@pytest.mark.parametrize("name", ["rep", "adp"])
def test_model_matches_the_equations_written_out(name):
    """Whole-model outputs and every core's gradient against plain autograd; rep's second step runs q and v (one
    input) as a sibling group, the fused kernel differentiating the generated A and B."""
    model = _model(name, **({"lora_dropout": 0.0} if name == "rep" else {}))
    perturb_trainable(model, seed=3, std=0.1)
    reference, written = _written_model(model)
    model.train(), reference.train()
    batch = token_batch()
    expected = _step(reference, batch)
    for step in range(2):
        kinds = []
        hooks = [layer.register_forward_hook(lambda m, i, o: kinds.append(type(o.grad_fn).__name__))
                 for _, layer in adapted_layers(model.model)]
        torch.testing.assert_close(_step(model, batch), expected, atol=1e-5, rtol=1e-5)
        for h in hooks:
            h.remove()
        if name == "rep":
            assert ("_LowRankGroupBackward" in kinds) == (step == 1), kinds
        for layer_name, layer in adapted_layers(model.model):
            adapter = layer.adapters["default"]
            trains = [adapter.loretta_A, adapter.loretta_B] if name == "rep" else [adapter.adapter_down,
                                                                                    adapter.adapter_up]
            for train, (_, _, leaves, bias) in zip(trains, written[layer_name].trains):
                for core, leaf in zip(train.cores, leaves):
                    torch.testing.assert_close(core.grad, leaf.grad, atol=1e-6, rtol=1e-5)
                if bias is not None:
                    torch.testing.assert_close(train.bias.grad, bias.grad, atol=1e-6, rtol=1e-5)
        model.zero_grad()


def test_trainable_parameters_are_the_cores_and_the_adapter_biases():
    rep, adp = _model("rep"), _model("adp")
    # tiny LLaMA, d = 32 → [8, 4], r = 8 → [8], v's d_out 16 → [16], bottleneck 64 → [8, 8]; TT rank 8
    per_block = sum(_core_size(m, 8) for m in ([8, 4, 8], [8, 8, 4], [8, 4, 8], [8, 16]))
    assert rep.get_nb_trainable_parameters()[0] == 2 * per_block == 3136
    per_site = _core_size([8, 4, 8, 8], 8) + _core_size([8, 8, 8, 4], 8) + 64 + 32
    assert adp.get_nb_trainable_parameters()[0] == 4 * per_site == 8448
    for model in (rep, adp):
        counted = sum(sum(c.numel() for t in a.children() if isinstance(t, TensorizedLinear) for c in t.cores) +
                      sum(t.bias.numel() for t in a.children() if isinstance(t, TensorizedLinear)
                          and t.bias is not None)
                      for _, layer in adapted_layers(model.model) for a in layer.adapters.values())
        assert counted == model.get_nb_trainable_parameters()[0]


def test_adp_sites_are_the_sequential_adapters_sites():
    def sites(model):
        return sorted(n for n, _ in adapted_layers(model.model))
    assert sites(_model("adp")) == [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.down_proj",
                                                                                        "self_attn.o_proj")]
    assert sites(_model("adp", placement="attention", layers_to_transform=[1])) == ["model.layers.1.self_attn.o_proj"]
    assert sites(_model("adp", target_modules=["up_proj"])) == [f"model.layers.{i}.mlp.up_proj" for i in (0, 1)]
    bert = _model("adp", base=tiny_bert())
    assert sites(bert) == [f"bert.encoder.layer.{i}.{m}" for i in (0, 1)
                           for m in ("attention.output.dense", "output.dense")]
    assert bert.model.bert.encoder.layer[0].intermediate.dense.__class__ is nn.Linear


@pytest.mark.parametrize("name", ["rep", "adp"])
def test_save_load_round_trip(name, tmp_path):
    model = _model(name, tensor_rank=3)
    perturb_trainable(model, seed=1, std=0.1)
    batch = token_batch()
    expected = _logits(model.eval(), batch)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == f"LORETTA_{name.upper()}" and config["tensor_rank"] == 3
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    if name == "rep":
        assert "base_model.model.model.layers.0.self_attn.q_proj.loretta_A.cores.0" in keys and len(keys) == 2 * (
            3 + 3 + 3 + 2)  # per block: q's A [8,4,8], B [8,8,4]; v's A [8,4,8], B [8,16]
    else:
        assert "base_model.model.model.layers.1.mlp.down_proj.adapter_up.bias" in keys and len(keys) == 4 * 10
    loaded = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=0, rtol=0)
    trainable = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()


def test_rep_merge_unmerge_merge_and_unload_and_conv1d():
    batch = token_batch()
    model = _model("rep")
    perturb_trainable(model, seed=2, std=0.1)
    model.eval()
    base_state = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    unmerged = _logits(model, batch)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, batch), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for k, v in model.get_base_model().state_dict().items():
        if k in base_state:
            torch.testing.assert_close(v, base_state[k], atol=1e-6, rtol=1e-6, msg=k)
    plain = model.merge_and_unload()
    assert not any(type(m).__module__.startswith("peftlab") for m in plain.modules())
    torch.testing.assert_close(_logits(plain, batch), unmerged, atol=1e-5, rtol=1e-5)
    gpt2 = _model("rep", base=tiny_gpt2(), target_modules=["c_attn", "c_fc"])
    perturb_trainable(gpt2, seed=4, std=0.1)
    unmerged = _logits(gpt2.eval(), batch)
    torch.testing.assert_close(_logits(gpt2.merge_and_unload(), batch), unmerged, atol=1e-5, rtol=1e-5)


def test_adp_refuses_to_merge():
    model = _model("adp")
    with pytest.raises(TypeError, match="cannot be merged.*loretta-rep"):
        model.merge_adapter()


def test_rep_mixed_batch_rows_get_their_own_adapter():
    batch = token_batch()
    model = _model("rep")
    model.add_adapter("other", LorettaRepConfig(r=4, tensor_rank=2))
    perturb_trainable(model, seed=5, std=0.1)
    model.eval()
    per_adapter = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        per_adapter[name] = _logits(model, batch)
    names = ["other", "default", "__base__"]
    mixed = _logits(model, {**batch, "adapter_names": names})
    base = _logits(tiny_llama(), batch)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], (base if name == "__base__" else per_adapter[name])[row],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls,field,value,message", [
    (LorettaRepConfig, "tensor_rank", 0, "tensor_rank .* must be a positive integer"),
    (LorettaRepConfig, "tensor_rank", 2.5, "tensor_rank .* must be a positive integer"),
    (LorettaRepConfig, "init_weights", "kaiming", r"init_weights='kaiming' is not one of \('gaussian', 'zero'\)"),
    (LorettaRepConfig, "factorization", {32: [3, 11]}, r"factorization\[32\] = \[3, 11\] multiplies to 33, not 32"),
    (LorettaRepConfig, "max_factor", 1, "max_factor must be an integer >= 2"),
    (LorettaRepConfig, "r", 0, "r must be a positive integer"),
    (LorettaRepConfig, "lora_alpha", float("inf"), "lora_alpha must be a positive finite number"),
    (LorettaRepConfig, "lora_dropout", 1.0, r"lora_dropout is a probability in \[0, 1\)"),
    (LorettaRepConfig, "layers_pattern", "layers", "layers_pattern needs layers_to_transform"),
    (LorettaAdpConfig, "bottleneck_size", 0, "bottleneck_size must be a positive integer"),
    (LorettaAdpConfig, "non_linearity", "softsign", "non_linearity 'softsign' is not one of"),
    (LorettaAdpConfig, "placement", "input", "placement must be 'attention', 'ffn' or 'both'"),
    (LorettaAdpConfig, "scaling", "learned", "scaling must be a number"),
    (LorettaAdpConfig, "tensor_rank", -1, "LorettaAdpConfig: tensor_rank"),
])
def test_bad_config_values_are_clear_errors(cls, field, value, message):
    with pytest.raises(ValueError, match=message):
        cls(**{field: value})


def test_registered_with_the_authors_defaults():
    rep, adp = peftlab.get_method("loretta-rep"), peftlab.get_method("loretta-adp")
    assert (rep.category, rep.kind, rep.mergeable, rep.identity_at_init) == ("reparameterized", "delta-weight",
                                                                             True, False)
    assert (adp.category, adp.kind, adp.mergeable, adp.identity_at_init) == ("additive", "activation", False, False)
    r, a = rep.make_config(), adp.make_config()
    assert (r.r, r.lora_alpha, r.lora_dropout, r.tensor_rank, r.init_weights) == (8, 16.0, 0.05, 8, "gaussian")
    assert (a.bottleneck_size, a.non_linearity, a.scaling, a.tensor_rank, a.placement) == (64, "relu", 1.0, 8, "both")
    assert (rep.rank_field, rep.alpha_field, rep.dropout_field) == ("r", "lora_alpha", "lora_dropout")
    assert adp.dropout_field == "adapter_dropout"
