"""Reference tests of the routing maths of the mixture methods, against the papers' equations written out here
independently of peftlab's code (plain loops over tokens and experts, softmax by hand)."""
from __future__ import annotations

import math

import pytest
import torch

import peftlab
from conftest import perturb_trainable, tiny_bert, tiny_llama, token_batch
from peftlab.core.routing import RoutingContext, balance_loss
from peftlab.methods.moe_lora import MoeLoraConfig, MoeLoraLinear


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _expert_layer(d_in=6, d_out=5, **kw):
    cfg = MoeLoraConfig(**{"r": 2, "num_experts": 4, "top_k": 2, "lora_alpha": 4.0, **kw})
    torch.manual_seed(0)
    layer = MoeLoraLinear(d_in, d_out, cfg, RoutingContext()).double()
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.weight.normal_()
    return layer, cfg


def _reference(layer, cfg, x, base_out):
    """y_t = base_t + Σ_j g_j s B_{e_j} A_{e_j} x_t, g = top-k of softmax(W_r x_t) renormalised (MixLoRA eq.)."""
    out = base_out.clone()
    for t in range(x.shape[0]):
        p = _softmax((layer.router.weight @ x[t]).tolist())
        top = sorted(range(len(p)), key=lambda i: -p[i])[:cfg.top_k]
        z = sum(p[i] for i in top)
        for i in top:
            if i < cfg.num_experts:  # slot num_experts is the zero expert: adds nothing
                out[t] += (p[i] / z) * (cfg.lora_alpha / cfg.r) * layer.lora_B[i].t() @ (layer.lora_A[i] @ x[t])
    return out


@pytest.mark.parametrize("kw", [dict(), dict(top_k=1), dict(top_k=3, zero_expert=True), dict(top_k=4),
                                dict(expert_compute="grouped"), dict(expert_compute="grouped", zero_expert=True)])
def test_topk_renormalised_output_matches_the_equation(kw):
    layer, cfg = _expert_layer(**kw)
    x = torch.randn(9, 6, dtype=torch.double)
    base = torch.nn.Linear(6, 5).double()
    got = layer(x, base, base(x))
    torch.testing.assert_close(got, _reference(layer, cfg, x, base(x)))


def test_balance_loss_value():
    # 4 tokens, 3 slots, top-2: f_i = (1/N)·#assignments to i, P_i = mean prob, L = S Σ f_i P_i
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.7, 0.2, 0.1]])
    idx = probs.topk(2, dim=-1).indices
    counts = [0, 0, 0]
    for row in idx.tolist():
        for i in row:
            counts[i] += 1
    p_mean = [sum(probs[t, i].item() for t in range(4)) / 4 for i in range(3)]
    expected = 3 * sum(counts[i] / 4 * p_mean[i] for i in range(3))
    assert balance_loss(probs, idx).item() == pytest.approx(expected, rel=1e-6)
    # uniform routing gives exactly k; a mask leaves padding tokens out
    uniform = torch.full((6, 3), 1 / 3)
    assert balance_loss(uniform, torch.tensor([[0, 1], [1, 2], [2, 0]] * 2)).item() == pytest.approx(2.0)
    mask = torch.tensor([True, True, False, True])
    assert balance_loss(probs, idx, mask).item() == pytest.approx(balance_loss(probs[mask], idx[mask]).item())


@pytest.mark.parametrize("compute", ["grouped", "dense"])
def test_zero_expert_keeps_the_base_output(compute):
    layer, cfg = _expert_layer(top_k=1, zero_expert=True, expert_compute=compute)
    x = torch.rand(7, 6, dtype=torch.double) + 0.1          # positive inputs: the zero slot's logit dominates
    with torch.no_grad():
        layer.router.weight[:cfg.num_experts] = -5.0
        layer.router.weight[cfg.num_experts] = 5.0
    base = torch.nn.Linear(6, 5).double()
    torch.testing.assert_close(layer(x, base, base(x)), base(x), rtol=0, atol=0)
    # top-2 with the zero slot: the expert keeps only its own renormalised weight (nothing is redistributed)
    layer2, cfg2 = _expert_layer(top_k=2, zero_expert=True, expert_compute=compute)
    torch.testing.assert_close(layer2(x, base, base(x)), _reference(layer2, cfg2, x, base(x)))


