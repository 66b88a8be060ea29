"""More than one process, for real: torchrun with gloo on this CPU (2 processes), DDP and FSDP2.

FSDP2 (`--fsdp`) shards the frozen base and keeps the adapter replicated (train/sharding.py): its adapter must
equal a single-process run with the same global batch, its lockstep evaluation must score what a single process
scores with the saved adapter, and a distributed run killed mid-way must resume to the uninterrupted adapter.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from test_train import save_tiny_model_dir

WORDS = ["abc", "dog", "cat", "sun", "fox", "owl", "bee", "ant"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")   # tiny model: one thread per process is fastest and steadiest


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    model_dir = save_tiny_model_dir(d / "tiny")
    data = d / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {w}?\nA:", "completion": " " + w[::-1]}) + "\n"
                            for w in WORDS))
    return model_dir, data


LORA = ("--r", 4, "--target-modules", "all-linear")


def _train(model_dir, data, out, *extra, steps=6, check=True, method=LORA, **popen):
    cmd = [sys.executable, "-m", "peftlab", "train", "--model", str(model_dir), "--data", str(data),
           "--eval-data", str(data), "--eval-size", "8", "--max-new-tokens", "4", "--output", str(out),
           "--steps", str(steps), "--batch-size", "4", "--lr", "1e-2", *map(str, method),
           "--no-progress", "--no-eval-before", "--forgetting-size", "4", "--json", *map(str, extra)]
    if popen:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def _adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _summary(res):
    return json.loads(res.stdout.strip().splitlines()[-1])   # only rank 0 prints


def test_fsdp_run_equals_one_process_and_its_adapter_loads_in_one(setup, tmp_path):
    model_dir, data = setup
    one = _summary(_train(model_dir, data, tmp_path / "one"))
    two = _summary(_train(model_dir, data, tmp_path / "fsdp", "--nproc", 2, "--fsdp"))
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "fsdp")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert two["train_tokens"] == one["train_tokens"] and two["steps"] == 6
    # lockstep evaluation on the sharded model = the single-process evaluation; the forgetting probe too
    assert two["eval"]["exact_match"] == one["eval"]["exact_match"]
    assert [e["prediction"] for e in two["eval"]["examples"]] == [e["prediction"] for e in one["eval"]["examples"]]
    assert two["forgetting"]["general_ppl"]["after"] == pytest.approx(one["forgetting"]["general_ppl"]["after"],
                                                                      rel=1e-4)
    # the adapter rank 0 saved is an ordinary adapter: a single process loads it and gets the same logits
    import peftlab
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([[5, 9, 17, 3, 11]])
    logits = [peftlab.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                                str(tmp_path / run / "adapter")).eval()(input_ids=ids).logits
              for run in ("one", "fsdp")]
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)


def test_fsdp_with_gradient_checkpointing_and_accumulation_matches(setup, tmp_path):
    model_dir, data = setup
    _train(model_dir, data, tmp_path / "one", "--grad-accum", 2, "--no-forgetting")
    _train(model_dir, data, tmp_path / "fsdp", "--grad-accum", 2, "--no-forgetting", "--nproc", 2, "--fsdp",
           "--gradient-checkpointing")
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "fsdp")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_killed_distributed_run_resumes_to_the_uninterrupted_adapter(setup, tmp_path, mode):
    model_dir, data = setup
    extra = ["--nproc", 2, "--save-every", 4, "--set", "lora_dropout=0.1", "--seed", 3, "--no-forgetting",
             *(["--fsdp"] if mode == "fsdp" else [])]
    _train(model_dir, data, tmp_path / "ref", *extra, steps=40)
    out = tmp_path / "killed"
    proc = _train(model_dir, data, out, *extra, steps=40, start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)   # the launcher and both workers: only what is on disk survives
    proc.wait()
    killed_at = int(latest.read_text().strip().split("-")[1])
    assert 4 <= killed_at < 40 and not (out / "adapter").exists(), "the run finished before it was killed"
    resumed = _summary(_train(model_dir, data, out, *extra, "--resume", steps=40))
    assert resumed["steps"] == 40
    a, b = _adapter(tmp_path / "ref"), _adapter(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_fsdp_refusals_say_what_to_use_instead(setup, tmp_path):
    model_dir, data = setup
    res = _train(model_dir, data, tmp_path / "p", "--nproc", 2, "--fsdp", check=False,
                 method=("--method", "prompt-tuning"))
    assert res.returncode != 0 and "prompt, prefix and P-tuning methods look up token embeddings" in res.stderr
    assert "use DDP (--nproc N without --fsdp)" in res.stderr
    res = _train(model_dir, data, tmp_path / "s", "--fsdp", check=False)
    assert res.returncode != 0 and "--fsdp shards the frozen base over several processes: add --nproc N" in res.stderr


def test_hf_trainer_under_torchrun_trains_a_peftlab_model_with_ddp(tmp_path):
    """transformers.Trainer (through peftlab.Trainer) launched by torchrun: DDP over 2 gloo processes keeps the
    ranks' adapters equal, rank 0 writes PEFT-format checkpoints, and the result differs from the untrained one."""
    out = tmp_path / "trainer"
    worker = os.path.join(os.path.dirname(__file__), "trainer_ddp_worker.py")
    env = dict(ENV, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), ENV.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          worker, str(out)], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for k in ranks[0]:
        torch.testing.assert_close(ranks[0][k], ranks[1][k], atol=0, rtol=0)
    lora_b = [v for k, v in ranks[0].items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)   # B starts at zero: it trained
    ckpt = out / "checkpoint-4"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    for k, v in saved.items():
        torch.testing.assert_close(v, ranks[0][k], atol=0, rtol=0)
