"""
The tokenizer stage (trainer/train_tokenizer.py): round trips, special ids, chat template, report, Han splitting.

    python -m pytest tests/test_tokenizer.py
"""

import json
import os
from pathlib import Path

import pytest

from trainer.train_tokenizer import QWEN2_PATTERN, Config, run, split_han_runs

PACK = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pretrain"


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.mark.parametrize(
    "text",
    [
        "你好，世界！Hello, world.",
        "emoji 👍🏽👨‍👩‍👧 ok",
        "𠀀𪚥龘 rare Han, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
        "Здравствуйте, مرحبا, こんにちは, 안녕",
        "  leading and trailing spaces  \n\n\ttabs\r\n",
        "e\u0301 (decomposed) vs é",
        "\x00\u200b\ufeff control",
        "",
        "<|endoftext|> is text here",
        "数学" * 300,
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_special_token_ids(tok):
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    assert [tok.convert_tokens_to_ids(t) for t in names] == [0, 1, 2, 3]
    assert tok.eos_token_id == 0 and tok.pad_token_id == 3
    assert tok.encode("<|im_start|>user", add_special_tokens=False)[0] == 1
    assert tok.encode("你好", add_special_tokens=True) == tok.encode("你好", add_special_tokens=False)  # no BOS added


def test_chat_template_and_assistant_mask(tok):
    msgs = [
        {"role": "system", "content": "你是助手"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|im_start|>system\n你是助手<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n你好！<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(msgs[:2], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    out = tok.apply_chat_template(msgs, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "你好！<|im_end|>"


def test_pre_tokenizer_is_qwen2(tiny_tokenizer_dir):
    tj = json.load(open(os.path.join(tiny_tokenizer_dir, "tokenizer.json"), encoding="utf-8"))
    pre = tj["pre_tokenizer"]["pretokenizers"]
    assert pre[0]["type"] == "Split" and pre[0]["pattern"]["Regex"] == QWEN2_PATTERN
    assert pre[1] == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    assert tj["normalizer"] is None


def test_report_written(tiny_tokenizer_dir):
    rep = json.load(open(os.path.join(tiny_tokenizer_dir, "tokenizer_report.json"), encoding="utf-8"))
    assert rep["vocab_size"] == 512 and rep["single_cjk_tokens"] > 20
    ((src, r),) = rep["heldout"].items()  # one source file; its held-out documents were not trained on
    assert r["docs"] > 0 and r["chars_per_token"] > 1.0 and r["bytes_per_token"] > 1.5


def test_split_han_runs():
    assert split_han_runs("一二三四五六七八九十abc一二", 4) == "一二三四\n五六七八\n九十abc一二"
    assert split_han_runs("short 短", 4) == "short 短"
    # rare pieces (3+ chars, not in `common`) become their overlapping pairs: same adjacent pairs, fewer distinct words
    common = {"一二三四", "五六", "六七", "七八", "三四", "四五"}
    assert split_han_runs("一二三四五六七八九十，三四五", 4, common) == "一二三四\n五六\n六七\n七八\n九十，三四\n四五"
    # pairs seen once are dropped; a character in no kept pair is fed alone
    assert split_han_runs("甲乙丙丁", 4, {"乙丙"}) == "甲\n乙丙\n丁"
    assert split_han_runs("甲乙丙丁", 4, set()) == "甲\n乙\n丙\n丁"


def test_bad_config(tmp_path):
    with pytest.raises(ValueError, match="data_path is empty"):
        run(Config(data_path="", out_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        run(Config(data_path=str(tmp_path / "nope.jsonl"), out_dir=str(tmp_path)))
    (tmp_path / "a.txt").write_text("你好" * 100, encoding="utf-8")
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        run(Config(data_path=str(tmp_path / "a.txt"), vocab_size=100, out_dir=str(tmp_path)))


def test_folders_and_globs_read_like_the_list_of_their_files(tmp_path):
    """data_path and eval_path go through text_sources.expand_paths, the path contract of every reader: a folder
    or a glob trains the tokenizer the list of its files trains, and reports on the same held-out files."""
    from tests.helpers import pretrain_corpus

    lines = pretrain_corpus(200)
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "held").mkdir()
    a = tmp_path / "corpus" / "a.jsonl"
    a.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in lines[:120]), encoding="utf-8")
    b = tmp_path / "corpus" / "sub" / "b.txt"
    b.write_text("\n\n".join(lines[120:180]), encoding="utf-8")
    (tmp_path / "held" / "h.txt").write_text("\n\n".join(lines[180:]), encoding="utf-8")

    def train(name: str, data_path: str, eval_path: str) -> tuple[str, dict]:
        out = tmp_path / name
        cfg = Config(data_path=data_path, eval_path=eval_path, vocab_size=300, out_dir=str(out), min_frequency=1)
        report = run(cfg)
        return (out / "tokenizer.json").read_text(encoding="utf-8"), report["heldout"]

    files = train("files", f"{a},{b}", str(tmp_path / "held" / "h.txt"))
    assert "eval:h.txt" in files[1]
    assert train("folders", str(tmp_path / "corpus"), str(tmp_path / "held")) == files
    corpus = tmp_path / "corpus"
    assert train("globs", f"{corpus}/*.jsonl, {corpus}/*/*.txt", str(tmp_path / "held" / "*.txt")) == files


@pytest.mark.slow
def test_real_pack_compression(tmp_path):
    """A small vocab on a slice of real text: held-out poetry and wiki are measured and compress."""
    wiki = PACK / "zh" / "zhwiki_wikiextractor_json_wiki_00.jsonl"
    poetry = PACK / "zh" / "chinese_poetry_songci_ci.song.json.gz"
    if not wiki.exists():
        pytest.skip("shared data pack not present")
    rep = run(
        Config(
            data_path=f"{wiki},{poetry}",
            vocab_size=600,
            out_dir=str(tmp_path),
            max_bytes=1_500_000,
            heldout_every=20,
            heldout_max_bytes=100_000,
        )
    )
    assert rep["fed_bytes"] <= 1_500_000 + 200_000  # the sample stops at max_bytes (plus one document)
    for name in (wiki.name, poetry.name):
        assert rep["heldout"][name]["cjk_chars_per_token"] > 0.4
    assert rep["single_cjk_tokens"] > 50


def test_token_byte_lengths_add_up_to_the_utf8_bytes(tok):
    """Bits per byte (pretraining's eval, the eval stage) divide by these: they must be the text's true size."""
    from dataset.tokenizer import byte_level_alphabet, token_byte_lengths

    alphabet = byte_level_alphabet()
    assert sorted(alphabet) == list(range(256)) and len(set(alphabet.values())) == 256  # a byte <-> char bijection
    lengths = token_byte_lengths(tok)
    assert len(lengths) == len(tok) and all(lengths[i] == 0 for i in tok.all_special_ids)
    for text in ("北京是中国的首都。", "hello world 123", "春眠不觉晓，处处闻啼鸟 🙂"):
        ids = tok.encode(text, add_special_tokens=False)
        assert sum(lengths[i] for i in ids) == len(text.encode("utf-8")), text
