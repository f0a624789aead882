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
from dataset.mc_data import LETTERS, mc_subject_files, read_mc_questions
from dataset.records import BadRecord
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
    read_prompts,
    run,
    score_requests,
)

CMMLU = str(SHARED_DATA / "eval" / "cmmlu")  # read-only shared data (data README section 5); never copied here
SUBJECTS = "arts,anatomy"
needs_cmmlu = pytest.mark.skipif(not os.path.isdir(CMMLU), reason=f"shared CMMLU not found at {CMMLU}")


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


def test_prompts_are_read_like_every_record_file(tmp_path):
    """prompts= goes through the shared record reader: JSONL and parquet give the same items, and a bad record stops
    the run naming file and line (or row) instead of a bare JSONDecodeError."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [
        {"prompt": "北京是哪个国家的首都？", "reference": "中国。"},
        {"instruction": "翻译成中文", "input": "hello", "output": "你好"},
        {"question": "一加一等于几？"},
    ]
    want = [
        {"prompt": "北京是哪个国家的首都？", "reference": "中国。"},
        {"prompt": "翻译成中文\nhello", "reference": "你好"},
        {"prompt": "一加一等于几？", "reference": ""},
    ]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    keys = ("prompt", "reference", "instruction", "input", "output", "question")
    schema = pa.schema([(k, pa.string()) for k in keys])  # a key a row lacks is a null there, as in a Hub file
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "p.parquet")
    assert read_prompts(str(tmp_path / "p.jsonl")) == want
    assert read_prompts(str(tmp_path / "p.parquet")) == want
    assert read_prompts(f"{tmp_path}/p.jsonl,{tmp_path}/p.parquet") == want + want
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n{broken\n", encoding="utf-8")
    with pytest.raises(BadRecord, match=r"bad\.jsonl:2: malformed \(invalid JSON"):
        read_prompts(str(tmp_path / "bad.jsonl"))
    pq.write_table(pa.Table.from_pylist([rows[0], {"reference": "没有问题"}]), tmp_path / "bad.parquet")
    with pytest.raises(BadRecord, match=r"bad\.parquet:row 2: no prompt"):
        read_prompts(str(tmp_path / "bad.parquet"))


@pytest.mark.slow
@needs_cmmlu
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
@needs_cmmlu
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
    assert layout == "val/<subject>_val" and sorted(files) == sorted(CEVAL_SUBJECTS)
    assert mc_subject_files(ceval_and_cmmlu["cmmlu"], "test")[0] == "test/<subject>"
    assert read_mc_questions(files["computer_network"]) == read_mc_questions(
        [f"{ceval_and_cmmlu['cmmlu']}/test/computer_network.csv"]
    )
    common = {"init_from": checkpoints["paths"][0], "shots": 2, "mc_score": "both", "device": "cpu", "dtype": "fp32"}
    ceval = run(Config(mc_dir=ceval_and_cmmlu["ceval"], mc_split="val", out_dir=str(tmp_path / "a"), **common))
    cmmlu = run(Config(mc_dir=ceval_and_cmmlu["cmmlu"], mc_split="test", out_dir=str(tmp_path / "b"), **common))
    assert ceval[0]["mc"] == cmmlu[0]["mc"] and ceval[0]["mc"]["overall"]["n"] == 15
    assert all(len(r["chosen_letter"]) == 5 for r in ceval[0]["mc"]["subjects"].values())
    # ... and C-Eval as its Hub repo ships it (parquet in subject folders, shots from dev-*.parquet) scores the same
    hub = mc_tables(ceval_and_cmmlu, tmp_path / "tables")["ceval_hub"]
    assert mc_subject_files(hub, "val")[0] == "<subject>/val"
    parquet = run(Config(mc_dir=hub, mc_split="val", out_dir=str(tmp_path / "c"), **common))
    assert parquet[0]["mc"] == ceval[0]["mc"]


def _csv_table(path, drop_index: bool = False):
    """A published CSV as the Hub's parquet holds it: the same columns (C-Eval's id as int32; CMMLU's unnamed index
    column dropped), every other cell a string."""
    import pyarrow as pa

    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        names = [n for n in reader.fieldnames if n or not drop_index]
        rows = list(reader)
    columns = {n: [int(r[n]) for r in rows] if n == "id" else [r[n] for r in rows] for n in names}
    return pa.table({n: pa.array(v, pa.int32() if n == "id" else pa.string()) for n, v in columns.items()})


def mc_tables(ceval_and_cmmlu, root) -> dict:
    """The fixture's questions as parquet/Arrow in every layout people download: C-Eval and CMMLU split folders of
    tables, the Hub repos' subject folders (today's <split>-*.parquet, the first conversion's *-<split>.parquet,
    refs/convert/parquet's <split>/0000.parquet), and save_to_disk folders, per split and per subject."""
    pytest.importorskip("pyarrow")
    import pyarrow.ipc
    import pyarrow.parquet as pq

    from tests.helpers import write_saved_dataset

    out = {k: str(root / k) for k in ("ceval_split", "ceval_hub", "ceval_first", "ceval_convert", "ceval_saved")}
    out.update({k: str(root / k) for k in ("ceval_split_saved", "cmmlu_split", "cmmlu_hub")})
    for subject in CEVAL_SUBJECTS:
        for split in ("val", "dev", "test"):
            table = _csv_table(f"{ceval_and_cmmlu['ceval']}/{split}/{subject}_{split}.csv")
            files = {
                "ceval_split": f"{split}/{subject}_{split}.parquet",
                "ceval_hub": f"{subject}/{split}-00000-of-00001.parquet",
                "ceval_first": f"{subject}/ceval-exam-{split}.parquet",
                "ceval_convert": f"{subject}/{split}/0000.parquet",
            }
            for key, name in files.items():
                os.makedirs(os.path.dirname(os.path.join(out[key], name)), exist_ok=True)
                pq.write_table(table, os.path.join(out[key], name))
            (root / "ceval_convert" / subject / split / "index.duckdb").write_bytes(
                b"DUCK\x00" * 8
            )  # the Hub's, beside
            write_saved_dataset(root / "ceval_saved" / subject / split, table, n_files=1)  # DatasetDict.save_to_disk
            (root / "ceval_saved" / subject / "dataset_dict.json").write_text('{"splits": ["test", "val", "dev"]}')
            write_saved_dataset(
                root / "ceval_split_saved" / split / subject, table, n_files=2
            )  # ds[split].save_to_disk
        for split in ("test", "dev"):
            table = _csv_table(f"{ceval_and_cmmlu['cmmlu']}/{split}/{subject}.csv", drop_index=True)
            os.makedirs(root / "cmmlu_split" / split, exist_ok=True)
            with pyarrow.ipc.new_file(str(root / "cmmlu_split" / split / f"{subject}.arrow"), table.schema) as w:
                w.write_table(table)
            os.makedirs(root / "cmmlu_hub" / subject, exist_ok=True)
            pq.write_table(table, str(root / "cmmlu_hub" / subject / f"{split}-00000-of-00001.parquet"))
    return out


