"""
Clean raw Chinese text into JSONL, one document per line: {"text": ..., "source": ..., "title": ...}.

    python scripts/zh_simplify.py --input ../shared/data/pretrain/zh --output dataset/zh/clean.jsonl
    python scripts/zh_simplify.py --input en.txt --output en.jsonl --min_cjk_ratio 0   # keep non-Chinese text
    python scripts/zh_simplify.py --input wiki/ --compare_engines                      # zhconv vs zhconv-rs only

Inputs: files or folders of WikiExtractor output (plain and --json), .txt, .jsonl, .json, each optionally .gz,
and Hugging Face parquet/Arrow files or save_to_disk folders
(see dataset/text_sources.py). The rules, the filters, deduplication and why memory stays flat are described in
dataset/corpus.py, which does the work; this file is its command line.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run directly: repo root importable

import argparse  # noqa: E402
import json  # noqa: E402

from dataset.corpus import compare_engines, print_summary, simplify  # noqa: E402
from dataset.text_sources import TEXT_FIELDS, FilterConfig, expand_paths  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="files or folders")
    ap.add_argument("--output", default="", help="output .jsonl")
    ap.add_argument("--min_chars", type=int, default=FilterConfig.min_chars)
    ap.add_argument("--min_cjk_ratio", type=float, default=FilterConfig.min_cjk_ratio)
    ap.add_argument(
        "--max_doc_chars",
        type=int,
        default=FilterConfig.max_doc_chars,
        help="plain text is cut into documents about this long; none is kept over 5x this",
    )
    ap.add_argument(
        "--engine",
        choices=["auto", "zhconv", "zhconv-rs"],
        default="auto",
        help="auto = zhconv-rs if installed, else zhconv",
    )
    ap.add_argument("--workers", type=int, default=0, help="0 = all cores")
    ap.add_argument(
        "--text_column", default="", help="JSONL field / parquet column with the text; default: text, content"
    )
    ap.add_argument("--compare_engines", action="store_true", help="only measure zhconv against zhconv-rs")
    args = ap.parse_args()
    try:
        files = expand_paths(args.input)
        if args.compare_engines:
            print(json.dumps(compare_engines(files), ensure_ascii=False, indent=1))
            return
        if not args.output:
            ap.error("--output is required")
        fc = FilterConfig(args.min_chars, args.min_cjk_ratio, args.max_doc_chars)
        fields = (args.text_column,) if args.text_column else TEXT_FIELDS
        print_summary(simplify(files, args.output, fc, args.engine, args.workers, text_fields=fields), args.output)
    except (ValueError, FileNotFoundError, ImportError) as e:  # ImportError: an optional reader (pyarrow)
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
