"""
The library layers import downwards only (STYLE.md, "Library code never imports an entry point"):
    model/    never imports trainer/, dataset/, main.py, scripts/ (or bench/, tests/)
    dataset/  never imports trainer/, model/, main.py, scripts/ (or bench/, tests/)
    trainer/  never imports main.py, scripts/ (or bench/, tests/)
Checked by parsing every file's imports (ast), including imports inside functions and importlib.import_module
calls with a literal name, so a lazy import cannot hide a wrong direction.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"main", "scripts", "bench", "tests"}
FORBIDDEN = {
    "model": ENTRY_POINTS | {"trainer", "dataset"},
    "dataset": ENTRY_POINTS | {"trainer", "model"},
    "trainer": ENTRY_POINTS,
}


def imported_packages(source: str, package: str) -> list[tuple[int, str]]:
    """(line, top-level name) of every import in `source`, a module of `package`; relative imports resolve to it."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, package if node.level else node.module.split(".")[0]))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value.split(".")[0]))
    return found


def test_the_checker_sees_every_kind_of_import():
    source = ("import os\nfrom . import x\n\ndef f():\n    from main import STAGES\n    import scripts.zh_simplify\n"
              "    importlib.import_module('trainer.sft')\n")
    assert imported_packages(source, "dataset") == [(1, "os"), (2, "dataset"), (5, "main"), (6, "scripts"),
                                                    (7, "trainer")]


FILES = sorted(p for layer in FORBIDDEN for p in (ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_library_imports_point_downwards(path):
    layer = path.relative_to(ROOT).parts[0]
    wrong = [f"{path.relative_to(ROOT)}:{line}: imports {name}"
             for line, name in imported_packages(path.read_text(encoding="utf-8"), layer) if name in FORBIDDEN[layer]]
    assert not wrong, "\n".join(wrong)
