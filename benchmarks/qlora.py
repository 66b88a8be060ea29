"""QLoRA on SmolLM2-135M: storage of the quantised weights, peak memory and step time of a QLoRA step, side by side.

1. Storage: bytes of every quantised linear weight (packed codes + all scales, core.quantized.quantized_bytes) vs
   the same weights in fp32, for NF4 with and without double quantisation, FP4 and int8.
2. Peak memory of a training step (4×128 tokens, r=16 all-linear), one fresh subprocess per mode, measured as
   benchmarks/memory.py does (VmHWM after a warm-up step, malloc_trim, peak-RSS reset): peftlab fp32 LoRA,
   peftlab QLoRA (NF4 + double quantisation, fp32 compute), HF PEFT QLoRA on the same base.
3. Step time: the three modes in one process taking turns (benchmarks/common.interleaved: CPU time, every step
   bracketed by two reference steps, median of the per-step ratios); reference = peftlab fp32 LoRA.
Run: .venv/bin/python benchmarks/qlora.py [--rounds 6] [--skip-memory] [--skip-time]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import (env_line, input_grad_hook, interleaved, make_adapted, print_table, setup_torch,  # noqa: E402
                    token_batch, train_step)
from memory import measure_peak, run_child  # noqa: E402

MODES = ["peftlab LoRA (fp32 base)", "peftlab QLoRA (nf4)", "HF PEFT QLoRA (nf4)"]


def load(quantize=None, double_quant=True):
    from peftlab.models import load_model
    model, _ = load_model("smollm2-135m", quantize=quantize, double_quant=double_quant)
    return model.eval()


def storage_table() -> None:
    from peftlab.core.quantized import quantized_bytes, quantized_layers
    print("\nStorage of SmolLM2-135M's 210 linear weights (the embedding / tied LM head stays fp32)")
    print("| quantisation | bytes | fp32 bytes | ratio | bits per weight |")
    print("|---|---|---|---|---|")
    for label, kind, double in [("NF4 + double quantisation", "nf4", True), ("NF4", "nf4", False),
                                ("FP4 + double quantisation", "fp4", True), ("int8 (LLM.int8)", "int8", False)]:
        layers = quantized_layers(load(kind, double))
        n = sum(m.in_features * m.out_features for _, m in layers)
        b = sum(quantized_bytes(m) for _, m in layers)
        print(f"| {label} | {b / 2**20:.1f} MiB | {4 * n / 2**20:.1f} MiB | {b / (4 * n):.4f}× | {8 * b / n:.3f} |")
    sys.stdout.flush()


def build(mode: str, r: int, bases: dict):
    """The mode's adapted model; `bases` caches the fp32 and the NF4 base, shared by the modes that use them."""
    kind = "fp32" if mode.startswith("peftlab LoRA") else "nf4"
    if kind not in bases:
        bases[kind] = load(None if kind == "fp32" else "nf4")
    model = make_adapted(bases[kind], "peft" if mode.startswith("HF") else "peftlab", "lora", r=r)
    input_grad_hook(model.get_base_model())
    return model.train()


def child(mode: str, r: int, batch: int, seq: int) -> dict:
    setup_torch(2)
    return measure_peak(train_step(build(mode, r, {}), token_batch(batch, seq)))


def memory_table(r: int, batch: int, seq: int) -> None:
    rows = {}
    for mode in MODES:
        rows[mode] = run_child(__file__, mode, "--r", r, "--batch", batch, "--seq", seq)
    gb = 1024 ** 3
    print(f"\nPeak memory of a training step ({batch}×{seq} tokens, r={r} all-linear), one subprocess per mode")
    print("| mode | RSS before steps | peak RSS during steps | step peak (peak − before) | file-backed RSS after |")
    print("|---|---|---|---|---|")
    for mode, m in rows.items():
        print(f"| {mode} | {m['rss_before'] / gb:.3f} GB | {m['peak'] / gb:.3f} GB | "
              f"{(m['peak'] - m['rss_before']) / gb:.3f} GB | {m['rss_file'] / gb:.3f} GB |")
    # Why the last column: transformers keeps the checkpoint's safetensors file mapped after loading. For the fp32
    # base those mapped pages are the weights themselves; a quantised load reads every page once to quantise it,
    # so the whole fp32 file (~0.5 GB here) stays in RSS as clean, reclaimable page cache beside the 4-bit copy.
    print("file-backed RSS: the mapped safetensors checkpoint (clean page cache, which the OS reclaims under "
          "pressure); for a quantised base it is the fp32 file read once to quantise it")
    ours, theirs, dense = (rows[m]["peak"] for m in MODES[1:] + MODES[:1])
    print(f"peftlab QLoRA vs HF PEFT QLoRA: peak RSS {ours / theirs - 1:+.1%} ({(ours - theirs) / 2**20:+.0f} MiB); "
          f"vs peftlab fp32 LoRA {ours / dense - 1:+.1%} ({(ours - dense) / 2**20:+.0f} MiB)")
    sys.stdout.flush()


def time_table(r: int, batch: int, seq: int, rounds: int) -> None:
    setup_torch(2)
    bases: dict = {}
    steps = {mode: train_step(build(mode, r, bases), token_batch(batch, seq)) for mode in MODES}
    res = interleaved(steps, reference=MODES[0], rounds=rounds)
    print_table(f"Training step CPU time ({batch}×{seq} tokens, r={r} all-linear), ratio vs peftlab fp32 LoRA",
                res, {"peftlab QLoRA (nf4)": "≤ 1.15", "HF PEFT QLoRA (nf4)": "(slower than peftlab QLoRA)"})
    ours, theirs = res[MODES[1]]["ratio"], res[MODES[2]]["ratio"]
    print(f"peftlab QLoRA step vs HF PEFT QLoRA step: {ours / theirs:.3f}× the time "
          f"(HF PEFT takes {theirs / ours:.3f}× peftlab's)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", default=None)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-time", action="store_true")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.r, args.batch, args.seq)))
        return
    import warnings
    warnings.filterwarnings("ignore")
    print(env_line())
    storage_table()
    if not args.skip_memory:
        memory_table(args.r, args.batch, args.seq)
    if not args.skip_time:
        time_table(args.r, args.batch, args.seq, args.rounds)


if __name__ == "__main__":
    main()
