"""trainer/eval.py: perplexity/bits-per-byte, CMMLU multiple choice (zero- and few-shot, letter and option
scoring, batched), the generation report, and a two-checkpoint comparison through main.py."""

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

import main
from model import SLMConfig, SLMForCausalLM
from tests.conftest import tiny_corpus_lines
from trainer.eval import Config, continuation_request, perplexity, ppl_windows, run, score_requests

CMMLU = "/work/shared/data/eval/cmmlu"  # read-only shared data (data README section 5); never copied here
SUBJECTS = "arts,anatomy"


@pytest.fixture(scope="module")
def checkpoints(tiny_tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = SLMForCausalLM(SLMConfig.from_preset("tiny", vocab_size=len(tok), initializer_range=0.05))
        model.save_pretrained(root / f"m{seed}")
        tok.save_pretrained(root / f"m{seed}")
        paths.append(str(root / f"m{seed}"))
    text = root / "val.jsonl"
    text.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in tiny_corpus_lines(60, seed=4)))
    prompts = root / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "北京是哪个国家的首都？", "reference": "中国。"}, ensure_ascii=False) + "\n"
                       + json.dumps({"prompt": "hello"}) + "\n")
    return {"root": root, "tok": tok, "paths": paths, "text": str(text), "prompts": str(prompts)}


def test_scores_are_log_likelihoods(checkpoints):
    tok = checkpoints["tok"]
    model = SLMForCausalLM.from_pretrained(checkpoints["paths"][0]).eval()
    ctx, conts = continuation_request(tok, "问题：北京是\n答案：", ["A", "B", "中国的首都", "hello world"], 512)
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


def test_eval_stage_compares_checkpoints(checkpoints, tmp_path):
    out = tmp_path / "out"
    rc = main.main(["--stage", "eval", f"init_from={','.join(checkpoints['paths'])}", "names=base,other",
                    f"ppl_data={checkpoints['text']}", "seq_len=64", f"mc_dir={CMMLU}", f"subjects={SUBJECTS}",
                    "shots=2", "mc_max_questions=4", "mc_score=both", f"prompts={checkpoints['prompts']}",
                    "max_new_tokens=4", "batch_size=8", f"out_dir={out}"])
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


def test_zero_shot_quantized_run(checkpoints, tmp_path):
    res = run(Config(init_from=checkpoints["paths"][0], mc_dir=CMMLU, subjects="arts", mc_max_questions=4,
                     quantize="int8", out_dir=str(tmp_path)))
    assert res[0]["quantize"] == "int8" and res[0]["mc"]["shots"] == 0 and "acc_letter" in res[0]["mc"]["overall"]