@pytest.mark.parametrize("compute", ["grouped", "dense"])
def test_gradients_reach_only_routed_experts(compute):
    layer, cfg = _expert_layer(top_k=1, expert_compute=compute)
    x = torch.rand(8, 6, dtype=torch.double) + 0.1
    with torch.no_grad():
        layer.router.weight[:] = -1.0
        layer.router.weight[2] = 1.0                     # every token goes to expert 2
    base = torch.nn.Linear(6, 5).double()
    layer(x, base, base(x)).sum().backward()
    for e in range(cfg.num_experts):
        moved = layer.lora_A.grad[e].abs().sum() + layer.lora_B.grad[e].abs().sum()
        assert (moved > 0) == (e == 2), f"expert {e}"


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"top_k=5 exceeds the 4 router slots \(num_experts=4\)"):
        MoeLoraConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="num_experts must be a positive integer"):
        MoeLoraConfig(num_experts=0)
    MoeLoraConfig(num_experts=4, top_k=5, zero_expert=True)   # the zero expert is a fifth slot


def _moe_model(**kw):
    cfg = MoeLoraConfig(**{"r": 2, "num_experts": 3, "top_k": 2, "target_modules": ["q_proj", "down_proj"], **kw})
    model = peftlab.get_peft_model(tiny_llama(), cfg)
    perturb_trainable(model, std=0.2)
    return model


def test_balance_loss_is_added_to_the_training_loss_and_recorded():
    batch = token_batch()
    model = _moe_model(router_aux_loss_coef=0.5).train()
    out = model(**batch, labels=batch["input_ids"])
    aux = model.last_aux_losses["default"]
    plain = _moe_model(router_aux_loss_coef=0.0).train()       # same seed: the same weights
    lm = plain(**batch, labels=batch["input_ids"]).loss
    assert plain.last_aux_losses == {}
    torch.testing.assert_close(out.loss, lm + aux)
    half = _moe_model(router_aux_loss_coef=0.25).train()
    half(**batch, labels=batch["input_ids"])
    torch.testing.assert_close(half.last_aux_losses["default"] * 2, aux)
    # coef × the mean over layers of S·Σ f_i P_i, and S·Σ f_i P_i >= k·min_i P_i·S/S > 0
    assert aux.item() > 0
    # the router gets a gradient from the balance loss alone
    half.zero_grad()
    half.last_aux_losses = {}
    model.zero_grad()
    (out.loss - lm.detach()).backward()
    router = model.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"].router
    assert router.weight.grad.abs().sum() > 0


def test_not_mergeable_says_why():
    model = _moe_model()
    with pytest.raises(TypeError, match="cannot be merged: it routes each token"):
        model.merge_and_unload()


def test_routing_stats_count_unmasked_tokens():
    batch = token_batch()
    model = _moe_model().eval()
    with torch.no_grad(), model.routing_group("task-a"):
        model(**batch)
    stats = model.get_routing_stats()["default"]
    layer = stats["all"]["layers"]["model.layers.0.self_attn.q_proj.router"]
    assert layer["tokens"] == int(batch["attention_mask"].sum())
    assert sum(layer["load"]) == pytest.approx(1.0, abs=1e-5)
    assert 0 <= layer["entropy"] <= math.log(3) + 1e-9
    assert stats["task-a"]["layers"].keys() == stats["all"]["layers"].keys()
    model.reset_routing_stats()
    assert model.get_routing_stats()["default"] == {}


def test_mixed_batch_rows_match_single_adapter_runs():
    batch = token_batch()
    model = _moe_model()
    model.add_adapter("other", MoeLoraConfig(r=2, num_experts=2, top_k=1, target_modules=["q_proj"]))
    perturb_trainable(model, seed=3, std=0.2)
    model.eval()
    with torch.no_grad():
        mixed = model(**batch, adapter_names=["default", "other", "__base__"]).logits
        singles = []
        for name in ("default", "other"):
            model.set_adapter(name)
            singles.append(model(**batch).logits)
        with model.disable_adapter():
            base = model(**batch).logits
    torch.testing.assert_close(mixed[0], singles[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], singles[1][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], base[2], atol=1e-5, rtol=1e-5)


