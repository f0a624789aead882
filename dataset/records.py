"""
Record files, the one reader under the chat, preference and prompt data (dataset/chat_data.py, preference_data.py,
prompt_data.py): files in, converted records out, with one bad-record policy, one skip count and one max_samples.

    from dataset.records import read_records
    items, stats = read_records("a.jsonl,more/", lambda path: convert, "conversations", on_bad="skip")

A file is JSON Lines or one JSON array (whatever its extension says), optionally gzipped (.gz), or a Hugging Face
`datasets` file (parquet, Arrow, a save_to_disk folder; dataset/table_files.py, needs pyarrow) whose rows are read
like JSON lines; paths are expanded by dataset/text_sources.py expand_paths (files, folders, globs).

Bad records: `convert(record, where)` raises BadRecord for a record it cannot use (so does the reader, for a line
that is not UTF-8 or not JSON). With on_bad="error" that stops the run naming file:line; with "skip" it is counted
as "skip:<reason>" and the first few per file are logged. UnreadableFile (no format we know: the whole file would
be lost) is an error unless on_bad="skip_file". SkipRecord is a good record the caller leaves out (a duplicate pair, a
prompt too long for rollouts): always counted as "skip:<reason>", never an error. A truncated .gz stops the run
with "error"; with "skip" the file ends there with a warning.
on_bad defaults to "error" in every reader: code that reads data without choosing a policy (a test, a notebook, a
bench script) fails loudly on a broken record instead of quietly training on less. The stages choose with their
`on_bad_record` key (default skip: a few broken lines in a downloaded set should not stop a run), and every reader
logs its skip counts, so nothing is dropped unseen.
No silent loss: under skip, a file that yields nothing, or loses more than half its records to bad ones, stops the
run (UnusableFile) naming the file, its first record's shape, the first error and the formats the reader knows; a
whole source is gone only when the user says so with on_bad="skip_file" (then a warning names it).
"""

import gzip
import json
import re
import zlib
from collections import Counter
from collections.abc import Callable

from dataset.table_files import check_text_input, is_table, iter_rows
from dataset.text_sources import expand_paths, open_binary

# What a bad record does: stop the run naming file:line | skip it and count the reason (but a file that yields
# nothing, or loses more than half its records, stops the run) | skip it, and let such a file go too, with a warning.
ON_BAD = ("error", "skip", "skip_file")


class BadRecord(ValueError):
    """A record that cannot be used as it is; the message starts with file:line."""

    def __init__(self, where: str, reason: str, detail: str = ""):
        super().__init__(f"{where}: {reason}" + (f" ({detail})" if detail else ""))
        self.where, self.reason, self.detail = where, reason, detail


class UnreadableFile(BadRecord):
    """A record showing that its whole file cannot be read (no format we know): an error even when on_bad=skip."""


class TruncatedFile(BadRecord):
    """The file ends early (a truncated .gz): an error with on_bad=error; with skip, the end of that file."""


class UnusableFile(ValueError):
    """A file that yields nothing, or loses more than half its records, under on_bad=skip or error: the message names
    the file, what it holds and the formats the reader knows."""


