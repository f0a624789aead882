"""
Multiple-choice benchmarks as they are published, layout and header detected: CMMLU (header `,Question,A,B,C,D,Answer`)
and C-Eval (header `id,question,A,B,C,D,answer[,explanation]`), from the CSV packs of their releases or the parquet
files of their Hugging Face repos (ceval/ceval-exam, haonan-li/cmmlu), or saved with `datasets`' save_to_disk. The
eval stage (trainer/eval.py) and scripts/lm_eval_task.py build prompts from these rows and score them.

    layout, sources = mc_subject_files("ceval-exam", "val")   # {subject: [file or save_to_disk folder, ...]}
    questions = read_mc_questions(sources["computer_network"])  # [{"question", "options": [4], "answer": "A"}]

Layouts of one split, read off the names (a subject file is .csv, .parquet or .arrow, or a save_to_disk folder):
    split folders    <split>/<subject>.csv                  CMMLU's release (test/arts.csv)
                     <split>/<subject>_<split>.csv          C-Eval's release (val/computer_network_val.csv)
    subject folders  <subject>/<split>-*.parquet            the Hub repos (accountant/val-00000-of-00001.parquet)
                     <subject>/*-<split>.parquet            the Hub's first parquet conversion (arts/cmmlu-test.parquet)
                     <subject>/<split>/                     refs/convert/parquet (<split>/0000.parquet), or the split
                                                            folder of a subject's DatasetDict.save_to_disk
Tables are read through dataset/table_files.py (pyarrow); CSVs go through its binary check first, so an archive or
a Git LFS pointer is named for what it is.
"""

import csv
import io
import os

from dataset.table_files import TABLE_EXTS, check_text_input, column_names, is_dataset_dir, is_table, iter_rows

LETTERS = ("A", "B", "C", "D")

# The published headers, by column role: CMMLU `,Question,A,B,C,D,Answer` (an unnamed index column first), C-Eval
# `id,question,A,B,C,D,answer[,explanation]`. Matched without case, so either file reads as it was downloaded.
MC_COLUMNS = ("question", "a", "b", "c", "d", "answer")
MC_EXTS = (".csv", *TABLE_EXTS)
LAYOUTS_LOOKED_FOR = (
    "<split>/<subject>.csv|.parquet|.arrow (CMMLU), <split>/<subject>_<split>.csv|... (C-Eval), "
    "<split>/<subject>/ (save_to_disk), <subject>/<split>-*.parquet or <subject>/*-<split>.parquet (Hugging Face "
    "Hub), <subject>/<split>/ (refs/convert/parquet or a DatasetDict saved with save_to_disk)"
)


# -----------------------------------------------------------------------------
# where the subjects of a split are


def _stem(name: str) -> str | None:
    """The name without its .csv/.parquet/.arrow extension; None for any other file."""
    ext = next((e for e in MC_EXTS if name.endswith(e)), None)
    return name[: -len(ext)] if ext else None


def _listing(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))  # .cache/ and .gitattributes of a Hub clone


def _split_folder(split_dir: str, split: str) -> tuple[str, dict[str, list[str]]]:
    sources = {}
    for name in _listing(split_dir):
        path = os.path.join(split_dir, name)
        stem = name if is_dataset_dir(path) else _stem(name) if os.path.isfile(path) else None
        if stem is None:
            continue
        if stem in sources:  # e.g. arts.csv beside arts.parquet: reading both would count every question twice
            raise ValueError(f"mc_dir: {sources[stem][0]} and {path} hold the same subject; keep one")
        sources[stem] = [path]
    suffix = f"_{split}"
    if sources and all(s.endswith(suffix) for s in sources):
        return f"{split}/<subject>_{split}", {s[: -len(suffix)]: p for s, p in sources.items()}
    return f"{split}/<subject>", sources


def _subject_split(subject_dir: str, split: str) -> list[str]:
    inner = os.path.join(subject_dir, split)
    if is_dataset_dir(inner):
        return [inner]
    if os.path.isdir(inner):  # refs/convert/parquet: <split>/0000.parquet (beside an index.duckdb)
        files = [os.path.join(inner, n) for n in _listing(inner) if n.endswith(TABLE_EXTS)]
        if files:
            return files
    return [
        os.path.join(subject_dir, n)
        for n in _listing(subject_dir)
        if (stem := _stem(n)) is not None
        and (stem == split or stem.startswith(f"{split}-") or stem.endswith(f"-{split}"))
    ]


