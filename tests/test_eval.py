"""trainer/eval.py: perplexity/bits-per-byte, CMMLU and C-Eval multiple choice as published (zero- and few-shot,
letter and option scoring, batched), the generation report, a two-checkpoint comparison through main.py, and the
same accuracy from lm-eval-harness on the Llama export (scripts/lm_eval_task.py, skipped without lm-eval)."""

import csv
import json
import math
import os
import random

import pytest
import torch
from transformers import AutoTokenizer

import main
from dataset.mc_data import LETTERS, mc_subject_files, read_mc_csv
from model import SLMForCausalLM
from scripts.export_llama import export_llama
from scripts.lm_eval_task import write_lm_eval_task
from tests.helpers import SHARED_DATA, tiny_corpus_lines, tiny_model
from tests.helpers_thirdparty import require_thirdparty, run_thirdparty
from trainer.eval import (
    Config,
    continuation_request,
    mc_prompt,
    perplexity,
    ppl_windows,
    run,
    score_requests,
)

CMMLU = str(SHARED_DATA / "eval" / "cmmlu")  # read-only shared data (data README section 5); never copied here
SUBJECTS = "arts,anatomy"


@pytest.fixture(scope="module")
def checkpoints(tiny_tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    paths = []
    for seed in (0, 1):
        model = tiny_model(len(tok), seed=seed, initializer_range=0.05)
        model.save_pretrained(root / f"m{seed}")
        tok.save_pretrained(root / f"m{seed}")
        paths.append(str(root / f"m{seed}"))
    text = root / "val.jsonl"
    text.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in tiny_corpus_lines(60, seed=4)))
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "北京是哪个国家的首都？", "reference": "中国。"}, ensure_ascii=False)
        + "\n"
        + json.dumps({"prompt": "hello"})
        + "\n"
    )
    return {"root": root, "tok": tok, "paths": paths, "text": str(text), "prompts": str(prompts)}


def test_scores_are_log_likelihoods(checkpoints):
    tok = checkpoints["tok"]
    model = SLMForCausalLM.from_pretrained(checkpoints["paths"][0]).eval()
    ctx, conts = continuation_request(tok, "问题：北京是\n答案：", ["A", "B", "中国的首都", "hello world"])
    single = score_requests(model, [(ctx, [c[:1] for c in conts])], 2, "cpu", 3)[0]  # one row, 4 queries
    multi = score_requests(model, [(ctx, conts)], 3, "cpu", 3)[0]  # a row per option, padded batches
    with torch.no_grad():
        for c, s1, sm in zip(conts, single, multi):
            logp = model(torch.tensor([ctx + c])).logits[0].log_softmax(-1)
            direct = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(c))
            assert sm == pytest.approx(direct, abs=1e-4)
            assert s1 == pytest.approx(float(logp[len(ctx) - 1, c[0]]), abs=1e-4)


def test_perplexity_and_bits_per_byte(checkpoints):
    tok = checkpoints["tok"]
    model = SLMForCausalLM.from_pretrained(checkpoints["paths"][0]).eval()
    windows = ppl_windows(checkpoints["text"], tok, 64, 0)
    assert windows.shape[1] == 65 and torch.equal(windows[0, -1], windows[1, 0])  # non-overlapping, contiguous
    res = perplexity(model, tok, windows, 4, "cpu")
    assert res["ppl"] == pytest.approx(math.exp(res["loss"]))
    assert 1 < res["ppl"] < 2 * len(tok) and res["bytes"] > res["tokens"] > 0
    assert res["bpb"] == pytest.approx(res["loss"] * res["tokens"] / (math.log(2) * res["bytes"]))


@pytest.mark.slow
def test_eval_stage_compares_checkpoints(checkpoints, tmp_path):
    out = tmp_path / "out"
    rc = main.main(
        [
            "--stage",
            "eval",
            f"init_from={','.join(checkpoints['paths'])}",
            "names=base,other",
            f"ppl_data={checkpoints['text']}",
            "seq_len=64",
            f"mc_dir={CMMLU}",
            f"subjects={SUBJECTS}",
            "shots=2",
            "mc_max_questions=4",
            "mc_score=both",
            f"prompts={checkpoints['prompts']}",
            "max_new_tokens=4",
            "batch_size=8",
            f"out_dir={out}",
        ]
    )
    assert rc == 0
    results = json.loads((out / "eval.json").read_text())["results"]
    assert [r["name"] for r in results] == ["base", "other"]
    for r in results:
        assert r["mc"]["overall"]["n"] == 8 and set(r["mc"]["subjects"]) == {"arts", "anatomy"}
        assert 0 <= r["mc"]["overall"]["acc_letter"] <= 1 and 0 <= r["mc"]["overall"]["acc_option"] <= 1
        assert r["ppl"]["bpb"] > 0 and len(r["generation"]) == 2
    assert results[0]["ppl"]["loss"] != results[1]["ppl"]["loss"]
    table = (out / "eval.md").read_text()
    assert "| metric | base | other |" in table and "| arts | 4 |" in table and "2-shot (n=8)" in table
    report = (out / "generations.md").read_text()
    assert "北京是哪个国家的首都？" in report and "**Reference**" in report and "**other**" in report


