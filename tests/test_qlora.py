"""QLoRA: adapters on bitsandbytes' 4-bit (NF4/FP4) and 8-bit bases, on a tiny LLaMA quantised by transformers.

The reference for every method is the same adapter on the dequantised base (each bitsandbytes layer replaced by
an nn.Linear holding bitsandbytes' own dequantisation of it): on CPU bitsandbytes multiplies by exactly that
matrix, so losses and every gradient must agree. Files and PiSSA's requantised residual are checked against the
real HF PEFT on the same quantised base.
"""
from __future__ import annotations

import json
import warnings

import bitsandbytes as bnb
import peft
import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM

import peftlab
from conftest import perturb_trainable, tiny_llama, token_batch
from peftlab.core.quantized import (dequantize, dequantize_model, keep_canonical_layout, quant_kind,
                                    quantized_layers, quantized_like)
from peftlab.models import quantization_config
from test_conformance import build_on

warnings.filterwarnings("ignore", message=".*inputs will be cast from torch.float32 to float16.*")

KINDS = ["nf4", "fp4", "int8"]
# methods that train the base weights in place cannot train packed ones (they refuse, see below)
REFUSING = {"full", "rocoft", "child-tuning", "pafi"}
# methods whose init writes a residual into the base: requantised, so not equal to the dense reference
RESIDUAL = {"pissa", "corda"}
# methods that refuse a quantised base altogether (WeGeFT generates its update from the dense W; tests/test_wegeft.py)
REFUSING_BASE = {"wegeft"}
# methods that read the prompt's text (TTMM weighs its experts by the decoded input_ids), which the comparison
# below cannot give: it feeds inputs_embeds to get the input's gradient
NEEDS_TEXT = {"ttmm"}
COMPARED = sorted(m.name for m in peftlab.list_methods()
                  if m.name not in REFUSING | RESIDUAL | REFUSING_BASE | NEEDS_TEXT)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(d)
    return d


def load(tiny_dir, kind="nf4", double_quant=True, compute_dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_dir, dtype=torch.float32,
        quantization_config=quantization_config(kind, double_quant, compute_dtype))
    return model.eval()


def _loss_and_grads(model, batch, seed=5):
    model.train()
    torch.manual_seed(seed)  # the same dropout masks in both models
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["input_ids"]).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), embeds.grad, grads


def _bnb_round_trip(w: torch.Tensor, kind: str, double: bool) -> torch.Tensor:
    """bitsandbytes' own quantise-then-dequantise of w with transformers' default settings for `kind`."""
    if kind == "int8":
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.half())
        return bnb.functional.int8_vectorwise_dequant(cb, scb).float()
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=double, quant_type=kind)
    return bnb.functional.dequantize_4bit(packed, state).float()


