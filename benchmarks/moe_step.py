"""MoE-LoRA training step vs a LoRA step of the same active rank, SmolLM2-135M shapes, fp32, 2 threads.

Issue 14's goal: MoE-LoRA with 8 experts of r=8, top-2, on all linear layers costs ≤ 1.25× a LoRA r=16 step
(2 × 8 = the same active rank per token) and its peak memory is ≤ 1.3× that step's. HF PEFT's X-LoRA, the
nearest existing reference (it mixes every LoRA densely with learned per-token scalings, two forward passes per
step), runs on the same shapes with 8 LoRA r=8 adapters.

Timing as benchmarks/common.py does it: all modes in one process, interleaved step by step, CPU time, each step
against the reference steps beside it, median over rounds; (1) whole steps of the 30-layer model and (2) many
short steps of a 2-layer decoder stack (the adapters' own cost to about a percent). Memory as benchmarks/memory.py
measures it: one subprocess per mode, peak RSS of 3 steps after a warm-up.
Run: .venv/bin/python benchmarks/moe_step.py [--rounds 6] [--stack-rounds 40] [--no-xlora] [--no-memory]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import (base_model, body_step, env_line, input_grad_hook, interleaved, make_adapted,  # noqa: E402
                    print_table, randomize, setup_torch, shared_copy, token_batch, train_step)
import torch  # noqa: E402

REF = "LoRA r=16"
MOE = "MoE-LoRA 8×r8 top-2"
TARGETS = {MOE: "≤ 1.25", f"{MOE} + zero expert": "≤ 1.25", "HF PEFT X-LoRA 8×r8": "(reference)"}
# MOE uses expert_compute="auto", which on CPU at 8 × r8 is the dense kernel; the grouped kernel (only routed
# experts computed) is measured beside it.


def moe_lora(base, zero_expert: bool = False, compute: str = "auto"):
    import peftlab
    model = shared_copy(base)
    cfg = peftlab.get_method("moe-lora").make_config(r=8, lora_alpha=16, num_experts=8, top_k=2,
                                                     zero_expert=zero_expert, target_modules="all-linear",
                                                     expert_compute=compute)
    pm = peftlab.get_peft_model(model, cfg)
    randomize(pm)
    return pm


def xlora(base):
    """HF PEFT X-LoRA over 8 saved LoRA r=8 adapters (it loads its experts from directories)."""
    import peft
    tmp = tempfile.mkdtemp(prefix="peftlab-xlora-")
    dirs = {}
    for i in range(8):
        m = peft.get_peft_model(shared_copy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        randomize(m, seed=i)
        m.save_pretrained(os.path.join(tmp, f"e{i}"))
        dirs[str(i)] = os.path.join(tmp, f"e{i}")   # X-LoRA names the loaded adapters "0".."7" whatever the keys
    cfg = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size, adapters=dirs,
                           xlora_depth=1, layerwise_scalings=False)
    model = shared_copy(base)
    model.config.use_cache = False
    return peft.get_peft_model(model, cfg)


BUILD = {REF: lambda b: make_adapted(b, "peftlab", "lora", r=16), MOE: moe_lora,
         f"{MOE} + zero expert": lambda b: moe_lora(b, zero_expert=True),
         f"{MOE}, grouped kernel": lambda b: moe_lora(b, compute="grouped"), "HF PEFT X-LoRA 8×r8": xlora}


def build(base, names: list[str]) -> dict:
    out = {}
    for n in names:
        try:
            m = BUILD[n](base)
        except Exception as e:  # X-LoRA's constructor is picky about models; say why instead of stopping
            print(f"[note] {n} not measured: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        input_grad_hook(m.get_base_model() if hasattr(m, "get_base_model") else m)
        m.train()
        out[n] = m
    return out


def child(mode: str, batch: int, seq: int) -> dict:
    from memory import measure_peak
    setup_torch(2)
    model = build(base_model(real=True), [mode])[mode]
    return {"mode": mode, **measure_peak(train_step(model, token_batch(batch, seq)))}


def memory(names: list[str], batch: int, seq: int) -> None:
    rows = {}
    for mode in names:
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--batch", str(batch), "--seq", str(seq)],
                             capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            print(f"[note] {mode}: memory not measured\n{out.stderr[-1500:]}", file=sys.stderr)
            continue
        rows[mode] = json.loads(line[0][7:])
    gb = 1024 ** 3
    print(f"\n(4) Peak memory of a training step (batch {batch}x{seq}, fp32), one subprocess per mode")
    print("| mode | RSS before steps | peak RSS | step peak (peak − before) | peak vs LoRA r=16 | target |")
    print("|---|---|---|---|---|---|")
    ref = rows.get(REF)
    for mode, r in rows.items():
        rel = f"{r['peak'] / ref['peak']:.2f}×" if ref else ""
        target = "≤ 1.3×" if mode.startswith("MoE") else ""
        print(f"| {mode} | {r['rss_before'] / gb:.2f} GB | {r['peak'] / gb:.2f} GB | "
              f"{(r['peak'] - r['rss_before']) / gb:.2f} GB | {rel} | {target} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", default=None)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--stack-rounds", type=int, default=40)
    ap.add_argument("--stack-layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--no-xlora", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.batch, args.seq)))
        return
    setup_torch(2)
    names = [n for n in BUILD if not (args.no_xlora and n.startswith("HF"))]
    print(f"MoE-LoRA training step, batch {args.batch}x{args.seq}, all-linear, fp32; {env_line()}")
    base = base_model(real=True)
    batch = token_batch(args.batch, args.seq)
    res = interleaved({n: train_step(m, batch) for n, m in build(base, names).items()}, REF, rounds=args.rounds)
    print_table(f"(1) Training step (fwd + bwd), CPU time ratio vs {REF}, median of {args.rounds} rounds", res,
                TARGETS)
    stack = base_model(real=False, layers=args.stack_layers)
    ids = token_batch(args.batch, args.seq, labels=False)["input_ids"]
    grad = torch.randn(args.batch, args.seq, stack.config.hidden_size, generator=torch.Generator().manual_seed(0))
    stack_models = build(stack, [n for n in names if not n.startswith("HF")])  # X-LoRA needs its whole model
    stack_res = interleaved({n: body_step(m, ids, grad) for n, m in stack_models.items()}, REF,
                            rounds=args.stack_rounds, verbose=False)
    print_table(f"(2) Decoder stack of {args.stack_layers} SmolLM2 layers (no LM head), fwd + bwd, ratio vs "
                f"{REF}, median of {args.stack_rounds} rounds", stack_res, TARGETS)
    if not args.no_memory:
        memory(names, args.batch, args.seq)


if __name__ == "__main__":
    with torch.inference_mode(False):
        main()
