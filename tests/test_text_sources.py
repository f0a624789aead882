"""
Readers and cleaning rules of dataset/text_sources.py, and the corpus cleaner (dataset/corpus.py, command line
scripts/zh_simplify.py) end to end, with bounded memory on a 50 MB line.

    python -m pytest tests/test_text_sources.py
"""

import gzip
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dataset.text_sources import (
    LONG_DOC_FACTOR,
    FilterConfig,
    clean_text,
    dedup_key,
    iter_corpus,
    iter_documents,
    iter_lines,
    keep_document,
    make_converter,
    resolve_mw_markup,
    split_document,
)

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT.parent / "shared" / "data" / "pretrain"


def _clean(text: str) -> str:
    return clean_text(text, make_converter()[1], Counter())


# -----------------------------------------------------------------------------
# readers: every input kind


WIKI = '<doc id="1" url="u" title="数学">\n数学\n\n数学是一门学科。\n</doc>\n<doc id="2" url="u" title="物理">\n物理学\n</doc>\n'  # noqa: E501


def test_wikiextractor_plain_and_gz(tmp_path):
    (tmp_path / "AA").mkdir()
    (tmp_path / "AA" / "wiki_00").write_text(WIKI, encoding="utf-8")
    with gzip.open(tmp_path / "AA" / "wiki_01.gz", "wt", encoding="utf-8") as f:
        f.write(WIKI)
    docs = list(iter_corpus([str(tmp_path)]))
    assert [d["title"] for d in docs] == ["数学", "物理", "数学", "物理"]
    assert docs[0]["text"] == "数学\n\n数学是一门学科。\n"


