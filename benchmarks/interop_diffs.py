"""HF PEFT interop, measured: the max |logit difference| of every case of tests/test_interop_peft.py, both ways.

peft -> peftlab (default numerics and inside hf_peft_numerics()) and peftlab -> peft, on the tiny in-process models
the tests use. The tests only assert <= 1e-5; this prints the numbers, so two versions of the code can be compared
(run it once per checkout: PYTHONPATH=<checkout>/src .venv/bin/python benchmarks/interop_diffs.py).
Run: .venv/bin/python benchmarks/interop_diffs.py
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import peft  # noqa: E402
import peftlab  # noqa: E402
from conftest import token_batch  # noqa: E402
from test_interop_peft import CASES, _out, _perturb_trainable  # noqa: E402


def diffs(case: str) -> tuple[float, float, float]:
    make, kw = CASES[case]
    batch = token_batch()
    with tempfile.TemporaryDirectory() as d:
        theirs = peft.get_peft_model(make(), peft.LoraConfig(**kw))
        _perturb_trainable(theirs)
        theirs.eval().save_pretrained(d)
        ours = peftlab.PeftModel.from_pretrained(make(), d)
        to_ours = float((_out(ours, batch) - _out(theirs, batch)).abs().max())
        with peftlab.hf_peft_numerics():
            to_ours_exact = float((_out(ours, batch) - _out(theirs, batch)).abs().max())
    with tempfile.TemporaryDirectory() as d:
        ours = peftlab.get_peft_model(make(), peftlab.LoraConfig(**kw))
        _perturb_trainable(ours)
        ours.eval().save_pretrained(d)
        theirs = peft.PeftModel.from_pretrained(make(), d)
        to_theirs = float((_out(ours, batch) - _out(theirs, batch)).abs().max())
    return to_ours, to_ours_exact, to_theirs


def main() -> None:
    print("| case | peft -> peftlab | same, hf_peft_numerics() | peftlab -> peft |")
    print("|---|---|---|---|")
    for case in sorted(CASES):
        a, b, c = diffs(case)
        print(f"| {case} | {a:.3g} | {b:.3g} | {c:.3g} |")


if __name__ == "__main__":
    main()
