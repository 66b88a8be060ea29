"""Print the README's methods table from the registry (tests/test_readme.py checks the README against it).
Run: .venv/bin/python scripts/methods_table.py"""
from __future__ import annotations

ORDER = ("reparameterized", "additive", "selective", "hybrid", "moe", "full")


def methods_table() -> str:
    from peftlab.core.registry import list_methods
    rows = ["| name | category | kind | mergeable | HF PEFT file format | default lr | what it trains |",
            "|---|---|---|---|---|---|---|"]
    for m in sorted(list_methods(), key=lambda m: (ORDER.index(m.category), m.name)):
        fmt = "yes" if m.hf_peft_compatible else "no (own peft_type)"
        rows.append(f"| `{m.name}` | {m.category} | {m.kind} | {'yes' if m.mergeable else 'no'} | {fmt} "
                    f"| {m.default_lr:g} | {m.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(methods_table())
