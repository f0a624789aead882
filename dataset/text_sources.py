"""
Text sources: streaming readers for every raw-text format we take in, and the Chinese cleaning rules.

Used by dataset/corpus.py (cleaning), trainer/train_tokenizer.py and dataset/shard_writer.py (reading).
Nothing here runs on import; a quick look at what a file yields:
    python -c "from dataset.text_sources import iter_documents as it; print(next(it('a.jsonl'))['text'][:200])"

Formats (a `.gz` suffix on any of them is read through gzip, still streaming):
    WikiExtractor folders/files     wiki_NN with `<doc id=.. url=.. title=..>` ... `</doc>` blocks
    WikiExtractor --json            one {"id","url","title","text"} object per line
    .jsonl                          one object per line; the text is the first field of `text_fields` present
    .json                           one JSON document: SQuAD (each `context` once) or chinese-poetry style records
    .txt / .md / anything else      plain text, cut into documents at blank lines once `max_doc_chars` is reached
                                    (and at `<!-- FILE: ... -->` markers, which separate laws in the LawRefBook dump);
                                    no document is longer than 5x that: without a blank line it ends at a line end
                                    or, inside one huge line, at a sentence end (lines are read in bounded pieces)
    parquet / Arrow / save_to_disk  Hugging Face `datasets` files, found by content (dataset/table_files.py, needs
                                    pyarrow); one document per row, the text column picked as for .jsonl
Every reader yields {"text", "source", "title", "line"} and raises ValueError naming file and line on bad input.
Binary files of any other kind (zip, bz2, xz, zstd, sqlite, ...) and raw Wikipedia XML dumps are refused by what
they are, with what to run instead; they never reach the UTF-8 decoder.
"""

import codecs
import glob
import gzip
import hashlib
import html
import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from dataset.table_files import (
    check_text_input,
    column_names,
    dataset_dict_message,
    is_dataset_dict_dir,
    is_dataset_dir,
    is_dataset_metadata,
    is_table,
    iter_rows,
)

TEXT_FIELDS = ("text", "content")  # jsonl fields tried in order; gov_work_reports uses "content"

# -----------------------------------------------------------------------------
# input discovery and low-level line reading


