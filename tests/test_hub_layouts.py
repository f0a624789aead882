"""
The layouts the most used Hub sets are published in (issue 24), each built from real records of the shared data pack
(tests/helpers.py SHARED_DATA; skipped when it is absent, and none of its text is kept in the repo) re-wrapped in the
published schema, read into the right structure and then trained on by the stage that takes it, in a fresh process
(main.py): TRL's conversational preference format, HuggingFaceH4/ultrafeedback_binarized as parquet, OpenAI's
preference fine-tuning format (DPO, reward); LLaMA-Factory's tool-call ShareGPT and BELLE multiturn_chat_0.8M (SFT);
MiniMind's RLAIF prompts and GSM8K with its "#### N" answer checked by the gsm8k rule (GRPO). And no silent loss: a
file that yields nothing stops the run naming what it holds, unless on_bad_record=skip_file.

    python -m pytest tests/test_hub_layouts.py
"""

import json
import re

import pytest

from dataset.chat_data import load_conversations
from dataset.preference_data import load_pairs
from dataset.records import UnusableFile
from tests.helpers import SHARED_DATA, read_metrics, run_main_py

QUIET = lambda *a: None  # noqa: E731


def shared(relative: str):
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"shared data pack not found at {path}")
    return path


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return str(path)


def write_json(path, rows) -> str:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    return str(path)


def stage_args(stage: str, init_from: str, data: str, *extra: str) -> list[str]:
    return ["--stage", stage, f"init_from={init_from}", f"data_path={data}", "device=cpu", "log_every=1", *extra]


# -----------------------------------------------------------------------------
# preference pairs: TRL, UltraFeedback (parquet), OpenAI -> DPO and reward


def lf_pairs(n: int) -> list[dict]:
    """The first n single-turn pairs of LLaMA-Factory's dpo_zh_demo (its own ranking schema)."""
    records = json.loads(shared("dpo/llamafactory_dpo_zh_demo.json").read_text(encoding="utf-8"))
    return [r for r in records if [t["from"] for t in r["conversations"]] == ["human"]][:n]


def as_trl(r: dict) -> dict:
    """TRL's conversational preference format: the prompt as messages, each side a one-message assistant list."""
    return {
        "prompt": [{"role": "user", "content": r["conversations"][0]["value"]}],
        "chosen": [{"role": "assistant", "content": r["chosen"]["value"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]["value"]}],
    }


def as_ultrafeedback(r: dict, i: int) -> dict:
    """HuggingFaceH4/ultrafeedback_binarized: a prompt string beside whole conversations, messages and scores."""
    q = r["conversations"][0]["value"]
    chosen = [{"role": "user", "content": q}, {"role": "assistant", "content": r["chosen"]["value"]}]
    rejected = [{"role": "user", "content": q}, {"role": "assistant", "content": r["rejected"]["value"]}]
    return {
        "prompt": q,
        "prompt_id": f"{i:064x}",
        "chosen": chosen,
        "rejected": rejected,
        "messages": chosen,
        "score_chosen": 8.0,
        "score_rejected": 4.5,
    }


def as_openai(r: dict) -> dict:
    """OpenAI's preference fine-tuning format (input.messages, preferred_output, non_preferred_output)."""
    return {
        "input": {"messages": [{"role": "user", "content": r["conversations"][0]["value"]}], "tools": []},
        "preferred_output": [{"role": "assistant", "content": r["chosen"]["value"]}],
        "non_preferred_output": [{"role": "assistant", "content": r["rejected"]["value"]}],
    }


def ultrafeedback_parquet(tmp_path, rows: list[dict]) -> str:
    """The rows as parquet, written by `datasets` itself in a fresh process when it is installed (its inferred
    schema: the conversations as lists of structs), else by pyarrow."""
    from tests.helpers_thirdparty import DATASETS_FOLDER, run_thirdparty

    jsonl = write_jsonl(tmp_path / "uf.jsonl", rows)
    parquet = str(tmp_path / "train_prefs-00000-of-00001.parquet")
    jobs = [{"builder": "json", "data_files": {"train": jsonl}, "parquet": {"train": parquet}}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    try:
        run_thirdparty(DATASETS_FOLDER, "datasets", "run_datasets_write.py", [str(tmp_path / "jobs.json")], tmp_path)
    except pytest.skip.Exception:  # no `datasets`: pyarrow writes the same table
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), parquet)
    return parquet


