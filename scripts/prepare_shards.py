"""
Tokenise text sources into shuffled token shards for pretraining (format: dataset/shards.py).

    python scripts/prepare_shards.py --tokenizer out/tokenizer --inputs dataset/zh/clean.jsonl:0.8 en.jsonl:0.2 \
        --out_dir dataset/shards --shard_mb 50 --val_tokens 1000000 --seed 1337

Each input is PATH[:WEIGHT][@LICENSE]: a file, a folder or a glob pattern (each file it names is one source), e.g.
`wiki/:0.5@cc-by-sa-4.0`. A license not given is read from the source's dataset_info.json or Hub dataset card
(README.md front matter); meta.json records each source's license for the model card.
A weight above 1 repeats a source (2.5 = every document twice, half of them a third time); below 1 keeps that
share of its documents; the same inputs and seed give byte-identical shards. Peak RAM is about the tokenizer plus
one bucket (--bucket_mb), whatever the corpus size. A run that was killed or failed can simply be run again in the
same --out_dir. How it works: dataset/shard_writer.py, which does the work; this file is its command line.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run directly: repo root importable

import argparse  # noqa: E402

from dataset.shard_writer import prepare  # noqa: E402
from trainer.errors import is_disk_full  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="directory written by the tokenizer stage")
    ap.add_argument("--inputs", nargs="+", required=True, help="PATH[:WEIGHT][@LICENSE] ... (file, folder or glob)")
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--shard_mb", type=float, default=50)
    ap.add_argument("--val_tokens", type=int, default=1_000_000, help="held-out documents, about this many tokens")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--workers", type=int, default=0, help="tokeniser threads, 0 = all cores")
    ap.add_argument("--dtype", choices=["auto", "uint16", "uint32"], default="auto")
    ap.add_argument("--bucket_mb", type=float, default=64, help="shuffle buckets; peak RAM is about one bucket")
    ap.add_argument("--batch_mb", type=float, default=1, help="text tokenised at once (with at most 512 documents)")
    ap.add_argument(
        "--text_column", default="", help="JSONL field / parquet column with the text; default: text, content"
    )
    args = ap.parse_args()
    try:
        prepare(
            args.tokenizer,
            args.inputs,
            args.out_dir,
            args.shard_mb,
            args.val_tokens,
            args.seed,
            args.workers,
            args.dtype,
            args.bucket_mb,
            batch_mb=args.batch_mb,
            text_column=args.text_column,
        )
    except (ValueError, FileNotFoundError, ImportError) as e:  # ImportError: an optional reader (pyarrow)
        sys.exit(f"error: {e}")
    except OSError as e:
        if not is_disk_full(e):
            raise
        # A rerun after freeing space writes the shards again (the crash-safety tests: byte-identical).
        sys.exit(f"error: a write under {args.out_dir} failed: {e}; free some space and rerun")


if __name__ == "__main__":
    main()
