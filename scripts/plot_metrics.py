"""
Plot a run's metrics.jsonl: training loss (and validation loss where logged) and the learning rate per step.

    python scripts/plot_metrics.py out/pretrain/metrics.jsonl [--out loss.png]
    python scripts/plot_metrics.py out/pretrain/metrics.jsonl out/sft/metrics.jsonl --out compare.png

matplotlib is an optional extra (`pip install matplotlib`); training never needs it.
"""

import argparse
import json
import os
import sys


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# Keys only a preference or RL stage logs: its loss is per pair or per rollout, not a next-token cross-entropy.
NOT_PER_TOKEN = ("margin", "reward_acc", "reward", "kl")


def loss_unit(records: list[dict]) -> str:
    return "nats/token" if not any(k in r for r in records for k in NOT_PER_TOKEN) else "per pair or rollout"


def figure(paths: list[str]):
    """The loss (top) and learning-rate (bottom) axes, one colour per run on both."""
    try:  # optional: training never needs matplotlib, so only plotting asks for it
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install matplotlib") from None
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    units = set()
    for i, path in enumerate(paths):
        label, color = os.path.basename(os.path.dirname(os.path.abspath(path))), f"C{i}"
        records = read_metrics(path)
        train = [r for r in records if r["split"] == "train"]
        evals = [r for r in records if r["split"] == "eval" and "loss" in r]
        units.add(loss_unit(train))
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color=color, label=f"{label} train")
        if evals:
            steps, losses = [r["step"] for r in evals], [r["loss"] for r in evals]
            ax_loss.plot(steps, losses, "o--", color=color, label=f"{label} val")
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color=color, label=label)
    ax_loss.set_ylabel(f"loss ({units.pop()})" if len(units) == 1 else "loss (per run: see its stage)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    if len(paths) > 1:
        ax_lr.legend()
    fig.tight_layout()
    return fig


def plot(paths: list[str], out: str) -> str:
    figure(paths).savefig(out, dpi=120)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", help="metrics.jsonl file(s) written by a training stage")
    parser.add_argument("--out", default=None, help="PNG path (default: loss.png beside the first file)")
    args = parser.parse_args()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.metrics[0])), "loss.png")
    print(f"wrote {plot(args.metrics, out)}")


if __name__ == "__main__":
    sys.exit(main())
