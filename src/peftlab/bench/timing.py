"""Interleaved CPU-time ratios: how peftlab compares two ways of running a step on a noisy, shared machine.

All modes live in one process and take turns step by step, the reference step run before and after every other
step; each step is timed with `time.process_time()` (CPU time of this process, so time lost to other tenants of
the VM does not count), and the reported number is the median over rounds of each step's ratio to the reference
steps beside it. The benchmarks/ scripts and `peftlab bench` both use this (docs/DESIGN.md, "Speed and memory").
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable

# OpenMP threads that spin-wait at barriers burn CPU time while the other thread is descheduled by a neighbour,
# which makes process_time() wander by 2x; passive waiting counts only the work itself. It only takes effect
# before torch starts its thread pool: the command line sets it before importing peftlab; set here too for
# scripts that import this module first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def timed(fn: Callable[[], None]) -> float:
    """CPU seconds of one call."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def interleaved(modes: dict[str, Callable[[], None]], reference: str, rounds: int = 8, warmup: int = 1,
                verbose: bool = True) -> dict[str, dict]:
    """Time every mode once per round (order rotated each round) with process_time, the reference step taken
    before and after each of them: ref, m1, ref, m2, ref, ...

    A step's ratio is its time over the geometric mean of the two reference steps beside it. Why: this VM's
    speed wanders from one step to the next (neighbours' load on the shared cache and memory), and with a single
    reference step per round every mode's ratio in that round moved together with that one step's luck; the
    bracketing references are seconds away from the step they judge, and averaging two halves the variance the
    reference adds to each ratio.
    Returns {mode: {"ratio": median step ratio, "sec": median seconds, "ratios": [...], "min_ratio": ratio of
    the fastest steps, "iqr": (25th, 75th percentile of the ratios)}}.
    """
    names = [n for n in modes if n != reference]
    times = {n: [] for n in modes}
    ratios = {n: [] for n in modes}
    for rnd in range(warmup + rounds):
        order = names[rnd % len(names):] + names[: rnd % len(names)] if names else []
        t_ref = timed(modes[reference])
        if rnd >= warmup:
            times[reference].append(t_ref)
        for n in order:
            t = timed(modes[n])
            t_next = timed(modes[reference])
            if rnd >= warmup:
                times[n].append(t)
                times[reference].append(t_next)
                ratios[n].append(t / max(t_ref * t_next, 1e-12) ** 0.5)
            t_ref = t_next
        if verbose and rnd >= warmup:
            print(f"  round {rnd - warmup + 1}/{rounds}: " + ", ".join(f"{n} {ratios[n][-1]:.3f}" for n in names),
                  file=sys.stderr, flush=True)
    ratios[reference] = [1.0] * rounds
    out = {}
    for n in modes:
        q = statistics.quantiles(ratios[n], n=4) if len(ratios[n]) > 1 else [ratios[n][0]] * 3
        out[n] = {"ratio": statistics.median(ratios[n]), "sec": statistics.median(times[n]), "ratios": ratios[n],
                  "min_ratio": min(times[n]) / max(min(times[reference]), 1e-12), "iqr": (q[0], q[2])}
    return out
