"""Peak memory of one training step per mode, each mode in its own fresh subprocess (SmolLM2-135M, 4×128, fp32).

Method (Linux): after the model is built and one warm-up step has run, free heap memory is returned to the OS
(glibc malloc_trim) and the kernel's peak-RSS mark is reset (`echo 5 > /proc/self/clear_refs`); then 3 steps
run and VmHWM (peak resident set size) is read. Reported: the RSS before the steps (weights, libraries,
adapter state) and the peak during them; "step peak" = peak − RSS before, the memory the step itself needs
(activations saved for backward, gradients, temporaries). Resident memory is what the OS sees, including
allocator caching, so it is an upper bound on live tensors.
Run: .venv/bin/python benchmarks/memory.py
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))

MODES = ["frozen base", "peftlab LoRA", "HF PEFT LoRA", "peftlab DoRA", "HF PEFT DoRA"]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure_peak(step) -> dict:
    """RSS before and peak RSS during 3 calls of `step` after a warm-up call (the method in the docstring)."""
    step()  # warm-up: lazily created state (caches, allocator arenas) exists before the measurement
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(3):
        step()
    return {"rss_before": before, "peak": _status("VmHWM"), "rss_file": _status("RssFile")}


def run_child(script: str, mode: str, *flags) -> dict:
    """`script --child MODE flags...` in a fresh process; the dict it printed on its RESULT line."""
    out = subprocess.run([sys.executable, script, "--child", mode, *map(str, flags)], capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        print(out.stderr[-2000:], file=sys.stderr)
        raise SystemExit(f"{mode}: child failed")
    print(f"  {mode}: done", file=sys.stderr, flush=True)
    return json.loads(line[0][7:])


def child(mode: str, r: int, batch: int, seq: int) -> dict:
    from common import base_model, input_grad_hook, make_adapted, setup_torch, token_batch, train_step
    setup_torch(2)
    base = base_model(real=True)
    if mode == "frozen base":
        model = base
        for p in model.parameters():
            p.requires_grad_(False)
        input_grad_hook(model)
    else:
        lib = "peft" if mode.startswith("HF") else "peftlab"
        model = make_adapted(base, lib, "dora" if "DoRA" in mode else "lora", r=r)
        input_grad_hook(model.get_base_model())
    model.train()
    return {"mode": mode, **measure_peak(train_step(model, token_batch(batch, seq)))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", default=None)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.r, args.batch, args.seq)))
        return
    rows = {}
    for mode in args.modes.split(","):
        rows[mode] = run_child(__file__, mode, "--r", args.r, "--batch", args.batch, "--seq", args.seq)
    gb = 1024 ** 3
    print(f"\nPeak memory of a training step (batch {args.batch}x{args.seq}, r={args.r} all-linear, fp32), "
          f"one subprocess per mode")
    print("| mode | RSS before steps | peak RSS during steps | step peak (peak − before) | step peak vs frozen |")
    print("|---|---|---|---|---|")
    ref = rows.get("frozen base")
    for mode, r in rows.items():
        step_peak = r["peak"] - r["rss_before"]
        rel = f"{step_peak / (ref['peak'] - ref['rss_before']):.2f}×" if ref else ""
        print(f"| {mode} | {r['rss_before'] / gb:.2f} GB | {r['peak'] / gb:.2f} GB | {step_peak / gb:.2f} GB | {rel} |")
    pairs = [("peftlab LoRA", "HF PEFT LoRA"), ("peftlab DoRA", "HF PEFT DoRA"), ("peftlab DoRA", "peftlab LoRA"),
             ("HF PEFT DoRA", "HF PEFT LoRA")]
    for a, b in pairs:
        if a in rows and b in rows:
            pa, pb = rows[a]["peak"], rows[b]["peak"]
            sa, sb = pa - rows[a]["rss_before"], pb - rows[b]["rss_before"]
            print(f"{a} vs {b}: peak RSS {pa / pb - 1:+.1%} ({(pa - pb) / 2**20:+.0f} MiB), "
                  f"step peak {sa / sb - 1:+.1%} ({(sa - sb) / 2**20:+.0f} MiB)")


if __name__ == "__main__":
    main()