def test_quantised_weights_are_bitsandbytes_round_trip(tiny_dir):
    dense = tiny_llama()
    for kind, double in [("nf4", True), ("nf4", False), ("fp4", True), ("int8", False)]:
        model = load(tiny_dir, kind, double)
        layers = quantized_layers(model)
        assert len(layers) == 14  # 7 linear layers per block, 2 blocks; lm_head stays dense
        for name, layer in layers:
            expected = _bnb_round_trip(dense.get_submodule(name).weight.detach(), kind, double)
            assert quant_kind(layer) == kind
            torch.testing.assert_close(dequantize(layer, torch.float32), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("name", COMPARED)
def test_method_on_quantised_base_matches_dequantised_reference(tiny_dir, name, kind):
    batch = token_batch()
    quantised, reference = load(tiny_dir, kind), dequantize_model(load(tiny_dir, kind))
    assert quantized_layers(quantised) and not quantized_layers(reference)
    torch.manual_seed(0)
    q = build_on(name, quantised)
    torch.manual_seed(0)
    r = build_on(name, reference)
    perturb_trainable(q, 1, 0.05)
    perturb_trainable(r, 1, 0.05)
    loss_q, dx_q, grads_q = _loss_and_grads(q, batch)
    loss_r, dx_r, grads_r = _loss_and_grads(r, batch)
    torch.testing.assert_close(loss_q, loss_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_q, dx_r, rtol=1e-4, atol=1e-7)
    assert grads_q.keys() == grads_r.keys() and grads_q
    for n in grads_q:
        torch.testing.assert_close(grads_q[n], grads_r[n], rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize("kind,double", [("fp4", True), ("nf4", False)])
@pytest.mark.parametrize("name", ["lora", "dora", "lora-fa"])
def test_fused_kernels_on_every_4bit_variant(tiny_dir, name, kind, double):
    batch = token_batch()
    quantised, reference = load(tiny_dir, kind, double), dequantize_model(load(tiny_dir, kind, double))
    torch.manual_seed(0)  # after loading, which draws random numbers too
    q = build_on(name, quantised)
    torch.manual_seed(0)
    r = build_on(name, reference)
    perturb_trainable(q, 1, 0.05)
    perturb_trainable(r, 1, 0.05)
    for a, b in zip(_loss_and_grads(q, batch)[:2], _loss_and_grads(r, batch)[:2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_bf16_compute_dtype_takes_bitsandbytes_forward_and_matches_peft(tiny_dir):
    batch = token_batch()
    cfg = dict(r=4, target_modules="all-linear", init_lora_weights=False)
    ours = peftlab.get_peft_model(load(tiny_dir, "nf4", compute_dtype=torch.bfloat16), peftlab.LoraConfig(**cfg))
    base = load(tiny_dir, "nf4", compute_dtype=torch.bfloat16)
    keep_canonical_layout(base)
    theirs = peft.get_peft_model(base, peft.LoraConfig(**cfg))
    perturb_trainable(ours, 1, 0.05)
    peft.set_peft_model_state_dict(theirs, peftlab.get_peft_model_state_dict(ours))
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(REFUSING))
def test_in_place_methods_refuse_a_quantised_weight(tiny_dir, name):
    with pytest.raises(ValueError, match=r"q_proj\.weight: it is quantised \(nf4.*delta-weight method"):
        build_on(name, load(tiny_dir, "nf4"))


def test_fused_training_keeps_no_dense_weight_for_backward(tiny_dir):
    model = build_on("dora", load(tiny_dir, "nf4"))
    perturb_trainable(model, 1, 0.05)
    dense = [dequantize(layer) for _, layer in quantized_layers(model)]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    batch = token_batch()
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for _ in range(2):  # the second forward runs the learned sibling groups
            loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    kept_weights = [t for t in saved for w in dense if t.shape == w.shape and torch.equal(t, w)]
    assert saved and not kept_weights


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_adapter_files_interoperate_with_peft_on_the_same_quantised_base(tiny_dir, tmp_path, kind, use_dora):
    batch = token_batch()
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora)
    ours = peftlab.get_peft_model(load(tiny_dir, kind), peftlab.LoraConfig(**cfg))
    perturb_trainable(ours, 2, 0.05)
    ours.save_pretrained(tmp_path / "ours")
    base = load(tiny_dir, kind)
    keep_canonical_layout(base)  # PEFT's base must not be repacked by bitsandbytes either (core/quantized.py)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    # packed 4-bit weights count as two weights a byte, as PEFT counts them
    assert ours.get_nb_trainable_parameters()[1] == theirs.get_nb_trainable_parameters()[1]
    with torch.no_grad():
        expected = theirs(**batch).logits
        torch.testing.assert_close(ours.eval()(**batch).logits, expected, rtol=0, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    back = peftlab.PeftModel.from_pretrained(load(tiny_dir, kind), tmp_path / "theirs").eval()
    with torch.no_grad(), peftlab.hf_peft_numerics():
        torch.testing.assert_close(back(**batch).logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_pissa_residual_is_requantised_as_in_peft_recipe(tiny_dir, kind):
    """HF PEFT refuses PiSSA on a bitsandbytes layer and documents the recipe instead: initialise on the
    full-precision weights, quantise the residual. peftlab does that in one call from the dequantised weights;
    the reference is PEFT's PiSSA on the same dequantised base with its residual quantised by bitsandbytes."""
    batch = token_batch()
    cfg = dict(r=4, lora_alpha=4, target_modules=["q_proj", "up_proj"], init_lora_weights="pissa")
    ours = peftlab.get_peft_model(load(tiny_dir, kind), peftlab.LoraConfig(**cfg)).eval()
    with pytest.raises(TypeError, match="initialize PiSSA under float32"):
        peft.get_peft_model(load(tiny_dir, kind), peft.LoraConfig(**cfg))
    theirs = peft.get_peft_model(dequantize_model(load(tiny_dir, kind)), peft.LoraConfig(**cfg)).eval()
    requantised = load(tiny_dir, kind)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        ours_layer = ours.base_model.model.get_submodule(name)
        assert quant_kind(ours_layer.base_layer) == kind  # the residual is stored quantised again
        residual = theirs.base_model.model.get_submodule(name).base_layer
        parent, leaf = name.rsplit(".", 1)
        setattr(requantised.get_submodule(parent), leaf,
                quantized_like(residual, requantised.get_submodule(name)))
        torch.testing.assert_close(dequantize(ours_layer.base_layer, torch.float32),
                                   dequantize(requantised.get_submodule(name), torch.float32), rtol=0, atol=0)
        for factor in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(ours_layer.adapters["default"], factor),
                                       getattr(theirs.base_model.model.get_submodule(name), factor)["default"].weight,
                                       rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_and_unload_dense_or_requantised(tiny_dir, kind):
    batch = token_batch()
    cfg = peftlab.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)

    def adapted():
        base = load(tiny_dir, kind)
        torch.manual_seed(0)  # the same random A in every copy
        model = peftlab.get_peft_model(base, cfg)
        perturb_trainable(model, 3, 0.05)
        return model.eval()

    with torch.no_grad():
        # train mode (no dropout here): an int8 layer's inference forward also quantises the activations (LLM.int8),
        # its training forward multiplies by the dequantised weight, which is what a dense merge keeps
        expected = adapted().train()(**batch).logits
        dense = adapted().merge_and_unload()
        assert not quantized_layers(dense) and getattr(dense.config, "quantization_config", None) is None
        assert isinstance(dense.model.layers[0].mlp.up_proj, nn.Linear)
        torch.testing.assert_close(dense(**batch).logits, expected, rtol=0, atol=2e-5)

        requantised = adapted().merge_and_unload(requantize=True)
        layers = dict(quantized_layers(requantised))
        assert len(layers) == 14 and all(quant_kind(m) == kind for m in layers.values())
        # the merged weights are quantised once more, exactly as bitsandbytes quantises them with these settings
        for name, layer in layers.items():
            merged_w = dense.get_submodule(name).weight.detach()
            torch.testing.assert_close(dequantize(layer, torch.float32), _bnb_round_trip(merged_w, kind, True),
                                       rtol=0, atol=0, msg=name)
        drift = (requantised(**batch).logits - expected).abs().max()
        assert 0 < drift < 0.5  # the requantising merge changes outputs, by the rounding above


def test_merge_adapter_requantises_and_unmerge_restores(tiny_dir):
    batch = token_batch()
    model = peftlab.get_peft_model(load(tiny_dir, "nf4"), peftlab.LoraConfig(r=4, target_modules=["q_proj"]))
    perturb_trainable(model, 4, 0.05)
    model.eval()
    with torch.no_grad():
        unmerged = model(**batch).logits
        model.merge_adapter()
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert quant_kind(layer.base_layer) == "nf4"  # PEFT's merge into a bitsandbytes layer: requantised
        merged = model(**batch).logits
        model.unmerge_adapter()
        again = model(**batch).logits
    assert (merged - unmerged).abs().max() < 0.5
    assert (again - unmerged).abs().max() < 0.5  # unmerging rounds once more; it cannot restore exactly


def test_safe_merge_refuses_a_broken_adapter_and_leaves_the_model(tiny_dir):
    model = peftlab.get_peft_model(load(tiny_dir, "nf4"), peftlab.LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"].lora_B.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN/inf"):
        model.merge_and_unload(safe_merge=True)
    assert all(quant_kind(m) == "nf4" for _, m in quantized_layers(model))


def test_training_steps_reduce_the_loss_on_a_quantised_base(tiny_dir):
    model = peftlab.prepare_model_for_kbit_training(load(tiny_dir, "nf4"), use_gradient_checkpointing=False)
    model = peftlab.get_peft_model(model, peftlab.LoraConfig(r=8, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    batch = token_batch()
    model.train()
    losses = []
    for _ in range(20):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert all(quant_kind(m) == "nf4" for _, m in quantized_layers(model))  # the base was never touched


def test_cli_trains_evaluates_and_merges_a_qlora_run(capsys, tmp_path):
    from test_cli import WORDS, run, save_tiny_model_dir
    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(f'{{"prompt": "Q: {w}?\\nA:", "completion": " {w[::-1]}"}}\n' for w in WORDS))
    out = tmp_path / "run"
    code, res, cap = run(capsys, "train", "--model", model_dir, "--data", data, "--output", out, "--steps", 20,
                         "--batch-size", 4, "--lr", 2e-2, "--r", 4, "--target-modules", "all-linear",
                         "--quantize", "nf4", "--max-new-tokens", 4, "--no-progress", "--no-forgetting",
                         "--no-eval-before", "--json")
    assert code == 0, cap.err
    assert "base quantised by bitsandbytes: nf4 with double quantisation" in cap.err + cap.out
    assert res["quantize"] == "nf4" and res["train_loss_last"] < res["train_loss_first"]
    assert json.loads((out / "run.json").read_text())["quantize"] == "nf4"

    code, ev, cap = run(capsys, "eval", "--model", model_dir, "--adapter", out, "--data", data,
                        "--max-new-tokens", 4, "--json")
    assert code == 0, cap.err
    assert ev["quantize"] == "nf4"  # read from the run: evaluated on the base it was trained on

    merged = tmp_path / "merged"
    code, mres, cap = run(capsys, "merge", "--model", model_dir, "--adapter", out, "--output", merged, "--json")
    assert code == 0, cap.err
    assert mres["quantize"] == "nf4" and not mres["requantize"] and "saved dense" in cap.err + cap.out
    plain = AutoModelForCausalLM.from_pretrained(str(merged))
    assert not quantized_layers(plain) and getattr(plain.config, "quantization_config", None) is None
    yaml_config = tmp_path / "bad.yaml"  # YAML keys skip argparse's choices: the job layer checks them itself
    yaml_config.write_text(f"model: {model_dir}\ndata: {data}\nquantize: nf4\ncompute_dtype: float64\nsteps: 1\n")
    code, _, cap = run(capsys, "train", "--config", yaml_config, "--output", tmp_path / "bad")
    assert code == 2 and "--compute-dtype float64: expected one of float32, bfloat16, float16" in cap.err


# -- LoftQ: init_lora_weights="loftq" on a full-precision base, checked against its equations ----------------------
def _loftq_reference(w: torch.Tensor, r: int, bits: int, iters: int):
    """Li et al. 2023, Algorithm 1, written out: Q_t = deq(quant(W − B A)), (B, A) = rank-r SVD of W − Q_t."""
    residual = w
    for _ in range(iters):
        if bits == 4:
            packed, state = bnb.functional.quantize_4bit(residual, blocksize=64, compress_statistics=False,
                                                         quant_type="nf4")
            q = bnb.functional.dequantize_4bit(packed, state)
        else:
            codes, scales, _ = bnb.functional.int8_vectorwise_quant(residual.half())
            q = bnb.functional.int8_vectorwise_dequant(codes, scales).float()
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        b, a = u[:, :r] @ torch.diag(s[:r].sqrt()), torch.diag(s[:r].sqrt()) @ vh[:r]
        residual = w - b @ a
    return q, a, b


@pytest.mark.parametrize("bits,iters", [(4, 1), (4, 3), (8, 2)])
def test_loftq_init_follows_its_equations(bits, iters):
    original = tiny_llama()
    cfg = peftlab.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "up_proj"], init_lora_weights="loftq",
                             loftq_config=peftlab.LoftQConfig(loftq_bits=bits, loftq_iter=iters))
    model = peftlab.get_peft_model(tiny_llama(), cfg)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        w = original.get_submodule(name).weight.detach()
        q, a, b = _loftq_reference(w, 4, bits, iters)
        layer = model.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.base_layer.weight, q, rtol=0, atol=0)  # the base holds Q, on the grid
        torch.testing.assert_close(layer.adapters["default"].lora_A, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.adapters["default"].lora_B, b, rtol=1e-5, atol=1e-6)
        plain = w - _bnb_round_trip(w, "nf4" if bits == 4 else "int8", False)
        # the point of LoftQ: Q + BA is closer to W than plain quantisation is
        assert (w - q - b @ a).norm() < plain.norm()


def test_loftq_adapter_reloads_onto_the_original_base_and_refuses_a_quantised_one(tiny_dir, tmp_path):
    batch = token_batch()
    cfg = peftlab.LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights="loftq",
                             loftq_config={"loftq_bits": 4})
    model = peftlab.get_peft_model(tiny_llama(), cfg)
    perturb_trainable(model, 5, 0.05)
    model.save_pretrained(tmp_path / "loftq")
    saved = json.loads((tmp_path / "loftq" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq" and saved["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}
    back = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path / "loftq")  # LoftQ re-run from W: same Q
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="LoftQ starts from the full-precision weights"):
        peftlab.get_peft_model(load(tiny_dir, "nf4"), cfg)


