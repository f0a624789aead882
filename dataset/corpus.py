"""
Corpus cleaning: raw Chinese text in, JSONL out, one document per line: {"text": ..., "source": ..., "title": ...}.
scripts/zh_simplify.py is its command line; the pipeline (trainer/pipeline.py) calls simplify() directly.

Inputs: files of every format dataset/text_sources.py reads. Rules, in order: control characters, HTML remnants,
MediaWiki -{..}- conversion markup, traditional -> simplified (zh-cn), full-width letters/digits, empty brackets,
repeated punctuation, whitespace; then documents that are too short or mostly non-Chinese are dropped, and exact
duplicates (after normalisation) are dropped. Memory stays flat: plain text is read in bounded pieces, a document
longer than LONG_DOC_FACTOR * max_doc_chars is split at paragraph or sentence ends before cleaning, documents stream
through a bounded window of worker batches, and only an 8-byte hash per kept document is remembered (for
deduplication, in a sorted array: see SeenKeys).
"""

import difflib
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter, deque

import numpy as np
import zhconv

from dataset.text_sources import (
    LONG_DOC_FACTOR,
    TEXT_FIELDS,
    FilterConfig,
    clean_text,
    dedup_key,
    iter_documents,
    keep_document,
    make_converter,
    split_document,
)

# -----------------------------------------------------------------------------
# worker side: every process builds its own converter once


_W: dict = {}


def _init_worker(engine: str, fcfg: FilterConfig) -> None:
    _W["engine"], _W["convert"] = make_converter(engine)
    _W["fcfg"] = fcfg


def _clean_batch(docs: list[dict]) -> tuple[list[tuple], Counter]:
    stats: Counter = Counter()
    out = []
    for d in docs:
        text = clean_text(d["text"], _W["convert"], stats)
        out.append((text, d["source"], d["title"], keep_document(text, _W["fcfg"])))
    return out, stats


def _batches(paths: list[str], fcfg: FilterConfig, batch_chars: int, stats: Counter, text_fields: tuple[str, ...]):
    batch, size = [], 0
    limit = LONG_DOC_FACTOR * fcfg.max_doc_chars
    for path in paths:
        for d in iter_documents(path, text_fields, max_doc_chars=fcfg.max_doc_chars):
            # A huge document (a 50 MB JSON string) would cost many times its size in one worker's regex passes;
            # its pieces are cleaned, filtered and deduplicated as documents of their own.
            # (The plain-text reader already keeps to this limit.)
            stats["docs_split"] += len(d["text"]) > limit
            for text in split_document(d["text"], limit):
                stats["docs_in"] += 1
                stats["chars_in"] += len(text)
                stats["bytes_in"] += len(text.encode("utf-8"))
                batch.append({"text": text, "source": os.path.basename(path), "title": d["title"]})
                size += len(text)
                if size >= batch_chars:
                    yield batch
                    batch, size = [], 0
    if batch:
        yield batch


class SeenKeys:
    """Exact set of the 8-byte dedup keys at ~8 bytes per key (a Python set of bytes costs ~75): new keys go to a
    small set, which is merged into one sorted uint64 array every `spill` keys. Keeps cleaning RSS flat."""

    def __init__(self, spill: int = 1 << 14):
        self.recent: set[int] = set()
        self.sorted = np.empty(0, dtype=np.uint64)
        self.spill = spill

    def add(self, key: bytes) -> bool:
        """Remember `key`; False if it was already there."""
        k = int.from_bytes(key, "little")
        if k in self.recent:
            return False
        if self.sorted.size:
            i = int(np.searchsorted(self.sorted, np.uint64(k)))
            if i < self.sorted.size and int(self.sorted[i]) == k:
                return False
        self.recent.add(k)
        if len(self.recent) >= self.spill:
            # no key is in both (checked above), so concatenate + in-place sort: ~2 arrays at once, not union1d's ~4
            merged = np.concatenate([self.sorted, np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent))])
            merged.sort()
            self.sorted = merged
            self.recent.clear()
        return True


# -----------------------------------------------------------------------------
# main loop: read -> clean in workers (bounded window, in order) -> dedup -> write


def worker_start_method(platform: str = sys.platform) -> str:
    """fork on Linux (workers start without re-importing anything); spawn elsewhere: Windows has no fork, and
    macOS's is unsafe once threads exist (Python's own default there is spawn)."""
    return "fork" if platform.startswith("linux") else "spawn"


