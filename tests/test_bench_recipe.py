"""
bench/bench_recipe.py: the token ratio it reports (interpolation, per-seed baseline, recipes that never get there),
and a --quick run on the shared data pack through the real pretraining stage (skipped without the pack).

    python -m pytest tests/test_bench_recipe.py            # -m "not slow" leaves out the --quick run
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.bench_recipe import BASELINE, PACK, RECIPES, parse_set, summarise, tokens_to_reach
from trainer.config import load_config
from trainer.pretrain import Config

ROOT = Path(__file__).resolve().parents[1]


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = [(100, 4.0), (200, 3.0), (300, 2.5)]
    assert tokens_to_reach(curve, 3.5) == pytest.approx(150)  # halfway from 4.0 to 3.0
    assert tokens_to_reach(curve, 2.75) == pytest.approx(250)
    assert tokens_to_reach(curve, 3.0) == 200
    assert tokens_to_reach(curve, 4.5) == 100  # reached by the first evaluation
    assert tokens_to_reach(curve, 2.0) is None


def test_summary_compares_each_seed_with_its_own_baseline():
    runs = [
        {"recipe": BASELINE, "seed": 0, "curve": [(100, 4.0), (200, 3.0)], "seconds": 60},
        {"recipe": BASELINE, "seed": 1, "curve": [(100, 4.2), (200, 3.2)], "seconds": 60},
        {"recipe": "fast", "seed": 0, "curve": [(100, 3.5), (200, 2.5)], "seconds": 30},  # 3.0 at 150
        {"recipe": "fast", "seed": 1, "curve": [(100, 3.2), (200, 2.6)], "seconds": 30},  # 3.2 at 100
        {"recipe": "slow", "seed": 0, "curve": [(100, 4.5), (200, 3.5)], "seconds": 30},
        {"recipe": "slow", "seed": 1, "curve": [(100, 4.5), (200, 3.1)], "seconds": 30},
    ]
    summary = summarise(runs)
    assert summary[BASELINE]["token_ratio"] == [1.0, 1.0]
    assert summary["fast"]["token_ratio"] == pytest.approx([0.75, 0.5])
    assert summary["fast"]["token_ratio_mean"] == pytest.approx(0.625)
    assert summary["fast"]["final_bpb_mean"] == pytest.approx(2.55)
    assert summary["slow"]["token_ratio"][0] is None and summary["slow"]["token_ratio_mean"] is None
    assert summary["fast"]["seconds"] == 60
    against_fast = summarise(runs, baseline_name="fast")  # --baseline: any recipe can be the reference
    assert against_fast["fast"]["token_ratio"] == [1.0, 1.0] and against_fast[BASELINE]["token_ratio"] == [None, None]


def test_extra_recipes_parse_as_train_config_values():
    assert parse_set(["m20:optimizer=muon,muon_lr_ratio=20,lr=2e-3"]) == {
        "m20": {"optimizer": "muon", "muon_lr_ratio": 20, "lr": 2e-3}
    }
    for bad in ("no_colon", "x:optimiser=muon", "x:lr=fast"):
        with pytest.raises(SystemExit):
            parse_set([bad])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(PACK), reason=f"shared data pack not at {PACK}")
def test_quick_run_prints_curves_and_ratios(tmp_path):
    out = tmp_path / "result.json"
    quick = [sys.executable, "bench/bench_recipe.py", "--quick", "--threads", "1", "--work", str(tmp_path / "work")]
    result = subprocess.run(
        [
            sys.executable,
            "bench/bench_recipe.py",
            "--quick",
            "--threads",
            "1",
            "--work",
            str(tmp_path / "work"),
            "--json",
            str(out),
            "--recipes",
            *RECIPES,
            "muon-zero-init",
            "muon-no-embed-decay",
            "--sft_lrs",
            "1e-4",
            "3e-4",
            "--sft_steps",
            "4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert list(data["summary"]) == [*RECIPES, "muon-zero-init", "muon-no-embed-decay"]  # the baseline first
    assert data["recipes"]["ours-muon"] == {"optimizer": "muon"}
    assert data["settings"]["lr"] == load_config(Config, str(ROOT / "config" / "pretrain.yaml")).lr  # the yaml's
    settings = data["settings"]
    steps, batch, seq = settings["max_steps"], settings["global_batch_size"], settings["seq_len"]
    for run in data["runs"]:
        tokens = [t for t, _ in run["curve"]]
        assert len(tokens) == 3 and tokens[-1] == steps * batch * seq and tokens == sorted(tokens)
        assert all(0 < bpb < 10 for _, bpb in run["curve"])
    assert data["summary"][BASELINE]["token_ratio"] == [1.0]
    curves = {r["recipe"]: r["curve"] for r in data["runs"]}
    assert curves["ours-muon"] != curves["ours-adamw"] != curves["minimind"]  # the recipes really differ
    assert curves["muon-zero-init"] != curves["ours-muon"] != curves["muon-no-embed-decay"]  # so do the variants
    model = json.loads((tmp_path / "work" / "quick" / "model_muon-zero-init.json").read_text())
    assert model["residual_init"] == "zero" and model["hidden_size"] == 64
    # the SFT sweep: each lr fine-tuned the kept ours-muon model and was evaluated at the end
    assert [r["lr"] for r in data["sft"]] == [1e-4, 3e-4]
    assert all(r["curve"][-1][0] == 4 and 0 < r["curve"][-1][1] < 20 for r in data["sft"])
    assert data["sft"][0]["curve"] != data["sft"][1]["curve"]
    assert "## SFT lr sweep" in result.stdout and "| 0.0003 |" in result.stdout
    for name in RECIPES:
        assert f"| {name} | 0 |" in result.stdout  # the curve table, one row per recipe and seed
    assert f"tokens to {BASELINE}'s final bpb" in result.stdout
    # a second run reuses finished runs of the same config instead of training them again
    again = subprocess.run(
        [*quick, "--recipes", "ours-muon", "--json", str(tmp_path / "again.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing the finished run") == 2  # the baseline and ours-muon
    rerun = {r["recipe"]: r["curve"] for r in json.loads((tmp_path / "again.json").read_text())["runs"]}
    assert rerun == {"ours-adamw": curves["ours-adamw"], "ours-muon": curves["ours-muon"]}