def _grouped_reference(x, weights, idx, lora_A, lora_B, scale, into, slots):
    """Σ_j g_j s B_{e_j} A_{e_j} x_t by plain autograd ops, one token at a time (slots >= E add nothing)."""
    rows = []
    for t in range(x.shape[0]):
        y = into[t]
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if e < lora_A.shape[0]:
                y = y + weights[t, j] * scale * (lora_B[e].t() @ (lora_A[e] @ x[t]))   # B stored as B_eᵀ
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("kernel", ["grouped", "dense"])
def test_expert_kernels_match_plain_autograd(zero, kernel):
    from peftlab.core import grouped
    fast = getattr(grouped, f"{kernel}_lowrank")
    g = torch.Generator().manual_seed(0)
    n, k, e, r, d_in, d_out = 11, 2, 4, 3, 5, 6
    x = torch.randn(n, d_in, dtype=torch.double, generator=g, requires_grad=True)
    logits = torch.randn(n, e + zero, dtype=torch.double, generator=g, requires_grad=True)
    a = torch.randn(e, r, d_in, dtype=torch.double, generator=g, requires_grad=True)
    b = torch.randn(e, r, d_out, dtype=torch.double, generator=g, requires_grad=True)
    base = torch.randn(n, d_out, dtype=torch.double, generator=g, requires_grad=True)
    idx = logits.detach().softmax(-1).topk(k, -1).indices
    upstream = torch.randn(n, d_out, dtype=torch.double, generator=g)
    outs, grads = [], []
    for fn in (fast, _grouped_reference):
        w = logits.softmax(-1).gather(1, idx)
        out = fn(x, w, idx, a, b, 0.7, base * 1.0, e + zero)   # base * 1.0: the kernel writes into `into`
        (out * upstream).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad.clone() for t in (x, logits, a, b, base)])
        for t in (x, logits, a, b, base):
            t.grad = None
    torch.testing.assert_close(outs[0], outs[1])
    for got, want, name in zip(grads[0], grads[1], ("x", "router logits", "A", "B", "base")):
        torch.testing.assert_close(got, want, msg=name)
    torch.autograd.gradcheck(lambda *t: fast(t[0], t[1], idx, t[2], t[3], 0.7, t[4] * 1.0, e + zero),
                             (x, w.detach().requires_grad_(), a, b, base))


# -- MoA ----------------------------------------------------------------------------------------------------
def _silu(v):
    return v / (1 + math.exp(-v))


def _sigmoid(v):
    return 1 / (1 + math.exp(-v))


def _moa_router_reference(router, h):
    """w_s = σ(W_2 (silu(W_1 h) ⊙ W_3 h))_s per token, written out with loops (MoA's SwiGLU router)."""
    out = []
    for t in range(h.shape[0]):
        a = [_silu(v) * u for v, u in zip((router.w1(h[t])).tolist(), (router.w3(h[t])).tolist())]
        z = [sum(wj * aj for wj, aj in zip(row, a)) + b for row, b in zip(router.w2.weight.tolist(),
                                                                           router.w2.bias.tolist())]
        out.append([_sigmoid(v) for v in z])
    return torch.tensor(out, dtype=h.dtype)


@pytest.mark.parametrize("mode", ["soft", "sparse"])
def test_moa_router_and_sparse_threshold(mode):
    from peftlab.methods.moa import MoaConfig, MoaRouter
    torch.manual_seed(0)
    cfg = MoaConfig(mode=mode)
    router = MoaRouter(6, 5, cfg, RoutingContext()).double()
    with torch.no_grad():
        for p in router.parameters():
            p.normal_()
    h = torch.randn(12, 6, dtype=torch.double)
    w = _moa_router_reference(router, h)
    got = router(h)
    if mode == "soft":
        torch.testing.assert_close(got, w)
        return
    tau = torch.tensor([[cfg.max_threshold * _sigmoid(float(router.threshold(h[t])))] for t in range(12)],
                       dtype=torch.double)
    torch.testing.assert_close(got, w * (w >= tau))
    assert (got == 0).any() and (got > 0).any(), "the threshold should route some slots and drop others here"
    got.sum().backward()   # the straight-through surrogate teaches the threshold
    assert router.threshold.weight.grad.abs().sum() > 0


def test_sparse_slot_runs_only_on_routed_tokens():
    from peftlab.methods.moa import weighted_rows
    seen = []
    h = torch.randn(6, 3)
    w = torch.tensor([0.0, 0.7, 0.0, 0.2, 0.9, 0.0])
    into = torch.randn(6, 3)
    out = weighted_rows(lambda t: seen.append(t.shape[0]) or 2 * t, h, w, into, sparse=True)
    assert seen == [3]
    torch.testing.assert_close(out, into + w.unsqueeze(-1) * 2 * h)
    torch.testing.assert_close(weighted_rows(lambda t: 2 * t, h, w, into, sparse=False), out)


