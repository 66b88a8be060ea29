"""How the LoRA training overhead scales with rank (4–64) and sequence length, against the frozen-base limit.

The decoder stack only (SmolLM2-135M layer shapes, random weights, --layers of them; no LM head or loss, so
the ratio is the adapted layers' own overhead, not diluted by the 49152-way head), fp32, 2 threads. A step is
the stack's forward plus backward of a fixed random output gradient, input gradients on everywhere.
Modes take turns step by step in one process (process CPU time, median of per-round ratios).
Run: .venv/bin/python benchmarks/scaling.py [--layers 8] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import (base_model, body_step, env_line, frozen_copy, input_grad_hook, interleaved,  # noqa: E402
                    make_adapted, setup_torch, token_batch)
import torch  # noqa: E402


def lora_of(base, r):
    m = make_adapted(base, "peftlab", "lora", r=r).train()
    input_grad_hook(m.get_base_model())
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ranks", default="4,8,16,32,64")
    ap.add_argument("--seqs", default="32,64,128,256,512")
    args = ap.parse_args()
    setup_torch(2)
    base = base_model(real=False, layers=args.layers).train()
    d = base.config.hidden_size
    print(f"LoRA overhead scaling, decoder stack of {args.layers} SmolLM2-shaped layers, batch {args.batch}, "
          f"fp32; {env_line()}")

    ids = token_batch(args.batch, 128, labels=False)["input_ids"]
    grad = torch.randn(args.batch, 128, d)
    frozen = frozen_copy(base)
    modes = {"frozen": body_step(frozen, ids, grad)}
    for r in map(int, args.ranks.split(",")):
        modes[f"r={r}"] = body_step(lora_of(base, r), ids, grad)
    res = interleaved(modes, "frozen", rounds=args.rounds)
    print(f"\nLoRA step / frozen step vs rank (seq 128, {args.rounds} rounds)")
    print("| rank | ratio (median) | spread | LoRA extra linear FLOPs (theory) |")
    print("|---|---|---|---|")
    dims = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
    base_flops = sum(i * o for i, o in dims)
    for name, r in res.items():
        if name == "frozen":
            continue
        rank = int(name[2:])
        # fwd x·Aᵀ, u·Bᵀ; bwd g·B, gb·A, gbᵀx, uᵀg: 3·r·(d_in + d_out) per token vs 2·d_in·d_out
        theory = sum(3 * rank * (i + o) for i, o in dims) / (2 * base_flops)
        print(f"| {rank} | {r['ratio']:.3f} | {min(r['ratios']):.3f}–{max(r['ratios']):.3f} | +{theory:.1%} |")
    del modes

    lora = lora_of(base, 16)
    print(f"\nLoRA (r=16) step / frozen step vs sequence length (batch {args.batch}, {args.rounds} rounds)")
    print("| seq | tokens | frozen CPU s/step | ratio (median) | spread |")
    print("|---|---|---|---|---|")
    for seq in map(int, args.seqs.split(",")):
        ids = token_batch(args.batch, seq, labels=False)["input_ids"]
        grad = torch.randn(args.batch, seq, d)
        res = interleaved({"frozen": body_step(frozen, ids, grad), "lora": body_step(lora, ids, grad)}, "frozen",
                          rounds=args.rounds, verbose=False)
        r = res["lora"]
        print(f"| {seq} | {args.batch * seq} | {res['frozen']['sec']:.3f} | {r['ratio']:.3f} | "
              f"{min(r['ratios']):.3f}–{max(r['ratios']):.3f} |", flush=True)


if __name__ == "__main__":
    main()
