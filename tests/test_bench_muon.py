"""
bench/bench_muon.py runs end to end on a tiny preset (one repeat, a few tokens) and prints every line its README
and bench/RESULTS.md numbers come from.

    python -m pytest tests/test_bench_muon.py
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a subprocess importing torch and transformers: over 3 s
def test_bench_muon_smoke():
    args = ["--preset", "tiny", "--batch", "1", "--seq_len", "16", "--repeats", "1", "--torch_muon"]
    result = subprocess.run(
        [sys.executable, "bench/bench_muon.py", *args, "--ns_dtype", "fp32"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "runtime policy: Newton-Schulz in" in out and "Newton-Schulz dtype: fp32 (--ns_dtype)" in out
    assert "(measured on 1 x 16, scaled x2048)" in out
    for line in ("fwd+bwd", "adamw", "muon", "torch.optim.Muon"):
        assert f"\nRESULT {line}" in out, out
    assert "of a recipe step" in out and "x AdamW's step" in out