# (model, task_type, its block 1's query projection): MoA on a LLaMA-like and on a BERT-like block
MOA_ARCHS = {"llama": (tiny_llama, "CAUSAL_LM", lambda m: m.base_model.model.model.layers[1].self_attn.q_proj),
             "bert": (tiny_bert, "SEQ_CLS", lambda m: m.base_model.model.bert.encoder.layer[1].attention.self.query)}


@pytest.mark.parametrize("arch", sorted(MOA_ARCHS))
@pytest.mark.parametrize("mode", ["soft", "sparse"])
def test_moa_lora_slot_is_weighted_by_its_router_output(mode, arch):
    from peftlab.methods.moa import MoaConfig
    build, task_type, query = MOA_ARCHS[arch]
    model = peftlab.get_peft_model(build(), MoaConfig(mode=mode, r=2, task_type=task_type))
    perturb_trainable(model, std=0.3)
    model.eval()
    seen = {}
    q_proj = query(model)
    hooks = [q_proj.register_forward_hook(lambda m, i, o: seen.update(q=(i[0], o))),
             q_proj.base_layer.register_forward_hook(lambda m, i, o: seen.update(q_base=o))]
    with torch.no_grad():
        model(**token_batch())
    for hk in hooks:
        hk.remove()
    x, y = seen["q"]
    site = q_proj.adapters["default"]
    h = x.reshape(-1, x.shape[-1])
    w = _moa_router_reference(site.router, h)[:, 0]            # slot 0 is q_proj's LoRA
    if mode == "sparse":
        tau = [0.5 * _sigmoid(float(site.router.threshold(h[t]))) for t in range(h.shape[0])]
        w = w * (w >= torch.tensor(tau))
    want = seen["q_base"].reshape(h.shape[0], -1) + w.unsqueeze(-1) * site.scale * (h @ site.lora_A.t() @ site.lora_B.t())
    torch.testing.assert_close(y.reshape(want.shape), want, atol=1e-5, rtol=1e-5)


def test_moa_sparse_has_no_prompt_expert_and_bad_configs_say_so():
    from peftlab.methods.moa import MoaConfig
    assert "prompt" in MoaConfig(mode="soft").slot_names()
    assert "prompt" not in MoaConfig(mode="sparse").slot_names()
    model = peftlab.get_peft_model(tiny_llama(), MoaConfig(mode="sparse"))
    assert not any("prompt" in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="mode='dense' is not one of"):
        MoaConfig(mode="dense")
    with pytest.raises(ValueError, match=r"lora_modules \['c_attn'\]"):
        MoaConfig(lora_modules=["q_proj", "c_attn"])


def test_moa_prompt_expert_matches_attention_over_the_prompt():
    from peftlab.methods.moa import MoaConfig
    cfg = MoaConfig(mode="soft", r=2, prompt_length=3)
    model = peftlab.get_peft_model(tiny_llama(), cfg)
    perturb_trainable(model, std=0.3)
    model.eval()
    attn = model.base_model.model.model.layers[0].self_attn
    seen = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, i, o: seen.update(q=o)),
             attn.o_proj.register_forward_hook(lambda m, i, o: seen.update(o=(i[0], o))),
             attn.q_proj.register_forward_hook(lambda m, i, o: seen.update(h=i[0]))]
    with torch.no_grad():
        model(**token_batch())
        for hk in hooks:
            hk.remove()
        site, router = attn.o_proj.adapters["default"], attn.q_proj.adapters["default"].router
        slots = cfg.slot_names()
        h = seen["h"].reshape(-1, seen["h"].shape[-1])
        w = _moa_router_reference(router, h)
        heads, kv_heads, hd = 4, 2, 8
        k = attn.k_proj.base_layer(site.prompt).view(-1, kv_heads, hd)
        v = attn.v_proj.base_layer(site.prompt).view(-1, kv_heads, hd)
        q = seen["q"].reshape(-1, heads, hd)
        p = torch.zeros(q.shape[0], heads, hd)
        for t in range(q.shape[0]):
            for hh in range(heads):
                kv = hh // (heads // kv_heads)     # grouped-query attention: heads share key/value heads
                s = torch.softmax(torch.stack([q[t, hh] @ k[l, kv] / math.sqrt(hd) for l in range(3)]), 0)
                p[t, hh] = w[t, slots.index("prompt")] * site.prompt_gate[hh] * sum(s[l] * v[l, kv] for l in range(3))
        x = seen["o"][0].reshape(-1, heads * hd) + p.reshape(-1, heads * hd)
        want = attn.o_proj.base_layer(x) + w[:, slots.index("o_proj"), None] * site.scale * (x @ site.lora_A.t() @ site.lora_B.t())
    torch.testing.assert_close(seen["o"][1].reshape(want.shape), want, atol=1e-5, rtol=1e-5)