def test_prepare_model_for_kbit_training_on_a_real_bitsandbytes_model_matches_peft(tiny_dir):
    from test_peft_helpers import _kbit_state
    models = [AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16,
                                                   quantization_config=quantization_config("nf4")) for _ in range(2)]
    ours, theirs = peftlab.prepare_model_for_kbit_training(models[0]), peft.prepare_model_for_kbit_training(models[1])
    assert _kbit_state(ours) == _kbit_state(theirs)
    params, checkpointing, input_grad = _kbit_state(ours)
    assert checkpointing and input_grad
    assert params["model.norm.weight"] == (torch.float32, False)  # bf16 leftovers upcast, everything frozen


def test_mixed_batches_and_disable_adapter_on_a_quantised_base(tiny_dir):
    batch = token_batch()
    model = peftlab.get_peft_model(load(tiny_dir, "nf4"), peftlab.LoraConfig(r=4, target_modules="all-linear"),
                                   adapter_name="a")
    model.add_adapter("b", peftlab.LoraConfig(r=2, target_modules="all-linear"))
    perturb_trainable(model, 6, 0.05)
    model.eval()
    with torch.no_grad():
        per_adapter = {}
        for name in ("a", "b"):
            model.set_adapter(name)
            per_adapter[name] = model(**batch).logits
        with model.disable_adapter():
            per_adapter["__base__"] = model(**batch).logits
        names = ["a", "__base__", "b"]
        mixed = model(**batch, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], per_adapter[name][row], rtol=1e-5, atol=1e-5)
    assert (per_adapter["a"] - per_adapter["__base__"]).abs().max() > 1e-3
