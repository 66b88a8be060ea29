"""TTMM against its definition: the merge weights against the reference's sparse cross-attention written out row
by row, and every output against the paper's procedure itself — merge the chosen LoRAs into W for that one prompt,
run, restore — on a tiny LLaMA with a character tokenizer and the real embedded sentence encoder (MiniLM-L6)."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import peftlab
from conftest import perturb_trainable
from peftlab.core.tuner import adapted_layers
from peftlab.methods.smile import lora_deltas
from peftlab.methods.ttmm import SentenceEncoder, TTMMConfig, centroids, cluster_texts, merge_weights
from test_train import save_tiny_model_dir

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def encoder_ok():
    from peftlab.models import is_fetched
    if not is_fetched("minilm-l6"):
        pytest.skip("minilm-l6 is not in the cache (make test fetches it: scripts/install_data.sh)")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, encoder_ok):
    """A tiny model directory, three LoRA experts of it (different targets and ranks), centroids from texts."""
    root = tmp_path_factory.mktemp("ttmm")
    model_dir = save_tiny_model_dir(root / "tiny")
    from transformers import AutoModelForCausalLM
    dirs = []
    for i, (targets, r) in enumerate([(["q_proj", "v_proj"], 2), (["q_proj", "up_proj"], 4), (["o_proj"], 2)]):
        m = peftlab.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                   peftlab.LoraConfig(r=r, lora_alpha=2 * r + i, target_modules=targets))
        perturb_trainable(m, seed=i, std=0.5)
        m.save_pretrained(root / f"expert{i}")
        dirs.append(str(root / f"expert{i}"))
    texts = [["dog cat bird", "cow horse"], ["red blue green", "yellow pink"], ["one two three", "four five"]]
    enc = SentenceEncoder()
    cents = torch.stack([F.normalize(enc(t).mean(0), dim=0) for t in texts])
    return model_dir, dirs, cents


def _ttmm(model_dir, dirs, cents, **kw):
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return peftlab.get_peft_model(base, TTMMConfig(expert_dirs=dirs, centroids=cents.tolist(), **kw)).eval()


def _weights(model) -> torch.Tensor:
    """The merge weights the last forward / generate used (B, K)."""
    return next(layer.adapters["default"] for _, layer in adapted_layers(model)).context.weights


def _reference_weights(q, cents, beta, tau, max_count):
    """ttmerge's TestTimeMergingModel._load_merged_model for one prompt, as plain Python over the experts."""
    sims = [float(q @ c) for c in cents]
    kernel = [math.exp(-(1 - s) / beta ** 2) for s in sims]
    norm = [k / sum(kernel) for k in kernel]
    chosen = [i for i, w in enumerate(norm) if w > tau]
    if not chosen:
        return [0.0] * len(cents)
    if len(chosen) > max_count:
        chosen = sorted(range(len(kernel)), key=lambda i: -kernel[i])[:max_count]
    total = sum(norm[i] for i in chosen)
    return [norm[i] / total if i in chosen else 0.0 for i in range(len(cents))]


@pytest.mark.parametrize("beta,tau,max_count", [(0.2, 0.01, 50), (0.5, 0.2, 50), (1.0, 0.0, 2), (0.05, 0.6, 50)])
def test_merge_weights_follow_the_reference(beta, tau, max_count):
    g = torch.Generator().manual_seed(0)
    cents = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    q = F.normalize(torch.randn(7, 16, generator=g), dim=-1)
    q[0] = cents[2]                                # a prompt on a centroid
    got = merge_weights(q, cents, beta, tau, max_count)
    for row, want in zip(got, (_reference_weights(x, cents, beta, tau, max_count) for x in q)):
        torch.testing.assert_close(row, torch.tensor(want), atol=1e-6, rtol=1e-5)
    assert ((got > 0).sum(-1) <= max_count).all()