# -- TT-LoRA MoE --------------------------------------------------------------------------------------------
def _stage1_dirs(tmp_path, n=3):
    from peftlab.methods.tt_lora import TTLoraConfig
    dirs = []
    for i in range(n):
        m = peftlab.get_peft_model(tiny_llama(), TTLoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        perturb_trainable(m, seed=i, std=0.3)
        m.save_pretrained(tmp_path / f"task{i}")
        dirs.append(str(tmp_path / f"task{i}"))
    return dirs


def test_noisy_top1_router_noise_only_in_training():
    from peftlab.methods.tt_lora_moe import TopOneRouter
    torch.manual_seed(0)
    router = TopOneRouter(6, 3, True, RoutingContext())
    h_last, h_mean = torch.randn(5, 6), torch.randn(5, 6)
    clean = h_last @ router.proj.weight.t()                     # logits = W_r h_last
    router.eval()
    torch.testing.assert_close(router(h_last, h_mean), clean)
    router.train()
    torch.manual_seed(1)
    noisy = router(h_last, h_mean)
    torch.manual_seed(1)
    eps = torch.randn_like(clean)
    scale = torch.log1p(torch.exp(h_mean @ router.noise.weight.t() + router.noise.bias))   # softplus
    torch.testing.assert_close(noisy, clean + eps * scale)


def test_tt_lora_moe_routes_each_input_to_one_frozen_expert(tmp_path):
    from peftlab.methods.tt_lora_moe import TTLoraMoeConfig
    dirs = _stage1_dirs(tmp_path)
    batch = token_batch()
    experts = [peftlab.PeftModel.from_pretrained(tiny_llama(), d).eval() for d in dirs]
    moe = peftlab.get_peft_model(tiny_llama(), TTLoraMoeConfig(expert_dirs=dirs)).eval()
    cfg = moe.peft_config["default"]
    assert cfg.expert_dirs is None and cfg.expert_names == ["task0", "task1", "task2"] and cfg.r == 2
    # only the router trains
    names = [n for n, p in moe.named_parameters() if p.requires_grad]
    assert names and all(".router." in n for n in names)
    # the router's choice per input: argmax W_r h_last of the frozen base's final hidden state at the last token
    router = moe.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"].router
    with torch.no_grad():
        h = tiny_llama().model(**batch).last_hidden_state[:, -1]     # left padding: the last token is real
        choice = (h @ router.proj.weight.t()).argmax(-1)
        got = moe(**batch).logits
        for row, e in enumerate(choice.tolist()):
            want = experts[e](**{k: v[row:row + 1] for k, v in batch.items()}).logits[0]
            torch.testing.assert_close(got[row], want, atol=1e-5, rtol=1e-5)
    load = moe.get_routing_stats()["default"]["all"]["layers"]["model.layers.0.self_attn.q_proj.router"]["load"]
    assert load == pytest.approx([choice.tolist().count(e) / 3 for e in range(3)], abs=1e-5)


def test_tt_lora_moe_router_cross_entropy_trains_the_router_only(tmp_path):
    from peftlab.methods.tt_lora_moe import TTLoraMoeConfig
    moe = peftlab.get_peft_model(tiny_llama(), TTLoraMoeConfig(expert_dirs=_stage1_dirs(tmp_path),
                                                               router_noise=False)).train()
    batch, task_ids = token_batch(), torch.tensor([2, 0, 1])
    out = moe(**batch, labels=batch["input_ids"], task_ids=task_ids)
    router = moe.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"].router
    with torch.no_grad():
        h = tiny_llama().model(**batch).last_hidden_state[:, -1]
    ce = torch.nn.functional.cross_entropy(h @ router.proj.weight.t(), task_ids)
    torch.testing.assert_close(moe.last_aux_losses["default"], ce.detach(), atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert router.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in moe.named_parameters() if "tt_cores" in n)


def test_tt_lora_moe_routes_a_training_row_on_its_prompt_alone(tmp_path):
    """Training rows are prompt + completion with labels on the completion; the router must decide from what it
    will see at inference (the prompt), so it pools the positions before the first labelled token."""
    from peftlab.core.routing import pooled_states
    from peftlab.methods.tt_lora_moe import TTLoraMoeConfig
    moe = peftlab.get_peft_model(tiny_llama(), TTLoraMoeConfig(expert_dirs=_stage1_dirs(tmp_path)))
    prompt = torch.tensor([[5, 17, 9, 33, 21]])
    full = torch.cat([prompt, torch.tensor([[40, 41, 2]])], 1)        # + a 3-token completion
    labels = torch.full_like(full, -100)
    labels[:, 5:] = full[:, 5:]
    body = moe.base_model.model
    with moe.disable_adapter():   # the router reads the frozen base (prepare_inputs turns the adapters off too)
        last_p, mean_p = pooled_states(body, {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)})
        last_t, mean_t = pooled_states(body, {"input_ids": full, "attention_mask": torch.ones_like(full),
                                              "labels": labels})
        # the training loop's trimmed labels (only the last columns, logits_to_keep) mark the same prompt
        last_k, _ = pooled_states(body, {"input_ids": full, "attention_mask": torch.ones_like(full),
                                         "labels": labels[:, -4:]})
        # labelled throughout (text data): pooled over every real token
        last_a, _ = pooled_states(body, {"input_ids": full, "attention_mask": torch.ones_like(full), "labels": full})
        last_n, _ = pooled_states(body, {"input_ids": full, "attention_mask": torch.ones_like(full)})
    torch.testing.assert_close(last_t, last_p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean_t, mean_p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last_k, last_p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last_a, last_n)