def expand_paths(paths: str | list[str]) -> list[str]:
    """The one way every reader (text, chat, preference and prompt data) turns a path setting into files.

    `paths` is a list or a comma-separated string of items; each item is a file, a folder (every regular file
    under it, hidden ones and a dataset's metadata left out: dataset_info.json, state.json, a README.md dataset card)
    or a glob pattern (its matches, each a file or a folder). Folders and matches
    are sorted, so runs are reproducible; the items keep their order. A `datasets` save_to_disk folder, named or
    found inside a folder, is one input (its .arrow files are rows of one table, its .json files metadata). An item
    that names nothing raises FileNotFoundError naming it; no files at all raises ValueError."""
    items = [p.strip() for p in paths.split(",")] if isinstance(paths, str) else [p.strip() for p in paths]
    out = []
    for item in [p for p in items if p]:
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches:
            raise FileNotFoundError(f"{item}: no such file or directory (the pattern matches nothing)")
        for p in matches:
            if is_dataset_dict_dir(p):
                raise ValueError(dataset_dict_message(p))
            if is_dataset_dir(p):
                out.append(p)
            elif os.path.isdir(p):
                for root, dirs, files in os.walk(p):
                    if is_dataset_dict_dir(root):
                        raise ValueError(dataset_dict_message(root))
                    if is_dataset_dir(root):
                        out.append(root)
                        dirs.clear()
                        continue
                    dirs.sort()
                    names = [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
                    out.extend(p for p in names if not is_dataset_metadata(p))
            elif os.path.isfile(p):
                out.append(p)
            else:
                raise FileNotFoundError(f"{p}: no such file or directory")
    if not out:
        raise ValueError(f"no data files in {paths!r}")
    return out


def input_bytes(path: str) -> int:
    """About how many bytes of text a source holds (gzip and parquet compress Chinese text ~3x; a save_to_disk
    folder holds its rows uncompressed), to size buffers and sampling rates before reading anything."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".arrow"))
    return os.path.getsize(path) * (3 if path.endswith((".gz", ".parquet")) else 1)


def open_binary(path: str):
    """The file's bytes, read through gzip when its name ends in .gz (streamed either way); every text and record
    reader opens files here."""
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_lines(path: str, max_line_bytes: int = 0) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) pairs. We decode line by line so that a bad byte is reported at its exact line.

    With max_line_bytes, a longer line comes in pieces of about that many bytes, all with the line's number and
    only the last one ending in a newline: a file with no newline for 50 MB is never held in memory whole. The
    incremental decoder keeps a character cut between two pieces whole (it starts the next piece)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lineno, line_start = 0, True
    with open_binary(path) as f:
        try:
            while raw := f.readline(max_line_bytes or -1):
                lineno += line_start
                try:
                    line = decoder.decode(raw)
                except UnicodeDecodeError as e:
                    raise ValueError(
                        f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                        f"convert the file to UTF-8 first (e.g. iconv -f GB18030 -t UTF-8)"
                    ) from None
                if lineno == 1 and line_start and line.startswith("\ufeff"):
                    line = line[1:]  # a UTF-8 byte-order mark is not text
                line_start = raw.endswith(b"\n")
                if line:  # empty when a piece held only the first bytes of a character
                    yield lineno, line
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: not valid UTF-8 at the end of the file ({e.reason}); a truncated file?"
                ) from None
        except (OSError, EOFError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise ValueError(f"{path}: cannot read ({e}); is it a truncated or mislabelled .gz?") from None


def _kind(path: str) -> str:
    """Pick a reader: tables and binary files by content, text formats from the name, and sniff the first line for
    extension-less or .txt WikiExtractor output."""
    if is_table(path):
        return "table"
    check_text_input(path)  # a zip, a bz2 dump, ... raises here, saying what it is and what to run
    name = path.removesuffix(".gz")
    ext = os.path.splitext(name)[1].lower()
    if ext == ".json":
        return "json"
    if ext == ".jsonl":
        return "jsonl"
    for _, line in iter_lines(path, max_line_bytes=1 << 16):  # the start of a line is enough to tell
        s = line.strip()
        if not s:
            continue
        if s.startswith("<doc ") or s == "<doc>":
            return "wiki"
        if s.startswith("{") and ext not in (".txt", ".md"):
            return "jsonl"  # WikiExtractor --json writes wiki_NN files without an extension
        return "text"
    return "text"


# -----------------------------------------------------------------------------
# readers, one per format


_DOC_OPEN = re.compile(r"<doc\b([^>]*)>")
_ATTR = re.compile(r'(\w+)="([^"]*)"')


def _read_wiki(path: str) -> Iterator[dict]:
    doc, title, start = None, "", 0
    for lineno, line in iter_lines(path):
        m = _DOC_OPEN.match(line.strip()) if line.startswith("<doc") else None
        if m:
            if doc is not None:
                raise ValueError(f"{path}:{lineno}: <doc> opened before the doc of line {start} was closed")
            doc, title, start = [], dict(_ATTR.findall(m.group(1))).get("title", ""), lineno
        elif line.strip() == "</doc>":
            if doc is None:
                raise ValueError(f"{path}:{lineno}: </doc> without a matching <doc>")
            yield {"text": "".join(doc), "source": path, "title": title, "line": start}
            doc = None
        elif doc is not None:
            doc.append(line)
        elif line.strip():
            raise ValueError(f"{path}:{lineno}: text outside a <doc> block in WikiExtractor output")
    if doc is not None:
        raise ValueError(f"{path}:{start}: <doc> never closed (truncated file?)")


def _read_jsonl(path: str, text_fields: tuple[str, ...]) -> Iterator[dict]:
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
        field = next((k for k in text_fields if k in obj), None)
        if field is None or not isinstance(obj[field], str):
            raise ValueError(
                f"{path}:{lineno}: no string field {' or '.join(repr(k) for k in text_fields)} "
                f"(keys: {', '.join(list(obj)[:8])})"
            )
        doc = {"text": obj[field], "source": path, "title": str(obj.get("title", "")), "line": lineno}
        if isinstance(obj.get("source"), str):
            doc["origin"] = obj["source"]  # zh_simplify output keeps the original file name here
        yield doc


def _read_table(path: str, text_fields: tuple[str, ...]) -> Iterator[dict]:
    names = column_names(path)
    field = next((k for k in text_fields if k in names), None)
    if field is None:
        raise ValueError(
            f"{path}: no column {' or '.join(repr(k) for k in text_fields)} (columns: "
            f"{', '.join(names[:12])}); name the one that holds the text: text_column= (ppl_text_column= in eval, "
            f"--text_column in scripts/prepare_shards.py)"
        )
    extra = [k for k in ("title", "source") if k in names and k != field]  # read only what a document keeps
    for row_no, row in iter_rows(path, [field] + extra):
        text = row[field]
        if not isinstance(text, str):
            raise ValueError(f"{path}:row {row_no}: column {field!r} is {type(text).__name__}, not a string")
        doc = {"text": text, "source": path, "title": str(row.get("title") or ""), "line": row_no}
        if isinstance(row.get("source"), str):
            doc["origin"] = row["source"]
        yield doc


# chinese-poetry records: header fields first, then the body; notes, ids, spellings and metadata are left out
_HEAD_KEYS = ("title", "chapter", "section", "rhythmic", "subchapter", "author")
_BODY_KEYS = ("abstract", "preface", "prologue", "paragraphs", "para", "content", "context", "text")


def _flatten(obj, out: list[str]) -> None:
    if isinstance(obj, str):
        out.append(obj)
    elif isinstance(obj, list):
        for x in obj:
            _flatten(x, out)
    elif isinstance(obj, dict):
        out.extend(obj[k] for k in _HEAD_KEYS if isinstance(obj.get(k), str) and obj[k])
        for k in _BODY_KEYS:
            if k in obj:
                _flatten(obj[k], out)


def _read_json(path: str) -> Iterator[dict]:
    # A .json file is one document tree, so it is parsed whole: memory is bounded by the largest file, not the corpus.
    with open_binary(path) as f:
        raw = f.read()
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list) and "version" in obj:
        for art in obj["data"]:  # SQuAD (CMRC2018, DRCD): keep each Wikipedia paragraph, ignore the questions
            for para in art.get("paragraphs", []):
                yield {"text": para.get("context", ""), "source": path, "title": art.get("title", ""), "line": 0}
        return
    for i, rec in enumerate(obj if isinstance(obj, list) else [obj]):
        parts: list[str] = []
        _flatten(rec, parts)
        title = rec.get("title", "") if isinstance(rec, dict) else ""
        yield {"text": "\n".join(parts), "source": path, "title": str(title), "line": i + 1}


_FILE_MARK = re.compile(r"^<!-- FILE: (.*?) -->\s*$")
LONG_DOC_FACTOR = 5  # a plain-text document with no blank line for LONG_DOC_FACTOR * max_doc_chars ends anyway

# Where a long text may be cut, best first: paragraph, line, sentence, clause, word. The sentence ends come before
# the clause marks so that a piece ends a sentence whenever one ends in the window.
_BREAKS = ("\n\n", "\n", "。", "！", "？", "…", ". ", "! ", "? ", "；", "; ", "，", ", ", "、", " ")


def split_document(text: str, max_chars: int) -> Iterator[str]:
    """Cut `text` into pieces of at most `max_chars` characters that join back to exactly `text`. Each piece ends
    at the best break (see _BREAKS) in the second half of its window, so pieces are at least half as long as asked;
    a hard cut only where that half has no break at all (e.g. one 100k-character token)."""
    pos = 0
    while len(text) - pos > max_chars:
        end = cut = pos + max_chars
        for sep in _BREAKS:
            i = text.rfind(sep, pos + max_chars // 2, end)  # sep lies wholly inside the window
            if i >= 0:
                cut = i + len(sep)
                break
        yield text[pos:cut]
        pos = cut
    yield text[pos:]


def _read_text(path: str, max_doc_chars: int) -> Iterator[dict]:
    limit = LONG_DOC_FACTOR * max_doc_chars
    buf, size, start, title, line_start = [], 0, 1, "", True
    # a line longer than a document arrives in pieces, so memory stays bounded by `limit` plus one piece
    for lineno, piece in iter_lines(path, max_line_bytes=max(1 << 16, 4 * max_doc_chars)):
        if line_start:
            mark = _FILE_MARK.match(piece)
            # a document ends at a file marker, or at a blank line once it is long enough (bounded memory per document)
            if mark or (not piece.strip() and size >= max_doc_chars):
                if size:
                    yield {"text": "".join(buf), "source": path, "title": title, "line": start}
                buf, size, start = [], 0, lineno + 1
                title = os.path.splitext(os.path.basename(mark.group(1)))[0] if mark else title
                line_start = piece.endswith("\n")
                continue
            if size and size + len(piece) > limit:  # no blank line for that long: end it before this line anyway
                yield {"text": "".join(buf), "source": path, "title": title, "line": start}
                buf, size, start = [], 0, lineno
        buf.append(piece)
        size += len(piece)
        line_start = piece.endswith("\n")
        if size > limit:  # only a line longer than a document gets here: cut it at sentence ends
            *full, rest = split_document("".join(buf), limit)
            for text in full:
                yield {"text": text, "source": path, "title": title, "line": start}
            buf, size, start = [rest], len(rest), lineno
    if size:
        yield {"text": "".join(buf), "source": path, "title": title, "line": start}


def iter_documents(
    path: str, text_fields: tuple[str, ...] = TEXT_FIELDS, max_doc_chars: int = 20000, allow_empty: bool = False
) -> Iterator[dict]:
    """Stream the documents of one file. An empty source is an error unless allow_empty, so a wrong path or an
    all-blank file never silently contributes nothing."""
    if not (os.path.isfile(path) or is_dataset_dir(path)):
        raise FileNotFoundError(f"{path}: no such file")
    kind = _kind(path)
    if kind == "table":
        docs = _read_table(path, text_fields)
    elif kind == "wiki":
        docs = _read_wiki(path)
    elif kind == "jsonl":
        docs = _read_jsonl(path, text_fields)
    elif kind == "json":
        docs = _read_json(path)
    else:
        docs = _read_text(path, max_doc_chars)
    n = 0
    for d in docs:
        if d["text"].strip():
            n += 1
            yield d
    if n == 0 and not allow_empty:
        raise ValueError(f"{path}: empty source (no non-blank documents)")


def iter_corpus(paths: list[str], **kw) -> Iterator[dict]:
    """All documents of several files and folders, in a fixed order."""
    for p in expand_paths(paths):
        yield from iter_documents(p, **kw)


# -----------------------------------------------------------------------------
# character classes


def is_cjk(ch: str) -> bool:
    """Han ideographs (BMP blocks and the supplementary-plane extensions) and CJK compatibility ideographs."""
    o = ord(ch)
    return (
        0x4E00 <= o <= 0x9FFF
        or 0x3400 <= o <= 0x4DBF
        or 0x20000 <= o <= 0x323AF
        or 0xF900 <= o <= 0xFAFF
        or 0x2F800 <= o <= 0x2FA1F
    )


_CJK_RE = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U000323af\U0002f800-\U0002fa1f]")


def count_cjk(text: str) -> int:
    return len(_CJK_RE.findall(text))


# -----------------------------------------------------------------------------
# conversion to simplified Chinese


_MW_MARKUP = re.compile(r"-\{(.*?)\}-", re.DOTALL)
_VARIANT_PREF = ("zh-cn", "zh-hans", "zh-sg", "zh-my", "zh", "zh-hant", "zh-tw", "zh-hk", "zh-mo")


def resolve_mw_markup(text: str) -> str:
    """Resolve MediaWiki language-conversion markup for zh-cn, as the wiki itself would render it:
    -{zh-cn:A;zh-tw:B}- -> A, -{A}- -> A (text protected from conversion), -{H|...}- (a hidden rule) -> nothing."""

    def one(m: re.Match) -> str:
        body = m.group(1)
        flag, sep, rest = body.partition("|")
        if sep and re.fullmatch(r"\s*[A-Za-z;]{1,4}\s*", flag):  # -{H|..}-, -{A|..}-, -{T|..}-, -{R|..}- ...
            if "H" in flag or "-" in flag or "T" in flag:
                return ""  # hidden/global rules and title rules do not print anything here
            body = rest
        variants = {}
        for part in body.split(";"):
            key, colon, val = part.partition(":")
            key = key.strip().lower()
            if colon and re.fullmatch(r"zh(-[a-z]+)?", key):
                variants[key] = val.strip()
        if not variants:
            return body
        return next((variants[k] for k in _VARIANT_PREF if k in variants), next(iter(variants.values())))

    return _MW_MARKUP.sub(one, text)


def make_converter(engine: str = "auto"):
    """Traditional -> simplified (zh-cn) converter. zhconv-rs (Rust, same MediaWiki+OpenCC tables, newer version)
    is faster than pure-Python zhconv; bench/RESULTS.md ("zhconv vs zhconv-rs") has how much and how far their
    outputs agree."""
    if engine in ("auto", "zhconv-rs"):
        try:  # optional (requirements.txt): the fast engine when installed, else zhconv
            from zhconv_rs import zhconv as _rs

            return "zhconv-rs", lambda s: _rs(s, "zh-cn", False)
        except ImportError:
            if engine == "zhconv-rs":
                raise
    # Imported here, not at the top: every stage reads paths through this module, and only the corpus cleaning
    # converts text (a training machine may lack zhconv: the GPU image does).
    import zhconv

    return "zhconv", lambda s: zhconv.convert(s, "zh-cn")


# -----------------------------------------------------------------------------
# cleaning rules; each one counts what it removed in `stats` (rule -> characters removed or changed)


_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\u202a-\u202e\ufeff\ufffc]")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>\n]*)?/?>")
_HTML_ENTITY = re.compile(r"&(?:#\d{1,7}|#x[0-9a-fA-F]{1,6}|[A-Za-z]{2,8});")
# brackets that hold nothing but separators: what is left after WikiExtractor drops a template, e.g. 萬民福音部（）是
_EMPTY_BRACKETS = re.compile(r"[（(【\[]\s*[，,；;、：:/\s]*\s*[）)】\]]")
_BRACKET_LEAD = re.compile(
    r"([（(])\s*[，,；;、]+\s*"
)  # （，意为…） -> （意为…）: the template before the comma is gone
_SAME_PUNCT = re.compile(r"([，。、；：！？,;!?])\1+")  # 。。 -> 。 ; kept: …… and —— which are single marks in Chinese
_LONG_ELLIPSIS = re.compile(r"…{3,}|\.{4,}|—{3,}|-{4,}|={4,}|~{3,}|·{3,}")
_LEADING_PUNCT = re.compile(r"(?m)^[ \t]*[，,；;、]+")  # a line that starts with a separator lost its first half
_WS_RUN = re.compile(r"[ \t\u00a0\u3000\u2000-\u200a]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def _sub(pattern: re.Pattern, repl, text: str, rule: str, stats: Counter) -> str:
    new = pattern.sub(repl, text)
    if len(new) != len(text):
        stats[rule] += len(text) - len(new)
    return new


def _fullwidth_alnum(text: str) -> str:
    # Full-width Latin letters and digits (Ａ-Ｚ, ａ-ｚ, ０-９) become ASCII. Full-width punctuation stays: （，。：）
    # are the correct forms in Chinese text, and mapping them to ASCII would change meaning in mixed text.
    return text.translate(_FW_TABLE)


_FW_RANGES = ((0xFF10, 0xFF19), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A))  # ０-９ Ａ-Ｚ ａ-ｚ
_FW_TABLE = {c: c - 0xFEE0 for lo, hi in _FW_RANGES for c in range(lo, hi + 1)}


def clean_text(text: str, convert, stats: Counter) -> str:
    """Apply every cleaning rule in order; `convert` is the callable from make_converter()."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _sub(_CONTROL, "", text, "control_chars", stats)
    text = _sub(_HTML_COMMENT, "", text, "html", stats)
    text = _sub(_HTML_TAG, "", text, "html", stats)
    if "&" in text:
        new = _HTML_ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
        stats["html"] += len(text) - len(new)
        text = new
    if "-{" in text:
        new = resolve_mw_markup(text)
        stats["mw_markup"] += len(text) - len(new)
        text = new
    new = convert(text)
    # conversion is almost always 1:1 per character; count changed characters (or the length change when not)
    same_len = len(new) == len(text)
    stats["zh_converted"] += sum(a != b for a, b in zip(text, new)) if same_len else abs(len(new) - len(text))
    text = new
    new = _fullwidth_alnum(text)
    stats["fullwidth_alnum"] += sum(a != b for a, b in zip(text, new))
    text = unicodedata.normalize("NFC", new)  # composed forms, so identical text hashes identically
    text = _sub(_EMPTY_BRACKETS, "", text, "empty_brackets", stats)
    text = _sub(_BRACKET_LEAD, r"\1", text, "empty_brackets", stats)
    text = _sub(_SAME_PUNCT, r"\1", text, "repeated_punct", stats)
    text = _sub(
        _LONG_ELLIPSIS,
        lambda m: m.group(0)[:2] if m.group(0)[0] in "…—" else m.group(0)[:3],
        text,
        "repeated_punct",
        stats,
    )
    text = _sub(_LEADING_PUNCT, "", text, "repeated_punct", stats)
    # whitespace: runs of spaces become one, indentation and trailing spaces go, at most one blank line in a row
    before = len(text)
    text = _WS_RUN.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    text = _MANY_NEWLINES.sub("\n\n", text).strip()
    stats["whitespace"] += before - len(text)
    return text


@dataclass
class FilterConfig:
    min_chars: int = 16  # drop documents with fewer non-space characters (a 4-line 5-character poem has 20)
    min_cjk_ratio: float = 0.3  # drop documents where Han characters are less than this share of non-space chars
    # plain-text files are cut into documents about this long (at blank lines); a document of any format longer
    # than LONG_DOC_FACTOR times this is split at paragraph or sentence ends (so cleaning memory stays bounded)
    max_doc_chars: int = 20000


def keep_document(text: str, cfg: FilterConfig) -> str | None:
    """None if the document is kept, else the name of the filter that drops it."""
    visible = len(text) - text.count(" ") - text.count("\n")
    if visible < cfg.min_chars:
        return "too_short"
    if cfg.min_cjk_ratio > 0 and count_cjk(text) < cfg.min_cjk_ratio * visible:
        return "mostly_non_cjk"
    return None


# -----------------------------------------------------------------------------
# exact deduplication


_NORM_DROP = re.compile(r"[\s\W_]+")


def dedup_key(text: str) -> bytes:
    """8-byte hash of the text with case, whitespace and punctuation removed: copies that differ only in spacing or
    punctuation collide. 8 bytes give a 1e-7 collision chance at 2 million documents."""
    return hashlib.blake2b(_NORM_DROP.sub("", text.lower()).encode("utf-8"), digest_size=8).digest()