def mc_subject_files(mc_dir: str, split: str, required: bool = True) -> tuple[str, dict[str, list[str]]]:
    """(layout, {subject: [its files or save_to_disk folder, in order]}) of one split, in any layout of the module
    docstring; the layout is the path pattern found: "val/<subject>_val" (C-Eval's release), "test/<subject>"
    (CMMLU's) or "<subject>/val" (subject folders, the Hub's). A split with no subject data raises
    FileNotFoundError naming the folder and the layouts looked for, or gives ("", {}) when not `required` (dev,
    where the shots come from, may be absent)."""
    if not os.path.isdir(mc_dir):
        raise FileNotFoundError(f"mc_dir: {mc_dir} is not a folder")
    split_dir = os.path.join(mc_dir, split)
    if os.path.isdir(split_dir) and not is_dataset_dir(split_dir):
        layout, sources = _split_folder(split_dir, split)
    else:
        layout, sources = f"<subject>/{split}", {}
        for subject in _listing(mc_dir):
            subject_dir = os.path.join(mc_dir, subject)
            if os.path.isdir(subject_dir) and (files := _subject_split(subject_dir, split)):
                sources[subject] = files
    if not sources and required:
        raise FileNotFoundError(
            f"mc_dir: no subject files of split '{split}' in {split_dir if os.path.isdir(split_dir) else mc_dir}; "
            f"looked for {LAYOUTS_LOOKED_FOR}"
        )
    return (layout, sources) if sources else ("", {})


# -----------------------------------------------------------------------------
# the questions of one subject


def _csv_rows(path: str) -> tuple[list[str], list[dict]]:
    if path.endswith(TABLE_EXTS):  # named as a table, yet not one: say what it is instead of "bad header"
        check_text_input(path)
        raise ValueError(f"{path}: not a parquet or Arrow file (truncated, or saved under the wrong name?)")
    check_text_input(path)  # an archive, a database or other binary named .csv is refused by what it is
    with open(path, "rb") as f:
        raw = f.read()  # a subject's file is small; whole, a bad byte's line is exact
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line}: not valid UTF-8 ({e.reason}); convert the file to UTF-8 first (e.g. iconv -f GB18030 "
            f"-t UTF-8)"
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    return list(reader.fieldnames or []), list(reader)


def _cell(value) -> str:
    return "" if value is None else str(value).strip()  # parquet stores C-Eval's id as int32, a missing cell as null


def read_mc_questions(paths: list[str]) -> list[dict]:
    """The questions of one subject (its files in order, header detected per file) as {"question", "options": [4],
    "answer": "A".."D"}."""
    rows = []  # (where, record, column of each role)
    for path in paths:
        if is_table(path):
            header, records = column_names(path), [row for _, row in iter_rows(path)]
        else:
            header, records = _csv_rows(path)
        by_role = {name.strip().lower(): name for name in header if name}
        missing = [role for role in MC_COLUMNS if role not in by_role]
        if missing:
            raise ValueError(
                f"{path}: header {header} lacks {missing}; expected CMMLU's "
                f"',Question,A,B,C,D,Answer' or C-Eval's 'id,question,A,B,C,D,answer[,explanation]'"
            )
        col = {role: by_role[role] for role in MC_COLUMNS}
        rows += [(f"{path}: row {i + 1}", record, col) for i, record in enumerate(records)]
    if rows and not any(_cell(record[col["answer"]]) for _, record, col in rows):
        # C-Eval's test split is published without answers (they are scored on its website).
        raise ValueError(
            f"{', '.join(paths)}: no answers in this subject (C-Eval publishes its test split without them); "
            f"score the val split instead: mc_split=val (shots still come from dev)"
        )
    questions = []
    for where, record, col in rows:
        answer = _cell(record[col["answer"]]).upper()
        if answer not in LETTERS:
            raise ValueError(f"{where} has answer '{answer}', expected one of A-D")
        questions.append(
            {
                "question": _cell(record[col["question"]]),
                "options": [_cell(record[col[k.lower()]]) for k in LETTERS],
                "answer": answer,
            }
        )
    return questions