@pytest.mark.slow  # over 3 s: kept out of the quick suite (pytest -m 'not slow')
def test_zero_shot_quantized_run(checkpoints, tmp_path):
    res = run(
        Config(
            init_from=checkpoints["paths"][0],
            mc_dir=CMMLU,
            subjects="arts",
            mc_max_questions=4,
            quantize="int8",
            out_dir=str(tmp_path),
        )
    )
    assert res[0]["quantize"] == "int8" and res[0]["mc"]["shots"] == 0 and "acc_letter" in res[0]["mc"]["overall"]


# -----------------------------------------------------------------------------
# C-Eval as published (generated here, never copied) and lm-eval-harness on the Llama export

# chinese_reading has a long passage in every question: its few-shot prompts overflow the tiny model's context.
CEVAL_SUBJECTS = ("computer_network", "high_school_physics", "chinese_reading")


def toy_questions(n: int, seed: int, passage: bool = False) -> list[dict]:
    """Arithmetic questions with four numeric options, one correct (answer letters spread over A-D)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randrange(10, 50), rng.randrange(10, 50)
        options = rng.sample([a + b, a + b + 1, a + b - 2, a + b + 10], 4)
        text = "".join(tiny_corpus_lines(10, seed=seed * 100 + i)) if passage else ""
        rows.append(
            {
                "question": f"{text}{a}加{b}等于多少？",
                "options": [str(o) for o in options],
                "answer": LETTERS[options.index(a + b)],
            }
        )
    return rows


@pytest.fixture(scope="module")
def ceval_and_cmmlu(tmp_path_factory):
    """The same questions twice: in C-Eval's published layout/header and in CMMLU's."""
    root = tmp_path_factory.mktemp("mc")
    splits = {"val": 5, "dev": 2, "test": 3}
    for si, subject in enumerate(CEVAL_SUBJECTS):
        for split, n in splits.items():
            questions = toy_questions(n, seed=10 * si + len(split), passage=subject == "chinese_reading")
            (root / "ceval" / split).mkdir(parents=True, exist_ok=True)
            with open(root / "ceval" / split / f"{subject}_{split}.csv", "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                explanation = split == "dev"  # C-Eval's dev files explain their answers
                w.writerow(["id", "question", "A", "B", "C", "D", "answer"] + (["explanation"] if explanation else []))
                for i, q in enumerate(questions):
                    answer = "" if split == "test" else q["answer"]  # C-Eval publishes test without answers
                    w.writerow([i, q["question"], *q["options"], answer] + (["1. 计算。"] if explanation else []))
            cmmlu_split = {"val": "test", "dev": "dev"}.get(split)
            if cmmlu_split:
                (root / "cmmlu" / cmmlu_split).mkdir(parents=True, exist_ok=True)
                with open(root / "cmmlu" / cmmlu_split / f"{subject}.csv", "w", encoding="utf-8", newline="") as f:
                    w = csv.writer(f)
                    w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                    for i, q in enumerate(questions):
                        w.writerow([i, q["question"], *q["options"], q["answer"]])
    return {"ceval": str(root / "ceval"), "cmmlu": str(root / "cmmlu")}


@pytest.mark.slow
def test_ceval_layout_reads_as_published_and_scores_like_cmmlu(checkpoints, ceval_and_cmmlu, tmp_path):
    layout, files = mc_subject_files(ceval_and_cmmlu["ceval"], "val")
    assert layout == "ceval" and sorted(files) == sorted(CEVAL_SUBJECTS)
    assert mc_subject_files(ceval_and_cmmlu["cmmlu"], "test")[0] == "cmmlu"
    assert read_mc_csv(files["computer_network"]) == read_mc_csv(
        f"{ceval_and_cmmlu['cmmlu']}/test/computer_network.csv"
    )
    common = {"init_from": checkpoints["paths"][0], "shots": 2, "mc_score": "both", "device": "cpu", "dtype": "fp32"}
    ceval = run(Config(mc_dir=ceval_and_cmmlu["ceval"], mc_split="val", out_dir=str(tmp_path / "a"), **common))
    cmmlu = run(Config(mc_dir=ceval_and_cmmlu["cmmlu"], mc_split="test", out_dir=str(tmp_path / "b"), **common))
    assert ceval[0]["mc"] == cmmlu[0]["mc"] and ceval[0]["mc"]["overall"]["n"] == 15
    assert all(len(r["chosen_letter"]) == 5 for r in ceval[0]["mc"]["subjects"].values())


def test_ceval_test_split_without_answers_is_refused(checkpoints, ceval_and_cmmlu, tmp_path):
    with pytest.raises(ValueError, match="mc_split=val"):
        run(
            Config(
                init_from=checkpoints["paths"][0],
                mc_dir=ceval_and_cmmlu["ceval"],
                mc_split="test",
                out_dir=str(tmp_path),
                device="cpu",
            )
        )


def test_published_cmmlu_pack_layout(tmp_path):
    if not os.path.isdir(CMMLU):
        pytest.skip("shared CMMLU pack absent")
    layout, files = mc_subject_files(CMMLU, "test")
    assert layout == "cmmlu" and len(files) == 59 and "arts" in files
    rows = read_mc_csv(files["arts"])
    assert rows and all(r["answer"] in LETTERS and len(r["options"]) == 4 and r["question"] for r in rows)


@pytest.mark.slow
def test_accuracy_equals_lm_eval_on_the_llama_export(checkpoints, ceval_and_cmmlu, tmp_path):
    """Our eval stage on the native checkpoint and lm-eval-harness on its Llama export, on the same questions with
    the same prompts (1 shot): every log-likelihood equal, so the same choice for every question and exactly the
    same accuracy, in both scorings. chinese_reading's prompts overflow the context: both cut them alike."""
    require_thirdparty("lm_eval", "lm_eval")
    llama = export_llama(checkpoints["paths"][0], str(tmp_path / "llama"), "fp32")
    mc = {"mc_dir": ceval_and_cmmlu["ceval"], "mc_split": "val", "shots": 1}
    write_lm_eval_task(mc["mc_dir"], str(tmp_path / "task"), mc["mc_split"], shots=mc["shots"], max_questions=4)
    theirs = run_thirdparty(
        "lm_eval", "lm_eval", "run_lm_eval.py", [llama, str(tmp_path / "task"), "milli_mc,milli_mc_option"], tmp_path
    )
    ours = run(
        Config(
            init_from=checkpoints["paths"][0],
            mc_score="both",
            mc_max_questions=4,
            device="cpu",
            dtype="fp32",
            out_dir=str(tmp_path / "ours"),
            **mc,
        )
    )[0]["mc"]
    model = SLMForCausalLM.from_pretrained(checkpoints["paths"][0]).eval()
    tok, max_len = checkpoints["tok"], model.config.max_position_embeddings
    for subject in CEVAL_SUBJECTS:
        questions = read_mc_csv(mc_subject_files(mc["mc_dir"], "val")[1][subject])[:4]
        shots = read_mc_csv(mc_subject_files(mc["mc_dir"], "dev")[1][subject])[:1]
        prompts = [mc_prompt(subject, shots, q) for q in questions]
        overflow = [len(tok.encode(p, add_special_tokens=False)) >= max_len for p in prompts]
        assert all(overflow) == (subject == "chinese_reading") and any(overflow) == all(overflow)
        for task, mode, conts in (
            (f"milli_mc_{subject}", "letter", lambda q: list(LETTERS)),
            (f"milli_mc_option_{subject}", "option", lambda q: q["options"]),
        ):
            # The same log-likelihoods from the same prompt text (lm-eval builds its own from the task file).
            requests = [continuation_request(tok, p, conts(q)) for p, q in zip(prompts, questions)]
            ours_lls = score_requests(model, requests, 8, "cpu", tok.pad_token_id or 0)
            theirs_lls = [s["lls"] for s in theirs["samples"][task]]
            assert len(theirs_lls) == len(ours_lls) == 4
            for a, b in zip(ours_lls, theirs_lls):
                assert a == pytest.approx(b, abs=1e-4), task
            # ... and so the same choice per question as the eval stage made (acc = lm-eval's acc / acc_bytes).
            norm = [[1] * 4 if mode == "letter" else [len(o.encode("utf-8")) for o in q["options"]] for q in questions]
            chosen = "".join(
                LETTERS[max(range(4), key=lambda i, ll=ll, n=n: ll[i] / n[i])] for ll, n in zip(theirs_lls, norm)
            )
            assert chosen == ours["subjects"][subject][f"chosen_{mode}"], task
            metric = "acc,none" if mode == "letter" else "acc_bytes,none"
            assert theirs["results"][task][metric] == ours["subjects"][subject][f"acc_{mode}"]
    assert theirs["results"]["milli_mc"]["acc,none"] == pytest.approx(ours["overall"]["acc_letter"], abs=1e-12)
    assert theirs["results"]["milli_mc_option"]["acc_bytes,none"] == pytest.approx(
        ours["overall"]["acc_option"], abs=1e-12
    )


def test_unknown_header_names_both_published_ones(tmp_path):
    (tmp_path / "val").mkdir()
    path = tmp_path / "val" / "x_val.csv"
    path.write_text("id,prompt,A,B,C,D,label\n0,问,1,2,3,4,A\n", encoding="utf-8")
    with pytest.raises(ValueError, match="lacks \\['question', 'answer'\\].*,Question,A,B,C,D,Answer.*id,question"):
        read_mc_csv(str(path))
