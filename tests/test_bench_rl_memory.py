"""
bench/bench_rl_memory.py: its CPU tensor-memory tracker on known tensors, and the PPO/GRPO memory options on the tiny
preset (a separate critic costs more than the shared value head; an offloaded reference costs less).

    python -m pytest tests/test_bench_rl_memory.py
"""

import json

import pytest
import torch

from bench.bench_rl_memory import main
from bench.tensor_memory import TensorMemoryTracker


def test_tracker_counts_live_storages_once():
    x = torch.randn(64, 64)
    size = x.untyped_storage().nbytes()
    tracker = TensorMemoryTracker()
    tracker.count_existing([x, x.view(-1)])  # two views of one storage: counted once
    with tracker:
        y = x @ x
        z = y + 1
        z.view(-1).add_(1)  # a view and an in-place op make no new storage
        assert tracker.current == tracker.peak == 3 * size
        del y  # freed: leaves the current count, not the peak
        assert tracker.current == 2 * size
        w = z * 2
        assert tracker.current == 3 * size and tracker.peak == 3 * size
        tracker.reset_peak()
        del w, z
        assert tracker.current == size and tracker.peak == 3 * size


def test_tracker_leaves_out_an_offloaded_forward():
    layer = torch.nn.Linear(64, 256)
    tracker = TensorMemoryTracker()
    tracker.leave_out(layer)  # its weights are not passed to count_existing either
    x = torch.randn(8, 64)
    with tracker:
        out = layer(x)  # (8, 256) made inside the forward: not counted
        first = out[:, :16]  # a view of it later: still not counted
        total = first.sum(-1)  # a new tensor made from it outside the forward: counted
        assert tracker.current == total.untyped_storage().nbytes() == 8 * 4


@pytest.mark.slow
def test_options_on_the_tiny_preset(tmp_path, capsys):
    path = tmp_path / "rl_memory.json"
    rows = main(
        [
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--batch",
            "4",
            "--group",
            "2",
            "--prompt_tokens",
            "24",
            "--max_new_tokens",
            "16",
            "--options",
            "ppo-shared",
            "ppo-separate",
            "ppo-shared-refcpu",
            "grpo",
            "grpo-refcpu",
            "ppo-shared-ckpt",
            "--json",
            str(path),
        ]
    )
    by = {r["option"]: r for r in rows}
    shared, separate, refcpu = by["ppo-shared"], by["ppo-separate"], by["ppo-shared-refcpu"]
    assert separate["peak_mib"] > shared["peak_mib"]
    assert refcpu["peak_mib"] < shared["peak_mib"]
    assert by["grpo-refcpu"]["peak_mib"] < by["grpo"]["peak_mib"]
    # Activations recomputed in backward: the update holds less (the stage runs its policy in train mode).
    assert by["ppo-shared-ckpt"]["peak_mib"] < shared["peak_mib"]
    # A separate critic brings a second backbone's gradients and AdamW state; the reference is the policy's size.
    assert separate["adam_mib"] > 1.9 * shared["adam_mib"]
    assert shared["weights_mib"] - refcpu["weights_mib"] == pytest.approx(shared["grads_mib"], rel=0.01)
    assert all(r["peak_mib"] > r["persistent_mib"] for r in rows)
    assert json.loads(path.read_text())["rows"] == rows
    assert "| ppo-separate |" in capsys.readouterr().out
