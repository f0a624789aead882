"""
Multiple-choice benchmarks as they are published: CMMLU (`<split>/<subject>.csv`, header `,Question,A,B,C,D,Answer`)
and C-Eval (`<split>/<subject>_<split>.csv`, header `id,question,A,B,C,D,answer[,explanation]`), layout and header
detected. The eval stage (trainer/eval.py) builds prompts from these rows and scores them.
"""

import csv
import os

LETTERS = ("A", "B", "C", "D")

# The published headers, by column role: CMMLU `,Question,A,B,C,D,Answer` (an unnamed index column first), C-Eval
# `id,question,A,B,C,D,answer[,explanation]`. Matched without case, so either file reads as it was downloaded.
MC_COLUMNS = ("question", "a", "b", "c", "d", "answer")


def mc_subject_files(mc_dir: str, split: str) -> tuple[str, dict[str, str]]:
    """(layout, {subject: csv path}) of one split: CMMLU's <split>/<subject>.csv or C-Eval's
    <split>/<subject>_<split>.csv (val/computer_network_val.csv). The layout is read off the file names."""
    split_dir = os.path.join(mc_dir, split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(
            f"mc_dir: {split_dir} is not a folder (expected <mc_dir>/{split}/*.csv, as CMMLU and C-Eval are published)"
        )
    names = sorted(f[:-4] for f in os.listdir(split_dir) if f.endswith(".csv"))
    suffix = f"_{split}"
    if names and all(n.endswith(suffix) for n in names):
        return "ceval", {n[: -len(suffix)]: os.path.join(split_dir, n + ".csv") for n in names}
    return "cmmlu", {n: os.path.join(split_dir, n + ".csv") for n in names}


def read_mc_csv(path: str) -> list[dict]:
    """Rows of a CMMLU or C-Eval CSV (header detected) as {"question", "options": [4], "answer": "A".."D"}."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        by_role = {name.strip().lower(): name for name in reader.fieldnames or [] if name}
        missing = [role for role in MC_COLUMNS if role not in by_role]
        if missing:
            raise ValueError(
                f"{path}: header {reader.fieldnames} lacks {missing}; expected CMMLU's "
                f"',Question,A,B,C,D,Answer' or C-Eval's 'id,question,A,B,C,D,answer[,explanation]'"
            )
        col = {role: by_role[role] for role in MC_COLUMNS}
        records = list(reader)
    if records and not any((r[col["answer"]] or "").strip() for r in records):
        # C-Eval's test split is published without answers (they are scored on its website).
        raise ValueError(
            f"{path}: no answers in this file (C-Eval publishes its test split without them); "
            f"score the val split instead: mc_split=val (shots still come from dev/)"
        )
    rows = []
    for i, row in enumerate(records):
        answer = (row[col["answer"]] or "").strip().upper()
        if answer not in LETTERS:
            raise ValueError(f"{path}: row {i + 1} has answer '{answer}', expected one of A-D")
        rows.append(
            {
                "question": row[col["question"]].strip(),
                "options": [row[col[k.lower()]].strip() for k in LETTERS],
                "answer": answer,
            }
        )
    return rows
