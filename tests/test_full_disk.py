"""
A full disk (issue 25.7 and 25.8): tokenizer training, the Llama and GGUF exports and prepare_shards, each writing
onto a tiny tmpfs, end with one `error:` line naming where, no traceback, and no cut output that looks whole.

Mounting a tmpfs needs root (as in the project's containers); elsewhere these tests skip.

    python -m pytest tests/test_full_disk.py
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_corpus_lines
from tests.helpers_inference import build_model, build_tokenizer, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def small_disk(tmp_path):
    """small_disk(kib) -> a folder on a tmpfs of that size, unmounted afterwards."""
    mounts = []

    def mount(kib: int) -> Path:
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def run(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_one_clean_error(done: subprocess.CompletedProcess, where: Path):
    assert done.returncode != 0, done.stdout[-1000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "error: " in done.stderr and str(where) in done.stderr and "No space left on device" in done.stderr


@pytest.mark.slow  # main.py in a fresh interpreter
def test_tokenizer_training_onto_a_full_disk(tmp_path, small_disk):
    """Before: the Rust writer's bare Exception as a traceback, and a cut 8 KiB tokenizer.json left for the next
    stage to read."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in tiny_corpus_lines()))
    out = small_disk(16) / "tok"
    done = run("main.py", "--stage", "tokenizer", f"data_path={corpus}", f"out_dir={out}", "vocab_size=512")
    assert_one_clean_error(done, out)
    assert not (out / "tokenizer.json").exists()  # nothing cut left behind


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    tok = build_tokenizer()
    return Path(save_checkpoint(build_model(tok), tok, str(tmp_path / "final")))


@pytest.mark.slow  # a fresh interpreter
def test_llama_export_onto_a_full_disk(model_dir, small_disk):
    out = small_disk(64) / "llama"
    done = run("scripts/export_llama.py", "--model", str(model_dir), "--out", str(out))
    assert_one_clean_error(done, out)
    assert not out.exists()  # the partial folder is removed: a cut export must not look like one


@pytest.mark.slow  # a fresh interpreter
def test_gguf_export_onto_a_full_disk(model_dir, small_disk):
    pytest.importorskip("gguf")
    out = small_disk(64) / "model.gguf"
    done = run("scripts/export_gguf.py", "--model", str(model_dir), "--out", str(out))
    assert_one_clean_error(done, out)
    assert not out.exists()


@pytest.mark.slow  # a fresh interpreter
def test_prepare_shards_onto_a_full_disk(tiny_tokenizer_dir, tmp_path, small_disk):
    """Before: an OSError traceback (the rerun worked); now one error line naming --out_dir."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t * 20}, ensure_ascii=False) + "\n" for t in tiny_corpus_lines()))
    out = small_disk(8) / "shards"
    args = ["--tokenizer", tiny_tokenizer_dir, "--inputs", str(corpus), "--out_dir", str(out), "--val_tokens", "100"]
    done = run("scripts/prepare_shards.py", *args)
    assert_one_clean_error(done, out)
    roomy = tmp_path / "shards"
    assert run("scripts/prepare_shards.py", *args[:-3], str(roomy), *args[-2:]).returncode == 0  # space: it works
