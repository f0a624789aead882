"""
Evaluation of one or more checkpoints: perplexity and bits-per-byte, CMMLU/C-Eval-style multiple choice, and a
generation report. Not training, so a plain function runner rather than a Trainer.

    python main.py --stage eval --config config/eval.yaml init_from=out/sft/final
    python main.py --stage eval init_from=out/pretrain/final,out/sft/final,out/dpo/final \\
        ppl_data=dataset/shards mc_dir=../shared/data/eval/cmmlu shots=5 prompts=eval_prompts.jsonl out_dir=out/eval
    python main.py --stage eval init_from=out/sft/final mc_dir=ceval-exam mc_split=val shots=5   # C-Eval

- ppl_data: a shard directory (its val shard is read) or text/JSONL/JSON files, comma-separated. Bits per byte
  (nats/token -> bits/UTF-8 byte) compares models whose tokenizers differ.
- mc_dir: CMMLU or C-Eval as published, layout and header detected (dataset/mc_data.py). CMMLU:
  <mc_split>/<subject>.csv and dev/<subject>.csv, header ,Question,A,B,C,D,Answer (score mc_split=test). C-Eval:
  val/<subject>_val.csv and dev/<subject>_dev.csv, header id,question,A,B,C,D,answer[,explanation] (score
  mc_split=val: its test split has no answers and is refused). The same as parquet/Arrow files or save_to_disk
  folders, and the Hugging Face repos' subject folders (ceval/ceval-exam: <subject>/val-*.parquet, dev-*.parquet).
  Each question is scored by the log-likelihood of the answer letter after "答案：" and/or of the option text
  (normalised by its UTF-8 bytes); `shots` dev questions of the same subject go first as examples.
  scripts/lm_eval_task.py writes the same questions and prompts as an lm-eval-harness task, so a Llama export
  (scripts/export_llama.py) scored there gets the same accuracy.
- prompts: records {"prompt": ..., "reference": ...} (reference optional; question/instruction+input and
  answer/output read too) in JSONL, JSON, parquet/Arrow or save_to_disk data, comma-separated or globs, read by the
  shared record reader (dataset/chat_data.py: a bad record stops the run naming file and line), answered through
  model/engine.py with its sampling settings (chat template applied when chat=true).
Several init_from paths are compared in one table. Writes eval.json, eval.md and generations.md into out_dir.
"""

import json
import math
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from dataset.mc_data import LETTERS, mc_subject_files, read_mc_questions
from dataset.records import BadRecord, read_records
from dataset.shards import load_meta, val_windows
from dataset.text_sources import TEXT_FIELDS, expand_paths, iter_documents
from dataset.tokenizer import token_byte_lengths
from model.engine import Engine, SamplingParams
from trainer.common import print0
from trainer.config import DtypeName, above, at_least, between, config_to_dict, setting, validate