# the split-folder layouts of mc_tables; the others are the Hub's subject folders, "<subject>/<split>"
SPLIT_FOLDER_LAYOUTS = {
    "ceval_split": "{}/<subject>_{}",
    "ceval_split_saved": "{}/<subject>",
    "cmmlu_split": "{}/<subject>",
}


def test_mc_tables_in_every_layout_read_as_the_csv(ceval_and_cmmlu, tmp_path):
    tables = mc_tables(ceval_and_cmmlu, tmp_path)
    for name, mc_dir in tables.items():
        cmmlu = name.startswith("cmmlu")
        for split, csv_split in (("test", "val"), ("dev", "dev")) if cmmlu else (("val", "val"), ("dev", "dev")):
            layout, sources = mc_subject_files(mc_dir, split)
            assert sorted(sources) == sorted(CEVAL_SUBJECTS), name
            assert layout == SPLIT_FOLDER_LAYOUTS.get(name, "<subject>/{}").format(split, split), name
            for subject, files in sources.items():
                want = read_mc_questions([f"{ceval_and_cmmlu['ceval']}/{csv_split}/{subject}_{csv_split}.csv"])
                assert read_mc_questions(files) == want, (name, split, subject)
        if not cmmlu:  # C-Eval's test split, without answers, is refused in every layout
            with pytest.raises(ValueError, match="mc_split=val"):
                read_mc_questions(mc_subject_files(mc_dir, "test")[1]["computer_network"])
    # a subject in several files (a sharded Hub split) reads them in order
    import pyarrow.parquet as pq

    subject_dir = tmp_path / "ceval_hub" / "computer_network"
    whole = pq.read_table(subject_dir / "val-00000-of-00001.parquet")
    (subject_dir / "val-00000-of-00001.parquet").unlink()
    pq.write_table(whole.slice(0, 3), subject_dir / "val-00000-of-00002.parquet")
    pq.write_table(whole.slice(3), subject_dir / "val-00001-of-00002.parquet")
    files = mc_subject_files(tables["ceval_hub"], "val")[1]["computer_network"]
    assert [os.path.basename(f) for f in files] == ["val-00000-of-00002.parquet", "val-00001-of-00002.parquet"]
    assert read_mc_questions(files) == read_mc_questions([f"{ceval_and_cmmlu['ceval']}/val/computer_network_val.csv"])


