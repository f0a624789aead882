"""
Hugging Face `datasets` files (parquet, Arrow IPC, save_to_disk folders) as rows, and the check that tells every
other binary input apart from text before a text reader tries to decode it.

    from dataset.table_files import check_text_input, is_table, iter_rows
    if is_table(path):
        for row_no, row in iter_rows(path, columns=["text"]):   # row: a dict, like one JSON line
            ...
    else:
        check_text_input(path)   # ValueError for zip/bz2/xz/zstd/sqlite/..., a raw Wikipedia dump, UTF-16, LFS pointers

Tables are read with pyarrow, an optional dependency (`pip install pyarrow`): the one library `datasets` itself
reads these files with, without the rest of `datasets` (fsspec, the Hub client, pandas...). They are streamed and
converted to Python in pieces of about BATCH_BYTES: Arrow IPC through the stream or file reader over a memory map
(the file is paged in, never copied whole), parquet through ParquetFile.iter_batches, whose memory is about one
row group of the columns read (the unit Parquet decodes), never the whole file. A save_to_disk folder (dataset_info.json
or state.json beside data-*.arrow) is one input; its .arrow files are read in the order state.json lists them.
"""

import bz2
import codecs
import gzip
import json
import os
from collections.abc import Iterator

import yaml

PYARROW_HINT = "pip install pyarrow"
TABLE_EXTS = (".parquet", ".arrow")
BATCH_ROWS = 1024  # at most this many rows are converted to Python at once ...
BATCH_BYTES = 1 << 20  # ... and about at most this much data, so rows of whole books stay bounded too

# -----------------------------------------------------------------------------
# what a path is


def is_dataset_dir(path: str) -> bool:
    """A `datasets` save_to_disk folder (one split): dataset_info.json or state.json plus .arrow files."""
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    return any(n in names for n in ("state.json", "dataset_info.json")) and any(n.endswith(".arrow") for n in names)


def is_dataset_dict_dir(path: str) -> bool:
    """A save_to_disk folder of a DatasetDict: dataset_dict.json and one subfolder per split."""
    return os.path.isfile(os.path.join(path, "dataset_dict.json"))


def dataset_dict_message(path: str) -> str:
    splits = sorted(n for n in os.listdir(path) if is_dataset_dir(os.path.join(path, n)))
    return (
        f"{path}: a DatasetDict saved with save_to_disk (splits: {', '.join(splits) or 'none found'}); name the "
        f"split folder to read, e.g. {os.path.join(path, splits[0] if splits else 'train')}"
    )


DATASET_METADATA = ("dataset_info.json", "state.json", "dataset_dict.json")  # `datasets` bookkeeping, never rows


def dataset_card(path: str) -> dict | None:
    """The YAML front matter of a Hub dataset card (a README.md that opens with a `---` block: license, language,
    configs...), or None for any other file, a card without front matter or one whose YAML does not parse."""
    if os.path.basename(path) != "README.md" or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read(1 << 20)  # the front matter sits at the top of the card
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    front, sep, _ = text[4:].partition("\n---")
    if not text.startswith("---\n") or not sep:
        return None
    try:
        meta = yaml.safe_load(front)
    except yaml.YAMLError:
        return None
    return meta if isinstance(meta, dict) else None


def is_dataset_metadata(path: str) -> bool:
    """A file that describes a dataset instead of holding it: `datasets`' JSON bookkeeping and the Hub dataset
    card. A folder given as input leaves them out (text_sources.expand_paths), so a downloaded Hub dataset can be
    named as it is without its card becoming training text."""
    return os.path.basename(path) in DATASET_METADATA or dataset_card(path) is not None


def _table_kind(path: str) -> str | None:
    """'parquet' | 'arrow_file' | 'arrow_stream' | 'dir' | None, from the content (the name may say nothing)."""
    if is_dataset_dir(path):
        return "dir"
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PAR1":
        return "parquet"
    if head[:6] == b"ARROW1":
        return "arrow_file"
    # An IPC stream starts with a message: the 0xFFFFFFFF continuation marker then its length (older writers omit
    # the marker, so the extension decides then).
    if head[:4] == b"\xff\xff\xff\xff" or (path.endswith(".arrow") and len(head) == 8):
        return "arrow_stream"
    return None


def is_table(path: str) -> bool:
    """True for a parquet or Arrow file or a save_to_disk folder (read with iter_rows, not as text)."""
    return _table_kind(path) is not None


