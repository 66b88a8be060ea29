"""One process vs two (torchrun, gloo): DDP and FSDP2 (the frozen base sharded, train/sharding.py) on SmolLM2-135M.

The same global batch (8 × 128 tokens of general-English passages, LoRA r=16 on all linear layers) per optimizer
step in every mode; 2 CPU threads for the single process, 1 per process for two (this machine has 2 cores).
Per rank: RSS before the measured steps, peak RSS during them (VmHWM after a reset; benchmarks/memory.py's
method), the anonymous part of the RSS at the end (the frozen weights a rank holds: FSDP2 keeps 1/N of them), and
the wall time per step (median of the 3 measured steps, after a warm-up step).
Run: .venv/bin/python benchmarks/distributed.py
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

MODES = {"1 process": [], "DDP, 2 processes": ["--nproc", "2"], "FSDP2, 2 processes": ["--nproc", "2", "--fsdp"]}


def worker(fsdp: bool) -> None:
    import torch

    import peftlab
    from memory import _status, measure_peak
    from peftlab.models import load_model
    from peftlab.train import loop as L
    from peftlab.train.data import Collator, encode_causal
    from peftlab.train.tasks import general_english_passages

    if "WORLD_SIZE" in os.environ:
        torch.distributed.init_process_group("gloo")
    base, tok = load_model("smollm2-135m")
    model = peftlab.get_peft_model(base.float(), peftlab.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    texts = general_english_passages(24)
    examples = encode_causal([{"text": t} for t in texts], tok, max_length=128)
    cfg = L.TrainConfig(steps=8, batch_size=8, lr=1e-4, progress=False, fsdp=fsdp, seed=0)
    state = L.setup(model, examples, Collator(tok.pad_token_id, "left"), cfg)
    times = []

    def step():
        t = time.perf_counter()
        loss, tokens = L.micro_step(state, 0)
        L.optimizer_step(state, loss, tokens)
        times.append(time.perf_counter() - t)

    mem = measure_peak(step)
    rank = state.rank
    # one file per rank: the ranks' stdout lines interleave under torchrun
    with open(os.path.join(os.environ["PEFTLAB_BENCH_OUT"], f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": state.world, **mem, "rss_anon_end": _status("RssAnon"),
                   "s_per_step": statistics.median(times[1:])}, f)
    if "WORLD_SIZE" in os.environ:
        torch.distributed.destroy_process_group()


def run(mode: str) -> list[dict]:
    me = os.path.abspath(__file__)
    extra = MODES[mode]
    if not extra:
        cmd = [sys.executable, me, "--worker"]
        env = dict(os.environ, OMP_NUM_THREADS="2")
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", me, "--worker",
               *(["--fsdp"] if "--fsdp" in extra else [])]
        env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as results:
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, PEFTLAB_BENCH_OUT=results))
        rows = [json.loads(f.read_text()) for f in sorted(Path(results).glob("rank*.json"))]
    if out.returncode or not rows:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{mode}: failed")
    print(f"  {mode}: done", file=sys.stderr, flush=True)
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--fsdp", action="store_true")
    args = ap.parse_args()
    if args.worker:
        return worker(args.fsdp)
    import torch
    print(f"torch {torch.__version__}, {os.cpu_count()} cpus; SmolLM2-135M fp32, LoRA r=16 all-linear, global batch "
          f"8 × 128 tokens per step, 3 measured steps after a warm-up\n")
    print("| mode | rank | RSS before steps | peak RSS during steps | anonymous RSS after | s/step (median) |")
    print("|---|---|---|---|---|---|")
    gb = 2 ** 30
    base_s = None
    for mode in MODES:
        for r in run(mode):
            base_s = base_s or r["s_per_step"]
            print(f"| {mode} | {r['rank']} | {r['rss_before'] / gb:.3f} GB | {r['peak'] / gb:.3f} GB | "
                  f"{r['rss_anon_end'] / gb:.3f} GB | {r['s_per_step']:.2f} ({r['s_per_step'] / base_s:.2f}×) |")


if __name__ == "__main__":
    main()