def test_mc_split_without_subject_files_says_where_and_what_was_looked_for(checkpoints, ceval_and_cmmlu, tmp_path):
    # the folder of parquet files that used to give an empty subject dict and a bare StopIteration, now read;
    # a split folder of other files, or no split anywhere, is an error naming the folder and the layouts
    (tmp_path / "empty" / "val").mkdir(parents=True)
    (tmp_path / "empty" / "val" / "README.md").write_text("C-Eval")
    common = {"init_from": checkpoints["paths"][0], "device": "cpu", "out_dir": str(tmp_path / "out")}
    for mc_dir, where in ((tmp_path / "empty", tmp_path / "empty" / "val"), (ceval_and_cmmlu["cmmlu"], None)):
        with pytest.raises(FileNotFoundError) as e:
            run(Config(mc_dir=str(mc_dir), mc_split="val", **common))
        msg = str(e.value)
        assert f"split 'val' in {where or mc_dir};" in msg, msg
        assert "<split>/<subject>_<split>.csv" in msg and "<subject>/<split>-*.parquet" in msg, msg
    assert mc_subject_files(str(tmp_path / "empty"), "dev", required=False) == ("", {})
    with pytest.raises(FileNotFoundError, match="no subject \\['arts'\\] in split 'val'.*it has chinese_reading"):
        run(Config(mc_dir=ceval_and_cmmlu["ceval"], mc_split="val", subjects="arts", **common))


