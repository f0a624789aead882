"""
bench/gpu_checks.sh, the one prepared GPU run, passes its CPU smoke run: every part starts, prints its RESULT lines
and exits 0, so the day a GPU is lent its minutes go to measuring, not to fixing the script.

    python -m pytest tests/test_gpu_checks.py
"""

import os
import re
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
    parts = ("attention", "trainer_fp16", "trainer_bf16", "trainer_small", "vs_llama", "trainer_base", "sync_audit")
    for part in parts:
        assert f"-- {part}: exit 0" in summary, summary[-3000:]
    assert "plan T4" in summary and "sm75 float16" in summary  # the dtype policy's answer for a T4
    assert "RESULT pretrain tiny fp16" in summary and "RESULT packed sft / pretrain" in summary
    assert "RESULT pretrain tiny auto B=2 T=64 compiled:" in summary  # compile=true through the real Trainer
    assert "RESULT pretrain tiny llama auto" in summary and "RESULT ours / llama tokens/s (tiny auto)" in summary
    assert "(interim, 2 steps)" in summary  # what a part cut off by its time limit still reports
    assert "RESULT sync audit: skipped: no cuda" in summary
    # The header's total is the sum of the parts' limits.
    script = (ROOT / "bench" / "gpu_checks.sh").read_text()
    limits = [int(n) for n in re.findall(r"^part \w+ (\d+) ", script, re.M)]
    assert len(limits) == len(parts) and f"{sum(limits)} s in all" in script


@pytest.mark.slow
def test_sync_audit_counts_each_stage_s_syncs_and_where_they_come_from(tmp_path, monkeypatch):
    """bench/sync_audit.py on a CPU, where nothing syncs: a faked debug mode makes every backward warn as a sync
    would, so each audited step (after warm-up) of each stage must count one, placed at its line."""
    import warnings

    import torch

    from bench import sync_audit

    mode, backward = ["default"], torch.Tensor.backward

    def warning_backward(self, *args, **kwargs):
        if mode[0] == "warn":
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)  # what the debug mode says
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: mode.__setitem__(0, m))
    monkeypatch.setattr(torch.Tensor, "backward", warning_backward)
    args = sync_audit.parse_args(["--smoke", "--device", "cpu"])
    results = sync_audit.audit(args, str(tmp_path))
    here = f"tests/test_gpu_checks.py:{warning_backward.__code__.co_firstlineno + 2}"
    assert [r["run"] for r in results] == [
        f"sync audit {s}" for s in ("pretrain adamw", "pretrain muon", "packed sft", "dpo")
    ]
    for result in results:
        assert result["syncs_per_step"] == [1] * (args.steps - args.warmup) and result["places"] == {here: 2}, result
    assert mode == ["default"]
