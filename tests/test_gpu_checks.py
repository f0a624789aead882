"""
bench/gpu_checks.sh, the one prepared GPU run, passes its CPU smoke run: every part starts, prints its RESULT lines
and exits 0, so the day a GPU is lent its minutes go to measuring, not to fixing the script.

    python -m pytest tests/test_gpu_checks.py
"""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_checks_smoke_run(tmp_path):
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path)}
    proc = subprocess.run(
        ["bash", "bench/gpu_checks.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    for part in ("attention", "trainer_fp16", "trainer_bf16", "trainer_small", "vs_llama", "trainer_base"):
        assert f"-- {part}: exit 0" in summary, summary[-3000:]
    assert "plan T4" in summary and "sm75 float16" in summary  # the dtype policy's answer for a T4
    assert "RESULT pretrain tiny fp16" in summary and "RESULT packed sft / pretrain" in summary
