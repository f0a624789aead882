"""
Data formats people download, in every stage that reads files: Hugging Face `datasets` files (parquet, Arrow IPC
file and stream, save_to_disk folders) give the same records as the equivalent JSONL; Firefly-style pair turns and
the columns= key mapping; binary inputs and raw Wikipedia dumps refused by what they are; the missing-pyarrow
message; bad bytes and truncated .gz in the chat/preference readers named by file and line; files written by the
`datasets` library itself (a fresh process, skipped without it), Arrow JSON columns included.

    python -m pytest tests/test_data_formats.py
"""

import builtins
import bz2
import gzip
import json
import lzma
import os
import sqlite3
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.chat_data import load_conversations, parse_columns
from dataset.preference_data import load_pairs
from dataset.records import BadRecord, TruncatedFile
from dataset.text_sources import expand_paths, iter_documents
from tests.helpers import write_saved_dataset

ROOT = Path(__file__).resolve().parents[1]

TEXTS = [f"第{i}篇文档：我们今天学习数学和语言。" + "人工智能是计算机科学的一个分支。" * (i % 3) for i in range(40)]
CONVS = [
    {
        "conversations": [
            {"role": "user", "content": f"问题{i}：中国的首都是哪里？"},
            {"role": "assistant", "content": f"北京是中国的首都。{i}"},
        ]
    }
    for i in range(12)
]
PAIRS = [{"prompt": f"问题{i}？", "chosen": f"好的回答{i}", "rejected": f"坏的回答{i}"} for i in range(12)]


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return str(path)