class SkipRecord(Exception):
    """A usable record the caller leaves out (a duplicate, a prompt too long): counted, whatever on_bad says."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# -----------------------------------------------------------------------------
# Reading files: records with their line numbers


def _not_utf8(path: str, line: int, e: UnicodeDecodeError) -> BadRecord:
    return BadRecord(
        f"{path}:{line}",
        "not valid UTF-8",
        f"{e.reason} at byte {e.start}; convert the file to UTF-8 first (e.g. iconv -f GB18030 -t UTF-8)",
    )


def iter_records(path: str):
    """Yield (line, record) for a JSON Lines or JSON array file, ("row N", row) for a parquet/Arrow table.
    Lines are decoded one by one, so a bad byte or broken JSON yields (line, BadRecord) and the file goes on; a
    truncated .gz yields one TruncatedFile naming the line reached, and ends the file."""
    if is_table(path):
        for n, row in iter_rows(path):
            yield f"row {n}", row
        return
    check_text_input(path)  # binary files and raw Wikipedia dumps are refused by what they are
    n, is_array = 0, False
    try:
        with open_binary(path) as f:
            is_array = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
            f.seek(0)
            if is_array:
                raw = f.read()
                if raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:  # one JSON document: nothing after a bad byte can be trusted
                    e2 = _not_utf8(path, raw[: e.start].count(b"\n") + 1, e)
                    raise UnreadableFile(e2.where, e2.reason, e2.detail) from None
                yield from _array_records(text, path)
                return
            for n, raw in enumerate(f, 1):
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a byte-order mark, which editors on Windows like to add
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield n, _not_utf8(path, n, e)
                    continue
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, BadRecord(f"{path}:{n}", "malformed", f"invalid JSON: {e.msg} at column {e.colno}")
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a cut or corrupt .gz, raised only when read there
        if is_array:  # one JSON document: what was read before the cut cannot be trusted either
            raise UnreadableFile(path, "truncated file", f"{e}; is it a truncated or mislabelled .gz?") from None
        yield (
            n + 1,
            TruncatedFile(
                f"{path}:{n + 1}",
                "truncated file",
                f"cannot read on after line {n} ({e}); is it a truncated or mislabelled .gz?",
            ),
        )


def _array_records(text: str, path: str):
    """Walk a JSON array element by element (raw_decode), so each record keeps the line it starts on.
    A syntax error inside an array cannot be skipped (nothing after it can be trusted), so it always raises."""
    decoder = json.JSONDecoder()
    space = re.compile(r"\s*")
    pos = space.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    while pos < len(text) and text[pos] != "]":
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise BadRecord(f"{path}:{e.lineno}", "malformed", f"invalid JSON: {e.msg}") from None
        line += text.count("\n", counted, pos)
        counted = pos
        yield line, record
        pos = space.match(text, end).end()
        if pos < len(text) and text[pos] == ",":
            pos = space.match(text, pos + 1).end()
        elif pos >= len(text) or text[pos] != "]":
            raise BadRecord(f"{path}:{1 + text.count(chr(10), 0, pos)}", "malformed", "expected ',' or ']'")


# -----------------------------------------------------------------------------
# Converting: every record of every file, one policy for the bad ones


def rename_keys(record, columns: dict):
    """Rename the keys of a record, of the dicts in its lists (turns) and of its dict values (a {from, value}
    reply) by `columns`; one level of nesting, which is where every chat and preference schema keeps its turns."""
    if not columns or not isinstance(record, dict):
        return record

    def one(d: dict) -> dict:
        return {columns.get(k, k): v for k, v in d.items()}

    out = {}
    for k, v in one(record).items():
        if isinstance(v, list):
            v = [one(x) if isinstance(x, dict) else x for x in v]
        elif isinstance(v, dict):
            v = one(v)
        out[k] = v
    return out


def describe_record(record) -> str:
    """A record's shape for an error message, without its text: {chosen: [{content, role}], prompt: str, ...}."""

    def shape(v) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(sorted(v)[:8]) + (", ..." if len(v) > 8 else "") + "}"
        if isinstance(v, list):
            return f"[{shape(v[0])}]" if v else "[]"
        return type(v).__name__

    if not isinstance(record, dict):
        return shape(record)
    items = [f"{k}: {shape(v)}" for k, v in sorted(record.items())[:8]]
    return "{" + ", ".join(items) + (", ..." if len(record) > 8 else "") + "}"


def _usable_records(path: str, convert, on_bad: str, stats: Counter, log, columns: dict | None, seen: dict):
    """Yield convert(record, where) for every record of one file that converts. A record that does not (convert or
    the reader raised BadRecord) stops the run naming file:line when on_bad=error; with on_bad=skip it is
    counted in stats as "skip:<reason>" and the first few per file are logged, so the cause is findable without
    flooding the log. stats["records"] counts every record read. `columns` renames keys first (rename_keys).
    SkipRecord is counted, whatever on_bad says. A truncated file stops the run with on_bad=error; with skip, the
    file ends there with a warning. `seen` gets the file's first record's shape and first error (UnusableFile's
    message). With on_bad=skip_file a file of no known format (UnreadableFile) is left out with a warning."""
    shown = 0
    for line, record in iter_records(path):
        if "record" not in seen and not isinstance(record, BadRecord):
            seen["record"] = describe_record(record)
        where = f"{path}:{line}"
        if isinstance(record, TruncatedFile):
            if on_bad == "error":
                raise record
            stats["truncated files"] += 1
            log(f"[data] WARNING: {record}; the rest of {path} is lost")
            return
        stats["records"] += 1
        try:
            if isinstance(record, BadRecord):
                raise record
            item = convert(rename_keys(record, columns), where)
        except SkipRecord as e:
            stats[f"skip:{e.reason}"] += 1
            continue
        except BadRecord as e:
            if isinstance(e, UnreadableFile) and on_bad == "skip_file":
                stats["skip:unreadable file"] += 1
                log(f"[data] WARNING: {e}; the whole of {path} is left out (on_bad_record=skip_file)")
                return
            if on_bad == "error" or isinstance(e, UnreadableFile):
                raise
            seen.setdefault("error", str(e))
            seen["bad"] = seen.get("bad", 0) + 1
            stats[f"skip:{e.reason}"] += 1
            if shown < 3:
                log(f"[data] skipped {e}")
                shown += 1
            continue
        yield item


