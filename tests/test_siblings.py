"""Sibling fusion (core/siblings.py): layers that read one input train as one autograd node, with the same
outputs and gradients as separate fused layers; wrong guesses fall back; checkpointing recomputes consistently."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn

import peftlab
from conftest import randomize_adapters, tiny_llama, token_batch
from peftlab.core.functional import _DoraLinear, _LoraLinear, lowrank_group
from peftlab.core.lowrank import LowRankOperands
from peftlab.core.tuner import adapted_layers

ATOL, RTOL = 2e-5, 1e-5


def _close(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.allclose(a, b, atol=ATOL, rtol=RTOL), f"{what}: max|diff| {(a - b).abs().max().item():.3e}"


def _members(d_in, specs, seed=0, dtype=torch.float32):
    """specs: (d_out, r, scale, bias, dora, zero_magnitudes) per member -> leaf tensors per member."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for d_out, r, s, bias, dora, zero_mag in specs:
        W = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).to(dtype)
        b = (torch.randn(d_out, generator=g) * 0.5).to(dtype) if bias else None
        A = (torch.randn(r, d_in, generator=g) / d_in ** 0.5).to(dtype)
        B = (torch.randn(d_out, r, generator=g) * 0.3).to(dtype)
        m = (torch.rand(d_out, generator=g) + 0.5).to(dtype) if dora else None
        if zero_mag:
            m[::3] = 0.0
        out.append(dict(W=W, b=b, A=A, B=B, m=m, s=s))
    return out


def _leaves(members):
    return [t.requires_grad_(True) for mem in members for k in ("b", "A", "B", "m") if (t := mem[k]) is not None]


def _separate(x, members):
    outs = []
    for mem in members:
        if mem["m"] is None:
            outs.append(_LoraLinear.apply(x, mem["W"], mem["b"], mem["A"], mem["B"], mem["s"]))
        else:
            with torch.no_grad():
                inv = 1.0 / (mem["W"] + mem["s"] * mem["B"] @ mem["A"]).norm(dim=1)
            outs.append(_DoraLinear.apply(x, mem["W"], mem["b"], mem["A"], mem["B"], mem["m"], inv, mem["s"]))
    return outs


def _inv_norm(mem):
    with torch.no_grad():
        return 1.0 / (mem["W"] + mem["s"] * mem["B"] @ mem["A"]).norm(dim=1)


def _grouped(x, members):
    ops = []
    for mem in members:
        inv = mem.get("inv", _inv_norm(mem) if mem["m"] is not None else None)
        ops.append(LowRankOperands(mem["W"], mem["b"], mem["A"], mem["B"], mem["s"], mem["m"], inv))
    return list(lowrank_group(x, ops))


SPECS = {
    "qkv-lora": [(12, 4, 2.0, False, False, False), (6, 4, 2.0, False, False, False),
                 (6, 4, 2.0, False, False, False)],
    "mixed": [(10, 3, 1.5, True, False, False), (7, 5, 0.5, False, True, True), (9, 2, 3.0, True, True, False)],
    "dora-pair": [(8, 4, 1.0, False, True, False), (8, 4, 1.0, True, True, True)],
}


@pytest.mark.parametrize("unused", [None, 1], ids=["all-used", "one-unused"])
@pytest.mark.parametrize("spec", sorted(SPECS))
def test_group_kernel_matches_separate_layers(spec, unused):
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(3, 5, 16, generator=g)
    results = []
    for run in (_separate, _grouped):
        members = _members(16, SPECS[spec])
        x = x0.clone().requires_grad_(True)
        leaves = _leaves(members)
        outs = run(x, members)
        loss = sum((o * torch.randn(o.shape, generator=torch.Generator().manual_seed(i))).sum()
                   for i, o in enumerate(outs) if i != unused)
        loss.backward()
        results.append(([o.detach() for o in outs], x.grad, [t.grad for t in leaves]))
    (o_s, gx_s, g_s), (o_g, gx_g, g_g) = results
    for i, (a, b) in enumerate(zip(o_g, o_s)):
        _close(a, b, f"output {i}")
    _close(gx_g, gx_s, "grad x")
    assert len(g_g) == len(g_s)
    for i, (a, b) in enumerate(zip(g_g, g_s)):
        if b is None:  # only the unused member's leaves get no gradient from the separate layers
            assert a is None or a.abs().max() == 0, f"leaf {i}: a gradient for an output nobody used"
        else:
            _close(a, b, f"grad of leaf {i}")


def test_group_kernel_gradcheck_float64():
    members = _members(6, SPECS["mixed"], seed=3, dtype=torch.float64)
    members[1]["m"][1] = 0.0
    for mem in members:  # the norm is a constant of the step (detached), as in test_fast_paths' gradcheck
        if mem["m"] is not None:
            mem["inv"] = _inv_norm(mem)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_()
    leaves = _leaves(members)

    def fn(x, *leaves):
        it = iter(leaves)
        mems = [{**mem, **{k: next(it) for k in ("b", "A", "B", "m") if mem[k] is not None}} for mem in members]
        return tuple(_grouped(x, mems))

    assert torch.autograd.gradcheck(fn, (x, *leaves))


# -- through a model ---------------------------------------------------------------------------------------------

def _group_names(model):
    names = {layer: name for name, layer in adapted_layers(model)}
    return sorted((names[lead].split(".")[-1], *[names[f].split(".")[-1] for f in fol])
                  for lead, fol in model.siblings.followers.items())


