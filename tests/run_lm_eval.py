"""Score a folder with lm-eval-harness (run by tests/test_eval.py in a fresh process, lm-eval on PYTHONPATH).

    python tests/run_lm_eval.py <hf model dir>[,model_arg=value...] <task include_path> <task,task> <out.json>

Writes lm-eval's results and, per task, each question's (doc_id, log-likelihood of every choice)."""

import json
import sys

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

model_dir, include_path, tasks, out = sys.argv[1:5]
result = simple_evaluate(
    model="hf",
    model_args=f"pretrained={model_dir},dtype=float32",
    tasks=tasks.split(","),
    task_manager=TaskManager(include_path=include_path),
    device="cpu",
    batch_size=8,
    log_samples=True,
)
samples = {
    task: sorted(
        ({"doc_id": s["doc_id"], "lls": [float(r[0]) for r in s["filtered_resps"]]} for s in rows),
        key=lambda s: s["doc_id"],
    )
    for task, rows in result["samples"].items()
}
with open(out, "w", encoding="utf-8") as f:
    json.dump({"results": result["results"], "samples": samples}, f)