@dataclass
class Config:
    init_from: str = setting("out/sft/final", path="dirs")  # model or LoRA adapter dir; comma-separated dirs are
    #                                                         compared in one table
    names: str = ""  # column names for the checkpoints, comma-separated; "" = derived from the paths
    out_dir: str = "out/eval"  # eval.json, eval.md, generations.md
    device: str = setting("auto", device=True)  # auto | cpu | cuda | cuda:N | mps
    dtype: DtypeName = "auto"  # auto (model/runtime.py: bf16 on sm80+, fp16 on older GPUs, fp32 on CPU)
    quantize: Literal["none", "int8", "int4"] = "none"  # evaluate the weight-only quantized model (model/quantize.py)
    batch_size: int = setting(8, bound=at_least(1))  # sequences per forward
    # --- perplexity / bits per byte ---
    ppl_data: str = ""  # shard dir (val shard) or text/JSONL/JSON/parquet files, comma-separated; "" = skip
    ppl_text_column: str = ""  # JSONL field / table column of ppl_data's text; "" = the first of text, content
    seq_len: int = setting(512, bound=at_least(1))  # window length (capped at the model's context)
    ppl_max_tokens: int = setting(200_000, bound=at_least(0))  # tokens scored at most (0 = all)
    # --- multiple choice (CMMLU or C-Eval as published: layout and header detected) ---
    mc_dir: str = (
        ""  # CMMLU/C-Eval: split folders of subject CSV/parquet files, or the Hub's subject folders; "" = skip
    )
    # the split scored (test, val, ...): test for CMMLU, val for C-Eval (its test has no answers); shots: dev/
    mc_split: str = setting("test", unchecked="a split folder of mc_dir; a missing one is named when mc_dir is read")
    subjects: str = ""  # comma-separated subject names; "" = every subject of the split
    shots: int = setting(0, bound=at_least(0))  # dev questions shown before each question (0 = zero-shot)
    # what is scored (both reports two accuracies)
    mc_score: Literal["letter", "option", "both"] = "letter"
    mc_max_questions: int = setting(0, bound=at_least(0))  # questions per subject (0 = all): quick runs
    # --- generation report ---
    prompts: str = ""  # records {"prompt", "reference"?}: JSONL/JSON/parquet/Arrow files, comma-separated; "" = skip
    chat: bool = True  # wrap prompts in the tokenizer's chat template (off for base models)
    # Sampling: model/engine.py SamplingParams' defaults (greedy, unpenalised: reproducible reports), except the
    # length: a report answers every prompt for every checkpoint, so its cap is half SamplingParams' 256.
    max_new_tokens: int = setting(128, bound=at_least(1))
    temperature: float = setting(SamplingParams.temperature, bound=at_least(0))  # 0 = greedy
    top_k: int = setting(SamplingParams.top_k, bound=at_least(0))
    top_p: float = setting(SamplingParams.top_p, bound=between(0, 1))
    # logits are divided (or multiplied) by it
    repetition_penalty: float = setting(SamplingParams.repetition_penalty, bound=above(0))
    seed: int = setting(0, unchecked="any integer seeds a torch.Generator (seed + batch index)")


# -----------------------------------------------------------------------------
# Loading


def load_engine(path: str, cfg: Config):
    """The checkpoint through the one loading path (model/engine.py), quantized if asked."""
    hf_logging.disable_progress_bar()
    return Engine.from_pretrained(path, device=cfg.device, dtype=cfg.dtype, quantize=cfg.quantize)


# -----------------------------------------------------------------------------
# Perplexity and bits per byte


def ppl_windows(spec: str, tokenizer, seq_len: int, max_tokens: int, text_column: str = "") -> torch.Tensor:
    """(N, seq_len + 1) token windows, non-overlapping, from a shard dir's val shard or from text files."""
    max_windows = max_tokens // seq_len if max_tokens > 0 else 1 << 40
    if os.path.isfile(os.path.join(spec, "meta.json")):
        windows = val_windows(spec, load_meta(spec), seq_len, max_windows)
        if windows is None:
            raise ValueError(f"{spec}: no validation shard with more than {seq_len} tokens")
        return torch.from_numpy(np.asarray(windows, dtype=np.int64))
    ids = []
    for path in expand_paths(spec):
        for doc in iter_documents(path, (text_column,) if text_column else TEXT_FIELDS):
            # special-token strings stay text, as the shard writer tokenises pretraining text
            ids += tokenizer.encode(doc["text"], add_special_tokens=False, split_special_tokens=True) + [
                tokenizer.eos_token_id
            ]
            if max_tokens > 0 and len(ids) > max_tokens + 1:
                break
    n = min((len(ids) - 1) // seq_len, max_windows)
    if n == 0:
        raise ValueError(f"{spec}: fewer than {seq_len + 1} tokens; lower seq_len")
    flat = torch.tensor(ids[: n * seq_len + 1])
    return flat.unfold(0, seq_len + 1, seq_len)  # window i = tokens [i*T, (i+1)*T]


@torch.no_grad()
def perplexity(model, tokenizer, windows: torch.Tensor, batch_size: int, device) -> dict:
    nats, targets = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size].to(device)
        # num_items_in_batch=1 turns the mean into a sum over every target of the batch.
        loss = model(input_ids=batch[:, :-1], shift_labels=batch[:, 1:], num_items_in_batch=1).loss
        nats += float(loss)
        targets += batch[:, 1:].numel()
    byte_lengths = torch.tensor(token_byte_lengths(tokenizer))
    n_bytes = int(byte_lengths[windows[:, 1:].clamp(max=len(byte_lengths) - 1)].sum())
    loss = nats / targets
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50)),
        "bpb": nats / (math.log(2) * max(1, n_bytes)),
        "tokens": targets,
        "bytes": n_bytes,
    }


