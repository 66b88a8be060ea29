"""The `peftlab` command line (in-process `main([...])`, on a tiny model saved as a local HF directory)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from peftlab.cli import main
from test_train import WORDS, save_tiny_model_dir

FAST = ["--no-progress", "--no-forgetting", "--no-eval-before"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")

    def write(name, rows):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return d / name

    return {
        "pc": write("pc.jsonl", [{"prompt": f"Q: {w}?\nA:", "completion": " " + w[::-1]} for w in WORDS]),
        "pc_eval": write("pc_eval.jsonl", [{"prompt": f"Q: {w}?\nA:", "completion": " " + w[::-1]} for w in WORDS[:4]]),
        "cls": write("cls.jsonl", [{"text": f"the {w}", "label": "long" if len(w) > 3 else "short"} for w in WORDS]),
        "txt": write("txt.jsonl", [{"text": f"the {w} is here."} for w in WORDS]),
    }


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    last = cap.out.strip().splitlines()[-1] if cap.out.strip() else ""
    return code, (json.loads(last) if "--json" in argv and code == 0 else None), cap


def test_help_for_every_command(capsys):
    for cmd in ("methods", "models", "train", "eval", "merge"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0 and "--json" in capsys.readouterr().out, cmd
    # `python -m peftlab` is the same entry point as the installed `peftlab` script
    proc = subprocess.run([sys.executable, "-m", "peftlab", "train", "--help"], capture_output=True, text=True)
    out = proc.stdout
    assert proc.returncode == 0
    for flag in ("--model", "--method", "--task", "--data", "--eval-data", "--output", "--steps", "--epochs", "--lr",
                 "--batch-size", "--r", "--config", "--resume", "--nproc"):
        assert flag in out, flag  # the flags docs/DESIGN.md documents


def test_methods_and_models_json(capsys):
    code, res, cap = run(capsys, "methods", "--json")
    assert code == 0 and len(cap.out.strip().splitlines()) == 1  # under --json stdout is only the JSON line
    names = {m["name"] for m in res["methods"]}
    assert {"lora", "dora", "full"} <= names
    assert all({"category", "mergeable", "hf_peft_compatible"} <= set(m) for m in res["methods"])
    code, _, cap = run(capsys, "methods")
    assert code == 0 and "lora" in cap.out
    code, res, _ = run(capsys, "models", "--json")
    assert code == 0 and {m["name"] for m in res["models"]} == {"smollm2-135m", "minilm-l6"}


def test_train_eval_merge_prompt_completion(capsys, tmp_path, tiny_dir, files):
    out = tmp_path / "run"
    code, res, cap = run(capsys, "train", "--model", tiny_dir, "--data", files["pc"], "--eval-data", files["pc_eval"],
                         "--output", out, "--steps", 30, "--batch-size", 4, "--lr", 2e-2, "--r", 4,
                         "--target-modules", "all-linear", "--max-new-tokens", 6, "--no-progress", "--json")
    assert code == 0, cap.err
    assert res["steps"] == 30 and res["train_loss_last"] < res["train_loss_first"]
    assert res["eval_before"]["n"] == 4 and 0 <= res["eval"]["exact_match"] <= 1
    assert res["tokens_per_s"] > 0 and res["trainable_params"] < res["total_params"]
    fg = res["forgetting"]
    assert set(fg) == {"general_ppl", "definitions_acc"} and fg["general_ppl"]["before"] > 1
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["task_type"] == "CAUSAL_LM"
    assert any("down_proj" in t for t in cfg["target_modules"])  # "all-linear" (as written, or resolved)
    assert (out / "metrics.jsonl").is_file() and json.loads((out / "run.json").read_text())["steps"] == 30

    code, ev, cap = run(capsys, "eval", "--model", tiny_dir, "--adapter", out / "adapter", "--data", files["pc_eval"],
                        "--max-new-tokens", 6, "--json")
    assert code == 0, cap.err
    assert ev["exact_match"] == res["eval"]["exact_match"] and ev["n"] == 4

    merged = tmp_path / "merged"
    code, mres, cap = run(capsys, "merge", "--model", tiny_dir, "--adapter", out / "adapter", "--output", merged,
                          "--json")
    assert code == 0, cap.err and mres["output"] == str(merged)
    from transformers import AutoModelForCausalLM
    import peftlab
    plain = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    adapted = peftlab.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_dir)),
                                                str(out / "adapter")).eval()
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    code, ev2, _ = run(capsys, "eval", "--model", merged, "--data", files["pc_eval"], "--max-new-tokens", 6, "--json")
    assert code == 0 and ev2["exact_match"] == ev["exact_match"]


def test_classification_saves_label_names(capsys, tmp_path, tiny_dir, files):
    out = tmp_path / "cls"
    code, res, cap = run(capsys, "train", "--model", tiny_dir, "--data", files["cls"], "--eval-data", files["cls"],
                         "--output", out, "--steps", 25, "--batch-size", 6, "--lr", 2e-2, "--r", 4,
                         "--target-modules", "q_proj,v_proj", "--no-progress", "--json")
    assert code == 0, cap.err
    assert json.loads((out / "adapter" / "labels.json").read_text()) == {"labels": ["long", "short"]}
    assert res["kind"] == "classification" and set(res["eval"]) >= {"accuracy", "macro_f1"}
    assert res["forgetting"] is None and "no language-modelling head" in cap.err
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and "score" in cfg["modules_to_save"]
    code, ev, cap = run(capsys, "eval", "--model", tiny_dir, "--adapter", out / "adapter", "--data", files["cls"],
                        "--json")
    assert code == 0, cap.err
    assert ev["accuracy"] == res["eval"]["accuracy"]
    merged = tmp_path / "merged"
    assert run(capsys, "merge", "--model", tiny_dir, "--adapter", out / "adapter", "--output", merged)[0] == 0
    from transformers import AutoConfig
    assert AutoConfig.from_pretrained(str(merged)).id2label == {0: "long", 1: "short"}


def test_text_data_and_yaml_config(capsys, tmp_path, tiny_dir, files):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_dir}\ndata: {files['txt']}\neval-data: {files['txt']}\nsteps: 4\n"
                   f"batch_size: 3\nlr: 0.01\nmethod: dora\nset:\n  r: 2\n  target_modules: [q_proj]\nprogress: false\n"
                   f"forgetting: false\n")
    code, res, cap = run(capsys, "train", "--config", cfg, "--output", tmp_path / "t", "--steps", 6, "--json")
    assert code == 0, cap.err
    assert res["steps"] == 6 and res["batch_size"] == 3 and res["method"] == "dora"  # flags win over the file
    assert res["kind"] == "lm" and res["eval"]["perplexity"] > 1
    saved = json.loads((tmp_path / "t" / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] and saved["r"] == 2 and saved["target_modules"] == ["q_proj"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("batchsize: 3\n")
    code, _, cap = run(capsys, "train", "--config", bad)
    assert code == 2 and "unknown key 'batchsize'" in cap.err and "batch_size" in cap.err


def test_full_fine_tuning_saves_a_plain_model(capsys, tmp_path, tiny_dir, files):
    code, res, cap = run(capsys, "train", "--model", tiny_dir, "--data", files["pc"], "--method", "full",
                         "--output", tmp_path / "f", "--steps", 3, "--batch-size", 4, "--lr", 1e-3, *FAST, "--json")
    assert code == 0, cap.err
    assert res["trainable_params"] == res["total_params"] and res["saved"].endswith("model")
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(res["saved"])


def test_clear_errors(capsys, tmp_path, tiny_dir, files):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n')
    code, _, cap = run(capsys, "train", "--model", tiny_dir, "--data", bad, "--output", tmp_path / "x", *FAST)
    assert code == 1 and f"{bad}:2: not valid JSON" in cap.err
    code, _, cap = run(capsys, "train", "--model", tiny_dir, "--data", files["pc"], "--set", "rr=3",
                       "--output", tmp_path / "y", *FAST)
    assert code == 2 and "LoraConfig has no field 'rr'" in cap.err
    code, _, cap = run(capsys, "train", "--model", tiny_dir, "--data", files["pc"], "--method", "bitfit", "--r", "3",
                       "--output", tmp_path / "z", *FAST)
    assert code == 2 and "--r: method 'bitfit' has no such setting" in cap.err
    code, _, cap = run(capsys, "train", "--model", tiny_dir, "--data", files["pc"], "--method", "lroa", *FAST)
    assert code == 1 and "Did you mean 'lora'" in cap.err
    code, _, cap = run(capsys, "train", "--model", tmp_path / "nope", "--data", files["pc"], *FAST)
    assert code == 1 and "neither an embedded model name nor an existing directory" in cap.err
    code, _, cap = run(capsys, "train", "--model", tiny_dir, "--task", "wordnet-antonyms", "--data", files["pc"])
    assert code == 2 and "exactly one of --task" in cap.err
    code, _, cap = run(capsys, "train", "--model", tiny_dir, "--data", files["pc"], "--output", tmp_path / "r",
                       "--resume", *FAST)
    assert code == 1 and "no checkpoint" in cap.err


def test_method_default_lr_and_corda_calibration_source(capsys, tmp_path, tiny_dir, files, monkeypatch):
    """Without --lr a run uses the method's own rate; CorDA IPM calibrates on the task's batches, KPM on general
    English text (the knowledge to keep), never on the task."""
    from peftlab.core.registry import get_method
    from peftlab.train import tasks
    calls = []
    real = tasks.knowledge_texts
    monkeypatch.setattr(tasks, "knowledge_texts", lambda *a, **k: calls.append(1) or real(*a, **k)[:4])
    common = ["--model", tiny_dir, "--data", files["pc"], "--method", "corda", "--steps", 2, "--batch-size", 4,
              "--r", 2, *FAST, "--json"]
    code, res, cap = run(capsys, "train", *common, "--output", tmp_path / "ipm")
    assert code == 0, cap.err
    assert res["lr"] == get_method("corda").default_lr != get_method("prompt-tuning").default_lr
    assert calls == []
    code, res, cap = run(capsys, "train", *common, "--set", "corda_config={corda_method: kpm}",
                         "--output", tmp_path / "kpm")
    assert code == 0, cap.err
    assert calls == [1]
