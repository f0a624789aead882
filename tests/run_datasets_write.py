"""Write data files with Hugging Face `datasets` itself (run by tests/test_data_formats.py in a fresh process,
datasets on PYTHONPATH), so our readers are tested on what users download and save, not on our own imitation.

    python tests/run_datasets_write.py <jobs.json> <out.json>

jobs.json holds [{"builder": "json" | "csv", "data_files": {split: path}, "parquet": {split: path},
"saved": {split: path}, "saved_dict": path}] (the last three optional). Each job's files are loaded by `datasets`
(load_dataset: the schema it infers, turns as lists of structs, a key a row lacks as null), then written with
Dataset.to_parquet, Dataset.save_to_disk and DatasetDict.save_to_disk. Dataset.from_list would build the same
table in memory, but datasets 5.2 cannot fingerprint an in-memory table under pyarrow 26 (see run_trl_dpo.py).
Writes {"datasets": version, "pyarrow": version, "rows": [{split: rows} per job]} to out.json."""

import json
import sys

import datasets
import pyarrow
from datasets import load_dataset

jobs_path, out = sys.argv[1:3]
with open(jobs_path, encoding="utf-8") as f:
    jobs = json.load(f)
datasets.disable_progress_bars()
rows = []
for job in jobs:
    splits = load_dataset(job["builder"], data_files=job["data_files"])
    for split, path in job.get("parquet", {}).items():
        splits[split].to_parquet(path)
    for split, path in job.get("saved", {}).items():
        splits[split].save_to_disk(path)
    if job.get("saved_dict"):
        splits.save_to_disk(job["saved_dict"])
    rows.append({split: ds.num_rows for split, ds in splits.items()})
with open(out, "w", encoding="utf-8") as f:
    json.dump({"datasets": datasets.__version__, "pyarrow": pyarrow.__version__, "rows": rows}, f)