def _merged_copy(base, dirs, weights):
    """The paper's test-time model: W + Σ_k w_k s_k B_k A_k written into a copy of the base."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for k, d in enumerate(dirs):
            for module, (b, a, scale) in lora_deltas(d)[0].items():
                model.get_submodule(module).weight += float(weights[k]) * scale * (b @ a)
    return model


def test_each_row_equals_its_own_merged_model(setup):
    model_dir, dirs, cents = setup
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model = _ttmm(model_dir, dirs, cents, beta=0.5)
    tok = model.get_base_model().config._name_or_path
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok)
    tok.padding_side = "left"
    prompts = ["dog and cat", "blue green", "three four five six", "horse"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch).logits
    weights = _weights(model)
    assert weights.shape == (4, 3) and (weights > 0).sum() > 4   # rows mix several experts
    for i, p in enumerate(prompts):
        ref = _merged_copy(base, dirs, weights[i])
        one = tok([p], return_tensors="pt")
        with torch.no_grad():
            want = ref(**one).logits[0]
        n = one["input_ids"].shape[1]
        torch.testing.assert_close(out[i, -n:], want, atol=1e-5, rtol=1e-4)


def test_generate_weighs_the_prompt_once_and_matches_the_merged_model(setup):
    model_dir, dirs, cents = setup
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model = _ttmm(model_dir, dirs, cents, beta=0.5)
    tok = AutoTokenizer.from_pretrained(model_dir)
    one = tok(["red and blue"], return_tensors="pt")
    got = model.generate(**one, max_new_tokens=6, do_sample=False, pad_token_id=0)
    w = _weights(model)[0]
    want = _merged_copy(base, dirs, w).generate(**one, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_prompt_is_the_text_before_the_labels_and_far_prompts_get_the_base(setup):
    model_dir, dirs, cents = setup
    model = _ttmm(model_dir, dirs, cents)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(["abc xyz"], return_tensors="pt")["input_ids"]
    labels = ids.clone()
    labels[0, :4] = -100                              # "abc " is the prompt
    cfg = model.peft_config["default"]
    tuner = model._tuner("default")
    assert tuner.prompt_texts(model.get_base_model(), cfg, {"input_ids": ids, "labels": labels}) == ["abc "]
    assert tuner.prompt_texts(model.get_base_model(), cfg, {"input_ids": ids}) == ["abc xyz"]
    # a very sharp kernel and a high threshold keep no expert: the model is the base model
    w = merge_weights(F.normalize(torch.ones(1, cents.shape[1]), dim=-1), cents, beta=1.0, tau=0.99, max_count=50)
    assert torch.equal(w, torch.zeros_like(w))


def test_saved_adapter_reloads_without_its_sources(setup, tmp_path):
    model_dir, dirs, cents = setup
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = _ttmm(model_dir, dirs, cents, beta=0.5)
    model.save_pretrained(tmp_path / "ttmm")
    again = peftlab.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "ttmm")
    batch = AutoTokenizer.from_pretrained(model_dir)(["cat and cow"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, again(**batch).logits, atol=0, rtol=0)
    cfg = again.peft_config["default"]
    assert cfg.expert_names == ["expert0", "expert1", "expert2"] and cfg.r == 4 and cfg.expert_dirs is None
    assert again.get_nb_trainable_parameters()[0] == 0    # loaded for inference
    # the experts' factors can be fine-tuned further; the centroids are data
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    with pytest.raises(TypeError, match="merged per request"):
        model.merge_and_unload()


def test_clusters_and_centroids():
    g = torch.Generator().manual_seed(0)
    far = F.normalize(torch.randn(3, 8, generator=g) * 10, dim=-1)
    points = F.normalize(far.repeat_interleave(6, 0) + 0.01 * torch.randn(18, 8, generator=g), dim=-1)
    assignment = cluster_texts(points, 3)
    groups = [set(assignment[i * 6:(i + 1) * 6]) for i in range(3)]
    assert all(len(s) == 1 for s in groups) and len(set().union(*groups)) == 3   # the three blobs
    cents = centroids(points, assignment, 3)
    for c in range(3):
        members = points[torch.tensor(assignment) == c]
        torch.testing.assert_close(cents[c], members.mean(0) / members.mean(0).norm())
    with pytest.raises(ValueError, match="cannot make 20 clusters of 18"):
        cluster_texts(points, 20)


def test_config_errors():
    with pytest.raises(ValueError, match="need as many centroids"):
        TTMMConfig(expert_dirs=["a", "b"], centroids=[[1.0]])
    with pytest.raises(ValueError, match="beta > 0"):
        TTMMConfig(beta=0)


def test_compose_clusters_trains_one_lora_per_cluster_and_evaluates(encoder_ok, tmp_path):
    from peftlab.cli import main
    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    data = tmp_path / "d.jsonl"
    words = ["dog", "cat", "cow", "red", "blue", "pink"]
    data.write_text("".join(f'{{"prompt": "Q: {w}?\\nA:", "completion": " {w[::-1]}"}}\n' for w in words))
    out = tmp_path / "ttmm"
    assert main(["compose", "ttmm", "--model", str(model_dir), "--data", str(data), "--clusters", "2", "--steps", "2",
                 "--batch-size", "2", "--output", str(out), "--json"]) == 0
    experts = sorted((out / "experts").glob("cluster*/train.jsonl"))
    members = [[json.loads(line)["prompt"] for line in f.read_text().splitlines()] for f in experts]
    assert len(members) == 2 and sorted(p for m in members for p in m) == sorted(f"Q: {w}?\nA:" for w in words)
    for k in range(2):
        assert lora_deltas(out / "experts" / f"cluster{k}" / "run" / "adapter")[0]   # a trained LoRA each
    from transformers import AutoModelForCausalLM
    loaded = peftlab.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    stored = next(layer.adapters["default"] for _, layer in adapted_layers(loaded)).centroids
    enc = SentenceEncoder()
    for k, prompts in enumerate(members):   # centroid k: the normalised mean of its members' embeddings
        torch.testing.assert_close(stored[k], F.normalize(enc(prompts).mean(0), dim=0), atol=1e-5, rtol=1e-4)
    assert main(["eval", "--model", str(model_dir), "--adapter", str(out), "--data", str(data), "--json"]) == 0


def test_on_a_quantised_base_equals_the_dequantised_reference(setup):
    """QLoRA's base: TTMM's experts over bitsandbytes' NF4 layers compute what they compute over the dense
    dequantisation of those layers (tests/test_qlora.py's reference; it feeds inputs_embeds, which TTMM cannot
    weigh, so TTMM is checked here)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peftlab.core.quantized import dequantize_model
    from peftlab.models import quantization_config
    model_dir, dirs, cents = setup

    def quantised():
        return AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, quantization_config=quantization_config("nf4", True, torch.float32)).eval()

    cfg = TTMMConfig(expert_dirs=dirs, centroids=cents.tolist(), beta=0.5)
    q = peftlab.get_peft_model(quantised(), cfg).eval()
    ref = peftlab.get_peft_model(dequantize_model(quantised()), cfg).eval()
    batch = AutoTokenizer.from_pretrained(model_dir)(["dog and cat"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(q(**batch).logits, ref(**batch).logits, atol=1e-4, rtol=1e-4)