def read_texts(path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def write_tables(tmp_path, rows, name: str) -> dict:
    """The same rows as parquet (2 row groups), Arrow IPC file, Arrow IPC stream and a save_to_disk folder
    (two .arrow stream files listed in state.json, as `datasets` writes them)."""
    pa = pytest.importorskip("pyarrow")
    pytest.importorskip("pyarrow.ipc")  # the submodules pa.ipc and pa.parquet exist once imported
    pytest.importorskip("pyarrow.parquet")
    table = pa.Table.from_pylist(rows)
    out = {
        "parquet": str(tmp_path / f"{name}.parquet"),
        "arrow_file": str(tmp_path / f"{name}_file.arrow"),
        "arrow_stream": str(tmp_path / f"{name}_stream.arrow"),
        "dir": str(tmp_path / f"{name}_saved"),
    }
    pa.parquet.write_table(table, out["parquet"], row_group_size=max(1, len(rows) // 2))
    with pa.ipc.new_file(out["arrow_file"], table.schema) as w:
        for batch in table.to_batches(max_chunksize=5):
            w.write_batch(batch)
    with pa.ipc.new_stream(out["arrow_stream"], table.schema) as w:
        w.write_table(table, max_chunksize=5)
    write_saved_dataset(out["dir"], table, n_files=2)
    return out


TABLE_KINDS = ("parquet", "arrow_file", "arrow_stream", "dir")


# -----------------------------------------------------------------------------
# text stages: corpus, tokenizer, shards, eval


@pytest.mark.parametrize("kind", TABLE_KINDS)
def test_text_documents_from_tables_equal_jsonl(tmp_path, kind):
    rows = [{"id": i, "text": t, "title": f"t{i}"} for i, t in enumerate(TEXTS)]
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    path = write_tables(tmp_path, rows, "a")[kind]
    want = [(d["text"], d["title"], d["line"]) for d in iter_documents(jsonl)]
    assert [(d["text"], d["title"], d["line"]) for d in iter_documents(path)] == want
    # text_column picks another column, as text_fields does for JSONL
    rows2 = [{"body": t, "text": "wrong"} for t in TEXTS]
    path2 = write_tables(tmp_path, rows2, "b")[kind]
    assert [d["text"] for d in iter_documents(path2, ("body",))] == TEXTS
    with pytest.raises(ValueError, match=r"no column 'content'.*columns: body, text.*text_column="):
        next(iter_documents(path2, ("content",)))


def test_save_to_disk_folder_is_one_input(tmp_path):
    saved = write_tables(tmp_path, [{"text": t} for t in TEXTS], "a")["dir"]
    assert expand_paths([saved]) == [saved]
    (tmp_path / "corpus").mkdir()
    os.rename(saved, tmp_path / "corpus" / "saved")
    write_jsonl(tmp_path / "corpus" / "z.jsonl", [{"text": "另一个文件"}])
    found = expand_paths([str(tmp_path / "corpus")])
    assert found == [str(tmp_path / "corpus" / "z.jsonl"), str(tmp_path / "corpus" / "saved")]  # files, then folders
    assert expand_paths(str(tmp_path / "corpus" / "saved")) == [str(tmp_path / "corpus" / "saved")]
    # a DatasetDict folder holds several splits: the reader asks which, instead of mixing train and test
    os.makedirs(tmp_path / "dd")
    os.rename(tmp_path / "corpus" / "saved", tmp_path / "dd" / "train")
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(ValueError, match=r"DatasetDict.*splits: train.*dd/train"):
        expand_paths([str(tmp_path / "dd")])


def test_shards_from_parquet_equal_shards_from_jsonl(tiny_tokenizer_dir, tmp_path):
    import dataset.shard_writer as sw
    from dataset.shards import load_meta, open_shard

    rows = [{"text": t} for t in TEXTS]
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    tables = write_tables(tmp_path, rows, "a")
    outs = {}
    for kind, path in (("jsonl", jsonl), ("parquet", tables["parquet"]), ("dir", tables["dir"])):
        out = str(tmp_path / f"s_{kind}")
        sw.prepare(tiny_tokenizer_dir, [path], out, shard_mb=0.001, val_tokens=0, seed=3, quiet=True)
        meta = load_meta(out)
        outs[kind] = np.concatenate([np.asarray(open_shard(out, s, meta["dtype"])) for s in meta["train_shards"]])
    assert len(outs["jsonl"]) > len(TEXTS)
    assert np.array_equal(outs["parquet"], outs["jsonl"]) and np.array_equal(outs["dir"], outs["jsonl"])


@pytest.mark.slow
def test_prepare_shards_command_line_reads_another_column(tiny_tokenizer_dir, tmp_path):
    """scripts/prepare_shards.py --text_column: a parquet file whose text is in "body" gives the shards of the
    JSONL with "text"; without the flag it exits naming the columns and the flag."""
    import subprocess
    import sys

    import dataset.shard_writer as sw
    from dataset.shards import load_meta, open_shard

    def shards(out) -> np.ndarray:
        meta = load_meta(out)
        return np.concatenate([np.asarray(open_shard(out, s, meta["dtype"])) for s in meta["train_shards"]])

    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS])
    parquet = write_tables(tmp_path, [{"id": i, "body": t} for i, t in enumerate(TEXTS)], "b")["parquet"]
    cmd = [sys.executable, str(ROOT / "scripts" / "prepare_shards.py"), "--tokenizer", tiny_tokenizer_dir]
    cmd += ["--shard_mb", "0.001", "--val_tokens", "0", "--seed", "3", "--workers", "1"]
    runs = {}
    for name, extra in (("body", [parquet, "--text_column", "body"]), ("none", [parquet])):
        out = str(tmp_path / f"s_{name}")
        runs[name] = subprocess.run([*cmd, "--out_dir", out, "--inputs", *extra], capture_output=True, text=True)
    assert runs["body"].returncode == 0, runs["body"].stderr
    sw.prepare(tiny_tokenizer_dir, [jsonl], str(tmp_path / "s_jsonl"), shard_mb=0.001, val_tokens=0, seed=3, quiet=True)
    assert np.array_equal(shards(str(tmp_path / "s_body")), shards(str(tmp_path / "s_jsonl")))
    assert runs["none"].returncode != 0
    assert "no column 'text' or 'content' (columns: id, body)" in runs["none"].stderr, runs["none"].stderr
    assert "--text_column" in runs["none"].stderr


def test_tokenizer_from_parquet_equals_tokenizer_from_jsonl(tmp_path):
    from trainer.train_tokenizer import Config, run

    rows = [{"text": t} for t in TEXTS * 3]
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    parquet = write_tables(tmp_path, [{"body": r["text"]} for r in rows], "a")["parquet"]
    run(Config(data_path=jsonl, vocab_size=300, out_dir=str(tmp_path / "t1"), min_frequency=1, seed=0))
    run(
        Config(
            data_path=parquet, text_column="body", vocab_size=300, out_dir=str(tmp_path / "t2"), min_frequency=1, seed=0
        )
    )
    a = json.loads((tmp_path / "t1" / "tokenizer.json").read_text())["model"]
    b = json.loads((tmp_path / "t2" / "tokenizer.json").read_text())["model"]
    assert a["vocab"] == b["vocab"] and a["merges"] == b["merges"] and len(a["vocab"]) == 300


def test_eval_ppl_windows_from_tables_equal_jsonl(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from trainer.eval import ppl_windows

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    rows = [{"text": t} for t in TEXTS]
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    tables = write_tables(tmp_path, [{"content": t} for t in TEXTS], "a")
    want = ppl_windows(jsonl, tok, 16, 0)
    assert want.shape[0] > 10
    for kind in ("parquet", "dir"):
        assert torch.equal(ppl_windows(tables[kind], tok, 16, 0), want)
    assert torch.equal(ppl_windows(tables["arrow_file"], tok, 16, 0, text_column="content"), want)


# -----------------------------------------------------------------------------
# record stages: SFT, DPO / reward, RL prompts


@pytest.mark.parametrize("kind", TABLE_KINDS)
def test_chat_pairs_and_prompts_from_tables_equal_jsonl(tiny_tokenizer_dir, tmp_path, kind):
    from transformers import AutoTokenizer

    from dataset.prompt_data import load_prompts

    quiet = lambda *a: None
    jsonl = write_jsonl(tmp_path / "c.jsonl", CONVS)
    table = write_tables(tmp_path, CONVS, "c")[kind]
    want, _ = load_conversations(jsonl, log=quiet)
    got, stats = load_conversations(table, log=quiet)
    assert got == want and len(got) == len(CONVS) and stats["records"] == len(CONVS)

    pj = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    pt = write_tables(tmp_path, PAIRS, "p")[kind]
    assert load_pairs(pt, log=quiet)[0] == load_pairs(pj, log=quiet)[0]

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert load_prompts(table, tok, 256, log=quiet) == load_prompts(jsonl, tok, 256, log=quiet)
    assert len(load_prompts(pt, tok, 256, log=quiet)) == len(PAIRS)


def test_bad_table_rows_are_named_by_row(tmp_path):
    rows = CONVS[:3] + [{"conversations": [{"role": "robot", "content": "x"}]}] + CONVS[3:5]
    path = write_tables(tmp_path, rows, "c")["parquet"]
    with pytest.raises(BadRecord, match=r"c\.parquet:row 4: unknown role"):
        load_conversations(path, log=lambda *a: None)
    convs, stats = load_conversations(path, on_bad="skip", log=lambda *a: None)
    assert len(convs) == 5 and stats["skip:unknown role"] == 1


FIREFLY = [
    {
        "conversation_id": i,
        "category": "Brainstorming",
        "conversation": [
            {"human": f"你好{i}", "assistant": f"你好！有什么可以帮你？{i}"},
            {"human": "讲个笑话", "assistant": "从前有一座山。"},
        ],
        "dataset": "moss",
    }
    for i in range(6)
]
FIREFLY_AS_MESSAGES = [
    [
        {"role": "user", "content": f"你好{i}"},
        {"role": "assistant", "content": f"你好！有什么可以帮你？{i}"},
        {"role": "user", "content": "讲个笑话"},
        {"role": "assistant", "content": "从前有一座山。"},
    ]
    for i in range(6)
]


def test_firefly_pairs_load_as_they_are_and_columns_maps_other_schemas(tmp_path):
    quiet = lambda *a: None
    jsonl = write_jsonl(tmp_path / "firefly.jsonl", FIREFLY)
    assert load_conversations(jsonl, log=quiet)[0] == FIREFLY_AS_MESSAGES
    table = write_tables(tmp_path, FIREFLY, "firefly")["parquet"]
    assert load_conversations(table, log=quiet)[0] == FIREFLY_AS_MESSAGES
    # the brief's mapping: conversation -> messages, human -> user, assistant stays
    cols = parse_columns("conversation=messages,human=user,assistant=assistant")
    assert load_conversations(jsonl, log=quiet, columns=cols)[0] == FIREFLY_AS_MESSAGES
    # a schema no reader knows: {"dialog": [{"q", "a"}], "persona"} -> pairs with a system turn
    odd = [
        {
            "dialog": [{"q": m[0]["content"], "a": m[1]["content"]}, {"q": m[2]["content"], "a": m[3]["content"]}],
            "persona": "你是助手。",
        }
        for m in FIREFLY_AS_MESSAGES
    ]
    odd_path = write_jsonl(tmp_path / "odd.jsonl", odd)
    with pytest.raises(BadRecord, match="unknown format"):
        load_conversations(odd_path, log=quiet)
    mapped, _ = load_conversations(
        odd_path, log=quiet, columns=parse_columns("dialog=conversations, q=user, a=assistant, persona=system")
    )
    assert mapped == [[{"role": "system", "content": "你是助手。"}] + m for m in FIREFLY_AS_MESSAGES]
    # ... and the same mapping on preference data and on table rows
    prefs = [{"question": p["prompt"], "good": p["chosen"], "bad": p["rejected"]} for p in PAIRS]
    pcols = parse_columns("question=prompt,good=chosen,bad=rejected")
    want = load_pairs(write_jsonl(tmp_path / "p.jsonl", PAIRS), log=quiet)[0]
    assert load_pairs(write_jsonl(tmp_path / "q.jsonl", prefs), log=quiet, columns=pcols)[0] == want
    assert load_pairs(write_tables(tmp_path, prefs, "q")["arrow_stream"], log=quiet, columns=pcols)[0] == want
    # firefly-train-1.1M's {kind, input, target}, as config/recipes/README.md documents it, read as Alpaca
    ff = write_jsonl(tmp_path / "ff.jsonl", [{"kind": "Poem", "input": "写一首诗", "target": "床前明月光。"}])
    assert load_conversations(ff, log=quiet, columns=parse_columns("input=instruction,target=output"))[0] == [
        [{"role": "user", "content": "写一首诗"}, {"role": "assistant", "content": "床前明月光。"}]
    ]
    for bad in ("conversation", "=x", "a="):
        with pytest.raises(ValueError, match="is not source=target"):
            parse_columns(bad)


def test_sft_stage_trains_on_a_mapped_parquet_file_from_the_command_line(pretrained_dir, tmp_path, capsys):
    """columns= on main.py's command line reaches the SFT reader; the DPO, reward and RL Configs have the key too."""
    import dataclasses

    import main
    from trainer import dpo, reward, rollout, sft

    for config in (sft.Config, dpo.Config, reward.Config, rollout.RLConfig):
        assert "columns" in {f.name for f in dataclasses.fields(config)}
    rows = [{"dialog": [{"q": m[0]["content"], "a": m[1]["content"]}]} for m in FIREFLY_AS_MESSAGES]
    data = write_tables(tmp_path, rows, "odd")["parquet"]
    out = tmp_path / "sft"
    rc = main.main(
        [
            "--stage",
            "sft",
            f"init_from={pretrained_dir}",
            f"data_path={data}",
            f"out_dir={out}",
            "columns=dialog=conversations,q=user,a=assistant",
            "seq_len=64",
            "batch_size=2",
            "global_batch_size=2",
            "max_steps=2",
            "val_samples=0",
            "device=cpu",
            "log_every=1",
        ]
    )
    assert rc == 0 and (out / "final" / "model.safetensors").is_file()
    assert f"[data] {data}: 6 conversations (pairs)" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# what stays unsupported: said clearly, never "not valid UTF-8, try GB18030"


def _binaries(tmp_path) -> dict:
    out = {}
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.writestr("a.jsonl", '{"text": "x"}\n')
    out["zip archive"] = tmp_path / "a.zip"
    (tmp_path / "a.jsonl.bz2").write_bytes(bz2.compress(b'{"text": "x"}\n'))
    out["bzip2-compressed"] = tmp_path / "a.jsonl.bz2"
    (tmp_path / "a.jsonl.xz").write_bytes(lzma.compress(b'{"text": "x"}\n'))
    out["xz-compressed"] = tmp_path / "a.jsonl.xz"
    (tmp_path / "a.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 20)
    out["zstd-compressed"] = tmp_path / "a.jsonl.zst"
    con = sqlite3.connect(tmp_path / "a.db")
    con.execute("create table t (x text)")
    con.commit()
    con.close()
    out["SQLite database"] = tmp_path / "a.db"
    with tarfile.open(tmp_path / "a.tar", "w") as t:
        t.add(tmp_path / "a.zip", arcname="a.zip")
    out["tar archive"] = tmp_path / "a.tar"
    (tmp_path / "a.jsonl").write_bytes(gzip.compress(b'{"text": "x"}\n'))
    out["gzip-compressed but not named .gz"] = tmp_path / "a.jsonl"
    (tmp_path / "u16.txt").write_bytes("你好，世界\n".encode("utf-16"))
    out["UTF-16 text"] = tmp_path / "u16.txt"
    (tmp_path / "blob.bin").write_bytes(b"\x01\x02\x00\x00\xc8\x00" * 50)
    out["binary file"] = tmp_path / "blob.bin"
    # what `git clone` of a Hub repo leaves without git-lfs, under the data file's own name
    (tmp_path / "train.parquet").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 6517\n", encoding="utf-8"
    )
    out["Git LFS pointer"] = tmp_path / "train.parquet"
    return out


def test_binary_inputs_are_named_for_what_they_are(tmp_path):
    for what, path in _binaries(tmp_path).items():
        for read in (lambda p: next(iter_documents(p)), lambda p: load_conversations(p, on_bad="skip")):
            with pytest.raises(ValueError) as e:
                read(str(path))
            assert what in str(e.value) and str(path) in str(e.value), (what, str(e.value))
            assert "GB18030" not in str(e.value) and "UTF-8 (" not in str(e.value)


def test_raw_wikipedia_dumps_are_refused_with_the_command_to_run(tmp_path):
    dump = (
        '<?xml version="1.0" encoding="utf-8"?>\n<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/">\n'
        "  <siteinfo><sitename>维基百科</sitename></siteinfo>\n  <page><title>数学</title><id>13</id>\n"
        "    <revision><text>'''数学'''是[[科学]]。{{Infobox}}</text></revision></page>\n</mediawiki>\n"
    )
    xml = tmp_path / "zhwiki-latest-pages-articles.xml"
    xml.write_text(dump, encoding="utf-8")
    bz = tmp_path / "zhwiki-latest-pages-articles.xml.bz2"
    # long enough that bzip2's first block (900 KB) ends far past the first 4 KB of the compressed file
    rng = np.random.default_rng(0)
    pages = "".join(
        f"<page><title>{i}</title><text>{''.join(map(chr, rng.integers(0x4E00, 0x5600, 300)))}</text></page>\n"
        for i in range(1500)
    )
    bz.write_bytes(bz2.compress(dump.replace("</mediawiki>", pages + "</mediawiki>").encode()))
    assert bz.stat().st_size > 100_000
    renamed = tmp_path / "dump.txt"  # by content, not by name
    renamed.write_text(dump, encoding="utf-8")
    readme = (ROOT / "config" / "recipes" / "README.md").read_text(encoding="utf-8")
    for path in (xml, bz, renamed):
        for read in (lambda p: list(iter_documents(p)), lambda p: load_conversations(p, on_bad="skip")):
            with pytest.raises(ValueError, match="raw Wikipedia XML dump") as e:
                read(str(path))
            msg = str(e.value)
            assert "pip install wikiextractor && python -m wikiextractor.WikiExtractor" in msg
            assert "--json" in msg and "python scripts/zh_simplify.py --input dataset/wiki" in msg
    # the hint and the recipe README give the same extraction command
    assert "pip install wikiextractor" in readme and "python -m wikiextractor.WikiExtractor zhwiki-latest" in readme
    for path in (xml, bz):
        with pytest.raises(ValueError, match=f"WikiExtractor {path} -o dataset/wiki --json"):
            list(iter_documents(str(path)))
    # a JSONL line that merely mentions <mediawiki is text
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"text": "<mediawiki> 是 XML 的根元素"}])
    assert [d["text"] for d in iter_documents(ok)] == ["<mediawiki> 是 XML 的根元素"]


