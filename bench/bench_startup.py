"""Start-up time of the command line (issue 27.6): `main.py --help` answers before torch is imported, a stage pays
for torch + transformers once. Median wall time of a few fresh interpreters each; measured, never asserted.

    python bench/bench_startup.py [--runs 5]
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "python main.py --help": ["main.py", "--help"],
    "python main.py --stage pretrian (a typo)": ["main.py", "--stage", "pretrian"],
    "python main.py --stage tokenizer data_path= (config read, exit 2)": [
        "main.py",
        "--stage",
        "tokenizer",
        "data_path=",
    ],
    "python scripts/chat_terminal.py --help": ["scripts/chat_terminal.py", "--help"],
    "python -c 'import torch, transformers' (the floor of a stage)": ["-c", "import torch, transformers"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"| command | median of {args.runs} (s) | min (s) |\n|---|---|---|")
    for name, argv in COMMANDS.items():
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, check=False)
            times.append(time.perf_counter() - start)
        print(f"| `{name}` | {statistics.median(times):.2f} | {min(times):.2f} |", flush=True)


if __name__ == "__main__":
    main()