def test_tt_lora_moe_refuses_other_adapters(tmp_path):
    from peftlab.methods.tt_lora_moe import TTLoraMoeConfig
    m = peftlab.get_peft_model(tiny_llama(), MoeLoraConfig(r=2, num_experts=2, top_k=1))
    m.save_pretrained(tmp_path / "moe")
    with pytest.raises(ValueError, match="holds a MOE_LORA adapter; stage 2 takes the directories of `tt-lora` runs"):
        peftlab.get_peft_model(tiny_llama(), TTLoraMoeConfig(expert_dirs=[str(tmp_path / "moe")]))


def test_tt_lora_moe_refuses_missing_experts_and_settings_they_contradict(tmp_path):
    from peftlab.methods.tt_lora import TTLoraConfig
    from peftlab.methods.tt_lora_moe import TTLoraMoeConfig
    with pytest.raises(ValueError, match="TT-LoRA MoE needs expert_dirs.*would stay untrained"):
        peftlab.get_peft_model(tiny_llama(), TTLoraMoeConfig())
    dirs = _stage1_dirs(tmp_path, n=2)
    with pytest.raises(ValueError, match=r"r=4 was given, but the stage-1 experts were trained with r=2; leave r"):
        peftlab.get_peft_model(tiny_llama(), TTLoraMoeConfig(expert_dirs=dirs, r=4))
    # a field given equal to the experts' is fine
    ok = peftlab.get_peft_model(tiny_llama(), TTLoraMoeConfig(expert_dirs=dirs, r=2))
    assert ok.peft_config["default"].r == 2
    other = peftlab.get_peft_model(tiny_llama(), TTLoraConfig(r=3, target_modules=["q_proj", "v_proj"]))
    other.save_pretrained(tmp_path / "r3")
    with pytest.raises(ValueError, match="the stage-1 experts disagree on r: .*task0.* 2, .*r3.* 3"):
        peftlab.get_peft_model(tiny_llama(), TTLoraMoeConfig(expert_dirs=[dirs[0], str(tmp_path / "r3")]))


def test_moa_mixed_batch_rows_match_single_adapter_runs():
    from peftlab.methods.moa import MoaConfig
    batch = token_batch()
    model = peftlab.get_peft_model(tiny_llama(), MoaConfig(mode="soft", r=2))
    model.add_adapter("sparse", MoaConfig(mode="sparse", r=2))
    perturb_trainable(model, std=0.3)
    model.eval()
    with torch.no_grad():
        mixed = model(**batch, adapter_names=["sparse", "default", "__base__"]).logits
        singles = {}
        for name in ("default", "sparse"):
            model.set_adapter(name)
            singles[name] = model(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
    torch.testing.assert_close(mixed[0], singles["sparse"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], singles["default"][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], base[2], atol=1e-5, rtol=1e-5)
