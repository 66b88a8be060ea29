"""The README lists exactly the registered methods, with their registry facts (scripts/methods_table.py)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_methods_table_is_the_registry():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from methods_table import methods_table
    finally:
        sys.path.pop(0)
    readme = (ROOT / "README.md").read_text()
    assert methods_table() in readme, ("README.md's methods table differs from the registry; regenerate it with "
                                       ".venv/bin/python scripts/methods_table.py")
