"""LoraHub: the composition's equations, the gradient-free search (pycma's CMA-ES), and `peftlab compose lorahub`."""
from __future__ import annotations

import json

import peft as hf_peft
import pytest
import torch

import peftlab
from conftest import perturb_trainable, tiny_llama, token_batch
from peftlab.methods.lora.lorahub import compose_into, search


def _sources(tmp_path, n=3):
    dirs = []
    for i in range(n):
        m = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4, lora_alpha=4 * (i + 1),
                                                                   target_modules=["q_proj", "v_proj"]))
        perturb_trainable(m, seed=i, std=0.3)
        m.save_pretrained(tmp_path / f"task{i}")
        dirs.append(str(tmp_path / f"task{i}"))
    return dirs


def test_composition_sums_the_factors_with_the_weights(tmp_path):
    dirs = _sources(tmp_path)
    model = peftlab.PeftModel.from_pretrained(tiny_llama(), dirs[0], adapter_name="s0")
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"s{i}")
    model.add_adapter("hub", peftlab.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    w = [0.5, -1.25, 0.75]
    compose_into(model, ["s0", "s1", "s2"], "hub", w)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    want_a = sum(wi * layer.adapters[f"s{i}"].lora_A for i, wi in enumerate(w))
    want_b = sum(wi * (i + 1) * layer.adapters[f"s{i}"].lora_B for i, wi in enumerate(w))   # s_i / s = (i + 1)
    torch.testing.assert_close(layer.adapters["hub"].lora_A, want_a)
    torch.testing.assert_close(layer.adapters["hub"].lora_B, want_b)


def test_search_finds_the_minimum_and_never_ends_worse_than_the_start():
    target = [0.7, -0.3, 0.2]
    seen = []

    def objective(w):
        seen.append(list(w))
        return sum((a - b) ** 2 for a, b in zip(w, target))

    res = search(objective, 3, budget=200, seed=1)
    assert seen[0] == [0.0, 0.0, 0.0] and res.start_loss == pytest.approx(sum(t * t for t in target))
    assert res.evaluations == len(seen) <= 200
    assert res.history == [sum((a - b) ** 2 for a, b in zip(w, target)) for w in seen]
    assert max(abs(a - b) for a, b in zip(res.weights, target)) < 0.05 and res.loss <= res.start_loss
    assert all(abs(v) <= 1.5 for w in seen for v in w)   # within the bounds
    again = search(lambda w: sum((a - b) ** 2 for a, b in zip(w, target)), 3, budget=200, seed=1)
    assert again.weights == res.weights   # seeded: reproducible


def test_compose_lorahub_from_the_cli_fits_the_new_task(tmp_path, capsys):
    """The few examples are what source 1 answers: the search moves the objective below the base's, the saved
    adapter is a LoRA file HF PEFT reads, and its outputs are the composition with the reported weights."""
    from peftlab import cli
    from test_train import save_tiny_model_dir
    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    dirs = _sources(tmp_path)
    from transformers import AutoModelForCausalLM
    teacher = peftlab.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), dirs[1]).eval()
    from test_train import char_tokenizer
    tok = char_tokenizer()
    rows = []
    for w in ["abc", "dog", "cat", "sun", "fox", "owl"]:
        ids = torch.tensor([tok(f"Q: {w}?\nA:")["input_ids"]])
        with torch.no_grad():
            out = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                   do_sample=False, pad_token_id=tok.pad_token_id)
        rows.append({"prompt": f"Q: {w}?\nA:", "completion": tok.decode(out[0, ids.shape[1]:])})
    data = tmp_path / "few.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["compose", "lorahub", "--model", str(model_dir), "--adapters", ",".join(dirs), "--data",
                     str(data), "--shots", "6", "--budget", "30", "--output", str(tmp_path / "hub"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["loss"] < res["start_loss"] and res["evaluations"] <= 30 and len(res["weights"]) == 3
    assert json.loads((tmp_path / "hub" / "lorahub.json").read_text())["history"][0] == res["start_loss"]
    # an ordinary LoRA adapter: HF PEFT loads it, and it is Σ w_i A_i / Σ w_i (s_i/s) B_i of the sources
    theirs = hf_peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "hub")
    ours = peftlab.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), dirs[0], "s0")
    for i, d in enumerate(dirs[1:], 1):
        ours.load_adapter(d, adapter_name=f"s{i}")
    ours.add_adapter("hub", peftlab.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    compose_into(ours, ["s0", "s1", "s2"], "hub", res["weights"])
    ours.set_adapter("hub")
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(**token_batch()).logits, ours.eval()(**token_batch()).logits,
                                   atol=1e-5, rtol=1e-5)


def test_compose_lorahub_refuses_what_it_cannot_combine(tmp_path, capsys):
    from peftlab import cli
    from test_train import save_tiny_model_dir
    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    dirs = _sources(tmp_path, n=2)
    other = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=2, target_modules=["q_proj"]))
    other.save_pretrained(tmp_path / "r2")
    data = tmp_path / "few.jsonl"
    data.write_text(json.dumps({"prompt": "Q: a?\nA:", "completion": " a"}) + "\n")
    base = ["compose", "lorahub", "--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "o")]
    assert cli.main(base + ["--adapters", f"{dirs[0]},{tmp_path / 'r2'}"]) == 2
    assert "LoRA adapters of one rank" in capsys.readouterr().err
    assert cli.main(base + ["--adapters", dirs[0]]) == 2
    assert "needs at least two sources" in capsys.readouterr().err
