"""
Milli-Chat's one entry point: every stage is started from here.

    python main.py --help
    python main.py --stage pretrain --config config/pretrain.yaml max_steps=200 lr=3e-4
    python main.py --stage pretrain --config config/pretrain.yaml --max_steps 200 --lr 3e-4   # the same
    torchrun --nproc_per_node=2 main.py --stage pretrain --config config/pretrain.yaml

Each stage is a module in trainer/ exposing `Config` (a dataclass) and `run(cfg)`, listed in trainer/stages.py.
Only the chosen stage's module is imported, so `--stage sft` never imports RL code, and `--help` (or a mistyped
stage) answers before torch is imported (bench/bench_startup.py measures it).
"""

import argparse
import importlib
import os
import sys

from dataset.records import UnusableFile
from trainer.errors import ConfigError, is_disk_full
from trainer.stages import STAGES


def main(argv=None) -> int:
    epilog = "stages:\n" + "\n".join(f"  {name:<10} {desc}" for name, (_, desc) in STAGES.items())
    parser = argparse.ArgumentParser(
        description="Milli-Chat: train a small Chinese chat model from scratch.",
        usage="%(prog)s --stage STAGE [--config YAML] [key=value | --key value ...]",
        epilog=epilog + "\n\noverrides: key=value (or --key value) after the flags set any field of the stage's "
        "config, applied after the YAML file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )  # --s must not mean --stage
    parser.add_argument("--stage", required=True, help="which stage to run (see below)")
    parser.add_argument("--config", default=None, help="YAML file with the stage's settings (default: none)")
    # Everything else is an override, kept in order so `--key value` pairs stay together (trainer/config.py).
    args, overrides = parser.parse_known_args(argv)

    if args.stage not in STAGES:
        return usage_error(f"unknown stage '{args.stage}'; choose one of: {', '.join(STAGES)}")
    if args.config and not os.path.isfile(args.config):
        return usage_error(f"config file '{args.config}' does not exist")

    from trainer.config import load_config  # imports torch (seconds): only once a stage is to run

    module = importlib.import_module(STAGES[args.stage][0])
    try:
        cfg = load_config(module.Config, args.config, overrides)
    except ConfigError as e:
        return usage_error(e)
    try:
        module.run(cfg)  # checks the paths the stage needs before it builds anything
    except (ConfigError, UnusableFile) as e:  # a usage mistake, or a data file of a layout no reader knows
        return usage_error(e)
    except OSError as e:
        if not is_disk_full(e):
            raise
        return disk_full(e)
    return 0


def usage_error(message) -> int:
    """A usage mistake: the message, no traceback, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def disk_full(e: OSError) -> int:
    """A full disk mid-run (a checkpoint, metrics.jsonl): checkpoints are written whole or not at all
    (trainer/checkpoint.py), so a rerun with resume=auto goes on from the newest complete one. Exit code 1."""
    print(
        f"error: a write failed: {e}; free some space and rerun (it resumes from the newest checkpoint)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
