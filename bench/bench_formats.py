"""
Reading the same records from JSONL and from Hugging Face `datasets` files (parquet, a save_to_disk folder):
time per stage reader and, for the streaming text reader, the peak of Arrow's own allocations.
Prints a Markdown table (see bench/RESULTS.md).

    python bench/bench_formats.py            # the shared pack's gov. reports (pretraining text) and ShareGPT SFT file

The tables are written from the pack's files into a temporary folder at run time (nothing is copied into the repo),
with pyarrow, the way `datasets` writes them: parquet with the writer's default row groups, save_to_disk as Arrow
IPC streams of 1000-row batches.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run directly: repo root importable

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.ipc  # noqa: E402, F401
import pyarrow.parquet  # noqa: E402, F401

from dataset.chat_data import load_conversations  # noqa: E402
from dataset.text_sources import iter_documents  # noqa: E402

PACK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
SOURCES = (
    ("pretraining text", "pretrain/zh/gov_work_reports_1954_2025.jsonl", "text"),
    ("SFT (ShareGPT)", "sft/medicalgpt_sharegpt_zh_1K_format.jsonl", "sft"),
)


def write_tables(jsonl: str, out: str) -> dict:
    with open(jsonl, encoding="utf-8") as f:
        table = pa.Table.from_pylist([json.loads(line) for line in f if line.strip()])
    paths = {"parquet": os.path.join(out, "t.parquet"), "save_to_disk": os.path.join(out, "saved")}
    pa.parquet.write_table(table, paths["parquet"])
    os.makedirs(paths["save_to_disk"])
    with pa.ipc.new_stream(os.path.join(paths["save_to_disk"], "data-00000-of-00001.arrow"), table.schema) as w:
        w.write_table(table, max_chunksize=1000)
    with open(os.path.join(paths["save_to_disk"], "state.json"), "w", encoding="utf-8") as f:
        json.dump({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}, f)
    return paths


def read(path: str, kind: str) -> tuple[int, float, int]:
    base, peak = pa.total_allocated_bytes(), 0
    t = time.perf_counter()
    if kind == "text":
        n = 0
        for _ in iter_documents(path):
            n += 1
            peak = max(peak, pa.total_allocated_bytes() - base)
    else:
        n = len(load_conversations(path, on_bad="skip", log=lambda *a: None)[0])
        peak = -1  # the conversations are all kept in memory by design; only the text readers stream
    return n, time.perf_counter() - t, peak


def main() -> None:
    print("| data | format | size on disk | records | read time | Arrow peak |")
    print("|---|---|---|---|---|---|")
    for name, rel, kind in SOURCES:
        jsonl = os.path.join(PACK, rel)
        with tempfile.TemporaryDirectory() as tmp:
            paths = {"jsonl": jsonl, **write_tables(jsonl, tmp)}
            for fmt, path in paths.items():
                size = (
                    os.path.getsize(path)
                    if os.path.isfile(path)
                    else sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
                )
                n, secs, peak = min((read(path, kind) for _ in range(3)), key=lambda r: r[1])
                print(
                    f"| {name} | {fmt} | {size / 1e6:.2f} MB | {n:,} | {secs:.2f} s | "
                    f"{f'{peak / 1e6:.1f} MB' if peak >= 0 else '-'} |"
                )


if __name__ == "__main__":
    main()