# -----------------------------------------------------------------------------
# Multiple choice


def mc_header(subject: str) -> str:
    """The instruction that opens every prompt of a subject (before the shots)."""
    return f"以下是关于{subject.replace('_', ' ')}的单项选择题，请直接给出正确答案的选项。\n\n"


def format_question(q: dict, answer: bool) -> str:
    text = q["question"] + "\n" + "".join(f"{k}. {o}\n" for k, o in zip(LETTERS, q["options"])) + "答案："
    return text + q["answer"] + "\n\n" if answer else text


def mc_prompt(subject: str, shots: list[dict], q: dict) -> str:
    """The text a question is scored after: header, answered shots, then the question up to "答案："."""
    return mc_header(subject) + "".join(format_question(s, True) for s in shots) + format_question(q, False)


def continuation_request(tokenizer, context: str, conts: list[str]) -> tuple[list[int], list]:
    """(context ids, [continuation ids]) for scoring each continuation after the same context.

    Each context + continuation is tokenised whole, as the model saw text in training; the split point is the
    longest prefix all of them share with the context alone (BPE may merge across the boundary), so every option
    is scored from the same place."""
    ctx = tokenizer.encode(context, add_special_tokens=False)
    fulls = [tokenizer.encode(context + c, add_special_tokens=False) for c in conts]
    start = min(len(ctx), *(len(f) - 1 for f in fulls))
    for f in fulls:
        start = next((i for i in range(start) if f[i] != ctx[i]), start)
    return ctx[:start], [f[start:] for f in fulls]


@torch.no_grad()
def score_requests(model, requests: list[tuple[list[int], list]], batch_size: int, device, pad_id: int) -> list:
    """Summed log-probability of every continuation of every request: [[score per continuation] per request].

    When all continuations of a request are one token (answer letters), one forward of the context gives all
    of them; otherwise each continuation is its own row. A row reads the context and all but the last
    continuation token (the last is only predicted); one longer than the model's context loses tokens on the left
    (the question stays, old shots go), row by row: the cut lm-eval-harness makes, so both score the same text."""
    max_len = model.config.max_position_embeddings
    rows = []  # (ids, [(position, token)], request index, continuation index)

    def add_row(ids: list[int], queries: list[tuple[int, int]], r: int, ci: int):
        drop = max(0, len(ids) - max_len)
        if queries[0][0] - drop < 0:
            raise ValueError(f"a continuation of {len(queries)} tokens does not fit the context of {max_len}")
        rows.append((ids[drop:], [(p - drop, t) for p, t in queries], r, ci))

    for r, (ctx, conts) in enumerate(requests):
        if all(len(c) == 1 for c in conts):
            # -1: this row's queries are the continuations 0..n-1 in order
            add_row(ctx, [(len(ctx) - 1, c[0]) for c in conts], r, -1)
        else:
            for ci, c in enumerate(conts):
                add_row(ctx + c[:-1], [(len(ctx) - 1 + j, t) for j, t in enumerate(c)], r, ci)
    scores = [[0.0] * len(conts) for _, conts in requests]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
    for b0 in range(0, len(order), batch_size):
        idx = order[b0 : b0 + batch_size]
        ids = torch.full((len(idx), max(len(rows[i][0]) for i in idx)), pad_id, dtype=torch.long)
        for b, i in enumerate(idx):
            ids[b, : len(rows[i][0])] = torch.tensor(rows[i][0])
        # Right padding needs no mask: causal attention never lets a real token see the pads after it.
        logits = model(input_ids=ids.to(device)).logits
        for b, i in enumerate(idx):
            _, queries, r, ci = rows[i]
            pos = torch.tensor([q[0] for q in queries], device=logits.device)
            tok = torch.tensor([q[1] for q in queries], device=logits.device)
            logp = logits[b, pos].float().log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)
            if ci == -1:
                scores[r] = logp.tolist()
            else:
                scores[r][ci] = float(logp.sum())
    return scores


