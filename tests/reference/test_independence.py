"""The references share no code with what they check: they import torch and each other, nothing of ours."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REFERENCES = ["tome.py", "sdtm.py", "atedm.py", "mod.py"]
ALLOWED = ("__future__", "contextlib", "collections", "torch", "tests.reference")


@pytest.mark.parametrize("name", REFERENCES)
def test_reference_imports_only_torch(name):
    tree = ast.parse((HERE / name).read_text())
    modules = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    modules += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    bad = [m for m in modules if not m.startswith(ALLOWED) or m == "tests.reference.common"]
    assert not bad, f"{name} imports {bad}"