def test_wikiextractor_json_jsonl_txt(tmp_path):
    (tmp_path / "wiki_00").write_text(
        json.dumps({"id": "1", "title": "甲", "text": "甲乙丙"}, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    assert [d["text"] for d in iter_documents(str(tmp_path / "wiki_00"))] == ["甲乙丙"]
    (tmp_path / "a.jsonl").write_text('{"content": "政府工作报告"}\n\n{"text": "第二"}\n', encoding="utf-8")
    assert [d["text"] for d in iter_documents(str(tmp_path / "a.jsonl"))] == ["政府工作报告", "第二"]
    (tmp_path / "a.txt").write_text("第一段。\n\n第二段。\n", encoding="utf-8")
    assert [d["text"] for d in iter_documents(str(tmp_path / "a.txt"), max_doc_chars=1)] == ["第一段。\n", "第二段。\n"]
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "压缩"}\n')
    assert [d["text"] for d in iter_documents(str(tmp_path / "b.jsonl.gz"))] == ["压缩"]


def test_json_squad_and_poetry(tmp_path):
    squad = {
        "version": "1",
        "data": [{"title": "t", "paragraphs": [{"context": "段落一", "qas": []}, {"context": "段落二", "qas": []}]}],
    }
    (tmp_path / "s.json").write_text(json.dumps(squad, ensure_ascii=False), encoding="utf-8")
    assert [d["text"] for d in iter_documents(str(tmp_path / "s.json"))] == ["段落一", "段落二"]
    poems = [{"title": "静夜思", "author": "李白", "paragraphs": ["床前明月光，", "疑是地上霜。"], "id": "x"}]
    (tmp_path / "p.json").write_text(json.dumps(poems, ensure_ascii=False), encoding="utf-8")
    assert next(iter_documents(str(tmp_path / "p.json")))["text"] == "静夜思\n李白\n床前明月光，\n疑是地上霜。"


# -----------------------------------------------------------------------------
# bad input: clear errors that name the file and line


@pytest.mark.parametrize(
    "content,match",
    [
        (b'{"text": "ok"}\n{"text": "broken"\n', r"bad\.jsonl:2: malformed JSON"),
        (b'{"text": "ok"}\n{"body": "x"}\n', r"bad\.jsonl:2: no string field 'text' or 'content'"),
        (b'{"text": "ok"}\n{"text": "\xb9\xfa"}\n', r"bad\.jsonl:2: not valid UTF-8"),
        (b"\n  \n", r"bad\.jsonl: empty source"),
    ],
)
def test_bad_input_errors(tmp_path, content, match):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        list(iter_documents(str(p)))


def test_bad_encoding_txt_names_line(tmp_path):
    p = tmp_path / "gbk.txt"
    p.write_bytes("第一行\n".encode() + "中国\n".encode("gbk"))
    with pytest.raises(ValueError, match=r"gbk\.txt:2: not valid UTF-8"):
        list(iter_documents(str(p)))


def test_unclosed_wiki_doc(tmp_path):
    p = tmp_path / "wiki_00"
    p.write_text('<doc id="1" title="x">\n文本\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"wiki_00:1: <doc> never closed"):
        list(iter_documents(str(p)))


# -----------------------------------------------------------------------------
# cleaning rules


def test_traditional_to_simplified():
    assert _clean("數學是研究數量、結構的學科。") == "数学是研究数量、结构的学科。"
    assert make_converter("zhconv")[1]("體") == "体"  # the fallback engine converts too


def test_mw_conversion_markup():
    assert resolve_mw_markup("航-{zh-cn:天; zh-tw:太}-飞机") == "航天飞机"
    assert resolve_mw_markup("-{H|zh-hant:心裡學;zh-hans:心里学;}-心理学-{于}-") == "心理学于"
    assert _clean("這是-{zh-cn:域;zh-tw:體}-名") == "这是域名"


def test_brackets_punct_html_whitespace_fullwidth():
    assert _clean("萬民福音部（）是（；）教廷（，）的() 機構") == "万民福音部是教廷的 机构"
    assert _clean("原名传信部（，意为圣部）") == "原名传信部（意为圣部）"
    assert _clean("好。。。真的？？？……等等——") == "好。真的？……等等——"
    assert _clean("a<br/>b &amp; c<!-- x -->\x00\u200b") == "ab & c"
    assert _clean("  第一行  \n\n\n\n\u3000\u3000第二行\t\t结束 ") == "第一行\n\n第二行 结束"
    assert _clean("ＡＢＣ１２３，全角标点保留。") == "ABC123，全角标点保留。"


def test_filters_and_dedup():
    cfg = FilterConfig(min_chars=8, min_cjk_ratio=0.5)
    assert keep_document("太短了", cfg) == "too_short"
    assert keep_document("this is an English sentence only 中", cfg) == "mostly_non_cjk"
    assert keep_document("这是一个足够长的中文句子。", cfg) is None
    assert keep_document("English is kept when the ratio is zero", FilterConfig(min_cjk_ratio=0)) is None
    assert dedup_key("你好，世界！") == dedup_key("你好 世界") != dedup_key("你好世")


# -----------------------------------------------------------------------------
# the script end to end (two workers, summary, dedup across files)


def test_zh_simplify_script(tmp_path):
    (tmp_path / "a.txt").write_text("這是第一篇文章，內容已經足夠長了。\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "这是第一篇文章，内容已经足够长了。"}, ensure_ascii=False) + '\n{"text": "短"}\n',
        encoding="utf-8",
    )
    out = tmp_path / "out.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "zh_simplify.py"),
            "--input",
            str(tmp_path / "a.txt"),
            str(tmp_path / "b.jsonl"),
            "--output",
            str(out),
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [x["text"] for x in rows] == ["这是第一篇文章，内容已经足够长了。"]
    assert "3 in -> 1 out" in r.stdout and "duplicate 1" in r.stdout and "too short 1" in r.stdout


def test_real_pack_wiki_is_clean():
    wiki = PACK / "zh" / "zhwiki_wikiextractor_json_wiki_00.jsonl"
    if not wiki.exists():
        pytest.skip("shared data pack not present")
    convert = make_converter()[1]
    for i, d in enumerate(iter_documents(str(wiki))):
        text = clean_text(d["text"], convert, Counter())
        assert "-{" not in text and "（）" not in text and "()" not in text
        if i == 50:
            break
    assert "數" not in text and "學" not in text


# -----------------------------------------------------------------------------
# huge lines and documents: read in bounded pieces, split at sentence ends, nothing lost


def test_split_document_prefers_paragraphs_then_sentences_and_loses_nothing():
    text = "第一段很长。" * 3 + "\n\n" + "第二段。第二句，逗号后" * 4 + "x" * 40
    pieces = list(split_document(text, 30))
    assert "".join(pieces) == text and all(len(p) <= 30 for p in pieces)
    assert pieces[0] == "第一段很长。" * 3 + "\n\n"  # the paragraph break, though a sentence end comes later
    assert all(p.endswith(("。", "，")) for p in pieces[1:-2])  # sentence (or clause) ends, never mid-word
    assert list(split_document("x" * 70, 30)) == ["x" * 30, "x" * 30, "x" * 10]  # no break at all: a hard cut
    assert list(split_document("短", 30)) == ["短"]


def test_long_line_is_read_in_pieces_with_its_line_number(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("头\n" + "中文" * 50_000 + "\n尾\n", encoding="utf-8")  # 300 kB line: characters cut across pieces
    lines = list(iter_lines(str(p), max_line_bytes=1 << 16))
    assert [n for n, _ in lines[:2]] == [1, 2] and {n for n, _ in lines[1:-1]} == {2} and lines[-1] == (3, "尾\n")
    assert "".join(t for n, t in lines if n == 2) == "中文" * 50_000 + "\n"
    assert all(len(t.encode()) <= (1 << 16) + 3 for _, t in lines)  # + the bytes of a character cut in two
    docs = [d["text"] for d in iter_documents(str(p), max_doc_chars=1000)]
    assert "".join(docs) == p.read_text(encoding="utf-8") and max(map(len, docs)) <= LONG_DOC_FACTOR * 1000


def test_zh_simplify_splits_a_huge_jsonl_document(tmp_path):
    rng = np.random.default_rng(1)
    text = "".join(
        "".join(rng.choice(list("的一是不了人我在有他这为之大来以个中上们到说和地也子时道出"), 30)) + "。"
        for _ in range(2000)
    )  # one 62,000-character document
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "zh_simplify.py"),
            "--input",
            str(tmp_path / "a.jsonl"),
            "--output",
            str(out),
            "--max_doc_chars",
            "1000",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x)["text"] for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 62_000 // (LONG_DOC_FACTOR * 1000) and all(len(x) <= LONG_DOC_FACTOR * 1000 for x in rows)
    assert all(x.endswith("。") for x in rows) and "".join(rows) == text
    assert "long documents split at paragraph/sentence ends: 1 " in r.stdout


# The child cleans one ~50 MB line of Chinese with no newline and reports its peak RSS growth, its own or its worker
# processes' (RUSAGE_CHILDREN: the largest reaped child), over what it used before the run.
_MEASURE = """
import json, resource, sys
from dataset.corpus import simplify
from dataset.text_sources import FilterConfig

def peak():
    return 1024 * max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)

before = peak()
stats = simplify([sys.argv[1]], sys.argv[2], FilterConfig(), workers=2, quiet=True)
print(json.dumps({"growth": peak() - before, "stats": stats}))
"""


@pytest.mark.slow
def test_zh_simplify_memory_is_bounded_on_a_50mb_line(tmp_path):
    # Already-simplified characters with a full stop every 37, so cleaning changes nothing and the output can be
    # compared with the input character for character.
    alphabet = (
        "的一是不了人我在有他这为之大来以个中上们到说和地也子时道出而要于就下得可你年生自会那后能对着事其所去行家十"
    )
    codes = np.array([ord(c) for c in alphabet], dtype=np.uint32)[
        np.random.default_rng(0).integers(0, len(alphabet), 17_000_000)
    ]
    codes[36::37] = ord("。")
    text = codes.astype("<u4").tobytes().decode("utf-32-le")
    src, out = tmp_path / "one_line.txt", tmp_path / "clean.jsonl"
    src.write_text(text, encoding="utf-8")
    size = src.stat().st_size
    assert size > 50e6 and "\n" not in text
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["growth"] < 8 * size, (
        f"peak RSS grew by {report['growth'] / 1e6:.0f} MB for a {size / 1e6:.0f} MB line"
    )
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    limit = LONG_DOC_FACTOR * FilterConfig().max_doc_chars
    assert len(rows) > 1 and all(len(x["text"]) <= limit for x in rows)  # split ...
    assert "".join(x["text"] for x in rows) == text  # ... not dropped: every character is there, in order


# -----------------------------------------------------------------------------
# expand_paths: the one contract of every path setting (text, chat, preference and prompt data)


def test_expand_paths_files_folders_patterns_and_errors(tmp_path):
    from dataset.text_sources import expand_paths

    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.jsonl", "d/a.jsonl", "d/sub/c.txt", "d/.hidden", "x.json", "y.json"):
        (tmp_path / name).write_text("{}\n")
    d, x, y = str(tmp_path / "d"), str(tmp_path / "x.json"), str(tmp_path / "y.json")
    folder = [str(tmp_path / n) for n in ("d/a.jsonl", "d/b.jsonl", "d/sub/c.txt")]  # sorted, hidden left out
    assert expand_paths([d]) == folder
    # A comma-separated string and a list mean the same; items keep their order, a pattern's matches are sorted.
    assert expand_paths(f"{y}, {tmp_path / 'd'}") == expand_paths([y, d]) == [y, *folder]
    assert expand_paths(str(tmp_path / "*.json")) == [x, y]
    assert expand_paths(str(tmp_path / "[d]")) == folder  # a pattern may match a folder
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        expand_paths([x, str(tmp_path / "nope.jsonl")])
    with pytest.raises(FileNotFoundError, match=r"z\*.json"):
        expand_paths(str(tmp_path / "z*.json"))
    # A folder leaves out what describes a dataset (datasets' JSON bookkeeping, a Hub card: README.md with YAML
    # front matter); a README.md of plain text is data, and a metadata file named on its own is read as asked.
    (tmp_path / "d" / "dataset_info.json").write_text('{"license": "mit"}')
    (tmp_path / "d" / "README.md").write_text("---\nlicense: mit\n---\n# card\n")
    (tmp_path / "d" / "sub" / "README.md").write_text("# 说明\n正文。\n", encoding="utf-8")
    assert expand_paths([d]) == folder[:2] + [str(tmp_path / "d/sub/README.md")] + folder[2:]
    assert expand_paths([str(tmp_path / "d" / "README.md")]) == [str(tmp_path / "d" / "README.md")]
    (tmp_path / "empty").mkdir()
    for nothing in ("", " , ", [str(tmp_path / "empty")]):
        with pytest.raises(ValueError, match="no data files"):
            expand_paths(nothing)