def simplify(
    paths: list[str],
    output: str,
    fcfg: FilterConfig,
    engine: str = "auto",
    workers: int = 0,
    batch_chars: int = 200_000,
    quiet: bool = False,
    text_fields: tuple[str, ...] = TEXT_FIELDS,
) -> Counter:
    """Clean `paths` into `output` (JSONL); text_fields: the JSONL fields / table columns tried for the text."""
    workers = workers or os.cpu_count() or 1
    stats: Counter = Counter()
    seen = SeenKeys()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    t0 = time.time()
    last = t0
    engine_name = make_converter(engine)[0]
    with (
        mp.get_context(worker_start_method()).Pool(workers, _init_worker, (engine, fcfg)) as pool,
        open(tmp, "w", encoding="utf-8") as fout,
    ):
        # Pool.imap would pull the whole input into its task queue if readers outpace workers, so we keep at most
        # 2 batches per worker in flight: memory is bounded by batch_chars * 2 * workers, whatever the input size.
        pending: deque = deque()
        batches = _batches(paths, fcfg, batch_chars, stats, text_fields)

        def drain_one():
            cleaned, st = pending.popleft().get()
            stats.update(st)
            for text, source, title, drop in cleaned:
                if drop:
                    stats["dropped_" + drop] += 1
                    continue
                if not seen.add(dedup_key(text)):
                    stats["dropped_duplicate"] += 1
                    continue
                stats["docs_out"] += 1
                stats["chars_out"] += len(text)
                fout.write(json.dumps({"text": text, "source": source, "title": title}, ensure_ascii=False) + "\n")

        for batch in batches:
            pending.append(pool.apply_async(_clean_batch, (batch,)))
            while len(pending) >= 2 * workers:
                drain_one()
            now = time.time()
            if not quiet and now - last > 5:
                last = now
                print(f"  {stats['docs_in']:,} docs | {stats['bytes_in'] / 1e6 / (now - t0):.2f} MB/s", flush=True)
        while pending:
            drain_one()
    if stats["docs_out"] == 0:
        os.remove(tmp)
        raise ValueError(
            f"no document survived cleaning out of {stats['docs_in']} read from {', '.join(paths)}; "
            f"check --min_chars/--min_cjk_ratio (use --min_cjk_ratio 0 for non-Chinese text)"
        )
    os.replace(tmp, output)  # a half-written output never looks finished
    stats["seconds"] = round(time.time() - t0, 2)
    stats["engine"] = engine_name
    return stats


def print_summary(stats: Counter, output: str) -> None:
    mb = stats["bytes_in"] / 1e6
    print(f"wrote {output}")
    secs = max(stats["seconds"], 1e-9)
    print(f"  engine {stats['engine']} | {mb:.1f} MB in {secs:.1f}s = {mb / secs:.2f} MB/s")
    print(
        f"  documents: {stats['docs_in']:,} in -> {stats['docs_out']:,} out "
        f"(too short {stats['dropped_too_short']:,}, mostly non-CJK {stats['dropped_mostly_non_cjk']:,}, "
        f"duplicate {stats['dropped_duplicate']:,})"
    )
    if stats["docs_split"]:
        print(
            f"  long documents split at paragraph/sentence ends: {stats['docs_split']:,} (counted above as their "
            f"pieces)"
        )
    print(f"  characters: {stats['chars_in']:,} in -> {stats['chars_out']:,} out")
    for rule in (
        "control_chars",
        "html",
        "mw_markup",
        "zh_converted",
        "fullwidth_alnum",
        "empty_brackets",
        "repeated_punct",
        "whitespace",
    ):
        verb = "changed" if rule in ("zh_converted", "fullwidth_alnum") else "removed"
        print(f"  {rule:16s} {stats[rule]:>12,} chars {verb}")


# -----------------------------------------------------------------------------
# zhconv vs zhconv-rs: same conversion? how fast?


def compare_engines(paths: list[str], max_docs: int = 100_000) -> dict:
    """Convert the same documents with both engines: time, identical documents, and the commonest differences."""
    from zhconv_rs import zhconv as rs  # optional (requirements.txt); this comparison alone cannot do without it

    docs = []
    for path in paths:
        docs.extend(d["text"] for d in iter_documents(path))
        if len(docs) >= max_docs:
            break
    docs = docs[:max_docs]
    chars = sum(map(len, docs))
    t = time.time()
    a = [zhconv.convert(d, "zh-cn") for d in docs]
    t_py = time.time() - t
    t = time.time()
    b = [rs(d, "zh-cn", False) for d in docs]
    t_rs = time.time() - t
    same_docs = sum(x == y for x, y in zip(a, b))
    diff_chars, examples = 0, Counter()
    for x, y in zip(a, b):
        if x == y:
            continue
        if len(x) == len(y):  # the usual case: character-for-character substitutions, compared in linear time
            diff = [i for i in range(len(x)) if x[i] != y[i]]
            diff_chars += len(diff)
            for i in diff[:20]:
                examples[f"{x[max(i - 1, 0) : i + 2]}->{y[max(i - 1, 0) : i + 2]}"] += 1
        else:  # a word mapped to one of another length: align a bounded window around the first difference
            i = next(k for k in range(min(len(x), len(y))) if x[k] != y[k]) if x[: len(y)] != y[: len(x)] else 0
            m = difflib.SequenceMatcher(None, x[i : i + 2000], y[i : i + 2000], autojunk=False)
            for op, i1, i2, j1, j2 in m.get_opcodes():
                if op != "equal":
                    diff_chars += max(i2 - i1, j2 - j1)
                    examples[f"{x[i + i1 : i + i2]}->{y[i + j1 : i + j2]}"] += 1
    res = {
        "docs": len(docs),
        "chars": chars,
        "zhconv_s": round(t_py, 2),
        "zhconv_rs_s": round(t_rs, 2),
        "zhconv_MBps": round(chars * 3 / 1e6 / t_py, 2),
        "zhconv_rs_MBps": round(chars * 3 / 1e6 / t_rs, 2),
        "identical_docs": same_docs,
        "differing_chars": diff_chars,
        "char_agreement": round(1 - diff_chars / max(chars, 1), 6),
        "top_differences": examples.most_common(15),
    }
    return res