def test_missing_pyarrow_says_pip_install(tmp_path, monkeypatch):
    tables = write_tables(tmp_path, [{"text": t} for t in TEXTS[:3]], "a")
    conv = write_tables(tmp_path, CONVS[:3], "c")["parquet"]
    real_import = builtins.__import__

    def no_pyarrow(name, *a, **kw):
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    for read in (
        lambda: next(iter_documents(tables["parquet"])),
        lambda: next(iter_documents(tables["dir"])),
        lambda: load_conversations(conv, on_bad="skip"),
    ):
        with pytest.raises(ImportError, match=r"needs pyarrow: pip install pyarrow"):
            read()


# -----------------------------------------------------------------------------
# issue 17.9: bad bytes and truncated .gz in the chat / preference readers name file and line


def test_bad_utf8_line_is_named_and_skippable(tmp_path):
    lines = [json.dumps(c, ensure_ascii=False).encode() for c in CONVS[:4]]
    lines.insert(2, '{"conversations": [{"role": "user", "content": "国"}]}'.encode("gb18030"))
    path = tmp_path / "gbk.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(BadRecord, match=r"gbk\.jsonl:3: not valid UTF-8 .*iconv -f GB18030"):
        load_conversations(str(path))
    logs = []
    convs, stats = load_conversations(str(path), on_bad="skip", log=logs.append)
    assert len(convs) == 4 and stats["skip:not valid UTF-8"] == 1
    assert any("gbk.jsonl:3" in m for m in logs)
    # the same for preference data
    plines = [json.dumps(p, ensure_ascii=False).encode() for p in PAIRS[:3]] + ['{"prompt": "国"}'.encode("gbk")]
    ppath = tmp_path / "gbk_pairs.jsonl"
    ppath.write_bytes(b"\n".join(plines) + b"\n")
    with pytest.raises(BadRecord, match=r"gbk_pairs\.jsonl:4: not valid UTF-8"):
        load_pairs(str(ppath))
    assert len(load_pairs(str(ppath), on_bad="skip", log=lambda *a: None)[0]) == 3


