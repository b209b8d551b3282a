"""The house rules a reviewer would otherwise check by hand: file size, lint, and an import picture without circles.

Each check reads the source tree only; a file that grows past the limit, a lint finding, or a new import circle
fails here with the offending names.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("export", "passes", "runtime", "benchmarks", "tests")
MAX_LINES = 400


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts) if path.is_relative_to(ROOT) else [path.stem]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports, at any depth of the file (function-level imports count: they
    close a circle as surely as top-level ones, only later)."""
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != me:
                found.add(name)
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _project_graph() -> dict[str, set[str]]:
    files = [p for p in _sources() if not p.is_relative_to(ROOT / "tests")]
    modules = {_module(p) for p in files}
    # a package's __init__ re-exporting its submodules is not a circle with them
    return {_module(p): {m for m in imports_of(p, modules) if not _module(p).startswith(m + ".")
                         and not (p.name == "__init__.py" and m.startswith(_module(p) + "."))} for p in files}


def test_no_source_file_passes_the_line_limit():
    long = {str(p.relative_to(ROOT)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines (split them by what they do): {long}"


def test_the_import_picture_has_no_circle():
    cycles = import_cycles(_project_graph())
    assert not cycles, f"modules that import each other (directly or round a loop): {cycles}"


def test_the_cycle_finder_sees_a_circle_and_a_function_level_import(tmp_path):
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
    src = tmp_path / "x.py"
    src.write_text("import os\n\ndef f():\n    from passes.locate import find_sites\n")
    assert imports_of(src, {"passes.locate", "passes.cleanup"}) == {"passes.locate"}


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is not installed (it comes with the test extra: pip install -e '.[test]')")
def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    res = subprocess.run([ruff, "check", "--no-cache", *PACKAGES], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-1000:]


def test_every_package_folder_is_packaged():
    """pyproject's package discovery finds every folder of export, passes and runtime that holds Python (a method
    folder left out would install without its pass, and setuptools' data-file fallback is deprecated)."""
    import tomllib

    setuptools = pytest.importorskip("setuptools")
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    found = set(setuptools.find_namespace_packages(where=str(ROOT), include=find["include"]))
    folders = {".".join(p.parent.relative_to(ROOT).parts) for pkg in ("export", "passes", "runtime")
               for p in (ROOT / pkg).rglob("*.py")}
    assert folders and not folders - found, f"not packaged: {sorted(folders - found)}"
