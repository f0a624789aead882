"""
The library layers import downwards only (STYLE.md, "Library code never imports an entry point"):
    model/    never imports dataset/, trainer/, main.py, scripts/ (or bench/, tests/); the files that ship inside
              every checkpoint (configuration_slm.py, model_slm.py, attention.py: trust_remote_code loads them
              without this repository) import only each other
    model/server/  the chat server (scripts/serve_api.py's library) beside the engine it serves: model/'s rules, and
              a leaf: no other library module imports it (dataset/, trainer/ and the rest of model/ never do; scripts,
              bench/ and tests/ use it)
    dataset/  never imports trainer/, main.py, scripts/ (or bench/, tests/); it reads the model's chat format
              (model/chat_format.py) and the key its cards record licenses under (model/hub.py)
    trainer/  never imports main.py, scripts/ (or bench/, tests/)
    scripts/  thin command lines over the libraries: never main.py, bench/, tests/ or another script (what two
              scripts share lives in a library module)
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
    "dataset": ENTRY_POINTS | {"trainer"},
    "trainer": ENTRY_POINTS,
    "scripts": ENTRY_POINTS,  # a relative import in a script resolves to scripts too
}
LEAF = "model.server"  # imported by no library module outside it (scripts, bench/ and tests/ use it)
LIBRARIES = {"model", "dataset", "trainer"}


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in `source`, a module of `package` ("model.server"): `from a.b import c`
    gives a.b.c (c may be a module), relative imports resolve against the package."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            base += node.module.split(".") if node.module else []
            found += [(node.lineno, ".".join(base + [alias.name])) for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_checker_sees_every_kind_of_import():
    source = (
        "import os\nfrom . import x\n\ndef f():\n    from main import STAGES\n    import scripts.zh_simplify\n"
        "    importlib.import_module('trainer.sft')\n"
    )
    assert imported_modules(source, "dataset") == [
        (1, "os"),
        (2, "dataset.x"),
        (5, "main.STAGES"),
        (6, "scripts.zh_simplify"),
        (7, "trainer.sft"),
    ]
    source = "from model import server\nfrom .. import engine\nfrom .protocol import ApiError\n"
    assert [name for _, name in imported_modules(source, "model.server")] == [
        "model.server",
        "model.engine",
        "model.server.protocol.ApiError",
    ]


FILES = sorted(p for layer in FORBIDDEN for p in (ROOT / layer).rglob("*.py"))


def package_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).parent.parts)


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_library_imports_point_downwards(path):
    layer, package = path.relative_to(ROOT).parts[0], package_of(path)
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: imports {name}"
        for line, name in imported_modules(path.read_text(encoding="utf-8"), package)
        if name.split(".")[0] in FORBIDDEN[layer]
        or (layer in LIBRARIES and within(name, LEAF) and not within(package, LEAF))
    ]
    assert not wrong, "\n".join(wrong)


def test_the_server_is_a_leaf_of_the_libraries():
    """The leaf rule has files to check on both sides: the server's own modules and the libraries that may not use
    it (a renamed folder would leave the rule checking nothing)."""
    inside = [p for p in FILES if within(package_of(p), LEAF)]
    assert {p.name for p in inside} >= {"protocol.py", "worker.py", "http.py"}
    assert {package_of(p) for p in FILES if not within(package_of(p), LEAF)} >= LIBRARIES


SHIPPED = ("configuration_slm.py", "model_slm.py", "attention.py")


def test_the_model_code_that_ships_with_checkpoints_imports_no_project_package():
    for name in SHIPPED:
        source = (ROOT / "model" / name).read_text(encoding="utf-8")
        outside = [
            (line, pkg)
            for line, pkg in ((line, name.split(".")[0]) for line, name in imported_modules(source, "model"))
            if pkg in FORBIDDEN["model"] | {"dataset", "model"} and pkg != "model"
        ]
        absolute = [
            n.module
            for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.ImportFrom) and not n.level and n.module.split(".")[0] == "model"
        ]
        assert outside == [] and absolute == [], (
            f"{name}: only relative imports of its siblings ({outside}, {absolute})"
        )


PROJECT = {"model", "dataset", "trainer", "scripts", "bench"}


def nested_project_imports(source: str, package: str) -> list[int]:
    """Lines of project imports inside functions or classes (they hide a file's dependencies; only optional
    third-party packages are imported lazily)."""
    tree = ast.parse(source)
    top = {id(node) for node in tree.body}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or package]
            if getattr(node, "level", 0) or any(n.split(".")[0] in PROJECT for n in names):
                lines.append(node.lineno)
    return lines


# The one exception, with its reason: main.py imports trainer.config (and with it torch, seconds) only once a stage
# is to run, so `python main.py --help` and a mistyped stage answer at once (issue 27.6).
NESTED_ALLOWED = {"main.py": 1}  # file -> how many nested project imports it may have


def test_project_imports_are_at_the_top_of_every_library_and_script_file():
    files = sorted(p for d in ("model", "dataset", "trainer", "scripts", "bench") for p in (ROOT / d).rglob("*.py"))
    nested = {
        str(p.relative_to(ROOT)): nested_project_imports(p.read_text(encoding="utf-8"), p.parent.name)
        for p in files + [ROOT / "main.py"]
    }
    assert {f: lines for f, lines in nested.items() if len(lines) > NESTED_ALLOWED.get(f, 0)} == {}


# Lazy imports of third-party and standard-library modules (inside functions): the rule is the top of the file,
# with a lazy import only for an optional package or a deliberate reason (a module that must not import torch, a
# torch.distributed submodule, a version gate), and then a one-line comment says which, on the import or on the
# line just above its group. (file, module) pairs not yet fixed, for the merge after the trainer/ and engine refactors;
# the list only shrinks.
LAZY_WITHOUT_REASON: set[tuple[str, str]] = set()  # (file, module) pairs still to fix; empty: none left


def lazy_imports_without_reason(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import inside a function or class with no comment on its line or on the line just
    above its group of import lines."""
    lines = source.split("\n")
    tree = ast.parse(source)
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
            first = node.lineno - 1  # 0-based index of the group's first import line
            while first > 0 and lines[first - 1].strip().startswith(("import ", "from ")):
                first -= 1
            if "#" not in lines[node.lineno - 1] and not (first > 0 and "#" in lines[first - 1]):
                found.append((node.lineno, node.names[0].name if isinstance(node, ast.Import) else node.module))
    return found


def test_the_lazy_import_checker_sees_a_reason_or_its_absence():
    source = (
        "def f():\n    import a  # optional\n    try:  # optional\n        import b\n        import b.c\n"
        "    except ImportError:\n        pass\n    import d\n"
    )
    assert lazy_imports_without_reason(source) == [(8, "d")]


def test_every_lazy_import_says_why():
    files = sorted(p for d in ("model", "dataset", "trainer", "scripts") for p in (ROOT / d).rglob("*.py"))
    found = {
        (str(p.relative_to(ROOT)), module)
        for p in files + [ROOT / "main.py"]
        for _, module in lazy_imports_without_reason(p.read_text(encoding="utf-8"))
    }
    assert found - LAZY_WITHOUT_REASON == set(), "a new lazy import without a reason comment"
    assert LAZY_WITHOUT_REASON - found == set(), "fixed: remove these from LAZY_WITHOUT_REASON"
