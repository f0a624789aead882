"""
bench/bench_serve.py stays runnable: a smoke run on the tiny preset (2 clients, 4 tokens) in a subprocess.

    python -m pytest tests/test_bench_serve.py   # slow: deselected with -m "not slow"
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers_inference import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_serve_prints_its_rows(tmp_path):
    build_tokenizer().save_pretrained(tmp_path / "tokenizer")  # the bench needs a tokenizer folder, not a model
    result = subprocess.run(
        [
            sys.executable,
            "bench/bench_serve.py",
            "--model_config",
            "config/model/tiny.json",
            "--tokenizer",
            str(tmp_path / "tokenizer"),
            "--clients",
            "1,2",
            "--max_tokens",
            "4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(
        r"^\| (serial|batched) \| (\d+) \| (\d+) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| .+ \|$", result.stdout, re.M
    )
    # one row per mode and client count; one client sends 2 requests, each of 2 clients 1
    assert rows == [("serial", "1", "2"), ("serial", "2", "2"), ("batched", "1", "2"), ("batched", "2", "2")]
    assert "batched, 2 clients vs 1:" in result.stdout
