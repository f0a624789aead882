"""
The newcomer's walk (issue 23): what runs from `python main.py --stage pretrain` to the first optimizer.step(),
measured by running it. A tiny pretraining run (tiny tokenizer and shards in a temp dir, model_config=tiny, one
step on the CPU) is profiled, in every thread, and cut at the first call into torch.optim's step. Reported:

- files: the project files (not tests/ or bench/) whose functions or class bodies ran, outside model/ and in it
- code lines: the non-blank, non-comment, non-docstring lines of those definitions (a function counts whole, its
  nested functions included; a class body counts without its methods, which count when they run); module-level code
  (imports, constants) is not counted
- hops: the calls that cross from one project file outside model/ into another, counted once per caller -> callee
  file pair, and the order in which the walk first enters each file

    python bench/walk_to_step.py [--defs]   # from the repository root; --defs also lists each definition
"""

import ast
import io
import os
import sys
import tempfile
import threading
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python bench/walk_to_step.py` from anywhere

from transformers import AutoTokenizer  # noqa: E402

from tests.helpers import pretrain_corpus, tiny_corpus_lines, write_shards  # noqa: E402
from trainer import pretrain, train_tokenizer  # noqa: E402


def project_file(filename: str) -> str | None:
    """The repo-relative path of a project file, or None (tests, benches, third party)."""
    path = os.path.abspath(filename)
    if not path.startswith(ROOT + os.sep) or not path.endswith(".py"):
        return None
    rel = os.path.relpath(path, ROOT)
    return None if rel.split(os.sep)[0] in ("tests", "bench", ".tf4") else rel


def code_lines(rel: str) -> tuple[set[int], dict[int, ast.AST]]:
    """The file's lines that hold code (not blank, comment or docstring), and its definitions by first line."""
    source = open(os.path.join(ROOT, rel), encoding="utf-8").read()
    tree = ast.parse(source)
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            lines.update(range(tok.start[0], tok.end[0] + 1))
    defs = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                if isinstance(body[0].value.value, str):  # a docstring
                    lines -= set(range(body[0].lineno, body[0].end_lineno + 1))
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            defs[first] = defs[node.lineno] = node
    return lines, defs


def definition_lines(node: ast.AST) -> set[int]:
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    span = set(range(first, node.end_lineno + 1))
    if isinstance(node, ast.ClassDef):  # the class's own statements; its methods count when they run
        for child in node.body:
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                span -= set(range(min([child.lineno] + [d.lineno for d in child.decorator_list]), child.end_lineno + 1))
    return span


def setup(work: str) -> list[str]:
    """A tiny tokenizer and shards; the main.py arguments of a one-step CPU pretraining run on them."""
    import json

    corpus = os.path.join(work, "corpus.jsonl")
    with open(corpus, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in tiny_corpus_lines())
    tok_dir = os.path.join(work, "tok")
    settings = dict(data_path=corpus, vocab_size=512, out_dir=tok_dir, min_frequency=1, heldout_every=10, seed=0)
    train_tokenizer.run(train_tokenizer.Config(**settings))
    shards = write_shards(AutoTokenizer.from_pretrained(tok_dir), pretrain_corpus(), os.path.join(work, "shards"))
    return [
        "main.py",
        "--stage",
        "pretrain",
        f"tokenizer_dir={tok_dir}",
        f"data_dir={shards}",
        "model_config=tiny",
        f"out_dir={os.path.join(work, 'out')}",
        "max_steps=1",
        "batch_size=2",
        "seq_len=32",
        "device=cpu",
        "sample_tokens=0",
        "save_every=0",
    ]


def main():
    import runpy

    with tempfile.TemporaryDirectory() as work:
        show_defs = "--defs" in sys.argv[1:]
        argv = setup(work)
        events = []  # (caller file, callee file, code) of every call into a project file, in order
        lock = threading.Lock()
        stepped = []

        def profile(frame, event, arg):
            if event != "call" or stepped:
                return
            code = frame.f_code
            if code.co_name == "step" and f"{os.sep}torch{os.sep}optim{os.sep}" in code.co_filename:
                stepped.append(True)
                return
            callee = project_file(code.co_filename)
            if callee is None or code.co_name == "<module>":
                return
            caller = frame.f_back
            while caller is not None and project_file(caller.f_code.co_filename) is None:
                caller = caller.f_back  # through torch or the standard library, back to our code
            with lock:
                events.append((project_file(caller.f_code.co_filename) if caller else None, callee, code))

        sys.argv = argv
        threading.setprofile(profile)
        sys.setprofile(profile)
        try:
            runpy.run_path(os.path.join(ROOT, "main.py"), run_name="__main__")
        except SystemExit:
            pass
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
    assert stepped, "the run never reached optimizer.step()"
    # Class bodies run at import, used or not: a class counts when one of its methods ran, or when it is one of the
    # stage Config's classes (the settings a newcomer reads).
    import inspect

    settings = {
        (project_file(inspect.getsourcefile(k)), inspect.getsourcelines(k)[1]) for k in pretrain.Config.__mro__[:-1]
    }
    ran = settings | {(project_file(c.co_filename), c.co_firstlineno) for _, _, c in events}
    counted = {}  # file -> set of code lines
    parsed = {}
    order, edges = [], set()
    for caller, callee, code in events:
        if callee not in parsed:
            parsed[callee] = code_lines(callee)
        node = parsed[callee][1].get(code.co_firstlineno)
        if node is None or isinstance(node, ast.ClassDef):
            continue
        if callee not in order:
            order.append(callee)
        inside = [f for f in (caller, callee) if f and not f.startswith("model" + os.sep)]
        if len(inside) == 2 and caller != callee:
            edges.add((caller, callee))
    for f, first in ran:
        if f not in parsed:
            parsed[f] = code_lines(f)
        lines, defs = parsed[f]
        node = defs.get(first)
        if node is None or (isinstance(node, ast.ClassDef) and (f, first) not in settings):
            continue
        counted.setdefault(f, set()).update(definition_lines(node) & lines)
        if show_defs:
            print(f"  {len(definition_lines(node) & lines):4d}  {f}:{node.name}")
        for klass in (n for n in defs.values() if isinstance(n, ast.ClassDef)):
            if klass.lineno < node.lineno <= klass.end_lineno and not isinstance(node, ast.ClassDef):
                counted[f].update(definition_lines(klass) & lines)  # the class of a method that ran
    outside = {f: n for f, n in counted.items() if not f.startswith("model" + os.sep)}
    model = {f: n for f, n in counted.items() if f.startswith("model" + os.sep)}
    for title, table in (("outside model/", outside), ("model/", model)):
        print(f"{title}: {len(table)} files, {sum(len(n) for n in table.values())} code lines")
        for f in sorted(table, key=lambda f: -len(table[f])):
            print(f"  {len(table[f]):5d}  {f}")
    print(f"hops (caller -> callee file pairs outside model/): {len(edges)}")
    for a, b in sorted(edges):
        print(f"  {a} -> {b}")
    print("first entered: " + " > ".join(f for f in order if not f.startswith("model" + os.sep)))


if __name__ == "__main__":
    main()
