"""LoRA-Pro (methods/lora/pro.py): the adjusted gradients against the paper's closed form written out here in plain
torch, their equivalent gradient against the full gradient of a dense W, the hook's place in both training loops,
and the adapter files."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import peftlab
from conftest import randomize_adapters, tiny_llama, token_batch
from peftlab.core.tuner import adapted_layers
from peftlab.methods.lora.pro import LoraProLinear, LoraProTuner, pro_gradients
from peftlab.train import data as D
from peftlab.train import loop
from peftlab.train.loop import TrainConfig, train
from test_train import char_tokenizer, pc_records, tiny_lm


def reference(A, B, gA, gB, s):
    """The paper's closed form with explicit inverses; X from the Sylvester equation solved as one linear system
    over vec(X) (row-major: vec(MX) = (M ⊗ I) vec X, vec(XN) = (I ⊗ Nᵀ) vec X)."""
    r, d_out = A.shape[0], B.shape[0]
    btb_inv, aat_inv = torch.linalg.inv(B.T @ B), torch.linalg.inv(A @ A.T)
    C = -(1 / s ** 2) * btb_inv @ gA @ A.T
    eye = torch.eye(r, dtype=A.dtype)
    K = torch.kron(B.T @ B, eye) + torch.kron(eye, (A @ A.T).T.contiguous())
    X = torch.linalg.solve(K, C.reshape(-1)).reshape(r, r)
    new_A = (1 / s ** 2) * btb_inv @ gA + X @ A
    new_B = (1 / s ** 2) * (torch.eye(d_out, dtype=A.dtype) - B @ btb_inv @ B.T) @ gB @ aat_inv - B @ X
    return new_A, new_B, X


def lora_case(r=3, d_in=11, d_out=7, s=1.7, seed=0, dtype=torch.float64):
    """A, B, and LoRA's gradients of the loss ⟨G, W + s·BA⟩ for a random full gradient G:
    g_A = s·BᵀG, g_B = s·G Aᵀ."""
    g = torch.Generator().manual_seed(seed)
    A, B, G = (torch.randn(*shape, generator=g, dtype=dtype) for shape in ((r, d_in), (d_out, r), (d_out, d_in)))
    return A, B, s * B.T @ G, s * G @ A.T, G


@pytest.mark.parametrize("r,d_in,d_out,s", [(3, 11, 7, 1.7), (1, 5, 9, 2.0), (4, 16, 16, 0.5)])
def test_adjusted_gradients_are_the_papers_closed_form(r, d_in, d_out, s):
    A, B, gA, gB, _ = lora_case(r, d_in, d_out, s)
    new_A, new_B = pro_gradients(A, B, gA, gB, s)
    want_A, want_B, _ = reference(A, B, gA, gB, s)
    torch.testing.assert_close(new_A, want_A, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(new_B, want_B, rtol=1e-9, atol=1e-10)
    # float32 gradients (a training run's): float32 out, the same values to float32 precision
    f32 = pro_gradients(*(t.float() for t in (A, B, gA, gB)), s)
    assert all(t.dtype == torch.float32 for t in f32)
    torch.testing.assert_close(f32[0], want_A.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f32[1], want_B.float(), rtol=1e-4, atol=1e-5)


def test_x_keeps_the_adjusted_gradients_closest_to_loras_and_the_loss_decreases():
    A, B, gA, gB, _ = lora_case(r=4, d_in=9, d_out=13, s=1.3, seed=3)
    new_A, new_B = pro_gradients(A, B, gA, gB, 1.3)

    def dist(E):  # another X = X + E gives the same equivalent gradient; its distance to LoRA's gradients
        return ((new_A + E @ A - gA) ** 2).sum() + ((new_B - B @ E - gB) ** 2).sum()

    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        E = torch.randn(4, 4, generator=g, dtype=torch.float64) * 1e-2
        assert dist(E) > dist(torch.zeros(4, 4, dtype=torch.float64))
    # stationarity of that distance in X: (g̃_A − g_A)Aᵀ − Bᵀ(g̃_B − g_B) = 0
    torch.testing.assert_close((new_A - gA) @ A.T - B.T @ (new_B - gB), torch.zeros(4, 4, dtype=torch.float64),
                               atol=1e-10, rtol=0)
    # the paper's loss-decrease property: −(⟨g_A, g̃_A⟩ + ⟨g_B, g̃_B⟩) ≤ 0
    assert (gA * new_A).sum() + (gB * new_B).sum() > 0


def test_b_zero_at_init_gives_the_authors_first_step():
    A, B, gA, gB, G = lora_case(r=3, d_in=10, d_out=6, s=2.0, seed=1)
    B = torch.zeros_like(B)
    gA, gB = 2.0 * B.T @ G, 2.0 * G @ A.T                            # g_A = 0 when B = 0
    new_A, new_B = pro_gradients(A, B, gA, gB, 2.0)
    assert torch.equal(new_A, torch.zeros_like(new_A))
    torch.testing.assert_close(new_B, gB @ torch.linalg.inv(A @ A.T) / 4.0, rtol=1e-9, atol=1e-12)


def _projection_by_least_squares(G, A, B, s):
    """min over M, N of ‖s(BM + NA) − G‖ by lstsq on the stacked linear system: the best rank-r-reachable step."""
    r, d_in, d_out = A.shape[0], A.shape[1], B.shape[0]
    cols = []
    for i in range(r * d_in):
        M = torch.zeros(r * d_in, dtype=G.dtype)
        M[i] = 1
        cols.append((s * B @ M.reshape(r, d_in)).reshape(-1))
    for i in range(d_out * r):
        N = torch.zeros(d_out * r, dtype=G.dtype)
        N[i] = 1
        cols.append((s * N.reshape(d_out, r) @ A).reshape(-1))
    design = torch.stack(cols, 1)
    coef = torch.linalg.lstsq(design, G.reshape(-1, 1), driver="gelsd").solution
    return (design @ coef).reshape(d_out, d_in)


def test_equivalent_gradient_is_closer_to_the_full_gradient_than_loras():
    """On a tiny LLaMA: every adapted layer's s(B g̃_A + g̃_B A) is the least-squares projection of the full gradient
    of its W (from a dense copy: the adapter merged, W trained), closer to it than plain LoRA's s(B g_A + g_B A) at
    any scale."""
    batch = token_batch()
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraProConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                                      target_modules=["q_proj", "down_proj"]))
    dense = copy.deepcopy(model).merge_and_unload().train()
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    dense.requires_grad_(False)
    names = [n for n, _ in adapted_layers(model.model)]
    weights = [dense.get_submodule(n).weight.requires_grad_(True) for n in names]
    dense(**batch, labels=batch["input_ids"]).loss.backward()
    layers = [layer.adapters["default"] for _, layer in adapted_layers(model.model)]
    plain = [(a.lora_A.grad.clone(), a.lora_B.grad.clone()) for a in layers]
    model.before_optimizer_step(0)
    for name, a, (gA, gB), W in zip(names, layers, plain, weights):
        G, A, B, s = W.grad.double(), a.lora_A.detach().double(), a.lora_B.detach().double(), a.scale
        pro = s * (B @ a.lora_A.grad.double() + a.lora_B.grad.double() @ A)
        lora = s * (B @ gA.double() + gB.double() @ A)
        c = (lora * G).sum() / (lora * lora).sum()                    # plain LoRA's step at its best scale
        torch.testing.assert_close(pro, _projection_by_least_squares(G, A, B, s), rtol=1e-4, atol=1e-7 * G.norm())
        err = (pro - G).norm()
        assert err < (c * lora - G).norm() < (lora - G).norm() and err < 0.99 * (c * lora - G).norm(), name


def _pro_model(**kw):
    base = tiny_lm()
    torch.manual_seed(0)
    return peftlab.get_peft_model(base, peftlab.LoraProConfig(**{**dict(r=4, lora_alpha=8,
                                                                        target_modules="all-linear"), **kw}))


def test_the_loop_adjusts_after_clipping_and_before_the_update(monkeypatch):
    events, expected = [], {}
    real_clip, real_hook, real_adamw = torch.nn.utils.clip_grad_norm_, LoraProTuner.before_optimizer_step, loop.adamw

    def clip(params, max_norm, *a, **k):
        events.append("clip")
        return real_clip(params, max_norm, *a, **k)

    def hook(self, model, adapter_name, config, step):
        events.append(f"adjust {step}")
        for _, layer in self._layers_with(model, adapter_name):
            ad = layer.adapters[adapter_name]
            expected[ad.lora_A], expected[ad.lora_B] = pro_gradients(ad.lora_A, ad.lora_B, ad.lora_A.grad,
                                                                     ad.lora_B.grad, ad.scale)
        real_hook(self, model, adapter_name, config, step)

    def seen_by_the_optimizer(opt, args, kwargs):
        events.append("update")
        for p, want in expected.items():
            torch.testing.assert_close(p.grad, want)

    def adamw(params, cfg):
        opt = real_adamw(params, cfg)
        opt.register_step_pre_hook(seen_by_the_optimizer)
        return opt

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    monkeypatch.setattr(LoraProTuner, "before_optimizer_step", hook)
    monkeypatch.setattr(loop, "adamw", adamw)
    model = _pro_model()
    train(model, D.encode_causal(pc_records(), char_tokenizer()), D.Collator(0),
          TrainConfig(steps=2, batch_size=4, progress=False))
    assert events == ["clip", "adjust 0", "update", "clip", "adjust 1", "update"]


def test_training_with_the_loop_lowers_the_loss():
    model = _pro_model()
    r = train(model, D.encode_causal(pc_records(), char_tokenizer()), D.Collator(0),
              TrainConfig(steps=30, batch_size=4, lr=1e-2, progress=False))
    assert r["loss_last"] < 0.7 * r["loss_first"]


def test_hf_trainer_runs_the_gradient_hook_before_each_update(tmp_path, monkeypatch):
    from transformers import TrainingArguments
    steps, real = [], LoraProTuner.before_optimizer_step
    monkeypatch.setattr(LoraProTuner, "before_optimizer_step",
                        lambda self, m, n, c, step: (steps.append(step), real(self, m, n, c, step)))
    tok = char_tokenizer()
    model = _pro_model()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False)
    peftlab.Trainer(model=model, args=args, train_dataset=D.encode_causal(pc_records(), tok) * 2,
                    data_collator=D.Collator(tok.pad_token_id)).train()
    assert steps == [0, 1, 2]


def test_files_are_loras_layout_and_round_trip(tmp_path):
    batch = token_batch()
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraProConfig(r=4, lora_alpha=8,
                                                                      target_modules=["q_proj", "down_proj"]))
    randomize_adapters(model, std=0.3)
    assert all(isinstance(layer.adapters["default"], LoraProLinear) for _, layer in adapted_layers(model.model))
    model.eval().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA_PRO"
    from safetensors.torch import load_file
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)
    expected = model(**batch).logits
    again = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert again._tuner("default").adjusts_gradients
    assert torch.equal(again.eval()(**batch).logits, expected)
    peft = pytest.importorskip("peft")  # the tensors are a plain LoRA that HF PEFT reads with the plain config
    model.peft_config["default"].to_lora_config().save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
        assert (ref(**batch).logits - expected).abs().max() <= 1e-5


def test_config_errors_say_what_to_do():
    with pytest.raises(ValueError, match="DoRA.*use_dora=False"):
        peftlab.LoraProConfig(use_dora=True)
    with pytest.raises(ValueError, match="init_lora_weights True, False or 'gaussian'"):
        peftlab.LoraProConfig(init_lora_weights="pissa")
    with pytest.raises(ValueError, match="LORA_PRO.*does not implement lora_bias"):
        peftlab.LoraProConfig(lora_bias=True)
    with pytest.raises(ValueError, match="LoRA-Pro"):
        peftlab.get_peft_model(tiny_llama(), peftlab.LoraProConfig(target_modules=["embed_tokens"]))
