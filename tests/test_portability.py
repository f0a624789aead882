"""Windows and macOS: the library (what train, chat, serve and export run; not tests/, which may use POSIX tools)
calls nothing POSIX-only, and every text file names its encoding (ruff's PLW1514 is on, so a Chinese Windows
never reads a file as GBK).

    python -m pytest tests/test_portability.py
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dataset.corpus import worker_start_method

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ["main.py", "model", "trainer", "dataset", "scripts"]
POSIX_ONLY = {
    r"\bimport fcntl\b|\bfrom fcntl\b": "fcntl (file locks: Unix only)",
    r"\bos\.fork\b|get_context\(\s*[\"']fork": "fork (Windows has none; macOS's is unsafe with threads)",
    r"\bSIGKILL\b|\bSIGHUP\b|\bSIGUSR[12]\b|\bos\.killpg\b|\bos\.setsid\b|\bpreexec_fn\b": "a POSIX-only signal call",
    r"/dev/shm|/dev/null|/proc/": "a Linux-only path",
    r"shell\s*=\s*True|\bos\.system\(|\bos\.popen\(": "a shell command line (pipelines differ on Windows)",
}
# Reads that are portable because they are guarded: (file, the code's text) -> why.
GUARDED = {
    (
        "model/runtime.py",
        'with open("/proc/cpuinfo", encoding="utf-8") as f:',
    ): "OSError off Linux means no flags: fp32",
    (
        "trainer/run_lock.py",
        'with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:',
    ): "a zombie check on Linux; OSError elsewhere means the pid is taken as alive, as os.kill said",
}


def library_files() -> list[Path]:
    files = []
    for name in LIBRARY:
        path = ROOT / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def code_lines(path: Path):
    """(number, line) of a file's code with comments and docstring text left out: prose may name SIGKILL."""
    in_doc = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        quotes = line.count('"""')
        if in_doc or (quotes and line.strip().startswith('"""')):
            in_doc = in_doc ^ (quotes % 2 == 1)
            continue
        yield number, line.split(" #", 1)[0]


def test_the_library_calls_nothing_posix_only():
    assert len(library_files()) > 30  # the scan found the library
    found = [
        f"{path.relative_to(ROOT)}:{number}: {why}"
        for path in library_files()
        for number, line in code_lines(path)
        for pattern, why in POSIX_ONLY.items()
        if re.search(pattern, line) and (str(path.relative_to(ROOT).as_posix()), line.strip()) not in GUARDED
    ]
    assert found == []


def test_the_scan_catches_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        '"""Killed with SIGKILL in a docstring is fine."""\nimport fcntl\nos.kill(pid, signal.SIGKILL)  # no\n',
        encoding="utf-8",
    )
    hits = [why for _, line in code_lines(bad) for pattern, why in POSIX_ONLY.items() if re.search(pattern, line)]
    assert len(hits) == 2


def test_corpus_workers_fork_only_on_linux():
    assert worker_start_method("linux") == "fork"
    assert worker_start_method("win32") == "spawn" and worker_start_method("darwin") == "spawn"


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed")
def test_ruff_flags_a_text_file_without_encoding(tmp_path):
    """pyproject.toml turns PLW1514 on (a preview rule in ruff 0.17): the project's own settings catch it."""
    sample = tmp_path / "sample.py"
    sample.write_text("def read(p):\n    with open(p) as f:\n        return f.read()\n", encoding="utf-8")
    proc = subprocess.run(
        [
            "ruff",
            "check",
            "--config",
            str(ROOT / "pyproject.toml"),
            "--no-cache",
            "--output-format",
            "concise",
            str(sample),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 1 and "unspecified-encoding" in proc.stdout, proc.stdout + proc.stderr
