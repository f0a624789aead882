"""
The shard writer (dataset/shard_writer.py) and its command line scripts/prepare_shards.py: format, determinism,
weights, validation split, dtype and tokenizer checks, and reruns after a killed or failed run.

    python -m pytest tests/test_prepare_shards.py
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import dataset.shard_writer as ps
from dataset.shards import load_meta, open_shard

ROOT = Path(__file__).resolve().parents[1]


def _write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture
def sources(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [f"中文文档{i}号，我们学习数学。" * (1 + i % 3) for i in range(200)])
    b = _write_jsonl(tmp_path / "b.jsonl", [f"english doc {i} hello world" for i in range(100)])
    return a, b


def _docs(tokens):
    """Split a token stream at EOS (0) into documents (tuples)."""
    out, cur = [], []
    for t in tokens.tolist():
        if t == 0:
            out.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    return out


def test_format_and_determinism(tiny_tokenizer_dir, sources, tmp_path):
    a, b = sources
    meta = ps.prepare(
        tiny_tokenizer_dir,
        [a + ":1", b + ":0.5"],
        str(tmp_path / "s1"),
        shard_mb=0.002,
        val_tokens=300,
        seed=7,
        quiet=True,
        bucket_mb=0.01,
    )
    ps.prepare(
        tiny_tokenizer_dir,
        [a + ":1", b + ":0.5"],
        str(tmp_path / "s2"),
        shard_mb=0.002,
        val_tokens=300,
        seed=7,
        quiet=True,
        bucket_mb=0.01,
    )
    m = load_meta(str(tmp_path / "s1"))
    assert m["dtype"] == "uint16" and m["vocab_size"] == 512 and m["eos_id"] == 0 and len(m["train_shards"]) > 1
    files = sorted(os.listdir(tmp_path / "s1"))
    assert files == sorted(os.listdir(tmp_path / "s2")) and "val.bin" in files and "_buckets.tmp" not in files
    for f in files:
        if f.endswith(".bin"):
            assert (tmp_path / "s1" / f).read_bytes() == (tmp_path / "s2" / f).read_bytes(), f
    # another seed shuffles differently
    ps.prepare(
        tiny_tokenizer_dir,
        [a + ":1", b + ":0.5"],
        str(tmp_path / "s3"),
        shard_mb=0.002,
        val_tokens=300,
        seed=8,
        quiet=True,
        bucket_mb=0.01,
    )
    assert (tmp_path / "s1" / "train_00000.bin").read_bytes() != (tmp_path / "s3" / "train_00000.bin").read_bytes()
    # every document ends with EOS, and the stream decodes back to the source texts
    stream = np.concatenate([open_shard(str(tmp_path / "s1"), e, m["dtype"]) for e in m["train_shards"]])
    assert stream[-1] == 0
    assert meta["sources"][0]["documents"] + meta["sources"][1]["documents"] == len(_docs(stream))


def test_weights_and_val_held_out_by_documents(tiny_tokenizer_dir, sources, tmp_path):
    from transformers import AutoTokenizer

    a, b = sources
    meta = ps.prepare(
        tiny_tokenizer_dir, [a + ":2.5", b + ":0.3"], str(tmp_path / "s"), val_tokens=400, seed=1, quiet=True
    )
    sa, sb = meta["sources"]
    assert sa["weight"] == 2.5 and sb["weight"] == 0.3
    val_docs = meta["val_documents"]
    assert 0 < val_docs < 60
    # a: 200 documents minus those in val, each 2 or 3 times, about 2.5 on average
    assert 2.2 < sa["documents"] / 200 < 2.8
    assert 15 < sb["documents"] < 50
    d = str(tmp_path / "s")
    m = load_meta(d)
    train = set(_docs(np.concatenate([open_shard(d, e, m["dtype"]) for e in m["train_shards"]])))
    val = _docs(open_shard(d, m["val_shard"], m["dtype"]))
    assert len(val) == val_docs and not train & set(val)  # no validation document is ever trained on
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert all(tok.decode(list(v)).startswith(("中文文档", "english doc")) for v in val)


def test_uint16_refusal_and_uint32(tmp_path, sources):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{f"t{i}": i + 1 for i in range(70000)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>").save_pretrained(tmp_path / "big")
    with pytest.raises(ValueError, match="does not fit uint16"):
        ps.prepare(str(tmp_path / "big"), [sources[1]], str(tmp_path / "s"), dtype="uint16", quiet=True)
    meta = ps.prepare(str(tmp_path / "big"), [sources[1]], str(tmp_path / "s32"), val_tokens=0, quiet=True)
    assert meta["dtype"] == "uint32" and load_meta(str(tmp_path / "s32"))["val_shard"] is None


def test_fingerprint_mismatch_and_bad_inputs(tiny_tokenizer_dir, sources, tmp_path):
    a, _ = sources
    out = str(tmp_path / "s")
    ps.prepare(tiny_tokenizer_dir, [a], out, val_tokens=0, quiet=True)
    meta = json.load(open(os.path.join(out, "meta.json"), encoding="utf-8"))
    meta["tokenizer_fingerprint"] = "0000000000000000"
    json.dump(meta, open(os.path.join(out, "meta.json"), "w", encoding="utf-8"))
    with pytest.raises(ValueError, match="already holds shards made with tokenizer 0000000000000000"):
        ps.prepare(tiny_tokenizer_dir, [a], out, quiet=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "好"}\n{"txt": "坏"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: no string field"):
        ps.prepare(tiny_tokenizer_dir, [str(bad)], str(tmp_path / "s2"), quiet=True)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.txt: empty source"):
        ps.prepare(tiny_tokenizer_dir, [str(empty)], str(tmp_path / "s3"), quiet=True)
    with pytest.raises(ValueError, match="weight must be a positive number"):
        ps.parse_input(a + ":-1")
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: no such file .*from --inputs .*nope\.jsonl:2"):
        ps.parse_input(str(tmp_path / "nope.jsonl:2"))
    assert [(s.path, s.weight) for s in ps.parse_input(a + ":0.25")] == [(a, 0.25)]
    assert [(s.path, s.weight, s.license) for s in ps.parse_input(a)] == [(a, 1.0, None)]


def test_folder_and_glob_inputs_with_their_licenses(tiny_tokenizer_dir, tmp_path):
    """An input is PATH[:WEIGHT][@LICENSE], the path a file, a folder or a glob (text_sources.expand_paths): each
    file is one source of meta.json with the item's weight, and its license comes from @, from a dataset_info.json
    beside it, or from the card of a Hub download (README.md front matter, itself not read as text). model/hub.py
    shard_licenses reads them back for the model card."""
    from dataset.licenses import shard_licenses

    hub = tmp_path / "hub"  # a Hub dataset as downloaded: the card on top, the data below it
    (hub / "data").mkdir(parents=True)
    (hub / "README.md").write_text("---\nlicense: cc-by-sa-3.0\nlanguage: [zh]\n---\n# 维基\n", encoding="utf-8")
    parts = [
        _write_jsonl(hub / "data" / f"part{k}.jsonl", [f"维基条目{k}-{i}号，春眠不觉晓。" for i in range(40)])
        for k in (0, 1)
    ]
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "dataset_info.json").write_text('{"license": "apache-2.0", "features": {}}')
    local = _write_jsonl(tmp_path / "local" / "x.jsonl", [f"本地文档{i}号，处处闻啼鸟。" for i in range(40)])
    (tmp_path / "plain").mkdir()
    plain = _write_jsonl(tmp_path / "plain" / "notes@v2.jsonl", [f"笔记{i}号，我们学习数学。" for i in range(40)])
    named = _write_jsonl(tmp_path / "plain" / "z.jsonl", [f"命名文档{i}号，人工智能。" for i in range(40)])
    inputs = [f"{hub}:0.5", str(tmp_path / "local" / "*.jsonl"), plain, f"{named}:2@mit"]
    out = str(tmp_path / "s")
    meta = ps.prepare(tiny_tokenizer_dir, inputs, out, shard_mb=0.01, val_tokens=0, quiet=True)
    got = [(s["path"], s["weight"], s["license"]) for s in meta["sources"]]
    assert got == [
        (parts[0], 0.5, "cc-by-sa-3.0"),
        (parts[1], 0.5, "cc-by-sa-3.0"),
        (local, 1.0, "apache-2.0"),
        (plain, 1.0, None),  # an '@' in a file's own name is no license
        (named, 2.0, "mit"),
    ]
    assert [s["license_from"] for s in meta["sources"]] == [str(hub / "README.md")] * 2 + [
        str(tmp_path / "local" / "dataset_info.json"),
        "",
        "--inputs",
    ]
    assert 10 < meta["sources"][0]["documents"] < 30 and meta["sources"][4]["documents"] == 80
    assert shard_licenses(out) == ["apache-2.0", "cc-by-sa-3.0", "mit"]
    # declared beats found; a save_to_disk folder states its own in dataset_info.json
    assert [s.license for s in ps.parse_input(f"{hub}@other")] == ["other", "other"]
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "data-00000-of-00001.arrow").write_bytes(b"")
    (saved / "dataset_info.json").write_text('{"license": "odc-by"}')
    assert ps.source_license(str(saved), str(saved)) == ("odc-by", str(saved / "dataset_info.json"))
    # never above the folder named: the card in tmp_path is not the one of plain/'s files
    (tmp_path / "README.md").write_text("---\nlicense: gpl-3.0\n---\n")
    assert ps.parse_input(plain)[0].license is None


@pytest.mark.slow
def test_cli(tiny_tokenizer_dir, sources, tmp_path):
    a, b = sources
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "prepare_shards.py"),
        "--tokenizer",
        tiny_tokenizer_dir,
        "--inputs",
        a + ":0.8",
        b + ":0.2",
        "--out_dir",
        str(tmp_path / "s"),
        "--val_tokens",
        "100",
        "--workers",
        "2",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stdout and "MB/s" in r.stdout
    r = subprocess.run(cmd[:5] + [str(tmp_path / "missing.jsonl")] + cmd[7:], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "missing.jsonl: no such file" in r.stderr


# -----------------------------------------------------------------------------
# reruns in the same --out_dir after a run that was killed or failed


def _assert_same_output(d1, d2):
    files = sorted(os.listdir(d1))
    assert files == sorted(os.listdir(d2)) and "meta.json" in files and ps.BUCKET_DIR not in files
    for f in files:
        assert (Path(d1) / f).read_bytes() == (Path(d2) / f).read_bytes(), f


@pytest.mark.slow
def test_rerun_after_sigkill_gives_the_shards_of_a_clean_run(tiny_tokenizer_dir, tmp_path):
    # ~4 MB: large enough that phase 1 is still running when the poll below sees the bucket folder appear.
    src = _write_jsonl(
        tmp_path / "big.jsonl",
        [f"第{i}篇：我们今天学习数学和语言，机器学习需要数据。{i * 7919} hello" * (3 + i % 5) for i in range(8000)],
    )
    out = tmp_path / "killed"
    args = dict(shard_mb=0.05, val_tokens=2000, workers=1, bucket_mb=0.5)
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "prepare_shards.py"),
        "--tokenizer",
        tiny_tokenizer_dir,
        "--inputs",
        src,
        "--out_dir",
        str(out),
    ] + [x for k, v in args.items() for x in (f"--{k}", str(v))]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(120_000):  # at most ~10 minutes: a guard against a hang, not a timing assertion
            if (out / ps.BUCKET_DIR).is_dir() or proc.poll() is not None:
                break
            time.sleep(0.005)
        proc.kill()  # SIGKILL: nothing in the process can clean up
    finally:
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended on its own before the kill: {err.decode()[-2000:]}"
    assert (out / ps.BUCKET_DIR).is_dir() and not (out / "meta.json").exists()  # what the killed run left behind

    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    ps.prepare(tiny_tokenizer_dir, [src], str(tmp_path / "clean"), quiet=True, **args)
    _assert_same_output(out, tmp_path / "clean")


def test_rerun_after_a_reported_error(tiny_tokenizer_dir, sources, tmp_path):
    a, b = sources
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        "".join(json.dumps({"text": f"好文档{i}"}, ensure_ascii=False) + "\n" for i in range(50))
        + '{"text": "broken"\n',
        encoding="utf-8",
    )
    out = tmp_path / "s"
    with pytest.raises(ValueError, match=r"bad\.jsonl:51: malformed JSON"):  # fails in phase 1, buckets written
        ps.prepare(tiny_tokenizer_dir, [a, str(bad)], str(out), val_tokens=300, quiet=True, bucket_mb=0.01)
    assert os.listdir(out) == []  # the failed run removed everything it wrote
    ps.prepare(tiny_tokenizer_dir, [a, b], str(out), val_tokens=300, quiet=True, bucket_mb=0.01)
    ps.prepare(tiny_tokenizer_dir, [a, b], str(tmp_path / "clean"), val_tokens=300, quiet=True, bucket_mb=0.01)
    _assert_same_output(out, tmp_path / "clean")


def test_check_out_dir_clears_only_what_a_run_writes(tmp_path):
    (tmp_path / ps.BUCKET_DIR).mkdir()
    (tmp_path / ps.BUCKET_DIR / "0000").write_bytes(b"x")
    for name in ("train_00000.bin", "train_00001.bin.tmp", "val.bin.tmp", "meta.json.tmp", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "mine").mkdir()
    ps.check_out_dir(str(tmp_path), "f" * 16)
    assert sorted(os.listdir(tmp_path)) == ["mine", "notes.txt"]