def test_truncated_gz_names_file_and_line(tmp_path):
    data = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in CONVS * 20).encode()
    whole = gzip.compress(data)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(TruncatedFile, match=r"cut\.jsonl\.gz:\d+: truncated file .*after line \d+"):
        load_conversations(str(path))
    logs = []
    stats = Counter()
    convs, _ = load_conversations(str(path), on_bad="skip", log=logs.append, stats=stats)
    assert 0 < len(convs) < len(CONVS) * 20 and stats["truncated files"] == 1
    assert any("WARNING" in m and "cut.jsonl.gz" in m and "the rest of" in m for m in logs)
    ppath = tmp_path / "cut_pairs.jsonl.gz"
    pwhole = gzip.compress("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PAIRS * 30).encode())
    ppath.write_bytes(pwhole[: len(pwhole) // 2])
    with pytest.raises(TruncatedFile, match=r"cut_pairs\.jsonl\.gz"):
        load_pairs(str(ppath))
    # a truncated JSON array cannot be trusted past the cut: an error naming the file even with skip
    apath = tmp_path / "cut_array.json.gz"
    awhole = gzip.compress(json.dumps(CONVS * 300, ensure_ascii=False).encode())
    apath.write_bytes(awhole[: len(awhole) // 2])
    with pytest.raises(BadRecord, match=r"cut_array\.json\.gz"):
        load_conversations(str(apath), on_bad="skip", log=lambda *a: None)


def test_chat_pair_and_prompt_readers_share_one_record_policy(tiny_tokenizer_dir, tmp_path):
    """dataset/records.py read_records under all three: the same default (error), the same skip counts logged by
    each, max_samples per file, folders and globs as paths. A duplicate pair or a too-long prompt is skipped and
    counted even with on_bad=error (a good record left out, not a bad one)."""
    from transformers import AutoTokenizer

    from dataset.prompt_data import load_prompts

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    readers = {
        "chat": (CONVS, lambda p, **kw: load_conversations(p, **kw)[0]),
        "pairs": (PAIRS, lambda p, **kw: load_pairs(p, **kw)[0]),
        "prompts": (PAIRS, lambda p, **kw: load_prompts(p, tok, 256, **kw)),
    }
    for name, (rows, read) in readers.items():
        folder = tmp_path / name
        folder.mkdir()
        for part, first in (("a", 0), ("b", 3)):  # three good records per file, a broken line second
            lines = [json.dumps(r, ensure_ascii=False) for r in rows[first : first + 3]]
            (folder / f"{part}.jsonl").write_text("\n".join(lines[:1] + ["{broken"] + lines[1:]) + "\n")
        with pytest.raises(BadRecord, match=rf"{name}/a\.jsonl:2: malformed"):
            read(str(folder))
        logs = []
        assert len(read(str(folder), on_bad="skip", log=logs.append)) == 6
        assert "[data] 2 records skipped (malformed: 2)" in logs, (name, logs)
        assert any(f"{name}/b.jsonl: 3 " in m for m in logs), logs
        assert len(read(str(folder / "*.jsonl"), on_bad="skip", max_samples=2, log=lambda *a: None)) == 4
    logs = []
    pairs, stats = load_pairs([str(tmp_path / "pairs" / "a.jsonl")] * 2, on_bad="skip", log=logs.append)
    assert len(pairs) == 3 and stats["skip:duplicate"] == 3
    assert "[data] 5 records skipped (duplicate: 3, malformed: 2)" in logs
    logs = []
    long = write_jsonl(
        tmp_path / "long.jsonl", [{"prompt": "你好"}, {"prompt": "人工智能是计算机科学的一个分支。" * 30}]
    )
    assert len(load_prompts(long, tok, 64, log=logs.append)) == 1
    assert "[data] 1 records skipped (prompt too long: 1)" in logs


# -----------------------------------------------------------------------------
# OpenAI "weight": 0 and special-token strings in pretraining text (issue 16.9)


def _runs(labels) -> list[tuple[int, int]]:
    trained = np.asarray(labels) != -100
    edges = np.flatnonzero(np.diff(np.concatenate([[0], trained.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def test_weight_zero_assistant_turn_is_context_only(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from dataset.chat_data import tokenize_conversation, tokenize_conversations

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    msgs = [
        {"role": "system", "content": "你是助手。"},
        {"role": "user", "content": "春眠不觉晓的下一句？"},
        {"role": "assistant", "content": "处处闻啼鸟。"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "天气很好，我们去公园散步吧。"},
    ]
    records = [
        {"messages": [*msgs[:2], {**msgs[2], "weight": 0}, msgs[3], {**msgs[4], "weight": 1}]},
        {"messages": [*msgs[:2], {**msgs[2], "weight": 1}, *msgs[3:]]},
        {"messages": [*msgs[:2], {**msgs[2], "weight": 0}, msgs[3], {**msgs[4], "weight": 0}]},
        {"messages": [*msgs[:2], {**msgs[2], "weight": 0.5}, *msgs[3:]]},
        {"messages": [msgs[0], {**msgs[1], "weight": 0}, *msgs[2:]]},
    ]
    path = write_jsonl(tmp_path / "openai.jsonl", records)
    convs, stats = load_conversations(path, on_bad="skip_file", log=lambda *a: None)  # 3 of 5 are bad
    assert len(convs) == 2 and stats["skip:no trained assistant turn"] == 1 and stats["skip:malformed"] == 2
    ids_all, labels_all = tokenize_conversation(tok, msgs)
    first, second = _runs(labels_all)
    ids_w, labels_w = tokenize_conversation(tok, convs[0])
    assert np.array_equal(ids_w, ids_all)  # the reply is still there as context
    assert (labels_w[first[0] : first[1]] == -100).all()
    assert np.array_equal(labels_w[second[0] : second[1]], labels_all[second[0] : second[1]])
    assert (labels_w != -100).sum() == second[1] - second[0]
    # weight 1 is the same as no weight, through the whole SFT tokenizing path too
    (ids_a, la), (ids_b, lb) = tokenize_conversations(convs, tok, seq_len=512)
    assert np.array_equal(ids_a, ids_all) and np.array_equal(ids_b, ids_all)
    assert np.array_equal(lb, labels_all) and np.array_equal(la, labels_w)
    # with on_bad=error the message names the record and the rule
    with pytest.raises(BadRecord, match=r"openai\.jsonl:3: no trained assistant turn"):
        load_conversations(path, log=lambda *a: None)
    bad = write_jsonl(tmp_path / "bad.jsonl", records[3:])
    with pytest.raises(BadRecord, match=r"bad\.jsonl:1: malformed \(weight 0\.5 on a turn of role 'assistant'"):
        load_conversations(bad, log=lambda *a: None)


SPECIAL_DOCS = [f"<|im_start|>user\n问题{i}<|im_end|>\n<|im_start|>assistant\n回答{i}。<|im_end|>" for i in range(30)]


def test_special_token_strings_in_pretraining_text_stay_text(tiny_tokenizer_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    import dataset.shard_writer as sw
    from dataset.shards import load_meta, open_shard
    from trainer.eval import ppl_windows

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    special_ids = {tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|pad|>")}
    path = write_jsonl(tmp_path / "hq.jsonl", [{"text": t} for t in SPECIAL_DOCS] + [{"text": "没有标记的文档"}])
    out = str(tmp_path / "shards")
    sw.prepare(tiny_tokenizer_dir, [path], out, shard_mb=0.001, val_tokens=0, seed=3, quiet=True)
    note = capsys.readouterr().out
    assert "note: 30 documents carry 120 special-token strings" in note and "plain text" in note
    meta = load_meta(out)
    assert meta["special_token_text"] == {"documents": 30, "strings": 120, "tokenised_as": "text"}
    stream = np.concatenate([np.asarray(open_shard(out, s, meta["dtype"])) for s in meta["train_shards"]])
    assert not special_ids & set(stream.tolist())
    docs = {tuple(d) for d in np.split(stream, np.flatnonzero(stream == tok.eos_token_id) + 1) if len(d)}
    want = tuple(tok.encode(SPECIAL_DOCS[0], add_special_tokens=False, split_special_tokens=True)) + (tok.eos_token_id,)
    assert want in docs and tok.decode(list(want[:-1])) == SPECIAL_DOCS[0]
    # eval's perplexity text is tokenised the same way
    assert not special_ids & set(ppl_windows(path, tok, 16, 0).flatten().tolist())
    # the tokenizer stage says so too
    from trainer.train_tokenizer import Config, run

    run(Config(data_path=path, vocab_size=300, out_dir=str(tmp_path / "tok"), min_frequency=1, seed=0))
    assert "training documents carry special-token strings" in capsys.readouterr().out


def test_corpus_cleaning_reads_tables_like_jsonl(tmp_path):
    from dataset.corpus import simplify
    from dataset.text_sources import FilterConfig

    rows = [{"text": t} for t in TEXTS]
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    parquet = write_tables(tmp_path, [{"body": t} for t in TEXTS], "a")["parquet"]
    fc = FilterConfig(min_chars=4)
    a = simplify([jsonl], str(tmp_path / "a.out.jsonl"), fc, engine="zhconv", workers=1, quiet=True)
    b = simplify(
        [parquet], str(tmp_path / "b.out.jsonl"), fc, engine="zhconv", workers=1, quiet=True, text_fields=("body",)
    )
    texts = [read_texts(tmp_path / "a.out.jsonl"), read_texts(tmp_path / "b.out.jsonl")]
    assert texts[0] == texts[1] and len(texts[0]) == len(TEXTS) and a["docs_out"] == b["docs_out"]


@pytest.mark.slow
def test_zh_simplify_command_line_names_the_column(tmp_path):
    """scripts/zh_simplify.py (two subprocesses): a missing column is reported without a traceback; the column
    named with --text_column gives what the library gives."""
    from dataset.corpus import simplify
    from dataset.text_sources import FilterConfig

    parquet = write_tables(tmp_path, [{"body": t} for t in TEXTS], "a")["parquet"]
    out = str(tmp_path / "want.jsonl")
    simplify([parquet], out, FilterConfig(), engine="zhconv", workers=1, quiet=True, text_fields=("body",))
    r = subprocess.run(
        [
            sys.executable,
            "scripts/zh_simplify.py",
            "--input",
            parquet,
            "--output",
            str(tmp_path / "c.jsonl"),
            "--workers",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "no column 'text' or 'content'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "scripts/zh_simplify.py",
            "--input",
            parquet,
            "--output",
            str(tmp_path / "c.jsonl"),
            "--workers",
            "1",
            "--text_column",
            "body",
            "--engine",
            "zhconv",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert read_texts(tmp_path / "c.jsonl") == read_texts(out)


def test_tables_are_streamed_not_loaded_whole(tmp_path):
    """Arrow memory held while reading stays about one row group / record batch, whatever the file size."""
    pa = pytest.importorskip("pyarrow")
    pytest.importorskip("pyarrow.parquet")
    text = "人工智能是计算机科学的一个分支。" * 60  # ~2.9 KB of UTF-8 per row
    rows = [{"text": f"{i}{text}"} for i in range(6000)]  # ~17 MB
    path = str(tmp_path / "big.parquet")
    pa.parquet.write_table(pa.Table.from_pylist(rows), path, row_group_size=100)
    del rows
    base, peak, n = pa.total_allocated_bytes(), 0, 0
    for _ in iter_documents(path):
        n += 1
        if n % 50 == 0:
            peak = max(peak, pa.total_allocated_bytes() - base)
    assert n == 6000 and 0 < peak < 3_000_000, peak  # about two batches of BATCH_BYTES; the table is 17 MB


def test_json_columns_are_parsed_like_jsonl(tmp_path):
    """Arrow JSON values (what `datasets` 5 writes for a column whose rows differ in shape, e.g. messages of which
    some carry tool_calls) come out as the dicts JSONL gives, at any depth; older pyarrow, which does not know the
    type, keeps it as a string field naming arrow.json in its metadata, and that is parsed too."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from dataset.table_files import _json_decoder, iter_rows

    if not hasattr(pa, "json_"):
        pytest.skip("pyarrow < 19 has no JSON type to write")

    def as_json(texts):
        return pa.ExtensionArray.from_storage(pa.json_(), pa.array(texts, pa.string()))

    turns = [json.dumps(m, ensure_ascii=False) for conv in CONVS for m in conv["conversations"]]
    offsets = np.cumsum([0] + [len(conv["conversations"]) for conv in CONVS])
    sources = [json.dumps({"lang": "zh", "n": i}) for i in range(len(CONVS))]
    notes = pa.array([f"n{i}" for i in range(len(CONVS))])
    table = pa.table(
        {
            "conversations": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), as_json(turns)),
            "meta": pa.StructArray.from_arrays([as_json(sources), notes], names=["source", "note"]),
        }
    )
    pq.write_table(table, tmp_path / "j.parquet")
    rows = [row for _, row in iter_rows(str(tmp_path / "j.parquet"))]
    assert [{"conversations": r["conversations"]} for r in rows] == CONVS
    assert rows[3]["meta"] == {"source": {"lang": "zh", "n": 3}, "note": "n3"}
    assert (
        load_conversations(str(tmp_path / "j.parquet"), log=lambda *a: None)[0]
        == load_conversations(write_jsonl(tmp_path / "j.jsonl", CONVS), log=lambda *a: None)[0]
    )
    old = pa.field("item", pa.string(), metadata={b"ARROW:extension:name": b"arrow.json"})
    assert _json_decoder(pa, pa.list_(old))(['{"a": [1, null]}', None]) == [{"a": [1, None]}, None]


def test_utf8_text_with_a_stray_nul_byte_is_still_text(tmp_path):
    path = tmp_path / "nul.txt"
    path.write_bytes("第一段文字\x00还是文字。\n".encode())
    assert [d["text"] for d in iter_documents(str(path))] == ["第一段文字\x00还是文字。\n"]


# -----------------------------------------------------------------------------
# files written by the `datasets` library itself, in a fresh process (skipped when it is not installed)

OPENAI_CHATS = [
    {
        "messages": [
            *([{"role": "system", "content": "你是一个乐于助人的助手。"}] if i % 3 == 0 else []),
            {"role": "user", "content": f"问题{i}：中国的首都是哪里？"},
            # weight on one turn only: every other turn of the set gets a null weight in the table
            {"role": "assistant", "content": f"北京。{i}", **({"weight": 0} if i % 4 == 1 else {})},
            {"role": "user", "content": "为什么？"},
            {"role": "assistant", "content": f"因为它是首都。{i}"},
        ]
    }
    for i in range(10)
]
SHAREGPT_CHATS = [
    {
        **({"system": "请简洁地回答。"} if i % 2 else {}),  # a null system in every other row of the table
        "conversations": [{"from": "human", "value": f"你好{i}"}, {"from": "gpt", "value": f"你好！{i}"}],
    }
    for i in range(8)
]


@pytest.mark.slow
def test_files_written_by_the_datasets_library_read_as_their_jsonl(tiny_tokenizer_dir, tmp_path):
    """Chat, preference, pretraining text and C-Eval questions: `datasets` loads the JSONL/CSV, writes parquet
    (to_parquet) and save_to_disk folders (a split, and a DatasetDict), and every reader of ours gives from them
    what it gives from the JSONL/CSV (SFT conversations, DPO pairs, documents, shards, multiple choice)."""
    import dataset.shard_writer as sw
    from dataset.mc_data import mc_subject_files, read_mc_questions
    from dataset.shards import load_meta, open_shard
    from tests.helpers_thirdparty import DATASETS_FOLDER, require_thirdparty, run_thirdparty

    require_thirdparty(DATASETS_FOLDER, "datasets")
    quiet = lambda *a: None
    sets = {
        "openai": OPENAI_CHATS,
        "sharegpt": SHAREGPT_CHATS,
        "pairs": PAIRS,
        "text": [{"id": i, "text": t, "title": f"标题{i}"} for i, t in enumerate(TEXTS)],
    }
    jobs, files = [], {}
    for name, rows in sets.items():
        files[name] = {
            "jsonl": write_jsonl(tmp_path / f"{name}.jsonl", rows),
            "parquet": str(tmp_path / f"{name}.parquet"),
            "saved": str(tmp_path / f"{name}_saved"),
            "dict": str(tmp_path / f"{name}_dict"),
        }
        f = files[name]
        jobs.append(
            {
                "builder": "json",
                "data_files": {"train": f["jsonl"]},
                "parquet": {"train": f["parquet"]},
                "saved": {"train": f["saved"]},
                "saved_dict": f["dict"],
            }
        )
    # C-Eval as published (CSV, numeric options that pandas reads as integers) -> its Hub layout and a DatasetDict
    mc = {split: tmp_path / "ceval" / split / f"logic_{split}.csv" for split in ("val", "dev")}
    for k, path in enumerate(mc.values()):
        path.parent.mkdir(parents=True)
        rows = [f"{i},{i}加{k}等于多少？,{i + k},{i + k + 1},{i + k + 2},{i + k + 3},{'ABCD'[i % 4]}" for i in range(5)]
        path.write_text("id,question,A,B,C,D,answer\n" + "\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "hub" / "logic").mkdir(parents=True)
    jobs.append(
        {
            "builder": "csv",
            "data_files": {split: str(p) for split, p in mc.items()},
            "parquet": {split: str(tmp_path / "hub" / "logic" / f"{split}-00000-of-00001.parquet") for split in mc},
            "saved_dict": str(tmp_path / "saved_subjects" / "logic"),
        }
    )
    (tmp_path / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    written = run_thirdparty(
        DATASETS_FOLDER, "datasets", "run_datasets_write.py", [str(tmp_path / "jobs.json")], tmp_path
    )
    assert written["rows"][0] == {"train": len(OPENAI_CHATS)} and written["rows"][-1] == {"val": 5, "dev": 5}

    tables = lambda f: (f["parquet"], f["saved"], os.path.join(f["dict"], "train"))
    for name in ("openai", "sharegpt"):
        want, _ = load_conversations(files[name]["jsonl"], on_bad="error", log=quiet)
        assert len(want) == len(sets[name])
        for path in tables(files[name]):
            assert load_conversations(path, on_bad="error", log=quiet)[0] == want, path
    openai, _ = load_conversations(files["openai"]["parquet"], on_bad="error", log=quiet)
    assert sum(m.get("weight") == 0 for conv in openai for m in conv) == 3  # weight 0 kept, nulls read as no weight
    want_pairs = load_pairs(files["pairs"]["jsonl"], log=quiet)[0]
    for path in tables(files["pairs"]):
        assert load_pairs(path, log=quiet)[0] == want_pairs, path
    docs = lambda p: [(d["text"], d["title"], d["line"]) for d in iter_documents(p)]
    for path in tables(files["text"]):
        assert docs(path) == docs(files["text"]["jsonl"]), path
    shards = {}
    for kind, path in (("jsonl", files["text"]["jsonl"]), ("parquet", files["text"]["parquet"])):
        out = str(tmp_path / f"shards_{kind}")
        sw.prepare(tiny_tokenizer_dir, [path], out, shard_mb=0.001, val_tokens=0, seed=3, quiet=True)
        meta = load_meta(out)
        shards[kind] = np.concatenate([np.asarray(open_shard(out, s, meta["dtype"])) for s in meta["train_shards"]])
    assert np.array_equal(shards["parquet"], shards["jsonl"])
    with pytest.raises(ValueError, match=r"DatasetDict saved with save_to_disk \(splits: train\)"):
        load_conversations(files["openai"]["dict"], log=quiet)
    for mc_dir in (tmp_path / "hub", tmp_path / "saved_subjects"):
        for split, path in mc.items():
            layout, sources = mc_subject_files(str(mc_dir), split)
            assert layout == f"<subject>/{split}" and list(sources) == ["logic"]
            assert read_mc_questions(sources["logic"]) == read_mc_questions([str(path)]), (mc_dir, split)
