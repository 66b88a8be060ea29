"""SDS-LoRA against its definition written out per row in plain torch: the two subspaces (from an independent SVD),
mixed-domain batches, gradient isolation between domains, unknown-domain rows, generation, files, merging for one
domain, refusals and config errors."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

import peftlab
from conftest import perturb_trainable, tiny_llama, token_batch
from peftlab.core.tuner import adapted_layers
from peftlab.methods.sds_lora import SdsLoraConfig, set_merge_domain
from peftlab.train.data import Collator


class _One(nn.Module):
    def __init__(self, d_in=12, d_out=10, conv1d=False):
        super().__init__()
        self.proj = Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def _layer_model(conv1d=False, d_in=12, d_out=10, seed=0, **kw):
    torch.manual_seed(seed)
    base = _One(d_in, d_out, conv1d)
    with torch.no_grad():
        base.proj.bias.normal_()
    cfg = {**dict(r=2, domain_r=3, num_domains=3, shared_dims=4, lora_alpha=6.0, target_modules=["proj"],
                  init_lora_weights=False), **kw}
    model = peftlab.get_peft_model(base, SdsLoraConfig(**cfg))
    return model, model.model.proj.adapters["default"], base.proj


def _W(base_layer, conv1d):
    return (base_layer.weight.t() if conv1d else base_layer.weight).detach()


def _top_projector(W, k):
    """The orthogonal projector onto W's top-k left singular subspace, from torch's SVD in float64."""
    U, _, _ = torch.linalg.svd(W.double())
    return (U[:, :k] @ U[:, :k].t()).float()


def _reference(x, W, b, a, ids, rule="shared"):
    """Per row: W x + b + s·(U C) A x + s_d·(I − P) B̃_j A_j x (j = the row's domain; "mean": 1/K of every j)."""
    P = _top_projector(W, a.sds_U.shape[1])
    I = torch.eye(W.shape[0])
    K, s, s_d = len(a.sds_domain_A), a.scale, a.domain_scale
    B_s = a.sds_U @ a.sds_shared_C
    rows = []
    for i, d in enumerate(ids):
        y = x[i] @ W.t() + b + s * (x[i] @ a.sds_shared_A.t()) @ B_s.t()
        weights = {d: 1.0} if d >= 0 else ({} if rule == "shared" else {j: 1.0 / K for j in range(K)})
        for j, w in weights.items():
            y = y + w * s_d * (x[i] @ a.sds_domain_A[j].t()) @ ((I - P) @ a.sds_domain_B[j]).t()
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_shared_factor_in_top_subspace_domain_factors_in_its_complement(conv1d):
    model, a, base = _layer_model(conv1d)
    perturb_trainable(model, seed=1, std=0.5)   # B̃_j now has components inside span(U_top): projected away
    W = _W(base, conv1d)
    U = a.sds_U
    torch.testing.assert_close(U.t() @ U, torch.eye(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(U @ U.t(), _top_projector(W, 4), atol=1e-6, rtol=0)
    B_s, P = a.shared_B(), _top_projector(W, 4)
    assert (B_s - P @ B_s).norm() <= 1e-6 * B_s.norm()
    for j in range(3):
        B_j = a.domain_B([j])
        assert (P @ B_j).norm() <= 1e-6 * B_j.norm() and B_j.norm() > 0.1
        assert (P @ a.sds_domain_B[j]).norm() > 0.1   # the raw B̃_j does have such components


def test_full_column_space_split_on_a_tall_layer():
    """shared_dims=1.0 on d_out > d_in: the shared LoRA in W's column space, the domain LoRAs in its left null space
    (the paper's split): Wᵀ B_j = 0 and (I − UUᵀ) W = 0."""
    model, a, base = _layer_model(d_in=6, d_out=14, shared_dims=1.0)
    perturb_trainable(model, seed=2, std=0.5)
    W = _W(base, False)
    assert a.sds_U.shape == (14, 6)
    torch.testing.assert_close(W - a.sds_U @ (a.sds_U.t() @ W), torch.zeros_like(W), atol=1e-5, rtol=0)
    for j in range(3):
        torch.testing.assert_close(W.t() @ a.domain_B([j]), torch.zeros(6, 3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rule", ["shared", "mean"])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_mixed_domain_batch_matches_the_formula_per_row(conv1d, rule):
    model, a, base = _layer_model(conv1d, unknown_domain=rule)
    perturb_trainable(model, seed=3, std=0.3)
    ids = [0, 2, -1, 0, 1]
    x = torch.randn(5, 4, 12, requires_grad=True)
    y = model(x, task_ids=torch.tensor(ids))
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = _reference(x_ref, _W(base, conv1d), base.bias, a, ids, rule)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    params = [a.sds_shared_A, a.sds_shared_C, *a.sds_domain_A, *a.sds_domain_B]
    got = torch.autograd.grad(y, [x, *params], g)
    want = torch.autograd.grad(y_ref, [x_ref, *params], g)
    for mine, ref in zip(got, want):
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():   # every row alone (the uniform path: one LoRA, fused kernel) gives the same rows
        for i, d in enumerate(ids):
            torch.testing.assert_close(model(x[i:i + 1], task_ids=torch.tensor([d])), y[i:i + 1], atol=1e-5, rtol=1e-5)


def test_without_task_ids_every_row_is_unknown():
    for rule in ("shared", "mean"):
        model, a, base = _layer_model(unknown_domain=rule)
        x = torch.randn(3, 2, 12)
        with torch.no_grad():
            expected = _reference(x, _W(base, False), base.bias, a, [-1, -1, -1], rule)
            torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model(x, task_ids=torch.tensor([-1, -1, -1])), expected, atol=1e-5, rtol=1e-5)


def test_mixed_path_gradcheck_float64():
    model, a, _ = _layer_model()
    model.double()
    x = torch.randn(4, 3, 12, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([1, 0, -1, 1])
    prefix = "base_model.model.proj.adapters.default."
    names = [prefix + n for n in ("sds_shared_C", "sds_domain_A.1", "sds_domain_B.1")]
    leaves = tuple(model.get_parameter(n).detach().clone().requires_grad_(True) for n in names)

    def fn(x, *params):
        return torch.func.functional_call(model, dict(zip(names, params)), (x,), {"task_ids": ids})

    assert torch.autograd.gradcheck(fn, (x, *leaves))


def _model(**kw):
    cfg = dict(num_domains=3, r=4, domain_r=4, init_lora_weights=False, **kw)
    return peftlab.get_peft_model(tiny_llama(), SdsLoraConfig(**cfg))


def _grads(model):
    out = {"shared": [], 0: [], 1: [], 2: []}
    for _, layer in adapted_layers(model.model):
        a = layer.adapters["default"]
        out["shared"] += [a.sds_shared_A.grad, a.sds_shared_C.grad]
        for j in range(3):
            out[j] += [a.sds_domain_A[j].grad, a.sds_domain_B[j].grad]
    return out


def test_domain_rows_train_only_their_domain_lora_and_the_shared_one():
    model = _model().train()
    batch = token_batch()
    model(**batch, labels=batch["input_ids"], task_ids=torch.tensor([1, 1, 1])).loss.backward()
    g = _grads(model)
    assert all(t is not None and t.abs().sum() > 0 for t in g["shared"] + g[1])
    assert all(t is None for t in g[0] + g[2])       # not in the graph: AdamW leaves them alone too


def test_a_row_gives_no_gradient_to_other_domains_in_a_mixed_batch():
    model = _model().train()
    batch = token_batch()
    logits = model(**batch, task_ids=torch.tensor([0, 1, -1])).logits
    logits[1].pow(2).sum().backward()                 # row 1 (domain 1) alone
    g = _grads(model)
    assert all(t.abs().sum() > 0 for t in g["shared"] + g[1])
    assert all(t is not None and torch.count_nonzero(t) == 0 for t in g[0])   # in the graph, exactly zero
    assert all(t is None for t in g[2])               # absent from the batch


def test_unknown_rows_train_only_the_shared_lora_by_default():
    model = _model().train()
    batch = token_batch()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    g = _grads(model)
    assert all(t.abs().sum() > 0 for t in g["shared"]) and all(t is None for j in range(3) for t in g[j])
    mean = _model(unknown_domain="mean").train()      # the "mean" rule trains every domain LoRA a little
    mean(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(t.abs().sum() > 0 for j in range(3) for t in _grads(mean)[j])


def _logits(model, batch, ids=None):
    with torch.no_grad():
        return model(**batch, **({} if ids is None else {"task_ids": torch.tensor(ids)})).logits


def test_model_rows_of_a_mixed_batch_equal_their_uniform_batches_in_training_too():
    """The mixed path against the fused / sibling-fusion path of one-domain batches, through a tiny LLaMA."""
    model = _model().train()
    batch = token_batch()
    ids = [2, 0, -1]
    mixed = model(**batch, task_ids=torch.tensor(ids)).logits
    for d in (2, 0, -1):
        for _ in range(2):   # the second training forward runs q/k/v and gate/up as sibling groups
            uniform = model(**batch, task_ids=torch.tensor([d] * 3)).logits
        rows = [i for i, e in enumerate(ids) if e == d]
        torch.testing.assert_close(mixed[rows], uniform[rows], atol=1e-5, rtol=1e-5)
    assert (mixed[0] - mixed[1]).abs().max() > 0     # the domains do differ


def test_generate_keeps_each_rows_domain_with_beams():
    model = _model().eval()
    perturb_trainable(model, seed=4, std=0.5)
    batch = token_batch(batch=2)
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)
    both = model.generate(**batch, task_ids=torch.tensor([1, 2]), **kw)
    for i, d in enumerate((1, 2)):
        alone = model.generate(input_ids=batch["input_ids"][i:i + 1], attention_mask=batch["attention_mask"][i:i + 1],
                               task_ids=torch.tensor([d]), **kw)
        assert torch.equal(both[i, -alone.shape[1]:], alone[0])


def test_save_load_round_trip_keeps_every_domain(tmp_path):
    model = _model(domain_names=["a", "b", "c"]).eval()
    perturb_trainable(model, seed=5, std=0.2)
    batch, ids = token_batch(), [2, 0, 1]
    expected, unknown = _logits(model, batch, ids), _logits(model, batch)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SDS_LORA" and saved["num_domains"] == 3 and saved["domain_names"] == ["a", "b", "c"]
    keys = load_file(tmp_path / "adapter_model.safetensors")
    q = "base_model.model.model.layers.0.self_attn.q_proj."
    assert {q + s for s in ("sds_U", "sds_shared_A", "sds_shared_C", "sds_domain_A.2", "sds_domain_B.2")} <= set(keys)
    assert keys[q + "sds_U"].shape == (32, 16)        # q_proj 32×32, shared_dims 0.5
    loaded = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, batch, ids), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_logits(loaded, batch), unknown, atol=1e-6, rtol=1e-6)


def test_merge_folds_one_domain_and_refuses_rows_of_others():
    model = _model().eval()
    perturb_trainable(model, seed=6, std=0.2)
    batch = token_batch()
    base_state = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    expected = _logits(model, batch, [1, 1, 1])
    with model.disable_adapter():
        base = _logits(model, batch)
    set_merge_domain(model, 1)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, batch, [1, 1, 1]), expected, atol=1e-5, rtol=1e-5)
    for ids in ([1, 0, 1], None):
        with pytest.raises(ValueError, match="merged for domain 1"):
            _logits(model, batch, ids)
    with model.disable_adapter():   # the base model, whatever the rows' domains (the layers unmerge themselves)
        torch.testing.assert_close(_logits(model, batch, [1, 0, 2]), base, atol=1e-5, rtol=1e-5)
    model.merge_adapter()
    model.unmerge_adapter()
    for k, v in model.get_base_model().state_dict().items():
        torch.testing.assert_close(v, base_state[k], atol=1e-6, rtol=1e-6, msg=k)
    torch.testing.assert_close(_logits(model, batch, [1, 1, 1]), expected, atol=1e-5, rtol=1e-5)
    plain = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    fresh = _model()
    with pytest.raises(ValueError, match="merge_domain must be None"):
        set_merge_domain(fresh, 3)
    assert fresh.peft_config["default"].merge_domain is None   # a refused value changes nothing


def test_mixed_adapter_batches_take_one_domain_per_batch():
    model = _model().eval()
    perturb_trainable(model, seed=7, std=0.2)
    batch = token_batch()
    names = ["default", "__base__", "default"]
    with torch.no_grad():
        got = model(**batch, adapter_names=names, task_ids=torch.tensor([2, 2, 2])).logits
        with model.disable_adapter():
            base = model(**batch).logits
    torch.testing.assert_close(got[[0, 2]], _logits(model, batch, [2, 2, 2])[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], base[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot be split further"):
        model(**batch, adapter_names=names, task_ids=torch.tensor([0, 2, 1]))


def test_records_expert_labels_reach_the_layers_as_task_ids():
    examples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "task_id": t} for t in (0, 2, 2)]
    batch = Collator(pad_token_id=0)(examples)
    assert batch["task_ids"].tolist() == [0, 2, 2]
    model = _model().train()
    model(**batch).loss.backward()
    g = _grads(model)
    assert all(t.abs().sum() > 0 for t in g[0] + g[2]) and all(t is None for t in g[1])


@pytest.mark.parametrize("kw,match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(domain_r=-1), "domain_r must be a positive integer"),
    (dict(num_domains=0), "num_domains must be a positive integer"),
    (dict(shared_dims=0), "shared_dims is how many top singular directions"),
    (dict(shared_dims=1.5), "fraction in \\(0, 1\\]"),
    (dict(lora_alpha=float("nan")), "lora_alpha must be a positive finite number"),
    (dict(lora_dropout=1.0), "lora_dropout is a probability"),
    (dict(unknown_domain="route"), "unknown_domain must be 'shared'"),
    (dict(num_domains=2, merge_domain=2), "merge_domain must be None .* 0..1"),
    (dict(num_domains=2, domain_names=["a"]), "1 domain_names for num_domains=2"),
    (dict(init_lora_weights="pissa"), "init_lora_weights must be True"),
])
def test_config_errors_say_what_is_right(kw, match):
    with pytest.raises(ValueError, match=match):
        SdsLoraConfig(**kw)