def test_mc_files_that_are_not_tables_or_text_are_named(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    cases = {
        "x_val.csv": (b"PK\x03\x04" + b"\x00" * 40, "a zip archive"),
        "y_val.parquet": (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 6517\n", "Git LFS pointer"),
        "z_val.csv": (
            "id,question,A,B,C,D,answer\n0,问题,1,2,3,4,A\n".encode("gb18030"),
            "z_val.csv:2: not valid UTF-8",
        ),
    }
    for name, (data, what) in cases.items():
        (val / name).write_bytes(data)
        with pytest.raises(ValueError, match=what):
            read_mc_questions([str(val / name)])
        (val / name).unlink()
    (val / "x_val.csv").write_text("id,question,A,B,C,D,answer\n0,问,1,2,3,4,A\n", encoding="utf-8")
    (val / "x_val.parquet").write_bytes((val / "x_val.csv").read_bytes())
    with pytest.raises(ValueError, match="x_val.csv and .*x_val.parquet hold the same subject; keep one"):
        mc_subject_files(str(tmp_path), "val")


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
    assert layout == "test/<subject>" and len(files) == 59 and "arts" in files
    rows = read_mc_questions(files["arts"])
    assert rows and all(r["answer"] in LETTERS and len(r["options"]) == 4 and r["question"] for r in rows)


def lm_eval_and_ours(checkpoint: str, tmp_path, mc: dict, **subjects) -> tuple[dict, dict]:
    """lm-eval-harness on the Llama export of `checkpoint` and our eval stage on the checkpoint itself, on the same
    questions (mc: mc_dir, mc_split, shots; 4 questions per subject; subjects=... picks some): (lm-eval's results and
    samples, our stage's "mc" result)."""
    require_thirdparty("lm_eval", "lm_eval")
    llama = export_llama(checkpoint, str(tmp_path / "llama"), "fp32")
    task = str(tmp_path / "task")
    write_lm_eval_task(mc["mc_dir"], task, mc["mc_split"], shots=mc["shots"], max_questions=4, **subjects)
    theirs = run_thirdparty("lm_eval", "lm_eval", "run_lm_eval.py", [llama, task, "milli_mc,milli_mc_option"], tmp_path)
    cfg = Config(
        init_from=checkpoint,
        mc_score="both",
        mc_max_questions=4,
        device="cpu",
        dtype="fp32",
        out_dir=str(tmp_path / "ours"),
        **subjects,
        **mc,
    )
    return theirs, run(cfg)[0]["mc"]


@pytest.mark.slow
def test_accuracy_equals_lm_eval_on_the_llama_export(checkpoints, ceval_and_cmmlu, tmp_path):
    """Our eval stage on the native checkpoint and lm-eval-harness on its Llama export, on the same questions with
    the same prompts (1 shot): every log-likelihood equal, so the same choice for every question and exactly the
    same accuracy, in both scorings. chinese_reading's prompts overflow the context: both cut them alike."""
    mc = {"mc_dir": ceval_and_cmmlu["ceval"], "mc_split": "val", "shots": 1}
    theirs, ours = lm_eval_and_ours(checkpoints["paths"][0], tmp_path, mc)
    model = SLMForCausalLM.from_pretrained(checkpoints["paths"][0]).eval()
    tok, max_len = checkpoints["tok"], model.config.max_position_embeddings
    for subject in CEVAL_SUBJECTS:
        questions = read_mc_questions(mc_subject_files(mc["mc_dir"], "val")[1][subject])[:4]
        shots = read_mc_questions(mc_subject_files(mc["mc_dir"], "dev")[1][subject])[:1]
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
        read_mc_questions([str(path)])


@pytest.mark.slow
def test_cmmlu_accuracy_equals_lm_eval_on_the_shared_pack(checkpoints, tmp_path):
    """The README's claim on real questions: CMMLU from the shared data pack (two subjects, 4 questions each,
    1 shot from its dev split), our eval stage on the native checkpoint and lm-eval-harness on its Llama export
    give the same choice for every question and so the same accuracy, in both scorings."""
    if not os.path.isdir(CMMLU):
        pytest.skip(f"shared CMMLU not found at {CMMLU}")
    mc = {"mc_dir": CMMLU, "mc_split": "test", "shots": 1}
    theirs, ours = lm_eval_and_ours(checkpoints["paths"][0], tmp_path, mc, subjects=SUBJECTS)
    for subject in SUBJECTS.split(","):
        for task, mode, metric in (
            (f"milli_mc_{subject}", "letter", "acc,none"),
            (f"milli_mc_option_{subject}", "option", "acc_bytes,none"),
        ):
            assert len(theirs["samples"][task]) == 4
            assert theirs["results"][task][metric] == ours["subjects"][subject][f"acc_{mode}"], task
        # the same letter chosen for each question (the highest log-likelihood of lm-eval's four continuations)
        lls = [s["lls"] for s in theirs["samples"][f"milli_mc_{subject}"]]
        chosen = "".join(LETTERS[max(range(4), key=ll.__getitem__)] for ll in lls)
        assert chosen == ours["subjects"][subject]["chosen_letter"], subject
    assert ours["overall"]["n"] == 8
    assert theirs["results"]["milli_mc"]["acc,none"] == pytest.approx(ours["overall"]["acc_letter"], abs=1e-12)
    assert theirs["results"]["milli_mc_option"]["acc_bytes,none"] == pytest.approx(
        ours["overall"]["acc_option"], abs=1e-12
    )