def eval_subject(model, tokenizer, subject: str, questions: list[dict], shots: list[dict], cfg: Config, device) -> dict:
    """Accuracy of one subject under the letter and/or option-text scoring."""
    modes = ["letter", "option"] if cfg.mc_score == "both" else [cfg.mc_score]
    requests, owners = [], []  # owners[k] = (mode, question index) of requests[k]
    for qi, q in enumerate(questions):
        context = mc_prompt(subject, shots, q)
        for mode in modes:
            conts = list(LETTERS) if mode == "letter" else q["options"]
            requests.append(continuation_request(tokenizer, context, conts))
            owners.append((mode, qi))
    scores = score_requests(model, requests, cfg.batch_size, device, tokenizer.pad_token_id or 0)
    best = {}  # (mode, qi) -> index of the chosen option
    for (mode, qi), option_scores in zip(owners, scores):
        if mode == "option":  # longer options collect more negative log-prob: compare per byte
            option_scores = [
                s / max(1, len(o.encode("utf-8"))) for s, o in zip(option_scores, questions[qi]["options"])
            ]
        best[(mode, qi)] = max(range(len(option_scores)), key=option_scores.__getitem__)
    result = {"n": len(questions)}
    for mode in modes:
        correct = sum(LETTERS[best[(mode, qi)]] == q["answer"] for qi, q in enumerate(questions))
        result[f"acc_{mode}"] = correct / max(1, len(questions))
    for mode in modes:  # the letter chosen per question, in file order: compared question by question elsewhere
        result[f"chosen_{mode}"] = "".join(LETTERS[best[(mode, qi)]] for qi in range(len(questions)))
    return result


def eval_multiple_choice(model, tokenizer, cfg: Config, device) -> dict:
    layout, files = mc_subject_files(cfg.mc_dir, cfg.mc_split)
    dev_files = mc_subject_files(cfg.mc_dir, "dev", required=False)[1] if cfg.shots > 0 else {}
    wanted = [s.strip() for s in cfg.subjects.split(",") if s.strip()] or sorted(files)
    missing = sorted(set(wanted) - set(files))
    if missing:
        have = ", ".join(sorted(files))
        raise FileNotFoundError(
            f"mc_dir: no subject {missing} in split '{cfg.mc_split}' of {cfg.mc_dir} (it has {have})"
        )
    print0(f"[eval]   multiple choice: {len(wanted)} subjects of {cfg.mc_dir} ({layout} layout, {cfg.mc_split} split)")
    subjects = {}
    for subject in wanted:
        questions = read_mc_questions(files[subject])
        if cfg.mc_max_questions > 0:
            questions = questions[: cfg.mc_max_questions]
        shots = read_mc_questions(dev_files[subject])[: cfg.shots] if subject in dev_files else []
        subjects[subject] = eval_subject(model, tokenizer, subject, questions, shots, cfg, device)
        print0(
            f"[eval]   {subject}: "
            + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in subjects[subject].items()
                if k[:7] != "chosen_"
            )
        )
    total = sum(r["n"] for r in subjects.values())
    overall = {"n": total}
    for key in [k for k in next(iter(subjects.values())) if k.startswith("acc_")]:
        overall[key] = sum(r[key] * r["n"] for r in subjects.values()) / max(1, total)  # over questions
    return {"overall": overall, "subjects": subjects, "shots": cfg.shots}