def read_records(
    paths: str | list[str],
    convert_file: Callable[[str], Callable],
    what: str,
    on_bad: str = "error",
    max_samples: int = 0,
    stats: Counter | None = None,
    log=print,
    columns: dict | None = None,
    file_note: Callable[[str], str] | None = None,
    formats: str = "",
) -> tuple[list, Counter]:
    """Every record of every file, converted: convert_file(path) gives the file's convert(record, where) (a new one
    per file, so it may keep what it learns from the file's first record, e.g. chat_data its format).

    Returns (items, stats); stats (the Counter given, or a new one) counts every record read ("records") and each
    skip reason ("skip:<reason>"). max_samples > 0 keeps the first max_samples items of each file (quick runs and
    tests). columns renames keys first (rename_keys). Logs one line per file ("{n} {what}", with file_note(path) in
    brackets) and one line with the skip counts of this call, if any.
    No silent loss: with on_bad=skip (or error) a file that yields nothing (a duplicate of an earlier record counts
    as yielded) or whose bad records are more than half of it raises UnusableFile, naming the first record's shape,
    the first error and `formats` (those the caller knows); with on_bad=skip_file it is only warned about."""
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be one of {', '.join(ON_BAD)}, got '{on_bad}'")
    stats = Counter() if stats is None else stats
    before = Counter(stats)
    items = []
    for path in expand_paths(paths):
        kept, at_start, seen = 0, Counter(stats), {}
        for item in _usable_records(path, convert_file(path), on_bad, stats, log, columns, seen):
            items.append(item)
            kept += 1
            if max_samples and kept >= max_samples:
                break
        log(f"[data] {path}: {kept:,} {what}" + (f" ({file_note(path)})" if file_note else ""))
        _check_file_yield(path, stats - at_start, kept, what, seen, formats, on_bad, log)
    skipped = {k.removeprefix("skip:"): n - before[k] for k, n in sorted(stats.items()) if k.startswith("skip:")}
    skipped = {reason: n for reason, n in skipped.items() if n}
    if skipped:
        counts = ", ".join(f"{reason}: {n:,}" for reason, n in skipped.items())
        log(f"[data] {sum(skipped.values()):,} records skipped ({counts})")
    return items, stats


def _check_file_yield(path: str, counts: Counter, kept: int, what: str, seen: dict, formats: str, on_bad: str, log):
    """Stop the run (on_bad=skip or error) or warn (skip_file) when a file yields nothing or loses over half its
    records to bad ones (under error a bad record has stopped the run already; an empty file, or one whose prompts
    are all too long, has not): a source gone unseen is worse than a stopped run. Duplicates of earlier records
    count as yielded."""
    read = counts["records"]
    skipped = {k.removeprefix("skip:"): n for k, n in counts.items() if k.startswith("skip:")}
    bad = seen.get("bad", 0)  # records skipped as bad (BadRecord), not good ones left out (SkipRecord)
    if "unreadable file" in skipped:
        return
    if kept + skipped.get("duplicate", 0) > 0 and bad * 2 <= read:  # a duplicate was yielded by an earlier file
        return
    reasons = ", ".join(f"{reason}: {n:,}" for reason, n in sorted(skipped.items())) or "no records"
    msg = (
        f"{path}: {kept:,} {what} from {read:,} records ({reasons})"
        + (f"; first record {seen['record']}" if "record" in seen else "")
        + (f"; first error {seen['error']}" if "error" in seen else "")
        + (f". Formats read: {formats}" if formats else "")
    )
    if on_bad == "skip_file":
        log(f"[data] WARNING: {msg}; going on without it (on_bad_record=skip_file)")
        return
    raise UnusableFile(
        f"{msg}. Map another schema's keys with columns=src=dst,...; on_bad_record=skip_file goes on without "
        f"such a file"
    )
