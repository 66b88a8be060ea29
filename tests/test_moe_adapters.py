"""MoE-Adapters with DDAS: one block against its formula in plain torch (noisy top-2 in training, clean in eval),
per-input routing on the last prompt token, frozen experts after a task, DDAS's choice and its threshold to the
base model, the saved task state, and `peftlab continual` through the CLI."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import peftlab
from conftest import perturb_trainable, tiny_llama, token_batch
from peftlab.methods.moe_adapters import BASE, MoeAdapterBlock, MoeAdaptersConfig, TaskAutoencoders, TaskRouting, \
    summary_positions
from peftlab.methods.adapters import _Slot


def _block(d=6, experts=4, tasks=3, dropout=0.0, noise=True, seed=0):
    torch.manual_seed(seed)
    cfg = MoeAdaptersConfig(bottleneck_size=3, num_experts=experts, num_tasks=tasks, adapter_dropout=dropout,
                            router_noise=noise)
    ctx = TaskRouting(0)
    block = MoeAdapterBlock(d, cfg, _Slot(), ctx, None)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_()       # off the zero init (up, routers), so nothing hides a wrong formula
    return block, ctx


def _reference(h, result, block, tasks, pos, noise=None):
    """The paper's block written out: top-2 of the row's router logits at its summary token, softmax over the
    two, Σ g_e · s · (W_up ReLU(W_down h + b_down) + b_up) over the chosen experts; noise ε (B, E) if given."""
    out = result.clone()
    for b in range(h.shape[0]):
        t = int(tasks[b])
        if t == BASE:
            continue
        x = h[b, pos[b]]
        logits = x @ block.router.w_gate[t]
        if noise is not None:
            logits = logits + noise[b] * (F.softplus(x @ block.router.w_noise[t]) + 1e-2)
        top, idx = logits.topk(2)
        g = torch.softmax(top, -1)
        for j in range(2):
            ex = block.experts[int(idx[j])]
            y = torch.relu(h[b] @ ex.down.weight.t() + ex.down.bias) @ ex.up.weight.t() + ex.up.bias
            out[b] = out[b] + g[j] * 0.1 * y
    return out


def _run(block, ctx, h, result, tasks, pos):
    ctx.tasks, ctx.positions, ctx.route_id = tasks, pos, ctx.route_id + 1
    block._source.value = h
    return block(h, None, result)


def test_block_in_eval_is_the_clean_top2_formula_per_input():
    block, ctx = _block()
    block.eval()
    h, result = torch.randn(4, 5, 6), torch.randn(4, 5, 6)
    tasks, pos = torch.tensor([0, 2, BASE, 0]), torch.tensor([4, 1, 3, 2])
    with torch.no_grad():
        got = _run(block, ctx, h, result, tasks, pos)
    want = _reference(h, result, block, tasks, pos)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got[2], result[2], atol=0, rtol=0)   # a BASE row: the FFN output untouched


def test_block_in_training_adds_shazeer_noise_and_gradients_follow_the_formula():
    block, ctx = _block(noise=True)
    block.train()
    h, result = torch.randn(3, 4, 6, requires_grad=True), torch.randn(3, 4, 6)
    tasks, pos = torch.tensor([1, 1, 1]), torch.tensor([3, 0, 2])
    torch.manual_seed(7)
    got = _run(block, ctx, h, result, tasks, pos)
    torch.manual_seed(7)
    noise = torch.randn(3, 4)       # the router draws ε once for the rows of one task
    h_ref = h.detach().clone().requires_grad_(True)
    want = _reference(h_ref, result, block, tasks, pos, noise)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    params = [block.router.w_gate[1], block.router.w_noise[1], h] + [p for e in block.experts for p in e.parameters()]
    mine = torch.autograd.grad(got, params, g, allow_unused=True)
    ref_params = params[:2] + [h_ref] + params[3:]
    theirs = torch.autograd.grad(want, ref_params, g, allow_unused=True)
    for a, b in zip(mine, theirs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    assert block.task_counts.sum() == 3 * 2   # every row counted its two experts (the frozen list's statistic)


def test_dropout_only_in_training():
    block, ctx = _block(dropout=0.5, noise=False)
    h, result = torch.randn(2, 3, 6), torch.zeros(2, 3, 6)
    tasks, pos = torch.tensor([0, 0]), torch.tensor([2, 2])
    block.eval()
    with torch.no_grad():
        assert torch.equal(_run(block, ctx, h, result, tasks, pos), _run(block, ctx, h, result, tasks, pos))
        block.train()
        assert not torch.equal(_run(block, ctx, h, result, tasks, pos), _reference(h, result, block, tasks, pos))


def test_the_summary_position_is_the_last_prompt_token():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, -100, -100, 5, 6], [-100, -100, 3, 4, 5, 6]])
    assert summary_positions({"attention_mask": mask}).tolist() == [5, 5]
    assert summary_positions({"attention_mask": mask, "labels": labels}).tolist() == [3, 1]
    assert summary_positions({"attention_mask": mask, "labels": labels[:, -4:]}).tolist() == [3, 1]   # kept tail
    assert summary_positions({"attention_mask": mask, "labels": mask}).tolist() == [5, 5]   # all labelled: text
    assert summary_positions({}) is None


def _config(**kw):
    return MoeAdaptersConfig(**{"num_experts": 4, "num_tasks": 3, "bottleneck_size": 4, "ddas_steps": 60, **kw})


def _model(**kw):
    model = peftlab.get_peft_model(tiny_llama(), _config(**kw))
    perturb_trainable(model, seed=3, std=0.3)
    return model


def _blocks(model):
    return [layer.mlp.down_proj.adapters["default"] for layer in model.base_model.model.model.layers]


def _task_batches(low, high, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(low, high, (4, 6), generator=g)
        labels = ids.clone()
        labels[:, :4] = -100            # a 4-token prompt, a 2-token completion
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def test_the_current_task_router_trains_and_a_finished_tasks_experts_get_no_gradient():
    model = _model()
    blocks = _blocks(model)
    model.train()
    batch = _task_batches(1, 40)[0]
    model(**batch).loss.backward()
    assert all(b.router.w_gate[0].grad is not None and b.router.w_gate[1].grad is None for b in blocks)
    model.zero_grad()
    counts = [torch.tensor([5.0, 0.0, 9.0, 1.0]), torch.tensor([0.0, 3.0, 2.0, 0.0])]
    for b, c in zip(blocks, counts):
        b.task_counts.copy_(c)
    model.end_task(iter(_task_batches(1, 40)))
    assert model.peft_config["default"].tasks_done == 1
    assert [b.frozen_by.tolist() for b in blocks] == [[0, BASE, 0, BASE], [BASE, 0, 0, BASE]]  # each block's top 2
    assert all(b.task_counts.sum() == 0 for b in blocks)
    frozen = {id(p) for b in blocks for e, ex in enumerate(b.experts) if b.frozen_by[e] >= 0 for p in ex.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert frozen and not frozen & trainable
    assert all(b.router.w_gate[1].requires_grad and not b.router.w_gate[0].requires_grad for b in blocks)
    before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    used_frozen = 0
    for step in range(3):       # task 2: router 1 routes to frozen experts too, which stay as they were
        counted = [b.task_counts.clone() for b in blocks]
        model(**_task_batches(60, 100, seed=step + 1)[0]).loss.backward()
        for b, c in zip(blocks, counted):
            assert b.router.w_gate[0].grad is None and b.router.w_gate[1].grad is not None
            for e, ex in enumerate(b.experts):
                used = bool(b.task_counts[e] > c[e])     # routed to in this step
                if b.frozen_by[e] >= 0:
                    used_frozen += used
                    assert all(p.grad is None for p in ex.parameters())
                else:
                    assert (ex.up.weight.grad is not None) == used
        opt.step()
        opt.zero_grad()
    assert used_frozen > 0
    after = model.adapter_state_dict()
    for k, v in before.items():
        block_i, rest = int(k.split("layers.")[1].split(".")[0]), k.split("down_proj.")[1]
        if rest.startswith("experts.") and blocks[block_i].frozen_by[int(rest.split(".")[1])] >= 0:
            assert torch.equal(after[k], v), k
        if rest.startswith("router.w_gate.0"):
            assert torch.equal(after[k], v), k


def _features(base, batch):
    """DDAS's input written out: sigmoid of the frozen base's last hidden state averaged over the prompt."""
    mask = batch["attention_mask"].clone()
    if "labels" in batch:
        mask = mask * (batch["labels"] == -100)
    with torch.no_grad():
        h = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return torch.sigmoid((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))


def _errors(ae, x, t):
    z = torch.relu(x @ ae.enc_weight[t].t() + ae.enc_bias[t])
    return (torch.sigmoid(z @ ae.dec_weight[t].t() + ae.dec_bias[t]) - x).pow(2).mean(-1)


def test_ddas_fits_an_autoencoder_per_task_picks_the_best_and_sends_far_inputs_to_the_base():
    torch.manual_seed(0)
    centres = torch.randn(3, 16) * 3
    data = [torch.sigmoid(c + 0.3 * torch.randn(200, 16)) for c in centres]
    ae = TaskAutoencoders(16, 8, 4)
    final = [ae.fit(t, data[t], 300, 1e-2) for t in range(2)]   # two tasks learnt; the third is never seen
    for t in range(2):
        torch.testing.assert_close(torch.tensor(final[t]), _errors(ae, data[t], t).mean())
        assert (ae.choose(data[t], 2, threshold=1.0) == t).float().mean() > 0.95
    far = data[2]
    in_dist = torch.cat([_errors(ae, data[t], t) for t in range(2)])
    far_best = torch.stack([_errors(ae, far, t) for t in range(2)], -1).min(-1).values
    threshold = float(in_dist.max() + far_best.min()) / 2
    assert in_dist.max() < threshold < far_best.min()   # the constructed far set is separable by the threshold
    assert (ae.choose(far, 2, threshold) == BASE).all()
    assert (ae.choose(data[0], 2, threshold) == 0).all() and (ae.choose(data[1], 2, threshold) == 1).all()


def test_ddas_in_the_model_routes_each_input_and_base_rows_get_the_base_output():
    model = _model()
    tasks = [_task_batches(1, 40, seed=0), _task_batches(80, 128, seed=1)]
    model.train()
    for t, batches in enumerate(tasks):
        model.end_task(iter(batches))
        assert model.peft_config["default"].tasks_done == t + 1
    model.eval()
    ae = _blocks(model)[0].ddas
    base = tiny_llama()
    probe = {"input_ids": torch.cat([tasks[0][0]["input_ids"][:2], tasks[1][0]["input_ids"][:2]]),
             "attention_mask": torch.ones(4, 6, dtype=torch.long)}
    x = _features(base, probe)
    err = torch.stack([_errors(ae, x, t) for t in range(2)], -1)        # (4, 2)
    best, choice = err.min(-1)
    cfg = model.peft_config["default"]
    cfg.ddas_threshold = 1.0                                            # nothing is far: the argmin
    with torch.no_grad():
        model(**probe)
    ctx = _blocks(model)[0].context
    assert ctx.tasks.tolist() == choice.tolist()
    cfg.ddas_threshold = float(best.sort().values[1:3].mean())         # the two larger errors are far
    with torch.no_grad():
        adapted = model(**probe).logits
        base_logits = base(**probe).logits
    far = best > cfg.ddas_threshold
    assert far.sum() == 2 and ctx.tasks.tolist() == torch.where(far, BASE, choice).tolist()
    torch.testing.assert_close(adapted[far], base_logits[far], atol=1e-6, rtol=1e-6)
    assert (adapted[~far] - base_logits[~far]).abs().max() > 1e-3
    # the autoencoder for task 0 was fit on prompts of task 0's batches (features computed as written out above)
    ae_own = torch.cat([_features(base, b) for b in tasks[0]])
    assert _errors(ae, ae_own, 0).mean() < _errors(ae, ae_own, 1).mean()


def test_generate_routes_on_the_prompt_once_and_keeps_it():
    model = _model()
    model.eval()
    batch = token_batch()
    with torch.no_grad():
        model(**batch)
        prompt_gates = [b._cached[1].clone() for b in _blocks(model)]
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (3, 11)
    for b, g in zip(_blocks(model), prompt_gates):
        assert b._cached[0] == b.context.route_id      # this generate call's routing, made once for the prompt
        torch.testing.assert_close(b._cached[1], g)   # on the prompt's last token, never on the new tokens


def test_save_load_keeps_the_task_state(tmp_path):
    model = _model()
    model.train()
    model.end_task(iter(_task_batches(1, 40)))
    model.eval()
    probe = _task_batches(1, 40, seed=5)[0]
    with torch.no_grad():
        want = model(**probe).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MOE_ADAPTERS" and saved["tasks_done"] == 1
    loaded = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**probe).logits, want, atol=1e-6, rtol=1e-6)
    again = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert again.peft_config["default"].tasks_done == 1
    for a, b in zip(_blocks(model), _blocks(again)):
        assert torch.equal(a.frozen_by, b.frozen_by)
        assert [p.requires_grad for p in a.parameters()] == [p.requires_grad for p in b.parameters()]
        assert b.router.w_gate[1].requires_grad and not b.router.w_gate[0].requires_grad
    assert torch.equal(_blocks(model)[0].ddas.enc_weight, _blocks(again)[0].ddas.enc_weight)
    assert again.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()
    with pytest.raises(ValueError, match="loaded for inference"):
        loaded.end_task(iter(_task_batches(1, 40)))


def test_task_capacity_and_end_task_errors():
    model = _model(num_tasks=1)
    model.train()
    with pytest.raises(ValueError, match="got no batches"):
        model.end_task(iter([]))
    model.end_task(iter(_task_batches(1, 40)))
    with pytest.raises(ValueError, match="all 1 task routers are used"):
        model(**_task_batches(1, 40)[0])
    with pytest.raises(ValueError, match="all 1 task routers are used"):
        model.end_task(iter(_task_batches(1, 40)))
    model.eval()
    with torch.no_grad():
        model(**token_batch())      # evaluation still works: DDAS over the finished task
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_adapter()


@pytest.mark.parametrize("field,value,message", [
    ("num_experts", 0, "num_experts must be a positive integer"),
    ("top_k", 5, "top_k=5 exceeds num_experts=4"),
    ("num_tasks", 1.5, "num_tasks must be a positive integer"),
    ("ddas_threshold", 0.0, "ddas_threshold must be a positive finite number"),
    ("ddas_lr", float("nan"), "ddas_lr must be a positive finite number"),
    ("tasks_done", 5, r"tasks_done=5 must be in \[0, num_tasks=3\]"),
    ("non_linearity", "gelu", "ReLU bottlenecks"),
])
def test_bad_config_values_are_clear_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        _config(**{field: value})


def test_registered_with_the_references_defaults():
    info = peftlab.get_method("moe-adapters")
    assert (info.category, info.kind, info.mergeable, info.identity_at_init) == ("moe", "activation", False, True)
    cfg = info.make_config()
    assert (cfg.num_experts, cfg.top_k, cfg.num_tasks, cfg.bottleneck_size, cfg.scaling, cfg.adapter_dropout) == \
        (22, 2, 11, 64, 0.1, 0.1)
    assert (cfg.ddas_code_size, cfg.ddas_steps) == (100, 300)
    assert (info.default_lr, info.rank_field, info.dropout_field) == (1e-2, "bottleneck_size", "adapter_dropout")


def test_peftlab_continual_on_two_tasks(tmp_path, capsys):
    from peftlab import cli
    from test_train import save_tiny_model_dir
    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    out = tmp_path / "run"
    assert cli.main(["continual", "--model", str(model_dir), "--method", "moe-adapters", "--tasks",
                     "wordnet-antonyms,wordnet-hypernyms", "--steps", "3", "--batch-size", "4", "--r", "4",
                     "--set", "num_experts=4", "--set", "ddas_steps=20", "--set", "ddas_batches=2",
                     "--eval-size", "4", "--max-new-tokens", "3", "--forgetting-size", "4", "--no-progress",
                     "--output", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(res["matrix"]) == 2 and all(len(row) == 2 for row in res["matrix"])
    for stage, task in ((1, "wordnet-antonyms"), (2, "wordnet-hypernyms")):
        adapter = out / f"stage-{stage}-{task}" / "adapter"
        saved = json.loads((adapter / "adapter_config.json").read_text())
        assert saved["peft_type"] == "MOE_ADAPTERS" and saved["tasks_done"] == stage
        assert saved["bottleneck_size"] == 4 and saved["num_experts"] == 4
