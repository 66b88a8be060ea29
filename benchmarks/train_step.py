"""Training-step benchmark: frozen base vs peftlab/HF PEFT LoRA and DoRA, SmolLM2-135M shapes, fp32, 2 threads.

Every mode is a copy of one base model sharing its frozen weights; all modes compute input gradients from the
embedding output on (so the frozen base's fwd + input-grad bwd is the physical limit they are compared with).

Two measurements. (1) Whole training steps of the 30-layer model, the modes taking turns. A step takes seconds
and this VM's speed varies ±10–15% from one step to the next, so ten rounds pin a median down to a few percent
only. (2) The same modes on a short decoder stack (--stack-layers of the same layers, no LM head), hundreds of
~0.1 s steps: the adapters' own overhead to about a percent. Everything outside the decoder layers (embedding,
LM head, loss) is identical across modes, so the whole-step ratio implied by (2) is 1 + (stack ratio − 1)·f,
with f the share of the frozen step spent in its decoder layers, measured by (1) and (2) together; printed as
the third table.
Run: .venv/bin/python benchmarks/train_step.py [--rounds 10] [--stack-rounds 60] [--random-weights]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import (base_model, body_step, env_line, frozen_copy, input_grad_hook, interleaved,  # noqa: E402
                    make_adapted, print_table, setup_torch, token_batch, train_step)
import torch  # noqa: E402

TARGETS = {"peftlab LoRA": "≤ 1.10", "peftlab DoRA": "≤ 1.20", "HF PEFT LoRA": "(1.23 in docs/DESIGN.md)",
           "HF PEFT DoRA": "(1.57 in docs/DESIGN.md)"}


SPEC = {"peftlab LoRA": ("peftlab", "lora"), "HF PEFT LoRA": ("peft", "lora"),
        "peftlab DoRA": ("peftlab", "dora"), "HF PEFT DoRA": ("peft", "dora")}


def build_models(base, r: int, which: list[str]) -> dict:
    models = {"frozen base": frozen_copy(base)}
    for name in which:
        lib, kind = SPEC[name]
        m = make_adapted(base, lib, kind, r=r)
        input_grad_hook(m.get_base_model())
        models[name] = m
    for m in models.values():
        m.train()
    return models


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--stack-rounds", type=int, default=60)
    ap.add_argument("--stack-layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--modes", default="peftlab LoRA,HF PEFT LoRA,peftlab DoRA,HF PEFT DoRA")
    args = ap.parse_args()
    setup_torch(args.threads)
    base = base_model(real=not args.random_weights)
    batch = token_batch(args.batch, args.seq)
    which = args.modes.split(",")
    print(f"training step, batch {args.batch}x{args.seq}, r={args.r} all-linear, fp32; {env_line()}")
    res = interleaved({n: train_step(m, batch) for n, m in build_models(base, args.r, which).items()},
                      "frozen base", rounds=args.rounds)
    print_table(f"(1) Training step (fwd + bwd), CPU time ratio vs frozen base, median of {args.rounds} rounds",
                res, TARGETS)
    _print_pairs(res)

    stack = base_model(real=False, layers=args.stack_layers)
    ids = token_batch(args.batch, args.seq, labels=False)["input_ids"]
    grad = torch.randn(args.batch, args.seq, stack.config.hidden_size, generator=torch.Generator().manual_seed(0))
    stack_res = interleaved({n: body_step(m, ids, grad) for n, m in build_models(stack, args.r, which).items()},
                            "frozen base", rounds=args.stack_rounds, verbose=False)
    print_table(f"(2) Decoder stack of {args.stack_layers} SmolLM2 layers (no LM head), fwd + bwd, median of "
                f"{args.stack_rounds} rounds", stack_res)
    _print_pairs(stack_res)

    layers = base.config.num_hidden_layers
    share = layers / args.stack_layers * stack_res["frozen base"]["sec"] / res["frozen base"]["sec"]
    print(f"\n(3) Whole-step ratio implied by (2): decoder layers are {share:.1%} of the frozen step "
          f"({layers} layers × {stack_res['frozen base']['sec'] / args.stack_layers:.3f} s of "
          f"{res['frozen base']['sec']:.3f} s)")
    print("| mode | implied whole-step ratio | from the stack's middle half | target |")
    print("|---|---|---|---|")
    for n in which:
        r = stack_res[n]
        lo, hi = (1 + (q - 1) * share for q in r["iqr"])
        print(f"| {n} | {1 + (r['ratio'] - 1) * share:.3f} | {lo:.3f}–{hi:.3f} | {TARGETS.get(n, '')} |")


def _print_pairs(res: dict) -> None:
    for a, b in (("peftlab LoRA", "HF PEFT LoRA"), ("peftlab DoRA", "HF PEFT DoRA")):
        if a in res and b in res:
            ratios = sorted(x / y for x, y in zip(res[a]["ratios"], res[b]["ratios"]))
            print(f"{a} / {b}: {ratios[len(ratios) // 2]:.3f}")


if __name__ == "__main__":
    with torch.inference_mode(False):
        main()
