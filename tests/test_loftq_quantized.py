"""replace_lora_weights_loftq: one LoftQ step on a base that bitsandbytes has already quantised (HF PEFT's
function of that name), checked against its equations on a tiny LLaMA quantised by transformers.

HF PEFT's own function computes on CUDA/XPU only, so it cannot be the reference on this machine; the checks are
LoftQ's definition instead: B A is the best rank-r approximation of R = W − deq(Q) (Eckart–Young: the residual
left, R − B A, holds exactly the singular values past r), Q itself is untouched, and the model moves toward the
unquantised one.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import peftlab
from conftest import tiny_llama, token_batch
from peftlab.core.quantized import dequantize
from peftlab.core.tuner import adapted_layers
from peftlab.models import quantization_config
from test_train import save_tiny_model_dir

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    tiny_llama().save_pretrained(d)
    return d


def _quantised(path, kind="nf4", double_quant=True):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                quantization_config=quantization_config(kind, double_quant,
                                                                                        torch.float32)).eval()


def _lora(path, r=4, alpha=4, **kw):
    return peftlab.get_peft_model(_quantised(path, **kw.pop("quant", {})),
                                  peftlab.LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", **kw))


@pytest.mark.parametrize("kind,double_quant", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("match_scaling", [False, True])
def test_adapter_is_the_best_rank_r_part_of_the_quantisation_residual(tiny_dir, kind, double_quant, match_scaling):
    dense = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    weights = {n: m.weight.detach() for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear)}
    model = _lora(tiny_dir, r=4, alpha=8, quant=dict(kind=kind, double_quant=double_quant))
    q_before = {n: dequantize(layer.base_layer, torch.float32) for n, layer in adapted_layers(model)}
    peftlab.replace_lora_weights_loftq(model, match_scaling=match_scaling)
    checked = 0
    for name, layer in adapted_layers(model):
        adapter = layer.adapters["default"]
        q = dequantize(layer.base_layer, torch.float32)
        torch.testing.assert_close(q, q_before[name], atol=0, rtol=0)        # the quantised weight stays
        residual = weights[name.removeprefix("base_model.model.")] - q
        sv = torch.linalg.svdvals(residual)
        # PEFT's convention: B A itself is the rank-r part; match_scaling: s·B A is (s = alpha / r = 2)
        delta = adapter.lora_B @ adapter.lora_A * (adapter.scale if match_scaling else 1.0)
        assert torch.linalg.matrix_rank(delta) <= 4
        left = torch.linalg.norm(residual - delta) ** 2
        torch.testing.assert_close(left, (sv[4:] ** 2).sum(), rtol=1e-4, atol=1e-7)
        # the balanced split of LoftQ / PEFT's _low_rank_decomposition: A Aᵀ = Bᵀ B = diag(top singular values)
        gram = adapter.lora_A @ adapter.lora_A.t() * (adapter.scale if match_scaling else 1.0)
        torch.testing.assert_close(torch.diag(gram), sv[:4], rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked == 14   # 2 blocks × (q, k, v, o, gate, up, down)


def test_loftq_brings_the_quantised_model_toward_the_unquantised_one(tiny_dir):
    batch = token_batch(batch=2, length=10)
    dense = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model = _lora(tiny_dir, r=8, alpha=16)
    with torch.no_grad():
        want = dense(**batch).logits
        gap = (model(**batch).logits - want).norm()
        peftlab.replace_lora_weights_loftq(model, match_scaling=True)
        closer = (model(**batch).logits - want).norm()
    assert closer < 0.8 * gap


def test_callback_false_rolls_a_layer_back(tiny_dir):
    model = _lora(tiny_dir)
    seen = []

    def keep_only_q(peft_model, name):
        assert peft_model is model
        seen.append(name)
        return name.endswith("q_proj")

    peftlab.replace_lora_weights_loftq(model, callback=keep_only_q)
    assert len(seen) == 14 and seen[0] == "model.layers.0.self_attn.q_proj"
    for name, layer in adapted_layers(model):
        b = layer.adapters["default"].lora_B
        assert bool(b.abs().sum() > 0) == name.endswith("q_proj")   # rolled back: B is its init, zero


def test_sharded_checkpoint_and_explicit_path(tiny_dir, tmp_path):
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).save_pretrained(sharded,
                                                                                        max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    one, two = _lora(tiny_dir), _lora(tiny_dir)
    peftlab.replace_lora_weights_loftq(one)
    peftlab.replace_lora_weights_loftq(two, model_path=str(sharded))
    for (_, a), (_, b) in zip(adapted_layers(one), adapted_layers(two)):
        torch.testing.assert_close(a.adapters["default"].lora_B, b.adapters["default"].lora_B, atol=0, rtol=0)


def test_bad_inputs_say_what_to_do(tiny_dir, tmp_path):
    dense = peftlab.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                                   peftlab.LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(ValueError, match="no LoRA adapter 'default' on a 4-bit"):
        peftlab.replace_lora_weights_loftq(dense)
    with pytest.raises(FileNotFoundError, match="needs the unquantised weights"):
        peftlab.replace_lora_weights_loftq(_lora(tiny_dir), model_path=str(tmp_path))
    with pytest.raises(TypeError, match="DoraLinear"):
        peftlab.replace_lora_weights_loftq(_lora(tiny_dir, use_dora=True))
    # LoftQ from the full-precision weights (init_lora_weights="loftq") on a quantised base points here
    with pytest.raises(ValueError, match="replace_lora_weights_loftq"):
        _lora(tiny_dir, init_lora_weights="loftq", loftq_config=peftlab.LoftQConfig())


def test_job_layer_loftq_option(tmp_path):
    from peftlab.train.jobs import JobConfig, JobError, run_job
    data = tmp_path / "d.jsonl"
    data.write_text("".join('{"prompt": "Q: %s?\\nA:", "completion": " %s"}\n' % (w, w[::-1])
                            for w in ["abc", "dog", "cat", "sun"]))
    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    common = dict(model=str(model_dir), data=str(data), steps=2, batch_size=2, r=4, target_modules="all-linear",
                  forgetting=False, eval_before=False, progress=False, loftq=True)
    with pytest.raises(JobError, match="--loftq starts a LoRA on a 4-bit base"):
        run_job(JobConfig(**common, output=str(tmp_path / "dense")))
    with pytest.raises(JobError, match="--loftq starts a LoRA on a 4-bit base"):
        run_job(JobConfig(**common, output=str(tmp_path / "dora"), quantize="nf4", method="dora"))
    said = []
    summary = run_job(JobConfig(**common, output=str(tmp_path / "run"), quantize="nf4"),
                      say=lambda *parts: said.append(" ".join(map(str, parts))))
    assert summary["loftq"] is True and summary["steps"] == 2
    assert any(line.startswith("LoftQ:") for line in said)