# -----------------------------------------------------------------------------
# Generation report


def read_prompts(paths: str) -> list[dict]:
    """The generation report's prompts -> [{"prompt", "reference"}], through the record reader every data stage
    uses (any file it reads; a bad record stops the run naming file:line, as a report missing a prompt would
    mislead)."""

    def to_item(record, where: str) -> dict:
        if not isinstance(record, dict):
            raise BadRecord(where, "malformed", f"a record is {type(record).__name__}, not an object")
        prompt = record.get("prompt") or record.get("question") or record.get("instruction")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRecord(
                where, "no prompt", f"expected a 'prompt' (or question/instruction) string, got keys {sorted(record)}"
            )
        extra = record.get("input") or ""
        reference = record.get("reference") or record.get("answer") or record.get("output") or ""
        if not isinstance(extra, str) or not isinstance(reference, str):
            raise BadRecord(where, "malformed", "input and reference/answer/output must be strings")
        return {"prompt": prompt + ("\n" + extra if extra else ""), "reference": reference}

    items, _ = read_records(paths, lambda path: to_item, "prompts", on_bad="error", log=print0)
    return items


def generate_answers(engine, items: list[dict], cfg: Config) -> list[str]:
    use_chat = cfg.chat and bool(getattr(engine.tokenizer, "chat_template", None))
    prompts = [
        engine.chat_prompt([{"role": "user", "content": it["prompt"]}], cfg.max_new_tokens)
        if use_chat
        else engine.encode(it["prompt"])
        for it in items
    ]
    sampling = SamplingParams(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        repetition_penalty=cfg.repetition_penalty,
    )
    answers = []
    for i in range(0, len(prompts), cfg.batch_size):
        out = engine.generate(prompts[i : i + cfg.batch_size], sampling.replace(seed=cfg.seed + i))
        answers += [engine.decode(ids).strip() for ids in out]
    return answers


# -----------------------------------------------------------------------------
# Reports


def markdown_summary(results: list[dict]) -> str:
    names = [r["name"] for r in results]
    lines = ["# Evaluation", "", "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]

    def row(label, values):
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    first = results[0]
    if "ppl" in first:
        for key, fmt in (("ppl", "{:.2f}"), ("bpb", "{:.4f}"), ("loss", "{:.4f}")):
            row(
                f"{key} ({first['ppl']['tokens']:,} tokens)" if key == "ppl" else key,
                [fmt.format(r["ppl"][key]) for r in results],
            )
    if "mc" in first:
        for key in [k for k in first["mc"]["overall"] if k.startswith("acc_")]:
            row(
                f"mc {key} overall, {first['mc']['shots']}-shot (n={first['mc']['overall']['n']})",
                [f"{100 * r['mc']['overall'][key]:.1f}" for r in results],
            )
        lines += [
            "",
            "## Multiple choice per subject (accuracy %)",
            "",
            "| subject | n | " + " | ".join(names) + " |",
            "|---" * (len(names) + 2) + "|",
        ]
        for subject, res in first["mc"]["subjects"].items():
            key = next(k for k in res if k.startswith("acc_"))
            lines.append(
                f"| {subject} | {res['n']} | "
                + " | ".join(f"{100 * r['mc']['subjects'][subject][key]:.1f}" for r in results)
                + " |"
            )
    return "\n".join(lines) + "\n"


def markdown_generations(items: list[dict], results: list[dict], cfg: Config) -> str:
    lines = [
        "# Generation report",
        "",
        (
            f"Sampling: temperature {cfg.temperature}, top_k {cfg.top_k}, top_p {cfg.top_p}, repetition_penalty "
            f"{cfg.repetition_penalty}, max_new_tokens {cfg.max_new_tokens}, chat template {cfg.chat}."
        ),
        "",
    ]
    for i, item in enumerate(items):
        lines += [f"## {i + 1}. {item['prompt'][:60]}", "", "**Prompt**", "", _quote(item["prompt"]), ""]
        for r in results:
            lines += [f"**{r['name']}**", "", _quote(r["generation"][i]["answer"] or "(empty)"), ""]
        if item["reference"]:
            lines += ["**Reference**", "", _quote(item["reference"]), ""]
    return "\n".join(lines)


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in text.splitlines() or [""])


