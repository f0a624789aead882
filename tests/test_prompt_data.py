"""
Rollout prompts (dataset/prompt_data.py): every supported record format becomes a prompt ending with a user turn,
with the reference answer where the data has one; bad and over-long records follow the bad-record policy.

    python -m pytest tests/test_prompt_data.py
"""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from dataset.chat_data import BadRecord
from dataset.preference_data import prompt_ids
from dataset.prompt_data import load_prompts
from dataset.records import UnusableFile


def write_jsonl(path, rows: list) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


RECORDS = [
    {"prompt": "中国的首都是哪里？", "answer": "北京"},  # plain prompt with an answer
    {"prompt": [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"}]},  # messages
    {"prompt": "今天天气怎么样？", "chosen": "很好。", "rejected": "床前明月光。"},  # a preference pair
    {"instruction": "人工智能是什么？", "output": "计算机科学的一个分支。"},  # alpaca: the output is the answer
    {"conversations": [{"from": "human", "value": "hello world"}]},  # sharegpt with no reply yet
]


def test_every_format_becomes_a_prompt_ending_with_user(tiny_tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    prompts = load_prompts(write_jsonl(tmp_path / "p.jsonl", RECORDS), tok, max_prompt_tokens=512, log=lambda *a: None)
    assert [p["prompt"][-1]["content"] for p in prompts] == [
        "中国的首都是哪里？",
        "你好",
        "今天天气怎么样？",
        "人工智能是什么？",
        "hello world",
    ]
    assert all(p["prompt"][-1]["role"] == "user" for p in prompts)
    assert prompts[1]["prompt"][0] == {"role": "system", "content": "你是助手。"}
    assert [p["answer"] for p in prompts] == ["北京", None, None, "计算机科学的一个分支。", None]
    assert all(p["ids"] == prompt_ids(tok, p["prompt"]) for p in prompts)  # ready for generation


def test_bad_long_and_capped_records(tiny_tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    long_prompt = "人工智能是计算机科学的一个分支。" * 20
    rows = [
        {"prompt": "你好"},
        {"prompt": long_prompt},
        {"messages": [{"role": "assistant", "content": "嗯"}]},
        {"prompt": "学校上课吗？"},
        {"prompt": "明月在哪里？"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    logged = []
    limit = len(prompt_ids(tok, [{"role": "user", "content": long_prompt}])) - 1
    kept = load_prompts(path, tok, max_prompt_tokens=limit, on_bad="skip", log=logged.append)
    assert [p["prompt"][-1]["content"] for p in kept] == ["你好", "学校上课吗？", "明月在哪里？"]
    assert any("2 records skipped" in line for line in logged)
    capped = load_prompts(f"{path},{path}", tok, limit, on_bad="skip", max_samples=2, log=lambda *a: None)
    assert [p["prompt"][-1]["content"] for p in capped] == ["你好", "学校上课吗？"] * 2  # max_samples is per file
    with pytest.raises(BadRecord, match=r"p\.jsonl:3"):
        load_prompts(path, tok, max_prompt_tokens=limit, on_bad="error", log=lambda *a: None)


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"prompt": [{"content": "x"}]}, "turn without role/content"),
        ({"prompt": 5}, "prompt is int, not a string or a message list"),
        ({"prompt": {"a": 1}}, "prompt is dict, not a string or a message list"),
        ({"prompt": [5]}, "a turn is not an object"),
        ({"prompt": [{"role": "user", "content": 7}]}, "not a string"),
        ({"instruction": "问", "output": "答", "history": 5}, "history is int, not a list of pairs"),
        ({"instruction": "问", "output": "答", "history": "ab"}, "history is str, not a list of pairs"),
    ],
)
def test_malformed_prompt_records_are_bad_records_not_tracebacks(tiny_tokenizer_dir, tmp_path, record, problem):
    """Each raised a raw KeyError or TypeError, even with on_bad=skip; now it is skipped, or names file:line."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "你好"}, record])
    kept = load_prompts(path, tok, max_prompt_tokens=512, on_bad="skip", log=lambda *a: None)
    assert [p["prompt"][-1]["content"] for p in kept] == ["你好"]
    with pytest.raises(BadRecord, match=rf"p\.jsonl:2.*{problem}"):
        load_prompts(path, tok, max_prompt_tokens=512, on_bad="error", log=lambda *a: None)


KEYS = ["prompt", "answer", "chosen", "rejected", "instruction", "output", "input", "history", "system", "messages"]
KEYS += ["conversations", "role", "content", "from", "value", "human", "assistant", "tools", "weight"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.sampled_from(["", "你好", "user"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(st.dictionaries(st.sampled_from(KEYS), JSON_VALUES, max_size=5) | JSON_VALUES, max_size=4))
def test_fuzzed_prompt_records_are_kept_skipped_or_a_bad_record(tiny_tokenizer_dir, tmp_path, records):
    """Any JSON at all: with on_bad=skip_file, load_prompts never raises; with on_bad=skip, at most UnusableFile (a
    file that yields nothing or loses over half its records); with on_bad=error, only BadRecord."""
    tok = load_tokenizer_once(tiny_tokenizer_dir)
    path = write_jsonl(tmp_path / "fuzz.jsonl", records)
    kept = load_prompts(path, tok, max_prompt_tokens=512, on_bad="skip_file", log=lambda *a: None)
    try:
        assert load_prompts(path, tok, max_prompt_tokens=512, on_bad="skip", log=lambda *a: None) == kept
    except UnusableFile:
        pass
    assert all(p["prompt"][-1]["role"] == "user" for p in kept)
    try:
        load_prompts(path, tok, max_prompt_tokens=512, on_bad="error", log=lambda *a: None)
    except BadRecord:
        pass


_TOKENIZERS = {}


def load_tokenizer_once(path):
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path)
    return _TOKENIZERS[path]
