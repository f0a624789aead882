"""
Write the eval stage's multiple-choice questions as a local lm-eval-harness task: the same questions, the same
prompts (header, shots, "答案：") and the same scoring as `python main.py --stage eval mc_dir=...`, so a Llama
export (scripts/export_llama.py) scored by lm-eval gets the accuracy our eval stage reports for the checkpoint.

    python scripts/lm_eval_task.py --mc_dir ../shared/data/eval/cmmlu --shots 5 --out out/lm_eval_task
    lm_eval --model hf --model_args pretrained=out/export/llama,dtype=float32 \\
        --include_path out/lm_eval_task --tasks milli_mc

Reads CMMLU or C-Eval as published (trainer/eval.py detects the layout; --mc_split val for C-Eval). Writes, per
subject, the questions and shots as JSONL and two tasks: milli_mc_<subject> (the answer letter, lm-eval's `acc`
= our acc_letter) and milli_mc_option_<subject> (the option text per UTF-8 byte, lm-eval's `acc_bytes` = our
acc_option), plus the groups milli_mc and milli_mc_option (accuracy over all questions, as eval.json's overall).
The data files are named by absolute path, so the task folder works from any directory, with no download.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: repo root on path

import yaml  # noqa: E402

from trainer.eval import LETTERS, format_question, mc_header, mc_subject_files, read_mc_questions  # noqa: E402


def _write_jsonl(path: str, questions: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for q in questions:
            # query is the prompt exactly as the eval stage builds it; lm-eval appends the choice with no delimiter.
            record = {"query": format_question(q, False), "options": q["options"], "gold": LETTERS.index(q["answer"])}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _task(name: str, subject: str, data_files: dict, shots: int, by_option: bool) -> dict:
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files},
        "test_split": "test",
        "output_type": "multiple_choice",
        "description": mc_header(subject),  # the header comes once, before the shots, as in trainer/eval.py
        "doc_to_text": "query",
        "doc_to_choice": "options" if by_option else list(LETTERS),
        "doc_to_target": "gold",
        "target_delimiter": "",  # our prompt ends in "答案：" and the choice follows it directly
        "fewshot_delimiter": "\n\n",
        "num_fewshot": shots,
        "metric_list": [
            {"metric": "acc_bytes" if by_option else "acc", "aggregation": "mean", "higher_is_better": True}
        ],
        "metadata": {"version": 1.0},
    }
    if shots:
        # Shots show the answer letter in both scorings, as format_question(shot, answer=True) does.
        task.update(fewshot_split="dev", fewshot_config={"sampler": "first_n", "doc_to_choice": list(LETTERS)})
    return task


def write_lm_eval_task(
    mc_dir: str, out_dir: str, mc_split: str = "test", subjects: str = "", shots: int = 0, max_questions: int = 0
) -> list[str]:
    """Write the task folder; returns the subject names. Subjects without a dev file are zero-shot (as in eval)."""
    _, files = mc_subject_files(mc_dir, mc_split)
    dev_files = mc_subject_files(mc_dir, "dev", required=False)[1] if shots > 0 else {}
    wanted = [s.strip() for s in subjects.split(",") if s.strip()] or sorted(files)
    missing = sorted(set(wanted) - set(files))
    if missing:
        raise FileNotFoundError(f"no {missing} in {os.path.join(mc_dir, mc_split)}")
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    groups = {"milli_mc": [], "milli_mc_option": []}
    for subject in wanted:
        questions = read_mc_questions(files[subject])
        if max_questions > 0:
            questions = questions[:max_questions]
        data_files = {"test": os.path.join(out_dir, f"{subject}.jsonl")}
        _write_jsonl(data_files["test"], questions)
        k = 0
        if subject in dev_files:
            dev = read_mc_questions(dev_files[subject])[:shots]
            data_files["dev"] = os.path.join(out_dir, f"{subject}_dev.jsonl")
            _write_jsonl(data_files["dev"], dev)
            k = len(dev)
        for group, by_option in (("milli_mc", False), ("milli_mc_option", True)):
            name = f"{group}_{subject}"
            with open(os.path.join(out_dir, f"{name}.yaml"), "w", encoding="utf-8") as f:
                yaml.safe_dump(_task(name, subject, data_files, k, by_option), f, allow_unicode=True, sort_keys=False)
            groups[group].append(name)
    for group, tasks in groups.items():
        metric = "acc_bytes" if group == "milli_mc_option" else "acc"
        spec = {
            "group": group,
            "task": tasks,
            "metadata": {"version": 1.0},
            # weighted by questions, as the eval stage's overall accuracy
            "aggregate_metric_list": [{"metric": metric, "aggregation": "mean", "weight_by_size": True}],
        }
        with open(os.path.join(out_dir, f"{group}.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(spec, f, allow_unicode=True, sort_keys=False)
    return wanted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mc_dir", required=True, help="CMMLU or C-Eval folder, as published")
    parser.add_argument("--mc_split", default="test", help="the split scored: test (CMMLU) or val (C-Eval)")
    parser.add_argument("--subjects", default="", help="comma-separated subjects; default: all")
    parser.add_argument("--shots", type=int, default=0, help="dev questions shown first (as the eval stage's shots)")
    parser.add_argument("--max_questions", type=int, default=0, help="questions per subject (0 = all)")
    parser.add_argument("--out", required=True, help="folder for the task (pass it to lm_eval --include_path)")
    args = parser.parse_args()
    try:
        subjects = write_lm_eval_task(
            args.mc_dir, args.out, args.mc_split, args.subjects, args.shots, args.max_questions
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {len(subjects)} subjects to {args.out}: lm_eval --include_path {args.out} --tasks milli_mc "
        f"(answer letter) or milli_mc_option (option text)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