# -----------------------------------------------------------------------------
# The stage


def evaluate_checkpoint(path: str, name: str, cfg: Config, items: list[dict]) -> dict:
    engine = load_engine(path, cfg)
    model, tokenizer, device = engine.model, engine.tokenizer, engine.device
    result = {
        "name": name,
        "path": path,
        "parameters": sum(p.numel() for p in model.parameters()),
        "quantize": cfg.quantize,
    }
    print0(f"[eval] {name}: {path} ({result['parameters']:,} parameters, quantize={cfg.quantize})")
    if cfg.ppl_data:
        seq_len = min(cfg.seq_len, model.config.max_position_embeddings)
        windows = ppl_windows(cfg.ppl_data, tokenizer, seq_len, cfg.ppl_max_tokens, cfg.ppl_text_column)
        result["ppl"] = perplexity(model, tokenizer, windows, cfg.batch_size, device)
        print0(
            f"[eval]   ppl {result['ppl']['ppl']:.2f} | bpb {result['ppl']['bpb']:.4f} over "
            f"{result['ppl']['tokens']:,} tokens"
        )
    if cfg.mc_dir:
        result["mc"] = eval_multiple_choice(model, tokenizer, cfg, device)
        print0(f"[eval]   multiple choice overall: {result['mc']['overall']}")
    if items:
        answers = generate_answers(engine, items, cfg)
        result["generation"] = [{"prompt": it["prompt"], "answer": a} for it, a in zip(items, answers)]
    return result


def run(cfg: Config) -> list[dict]:
    validate(cfg)
    paths = [p.strip() for p in cfg.init_from.split(",") if p.strip()]
    if not paths:
        raise ValueError("init_from: give at least one checkpoint directory")
    names = [n.strip() for n in cfg.names.split(",") if n.strip()] or [_short_name(p) for p in paths]
    if len(names) != len(paths):
        raise ValueError(f"names: {len(names)} names for {len(paths)} checkpoints")
    if cfg.mc_score not in ("letter", "option", "both"):
        raise ValueError(f"mc_score must be letter, option or both, got '{cfg.mc_score}'")
    items = read_prompts(cfg.prompts) if cfg.prompts else []
    results = [evaluate_checkpoint(p, n, cfg, items) for p, n in zip(paths, names)]
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump({"config": config_to_dict(cfg), "results": results}, f, ensure_ascii=False, indent=2)
    with open(os.path.join(cfg.out_dir, "eval.md"), "w", encoding="utf-8") as f:
        f.write(markdown_summary(results))
    if items:
        with open(os.path.join(cfg.out_dir, "generations.md"), "w", encoding="utf-8") as f:
            f.write(markdown_generations(items, results, cfg))
    print0(f"[eval] wrote {cfg.out_dir}/eval.json and eval.md" + (" and generations.md" if items else ""))
    return results


def _short_name(path: str) -> str:
    """out/sft/run1/final -> sft/run1/final: enough to tell checkpoints apart in a table."""
    parts = os.path.normpath(path).split(os.sep)
    return "/".join(parts[-3:]) if len(parts) > 1 else path