@pytest.mark.slow
def test_trl_ultrafeedback_and_openai_preference_layouts_train_dpo_and_reward(pretrained_dir, tmp_path):
    originals = lf_pairs(48)
    parts = {"trl": originals[:16], "ultrafeedback": originals[16:32], "openai": originals[32:]}
    files = {
        "trl": write_jsonl(tmp_path / "trl.jsonl", [as_trl(r) for r in parts["trl"]]),
        "ultrafeedback": ultrafeedback_parquet(
            tmp_path, [as_ultrafeedback(r, i) for i, r in enumerate(parts["ultrafeedback"])]
        ),
        "openai": write_jsonl(tmp_path / "openai_pref.jsonl", [as_openai(r) for r in parts["openai"]]),
    }
    for name, path in files.items():
        want, _ = load_pairs(write_json(tmp_path / f"lf_{name}.json", parts[name]), log=QUIET)
        assert len(want) == 16 and want[0]["prompt"] == [
            {"role": "user", "content": parts[name][0]["conversations"][0]["value"]}
        ]
        got, stats = load_pairs(path, log=QUIET)
        assert got == want, name
        assert stats["records"] == 16 and not any(k.startswith("skip:") for k in stats), (name, stats)

    common = ["seq_len=128", "batch_size=4", "global_batch_size=4", "max_steps=2", "val_samples=4", "eval_batches=1"]
    dpo = run_main_py(tmp_path / "dpo", stage_args("dpo", pretrained_dir, ",".join(files.values()), *common))
    for path in files.values():
        assert f"[data] {path}: 16 preference pairs" in dpo.stdout, dpo.stdout[-2000:]
    assert "records skipped" not in dpo.stdout and "48 records -> 44 train + 4 val pairs" in dpo.stdout
    assert [r["step"] for r in read_metrics(str(tmp_path / "dpo"))] == [1, 2]
    reward = run_main_py(tmp_path / "rm", stage_args("reward", pretrained_dir, files["openai"], *common))
    assert f"[data] {files['openai']}: 16 preference pairs" in reward.stdout
    assert (tmp_path / "rm" / "final" / "model.safetensors").is_file()


# -----------------------------------------------------------------------------
# SFT: LLaMA-Factory tool-call ShareGPT, BELLE multiturn_chat_0.8M


def tool_sharegpt(n: int) -> list[dict]:
    """glaive_toolcall_zh_demo's layout (function_call / observation turns, tools as JSON text) around real Alpaca
    records: the instruction is the question, a search tool is called with it and answers with the output."""
    records = json.loads(shared("sft/llamafactory_alpaca_zh_demo.json").read_text(encoding="utf-8"))
    tool = {
        "name": "search",
        "description": "搜索百科资料",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    }
    rows = []
    for r in [r for r in records if not r["input"] and len(r["instruction"]) + len(r["output"]) < 60][:n]:
        call = {"name": "search", "arguments": {"query": r["instruction"]}}
        rows.append(
            {
                "conversations": [
                    {"from": "human", "value": r["instruction"]},
                    {"from": "function_call", "value": json.dumps(call, ensure_ascii=False)},
                    {"from": "observation", "value": json.dumps({"result": r["output"]}, ensure_ascii=False)},
                    {"from": "gpt", "value": r["output"]},
                ],
                "tools": json.dumps([tool], ensure_ascii=False),
            }
        )
    return rows


