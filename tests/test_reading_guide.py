"""docs/reading_guide.md cannot rot: every `file::function` it names exists (classes, functions and methods, found
by parsing the file), every file it names exists, and every line of its code excerpts is still a line of a file
that its section names.

    python -m pytest tests/test_reading_guide.py
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = sorted((ROOT / "docs").glob("reading_guide*.md"))
REFERENCE = re.compile(r"`([\w/]+\.py)::([\w.]+)`")


def defined_names(path: Path) -> set[str]:
    """'f', 'C' and 'C.m' for every top-level function f, class C and method m (nested classes too)."""
    names: set[str] = set()

    def walk(body, prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(prefix + node.name)
                if isinstance(node, ast.ClassDef):
                    walk(node.body, prefix + node.name + ".")

    walk(ast.parse(path.read_text(encoding="utf-8")).body, "")
    return names


def sections(text: str) -> list[tuple[str, str]]:
    """(heading line, body) for each Markdown section."""
    parts = re.split(r"^(#{1,6} .*)$", text, flags=re.M)
    return list(zip(parts[1::2], parts[2::2]))


def test_there_is_a_guide():
    assert GUIDES and (ROOT / "docs" / "reading_guide.md") in GUIDES


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
def test_every_named_function_exists(guide):
    text = guide.read_text(encoding="utf-8")
    references = REFERENCE.findall(text)
    assert len(references) >= 30  # the pattern found the guide's references
    missing = []
    for file, name in references:
        path = ROOT / file
        if not path.is_file():
            missing.append(f"{file} (no such file)")
        elif name not in defined_names(path):
            missing.append(f"{file}::{name}")
    for file in re.findall(r"`([\w/.]+\.(?:py|md|sh|yaml))`", text):
        if "/" in file and not (ROOT / file).exists():
            missing.append(f"{file} (no such file)")
    assert missing == []


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
def test_every_excerpt_is_still_in_the_code(guide):
    text = guide.read_text(encoding="utf-8")
    checked = 0
    for heading, body in sections(text):
        blocks = re.findall(r"^```python\n(.*?)^```", body, re.S | re.M)
        if not blocks:
            continue
        files = {file for file, _ in REFERENCE.findall(heading)}
        assert files, f"excerpts under '{heading}' name no file::function in their heading"
        lines = {line.strip() for file in files for line in (ROOT / file).read_text(encoding="utf-8").splitlines()}
        for block in blocks:
            for line in block.splitlines():
                if line.strip():
                    assert line.strip() in lines, f"'{heading}': the line is no longer in {sorted(files)}: {line}"
                    checked += 1
    assert checked >= 30


def test_the_checks_catch_a_renamed_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("class A:\n    def f(self):\n        return 1\n\ndef g():\n    pass\n", encoding="utf-8")
    assert defined_names(module) == {"A", "A.f", "g"}
    assert sections("# t\n\n## a `x.py::f`\n\nbody\n") == [("# t", "\n\n"), ("## a `x.py::f`", "\n\nbody\n")]
