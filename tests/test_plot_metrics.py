"""scripts/plot_metrics.py: one colour per run on both axes, and a loss unit that fits the stage (issue 27.6)."""

import json

import pytest

pytest.importorskip("matplotlib")

from scripts.plot_metrics import figure  # noqa: E402  (after the optional-package skip)


def _metrics(path, extra: dict, evals: bool):
    path.parent.mkdir(parents=True)
    rows = [{"step": s, "split": "train", "loss": 1.0 / s, "lr": 1e-3, **extra} for s in (1, 2, 3)]
    rows += [{"step": 3, "split": "eval", "loss": 0.5}] if evals else []
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.slow  # matplotlib's first import and three figures
def test_each_run_has_one_colour_on_both_axes_and_dpo_is_not_nats_per_token(tmp_path):
    sft = _metrics(tmp_path / "sft" / "metrics.jsonl", {}, evals=True)
    dpo = _metrics(tmp_path / "dpo" / "metrics.jsonl", {"margin": 0.1, "reward_acc": 0.9}, evals=True)
    fig = figure([sft, dpo])
    ax_loss, ax_lr = fig.axes
    colours = {line.get_label(): line.get_color() for ax in (ax_loss, ax_lr) for line in ax.get_lines()}
    assert colours["sft train"] == colours["sft val"] == colours["sft"]
    assert colours["dpo train"] == colours["dpo val"] == colours["dpo"] != colours["sft"]
    assert "nats/token" not in ax_loss.get_ylabel()
    assert figure([dpo]).axes[0].get_ylabel() == "loss (per pair or rollout)"
    assert figure([sft]).axes[0].get_ylabel() == "loss (nats/token)"