def _step(model, batch):
    out = model(**batch).logits
    out.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out.detach(), grads


def _grad_fns(model, batch):
    seen = []
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append(type(o.grad_fn).__name__))
             for _, layer in adapted_layers(model)]
    model(**batch)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_llama_learns_qkv_and_gate_up_groups_and_keeps_results(dora):
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, lora_alpha=8, use_dora=dora,
                                                                    target_modules="all-linear"))
    randomize_adapters(model, seed=2)
    model.train()
    batch = token_batch()
    out1, grads1 = _step(model, batch)          # records which layers share an input
    assert _group_names(model) == []             # committed only when the next forward begins
    out2, grads2 = _step(model, batch)          # fused
    assert _group_names(model) == [("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj", "v_proj")] * 2
    assert _grad_fns(model, batch).count("_LowRankGroupBackward") == 5 * 2
    _close(out2, out1, "logits")
    assert set(grads1) == set(grads2) and grads1
    for n in grads1:
        _close(grads2[n], grads1[n], n)


class _TwoHeads(nn.Module):
    """Two linears that read the same input, unless `shift` makes the second read another tensor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 6), nn.Linear(8, 5)
        self.shift = self.skip_b = False

    def forward(self, x):
        if self.skip_b:
            return self.a(x)
        return torch.cat([self.a(x), self.b(x + 1.0 if self.shift else x)], -1)


def test_follower_called_with_another_input_computes_its_own_output():
    model = peftlab.get_peft_model(_TwoHeads(), peftlab.LoraConfig(r=2, target_modules=["a", "b"]))
    randomize_adapters(model, seed=1)
    model.train()
    x = torch.randn(4, 8)
    model(x).sum().backward()
    model(x).sum().backward()
    assert len(model.siblings.followers) == 1
    inner = model.get_base_model()
    inner.shift = True
    got = model(x)                               # the leader guessed b(x); b is called with x + 1
    assert model.siblings._relearn               # so the next forward learns the groups again ...
    expected = model(x)
    assert model.siblings.followers == {}        # ... on the plain per-layer path
    _close(got, expected, "output after a wrong guess")


def test_follower_not_called_releases_its_output_and_relearns():
    model = peftlab.get_peft_model(_TwoHeads(), peftlab.LoraConfig(r=2, target_modules=["a", "b"]))
    model.train()
    x = torch.randn(4, 8)
    for _ in range(2):
        model(x).sum().backward()
    assert len(model.siblings.followers) == 1
    model.get_base_model().skip_b = True
    model(x).sum().backward()                    # the leader computed b's output too; nobody took it
    assert model.siblings._relearn and not model.siblings._waiting


def test_gradient_checkpointing_recomputes_the_same_groups():
    results = {}
    for ckpt in (False, True):
        model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, target_modules="all-linear"))
        randomize_adapters(model, seed=3)
        if ckpt:
            model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        batch = token_batch()
        steps = [_step(model, batch) for _ in range(3)]  # record, then fused twice (recomputed in backward)
        assert len(model.siblings.followers) == 4
        results[ckpt] = steps[-1]
    (o0, g0), (o1, g1) = results[False], results[True]
    _close(o1, o0, "logits")
    for n in g0:
        _close(g1[n], g0[n], n)


@pytest.mark.parametrize("case", ["lora-fa", "dropout", "dora-eval", "peft-numerics-eval", "no-grad"])
def test_not_grouped_where_the_kernel_does_not_apply(case):
    # each is a case where a single layer does not take the fused kernel either
    if case == "lora-fa":
        cfg = peftlab.LoraFaConfig(r=4, target_modules="all-linear")
    else:
        cfg = peftlab.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1 if case == "dropout" else 0.0,
                                 use_dora=case == "dora-eval")
    model = peftlab.get_peft_model(tiny_llama(), cfg)
    model.train(not case.endswith("eval"))
    batch = token_batch()
    numerics = peftlab.hf_peft_numerics() if case == "peft-numerics-eval" else contextlib.nullcontext()
    with numerics:
        for _ in range(2):
            if case == "no-grad":
                with torch.no_grad():
                    model(**batch)
            else:
                model(**batch).logits.sum().backward()
        assert model.siblings.followers == {}
        assert "_LowRankGroupBackward" not in _grad_fns(model, batch)


def test_changing_adapters_forgets_the_groups():
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, target_modules="all-linear"))
    model.add_adapter("other", peftlab.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.train()
    batch = token_batch()
    for _ in range(2):
        model(**batch).logits.sum().backward()
    assert len(model.siblings.followers) == 4
    model.set_adapter("other")
    assert model.siblings.followers == {}
    for _ in range(2):
        model(**batch).logits.sum().backward()
    assert _group_names(model) == [("q_proj", "v_proj")] * 2


def test_an_inference_pass_first_does_not_stop_the_learning():
    # e.g. a zero-shot evaluation before training: nothing to group there, so the first training forward learns
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, target_modules="all-linear"))
    batch = token_batch()
    with torch.no_grad():
        model(**batch)
    model.train()
    for _ in range(2):
        model(**batch).logits.sum().backward()
    assert len(model.siblings.followers) == 4


def test_plain_path_flag_is_respected():
    # an adapter told not to fuse the base (fuses_base=False, HF PEFT's formulation) never joins a group
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, target_modules="all-linear"))
    for _, layer in adapted_layers(model):
        layer.adapters["default"].fuses_base = False
    model.train()
    for _ in range(2):
        model(**token_batch()).logits.sum().backward()
    assert model.siblings.followers == {}