def belle_multiturn(n: int) -> tuple[list[dict], list[list[dict]]]:
    """multiturn_chat_0.8M's layout (the chat as one "Human:...\\nAssistant:..." instruction, the last reply as output)
    around real multi-round ShareGPT chats; and those chats as messages (what the split must give back)."""
    rows, chats = [], []
    with open(shared("sft/medicalgpt_sharegpt_zh_1K_format.jsonl"), encoding="utf-8") as f:
        for line in f:
            turns = json.loads(line)["conversations"]
            values = [t["value"].strip() for t in turns]
            if (
                len(turns) < 4
                or sum(map(len, values)) > 400  # short chats: a tiny model's context holds them whole
                or len(turns) % 2
                or [t["from"] for t in turns] != ["human", "gpt"] * (len(turns) // 2)
                or any(not v or re.search(r"(^|\n)(Human|Assistant):", v) for v in values)
            ):
                continue
            transcript = "".join(f"{'Human' if k % 2 == 0 else 'Assistant'}:{v}\n" for k, v in enumerate(values[:-1]))
            rows.append({"instruction": transcript + "Assistant:", "input": "", "output": values[-1]})
            chats.append([{"role": "user" if k % 2 == 0 else "assistant", "content": v} for k, v in enumerate(values)])
            if len(rows) == n:
                break
    return rows, chats


@pytest.mark.slow
def test_tool_call_sharegpt_and_belle_multiturn_train_sft(pretrained_dir, tmp_path):
    from transformers import AutoTokenizer

    from dataset.chat_data import tokenize_conversation

    tool_rows = tool_sharegpt(12)
    tools = write_json(tmp_path / "glaive_toolcall_zh.json", tool_rows)
    convs, stats = load_conversations(tools, log=QUIET)
    assert len(convs) == 12 and stats["records"] == 12
    system, user, call, result, reply = convs[0]
    assert system == {
        "role": "system",
        "content": "",
        "tools": [{"type": "function", "function": json.loads(tool_rows[0]["tools"])[0]}],
    }
    assert call == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"name": "search", "arguments": {"query": user["content"]}}],
    }
    assert result["role"] == "tool" and json.loads(result["content"]) == {"result": reply["content"]}
    tok = AutoTokenizer.from_pretrained(pretrained_dir)
    ids, labels = tokenize_conversation(tok, convs[0])
    trained = tok.decode([int(i) for i, t in zip(ids, labels) if t != -100])
    assert "<tool_call>" in trained and '"name": "search"' in trained  # the call is learned, the result is not
    assert "<tool_response>" not in trained

    rows, chats = belle_multiturn(10)
    belle = write_jsonl(tmp_path / "multiturn_chat_0.8M.jsonl", rows)
    got, _ = load_conversations(belle, log=QUIET)
    assert got == chats and all(len(c) >= 4 for c in got)
    ids, labels = tokenize_conversation(tok, got[0])
    runs = sum(1 for a, b in zip(labels[:-1], labels[1:]) if a == -100 and b != -100)
    assert runs == len(chats[0]) // 2  # every reply of the chat is trained, not only the last

    args = ["seq_len=512", "pack=false", "batch_size=2", "global_batch_size=2", "max_steps=2", "val_samples=0"]
    sft = run_main_py(tmp_path / "sft", stage_args("sft", pretrained_dir, f"{tools},{belle}", *args))
    assert f"[data] {tools}: 12 conversations (sharegpt)" in sft.stdout, sft.stdout[-2000:]
    assert f"[data] {belle}: 10 conversations (alpaca)" in sft.stdout
    assert [r["step"] for r in read_metrics(str(tmp_path / "sft"))] == [1, 2]


# -----------------------------------------------------------------------------
# RL prompts: MiniMind RLAIF, GSM8K + the gsm8k rule


