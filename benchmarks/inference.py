"""Inference benchmark: base vs unmerged LoRA vs merged vs a batch mixing 8 adapters (peftlab and HF PEFT).

SmolLM2-135M shapes, fp32, 2 threads, r=16 on all linear layers, batch 32×64 (prefill: the hidden states of
all 64 positions, logits of the last one only, `logits_to_keep=1`, so the 49152-way head does not dilute the
adapters' cost). The 8 adapters are assigned 4 rows each in a shuffled order (what a server sees).
Run: .venv/bin/python benchmarks/inference.py [--rounds 8]
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import (base_model, env_line, interleaved, make_adapted, print_table, randomize,  # noqa: E402
                    setup_torch, shared_copy, token_batch)
import torch  # noqa: E402

TARGETS = {"peftlab LoRA unmerged": "≤ 1.08", "peftlab LoRA merged": "≤ 1.02", "peftlab 8-adapter mixed": "≤ 1.15",
           "HF PEFT LoRA unmerged": "(1.20 in docs/DESIGN.md)", "HF PEFT 8-adapter mixed": "(1.48 in docs/DESIGN.md)"}


def forward(model, batch, **extra):
    def run():
        with torch.inference_mode():
            model(**batch, logits_to_keep=1, **extra)
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--no-peft", action="store_true")
    args = ap.parse_args()
    setup_torch(2)
    base = base_model(real=not args.random_weights)
    batch = token_batch(args.batch, args.seq, labels=False)
    names = [f"a{i % args.adapters}" for i in range(args.batch)]
    random.Random(0).shuffle(names)

    frozen = shared_copy(base)
    modes = {"base": forward(frozen, batch)}
    libs = ["peftlab"] + ([] if args.no_peft else ["peft"])
    for lib in libs:
        label = "peftlab" if lib == "peftlab" else "HF PEFT"
        single = make_adapted(base, lib, "lora", r=args.r).eval()
        modes[f"{label} LoRA unmerged"] = forward(single, batch)
        multi = make_adapted(base, lib, "lora", r=args.r, adapters=args.adapters).eval()
        modes[f"{label} {args.adapters}-adapter mixed"] = forward(multi, batch, adapter_names=names)
    # merged: its own copy of the weights (merging writes into them)
    own = copy.deepcopy(base)
    import peftlab
    merged = peftlab.get_peft_model(own, peftlab.LoraConfig(r=args.r, lora_alpha=2 * args.r,
                                                            target_modules="all-linear"))
    randomize(merged)
    merged.eval()
    merged.merge_adapter()
    modes["peftlab LoRA merged"] = forward(merged, batch)
    print(f"inference, batch {args.batch}x{args.seq} (logits_to_keep=1), r={args.r} all-linear, fp32; "
          f"adapter order {' '.join(names)}; {env_line()}")
    res = interleaved(modes, "base", rounds=args.rounds)
    print_table(f"Inference forward, CPU time ratio vs base, median of {args.rounds} rounds", res, TARGETS)


if __name__ == "__main__":
    main()