def test_layers_that_cannot_be_split_are_refused_by_name():
    # v_proj is 16×32: k = 12 leaves 4 directions, fewer than domain_r = 8
    with pytest.raises(ValueError, match=r"cannot split model\.layers\.0\.self_attn\.v_proj .* k=12"):
        peftlab.get_peft_model(tiny_llama(), SdsLoraConfig(shared_dims=12))
    with pytest.raises(ValueError, match="r=8 <= k"):   # q_proj 32×32, k = 3 cannot hold rank 8
        peftlab.get_peft_model(tiny_llama(), SdsLoraConfig(shared_dims=3))
    with pytest.raises(ValueError, match="cannot split"):   # the whole column space of a square W: no complement
        peftlab.get_peft_model(tiny_llama(), SdsLoraConfig(shared_dims=1.0))


def test_bad_task_ids_are_refused():
    model = _model()
    batch = token_batch()
    with pytest.raises(ValueError, match="domain\\(s\\) \\[3\\], but the adapter has num_domains=3"):
        model(**batch, task_ids=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="one domain per row"):
        model(**batch, task_ids=torch.tensor([[0, 1, 1]]))


def test_registered_with_its_flags():
    info = peftlab.get_method("sds-lora")
    assert info.mergeable and info.identity_at_init and info.kind == "delta-weight"
    cfg = info.make_config(r=4, lora_alpha=8, lora_dropout=0.1)
    assert (cfg.r, cfg.domain_r, cfg.lora_alpha, cfg.lora_dropout) == (4, 4, 8, 0.1)
