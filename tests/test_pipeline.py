"""--stage all: every stage runs in order on the generated demo data, writes its artifacts, and a re-run skips
finished stages. Tiny settings (a few steps per stage): this checks the wiring, not the learning (the full demo,
config/demo.yaml, shows that)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "n_docs": 300,
    "device": "cpu",
    "tokenizer": {"vocab_size": 600},
    "shards": {"shard_mb": 0.02, "val_tokens": 2000},
    "pretrain": {
        "model_config": "tiny",
        "vocab_size": 600,
        "max_steps": 6,
        "batch_size": 4,
        "seq_len": 64,
        "warmup_steps": 1,
        "log_every": 3,
        "eval_every": 0,
        "eval_batches": 1,
        "sample_tokens": 0,
    },
    "sft": {"max_steps": 4, "batch_size": 4, "seq_len": 48, "warmup_steps": 1, "log_every": 2, "eval_batches": 1},
    "lora": {"max_steps": 3, "batch_size": 4, "seq_len": 48, "warmup_steps": 1, "log_every": 3, "eval_batches": 1},
    "dpo": {"max_steps": 2, "batch_size": 2, "seq_len": 48, "warmup_steps": 1, "log_every": 1, "eval_batches": 1},
}


@pytest.mark.slow
def test_demo_pipeline_runs_every_stage_and_skips_when_done(tmp_path):
    import yaml

    cfg = tmp_path / "demo.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "out_dir": str(tmp_path / "demo")}, allow_unicode=True))
    first = subprocess.run(
        [sys.executable, "main.py", "--stage", "all", "--config", str(cfg)], cwd=ROOT, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = tmp_path / "demo"
    for marker in (
        "corpus/clean.jsonl",
        "tokenizer/tokenizer.json",
        "shards/meta.json",
        "pretrain/final/config.json",
        "sft/final/config.json",
        "lora/final/adapter_config.json",
        "dpo/final/config.json",
        "eval/eval.json",
        "summary.json",
    ):
        assert (out / marker).exists(), marker
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["held_out_accuracy"]) == {"pretrain", "sft", "dpo", "lora"}
    assert set(summary["chat_turns"]) == {"pretrain", "sft", "dpo", "lora"}  # the LoRA model is checked chatting too
    # ... and whether its sampled turns end at <|im_end|>, with that token's loss (full demo: LoRA 20/20, was 4/20)
    assert set(summary["ended_turns"]) == set(summary["end_of_turn_loss"]) == set(summary["chat_turns"])
    assert all(0 < loss < 20 for loss in summary["end_of_turn_loss"].values())
    assert "ended at <|im_end|>" in first.stdout
    assert "held-out skill" in first.stdout and "chat_terminal.py" in first.stdout
    # the cleaning stage simplified the traditional characters and resolved the conversion markup
    clean = (out / "corpus" / "clean.jsonl").read_text(encoding="utf-8")
    assert "這" not in clean and "-{" not in clean and "软件" in clean
    second = subprocess.run(
        [sys.executable, "main.py", "--stage", "all", "--config", str(cfg), "stages=corpus,tokenizer,shards,pretrain"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert second.returncode == 0 and second.stdout.count("skipped; force=true redoes it") == 4


@pytest.mark.slow
def test_the_demo_config_trains_its_tokenizer_without_a_warning(tmp_path):
    """Issue 27.6: config/demo.yaml asked for 1024 entries where its corpus yields ~730, a WARNING in every demo."""
    out = subprocess.run(
        [sys.executable, "main.py", "--stage", "all", "--config", "config/demo.yaml"]
        + [f"out_dir={tmp_path / 'demo'}", "stages=data,corpus,tokenizer"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "WARNING" not in out.stdout + out.stderr and "tokenizer: vocab 704" in out.stdout