def gsm8k_rows(n: int) -> list[dict]:
    """GSM8K's {question, answer} layout, "#### N" on the answer's last line, around BELLE's math questions: the
    answer is the reference solution, N the last number it gives."""
    rows = []
    with open(shared("sft/belle_eval_set_800.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            numbers = re.findall(r"\d+(?:\.\d+)?", r["std_answer"])
            if r["class"] == "math" and numbers and len(r["question"]) < 50:  # fits the tiny model's prompt budget
                rows.append({"question": r["question"], "answer": f"{r['std_answer']}\n#### {numbers[-1]}"})
            if len(rows) == n:
                break
    return rows


def rlaif_rows(n: int) -> list[dict]:
    """MiniMind's rlaif layout: a user turn and an empty reply, with no roles (the first human turns of real chats)."""
    rows = []
    with open(shared("sft/medicalgpt_sharegpt_zh_1K_format.jsonl"), encoding="utf-8") as f:
        for line in f:
            q = json.loads(line)["conversations"][0]["value"]
            if len(q) < 60:
                rows.append({"conversations": [{"content": q}, {"content": ""}]})
            if len(rows) == n:
                break
    return rows


@pytest.mark.slow
def test_rlaif_and_gsm8k_prompts_train_grpo_with_the_gsm8k_rule(pretrained_dir, tmp_path):
    from transformers import AutoTokenizer

    from dataset.prompt_data import load_prompts
    from trainer.rewards import Completion, parse_rules, rule_rewards

    tok = AutoTokenizer.from_pretrained(pretrained_dir)
    gsm = gsm8k_rows(8)
    rlaif = rlaif_rows(8)
    gsm_path = write_jsonl(tmp_path / "gsm8k_train.jsonl", gsm)
    rlaif_path = write_jsonl(tmp_path / "rlaif-mini.jsonl", rlaif)
    prompts = load_prompts(gsm_path, tok, 4096, log=QUIET)
    assert [p["prompt"] for p in prompts] == [[{"role": "user", "content": r["question"]}] for r in gsm]
    assert [p["answer"] for p in prompts] == [r["answer"] for r in gsm]
    prompts_rlaif = load_prompts(rlaif_path, tok, 4096, log=QUIET)
    assert [p["prompt"] for p in prompts_rlaif] == [
        [{"role": "user", "content": r["conversations"][0]["content"]}] for r in rlaif
    ]
    assert all(p["answer"] is None for p in prompts_rlaif)
    # the rule: the reference solution itself scores 1, the same text ending on another number 0
    rules = parse_rules("gsm8k")
    right = [Completion(text=r["answer"].rsplit("\n####", 1)[0], ids=[], answer=r["answer"]) for r in gsm]
    n = re.findall(r"#### (.*)", gsm[0]["answer"])[0]
    wrong = Completion(text=f"答案是 {float(n) + 1:g}", ids=[], answer=gsm[0]["answer"])
    assert rule_rewards(rules, right).tolist() == [1.0] * len(gsm)
    assert rule_rewards(rules, [wrong, Completion(text="不知道", ids=[], answer=gsm[0]["answer"])]).tolist() == [0, 0]

    args = ["seq_len=160", "max_new_tokens=8", "batch_size=8", "global_batch_size=8", "num_generations=4"]
    args += ["max_steps=1", "reward_rules=gsm8k,format", "save_every=0", "dtype=fp32"]
    grpo = run_main_py(tmp_path / "grpo", stage_args("grpo", pretrained_dir, f"{gsm_path},{rlaif_path}", *args))
    assert f"[data] {gsm_path}: 8 prompts" in grpo.stdout and f"[data] {rlaif_path}: 8 prompts" in grpo.stdout
    assert "16 prompts" in grpo.stdout and (tmp_path / "grpo" / "final" / "model.safetensors").is_file()


# -----------------------------------------------------------------------------
# no silent loss


def test_a_file_that_yields_nothing_or_mostly_bad_records_stops_the_run(tmp_path):
    """Under the default skip: a file none of whose records read, or whose bad records are over half of it, stops
    the run naming the file, its first record's shape, the first error and the formats known; skip_file goes on."""
    good = write_jsonl(
        tmp_path / "good.jsonl", [{"prompt": f"问题{i}", "chosen": "好", "rejected": "坏"} for i in range(4)]
    )
    foreign = write_jsonl(tmp_path / "foreign.jsonl", [{"query": "问题", "pos": ["好"], "neg": ["坏"]}] * 3)
    with pytest.raises(UnusableFile) as e:
        load_pairs(f"{good},{foreign}", on_bad="skip", log=QUIET)
    msg = str(e.value)
    assert "foreign.jsonl: 0 preference pairs from 3 records (unknown format: 3)" in msg
    assert "first record {neg: [str], pos: [str], query: str}" in msg and "preferred_output" in msg
    assert "columns=" in msg and "on_bad_record=skip_file" in msg
    logs = []
    pairs, _ = load_pairs(f"{good},{foreign}", on_bad="skip_file", log=logs.append)
    assert len(pairs) == 4 and any("WARNING" in m and "foreign.jsonl" in m for m in logs)
    # a chat file that loses 3 of 5 records stops the run; 2 of 5 is counted and logged
    convs = [
        {"conversations": [{"role": "user", "content": f"问{i}"}, {"role": "assistant", "content": "答"}]}
        for i in range(5)
    ]
    broken = [c if i < 2 else {"conversations": [{"role": "user", "content": "问"}]} for i, c in enumerate(convs)]
    with pytest.raises(UnusableFile, match=r"2 conversations from 5 records \(no assistant turn: 3\)"):
        load_conversations(write_jsonl(tmp_path / "mostly_bad.jsonl", broken), on_bad="skip", log=QUIET)
    fine = [c if i < 3 else broken[4] for i, c in enumerate(convs)]
    assert len(load_conversations(write_jsonl(tmp_path / "ok.jsonl", fine), on_bad="skip", log=QUIET)[0]) == 3
    # an empty file is a lost source too
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UnusableFile, match="no records"):
        load_pairs(str(tmp_path / "empty.jsonl"), on_bad="skip", log=QUIET)


@pytest.mark.slow
def test_dpo_stage_stops_on_a_file_it_cannot_read(pretrained_dir, tmp_path):
    """Through main.py: the UltraFeedback-like file of an unknown schema stops DPO with "error:" and no traceback."""
    bad = write_jsonl(tmp_path / "pairs.jsonl", [{"question": "问题", "good": "好", "bad": "坏"}] * 4)
    r = run_main_py(tmp_path / "dpo", stage_args("dpo", pretrained_dir, bad, "max_steps=1"), check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"error: {bad}: 0 preference pairs from 4 records (unknown format: 4)" in r.stderr


def test_on_bad_error_still_refuses_a_file_that_yields_nothing(tmp_path, tiny_tokenizer_dir):
    """on_bad=error stops at a bad record already; a file with no record, or whose prompts are all too long for
    rollouts (good records left out), must not pass unseen either."""
    from transformers import AutoTokenizer

    from dataset.prompt_data import load_prompts

    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UnusableFile, match="0 conversations from 0 records"):
        load_conversations(str(tmp_path / "empty.jsonl"), on_bad="error", log=QUIET)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "人工智能是计算机科学的一个分支。" * 30}] * 2)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    with pytest.raises(UnusableFile, match=r"0 prompts from 2 records \(prompt too long: 2\)"):
        load_prompts(long, tok, 64, on_bad="error", log=QUIET)