def _pyarrow():
    try:  # optional (pip install pyarrow): asked for only when a table is read, with the hint if it is missing
        import pyarrow
        import pyarrow.ipc  # noqa: F401  (imported to load the submodule, used as pyarrow.ipc)
        import pyarrow.parquet  # noqa: F401  (the same)
    except ImportError:
        raise ImportError(f"reading parquet/Arrow/save_to_disk data needs pyarrow: {PYARROW_HINT}") from None
    return pyarrow


# -----------------------------------------------------------------------------
# rows


def _dir_files(path: str) -> list[str]:
    state = os.path.join(path, "state.json")
    if os.path.isfile(state):
        with open(state, encoding="utf-8") as f:
            files = [d["filename"] for d in json.load(f).get("_data_files", [])]
        if files:
            return [os.path.join(path, name) for name in files]
    return [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".arrow")]


def _batches(pa, path: str, kind: str, columns: list[str] | None):
    if kind == "parquet":
        pf = pa.parquet.ParquetFile(path)
        md = pf.metadata
        row_bytes = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups)) / max(md.num_rows, 1)
        rows = int(max(1, min(BATCH_ROWS, BATCH_BYTES // max(row_bytes, 1))))
        yield from _slices(pf.iter_batches(batch_size=rows, columns=columns))
        return
    with pa.memory_map(path) as source:  # IPC batches are mapped, not copied: only the slices we convert cost RAM
        reader = pa.ipc.open_file(source) if kind == "arrow_file" else pa.ipc.open_stream(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if kind == "arrow_file" else reader
        yield from _slices(batch.select(columns) if columns else batch for batch in batches)


def _slices(batches):
    # a writer's batch may hold 1000 long documents: convert it in pieces of about BATCH_BYTES
    for batch in batches:
        step = max(1, min(BATCH_ROWS, int(BATCH_BYTES * batch.num_rows / max(batch.nbytes, 1))))
        for start in range(0, batch.num_rows, step):
            yield batch.slice(start, step)


def _is_json(arrow_type, field=None) -> bool:
    """Arrow's canonical JSON type (arrow.json: JSON text per value), also when this pyarrow does not know it and
    keeps it as its storage type, naming it in the field's metadata."""
    if getattr(arrow_type, "extension_name", None) == "arrow.json":
        return True
    return bool(field is not None and field.metadata and field.metadata.get(b"ARROW:extension:name") == b"arrow.json")


def _json_decoder(pa, arrow_type, field=None):
    """A function that parses every arrow.json value inside a converted value of `arrow_type`, or None when the type
    holds none. `datasets` 5 stores a column whose rows differ in shape as JSON (a list of messages where some carry
    tool_calls or a weight: list<arrow.json>), which to_pylist gives as text, not as the dicts JSONL gives."""
    if _is_json(arrow_type, field):
        return lambda v: None if v is None else json.loads(v)
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        inner = _json_decoder(pa, arrow_type.value_type, arrow_type.value_field)
        return None if inner is None else lambda v: None if v is None else [inner(x) for x in v]
    if pa.types.is_struct(arrow_type):
        fields = [arrow_type.field(i) for i in range(arrow_type.num_fields)]
        inner = {f.name: d for f in fields if (d := _json_decoder(pa, f.type, f)) is not None}
        if not inner:
            return None
        return lambda v: None if v is None else {k: inner[k](x) if k in inner else x for k, x in v.items()}
    return None


def column_names(path: str) -> list[str]:
    """The column names of a table file or folder (its schema, nothing else is read)."""
    pa, kind = _pyarrow(), _table_kind(path)
    if kind == "dir":
        path = _dir_files(path)[0]
        kind = _table_kind(path)
    if kind == "parquet":
        return list(pa.parquet.ParquetFile(path).schema_arrow.names)
    with pa.memory_map(path) as source:
        reader = pa.ipc.open_file(source) if kind == "arrow_file" else pa.ipc.open_stream(source)
        return list(reader.schema.names)


def iter_rows(path: str, columns: list[str] | None = None) -> Iterator[tuple[int, dict]]:
    """(row number from 1, row as a dict of Python values) for every row of a table file or save_to_disk folder;
    nested columns (lists of structs, e.g. a conversation) come out as lists of dicts, as json.loads gives them, and
    so do Arrow JSON values (what `datasets` 5 writes for rows of different shapes), parsed."""
    pa, kind = _pyarrow(), _table_kind(path)
    if kind is None:
        raise ValueError(f"{path}: not a parquet or Arrow file")
    files = [(p, _table_kind(p)) for p in _dir_files(path)] if kind == "dir" else [(path, kind)]
    n = 0
    for file, file_kind in files:
        decoders = None  # {column: parse its JSON values}, from the file's schema
        try:
            for batch in _batches(pa, file, file_kind, columns):
                if decoders is None:
                    decoders = {f.name: d for f in batch.schema if (d := _json_decoder(pa, f.type, f)) is not None}
                for row in batch.to_pylist():
                    for name, decode in decoders.items():
                        row[name] = decode(row[name])
                    n += 1
                    yield n, row
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{file}: cannot read as {file_kind} after row {n} ({e}); truncated file?") from None


# -----------------------------------------------------------------------------
# binary input that is not a table: a clear refusal instead of "not valid UTF-8"


_MAGIC = (  # (prefix, what it is, what to do)
    (b"PK\x03\x04", "a zip archive", "unzip it and give the files inside"),
    (b"BZh", "bzip2-compressed", "decompress it first (bunzip2 -k FILE)"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it first (xz -dk FILE)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it first (zstd -d FILE)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", "extract it first (7z x FILE)"),
    (b"SQLite format 3\x00", "an SQLite database", "export the table to JSONL first"),
    (b"\x1f\x8b", "gzip-compressed but not named .gz", "rename it to end in .gz"),
    (b"\x89HDF", "an HDF5 file", "export it to JSONL or parquet first"),
    (b"\x93NUMPY", "a NumPy array", "give the text it was made from"),
)


def wiki_dump_hint(path: str) -> str:
    """The commands that turn a raw MediaWiki dump into text we read (the same as config/recipes/README.md)."""
    # WikiExtractor reads the dump as it is, .xml or .xml.bz2, so the command names the file given
    return (
        f"{path}: a raw Wikipedia XML dump (siteinfo, ids and wikitext markup, not text); extract the articles "
        f"first: `pip install wikiextractor && python -m wikiextractor.WikiExtractor {path} -o dataset/wiki "
        f"--json` (on Python 3.11+ install wikiextractor from its GitHub master, see config/recipes/README.md), "
        f"then `python scripts/zh_simplify.py --input dataset/wiki --output dataset/zh/clean.jsonl` and use that"
    )


def _is_mediawiki(text_head: bytes) -> bool:
    head = text_head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"<?xml"):
        head = head[head.find(b"?>") + 2 :].lstrip()
    return head.startswith(b"<mediawiki")


def _utf8_so_far(raw: bytes) -> bool:
    try:
        codecs.getincrementaldecoder("utf-8")().decode(raw, final=False)  # a character cut at the end is fine
    except UnicodeDecodeError:
        return False
    return True


def check_text_input(path: str) -> None:
    """Raise ValueError naming what `path` is when it is a binary file or a raw Wikipedia dump; return for text.
    Looks at the first bytes only (of the decompressed stream for .gz)."""
    with open(path, "rb") as f:
        raw = f.read(4096)
        f.seek(257)
        tar = f.read(5) == b"ustar"
    if path.endswith(".gz") and raw[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as g:
                raw = g.read(4096)
        except (OSError, EOFError):
            return  # a broken .gz: the text reader reports it with the line reached
    if raw[:3] == b"BZh":  # a dump is usually .xml.bz2: look inside before calling it just "bzip2"
        try:  # bzip2 gives no output before a whole block (up to 900 KB) is in, so let bz2.open read that far
            with bz2.open(path, "rb") as b:
                inner = b.read(4096)
        except (OSError, EOFError):
            inner = b""
        if _is_mediawiki(inner):
            raise ValueError(wiki_dump_hint(path))
    if _is_mediawiki(raw):
        raise ValueError(wiki_dump_hint(path))
    if raw.startswith(b"version https://git-lfs.github.com/spec/"):
        raise ValueError(
            f"{path}: a Git LFS pointer (the placeholder a clone without git-lfs leaves), not the data; fetch the "
            f"file itself: `git lfs install && git lfs pull` in the clone, or `huggingface-cli download`"
        )
    for magic, what, todo in _MAGIC:
        if raw.startswith(magic):
            raise ValueError(f"{path}: {what}, not text; {todo.replace('FILE', path)}")
    if tar:  # a tar header has its magic at byte 257
        raise ValueError(f"{path}: a tar archive, not text; extract it first (tar xf {path})")
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ValueError(f"{path}: UTF-16 text; convert it to UTF-8 first (iconv -f UTF-16 -t UTF-8)")
    if b"\x00" in raw and not _utf8_so_far(raw):  # NUL bytes and not UTF-8: no text we could be asked to read
        raise ValueError(
            f"{path}: a binary file (NUL bytes in its first 4 KB), not text of any encoding; give "
            f"text, JSONL, JSON, parquet, Arrow or a save_to_disk folder"
        )
