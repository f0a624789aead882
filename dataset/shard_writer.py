"""
The shard writer: text sources in, shuffled token shards out (the format and the readers are in dataset/shards.py).
scripts/prepare_shards.py is its command line; the pipeline (trainer/pipeline.py) calls prepare() directly.

An input is `path[:weight][@license]`; the path is a file, a folder or a glob (text_sources.expand_paths), and
every file it names is one source of meta.json, with the weight and the license. A weight above 1 repeats a source
(2.5 = every document twice, half of them a third time); below 1 keeps that share of its documents. A license not
given is read from the source's dataset_info.json or dataset card (source_license); meta.json records it per
source (null when not known), and the model card lists them (dataset/licenses.py shard_licenses).
Which documents are kept, repeated or held out is decided by a seeded hash of each document's text, so the same
inputs and seed give byte-identical shards.
Memory stays flat: documents stream in, are tokenised in batches (the Rust tokenizer uses `workers` threads) and
scattered into on-disk buckets by a seeded hash; each bucket is then shuffled in memory and cut into shards.
Peak RAM is the tokenizer plus one bucket (bucket_mb) plus one tokenising batch (bounded in documents and bytes),
whatever the corpus size; shards are written straight to disk.
A run that dies (SIGKILL, full disk, bad input) leaves no meta.json, so its directory reads as unfinished, and the
next run in that directory clears whatever the dead one left (see check_out_dir).
Special-token strings inside the text (MiniMind's pretrain_hq.jsonl wraps every document in <|im_start|> ...
<|im_end|>) are tokenised as the plain text they are, never as the special ids (see prepare()); a note counts them.
"""

import glob
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass

import numpy as np
from transformers import AutoTokenizer

from dataset.licenses import source_license
from dataset.shards import SHARD_FORMAT, dtype_for_vocab, tokenizer_fingerprint
from dataset.text_sources import TEXT_FIELDS, expand_paths, input_bytes, iter_documents

BUCKET_DIR = "_buckets.tmp"  # phase 1's scatter files, inside out_dir; gone when a run finishes


# -----------------------------------------------------------------------------
# inputs and hashing


LICENSE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]*")  # an SPDX id or a Hub license tag: cc-by-sa-4.0, mit, other


@dataclass
class Source:
    """One input file of a run, with what its --inputs item says about it."""

    path: str
    weight: float
    license: str | None  # declared with @LICENSE, else found by source_license, else None (not known)
    license_from: str  # "--inputs", the file it was read from, or "" when not known
    spec: str  # the --inputs item that named the file


def _split_weight(spec: str) -> tuple[str, float]:
    path, sep, w = spec.rpartition(":")
    if sep:
        try:
            return path, float(w)
        except ValueError:
            pass
    return spec, 1.0


def _names_input(path: str) -> bool:
    return bool(glob.glob(path)) if glob.has_magic(path) else os.path.exists(path)


def _input_root(path: str) -> str:
    """The folder an --inputs path names or lies in (for a glob, the folder before its first pattern part): where
    source_license stops looking upwards."""
    if glob.has_magic(path):
        parts = path.split(os.sep)
        return os.sep.join(parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]) or "."
    return path if os.path.isdir(path) else os.path.dirname(path) or "."


def parse_input(spec: str) -> list[Source]:
    """'path[:weight][@license]' -> one Source per file the path names (dataset/text_sources.py expand_paths: a
    file, a folder, a glob pattern), each with the item's weight and license.

    Only a number after the last ':' is a weight. An '@' followed by a license id at the very end declares the
    license of every file (`wiki.jsonl:0.8@cc-by-sa-4.0`), unless the spec without the weight names an existing
    path as written (a file may be called `notes@v2.txt`). Without one, each file's own metadata is read
    (source_license); None when nothing states it."""
    declared = None
    head, at, tail = spec.rpartition("@")
    if at and head and LICENSE_ID.fullmatch(tail) and not _names_input(_split_weight(spec)[0]):
        spec_body, declared = head, tail
    else:
        spec_body = spec
    path, weight = _split_weight(spec_body)
    if not weight > 0 or math.isinf(weight):
        raise ValueError(f"--inputs {spec}: the weight must be a positive number")
    try:
        files = expand_paths([path])
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (from --inputs {spec})") from None
    root = _input_root(path)
    sources = []
    for f in files:
        license, found_in = (declared, "--inputs") if declared else source_license(f, root)
        sources.append(Source(f, weight, license, found_in, spec))
    return sources


def _unit(key: bytes, salt: str) -> float:
    h = hashlib.blake2b(key, digest_size=8, person=salt.encode()[:16].ljust(16, b"\0"))
    return int.from_bytes(h.digest(), "little") / 2**64


def _doc_key(text: str, seed: int) -> bytes:
    return hashlib.blake2b(f"{seed}\0{text}".encode("utf-8", "surrogatepass"), digest_size=16).digest()


# -----------------------------------------------------------------------------
# output directory checks and atomic writes


def check_out_dir(out_dir: str, fingerprint: str) -> None:
    """Refuse to mix shards of two tokenizers in one directory; clear our own old files otherwise (also what an
    interrupted or failed run left behind: no meta.json, partial shards, .tmp files, the bucket folder)."""
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            old = json.load(f)
        if old.get("tokenizer_fingerprint") != fingerprint:
            raise ValueError(
                f"{out_dir} already holds shards made with tokenizer {old.get('tokenizer_fingerprint')}, "
                f"not the one given ({fingerprint}); use another --out_dir or delete that one"
            )
    os.makedirs(out_dir, exist_ok=True)
    if os.path.isfile(meta_path):
        os.remove(meta_path)  # meta.json is written last, so without it the directory reads as unfinished
    remove_partial_output(out_dir)


def remove_partial_output(out_dir: str) -> None:
    """Delete every file a run writes except meta.json, and the bucket folder; other files and folders stay."""
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if name == BUCKET_DIR and os.path.isdir(path):
            shutil.rmtree(path)  # a folder: os.remove() would raise IsADirectoryError
        elif os.path.isfile(path) and (
            (name.startswith("train_") and name.endswith(".bin")) or name == "val.bin" or name.endswith(".tmp")
        ):
            os.remove(path)


class ShardWriter:
    """Cuts one token stream into files of `shard_tokens` tokens (the last one shorter). Tokens go straight to the
    open `.tmp` file (renamed when the shard is full), so no shard is held in memory and the arrays handed to add()
    can be freed as soon as it returns."""

    def __init__(self, out_dir: str, shard_tokens: int):
        self.out_dir, self.shard_tokens = out_dir, shard_tokens
        self.f, self.n, self.shards = None, 0, []

    def _path(self) -> str:
        return os.path.join(self.out_dir, f"train_{len(self.shards):05d}.bin")

    def add(self, a: np.ndarray) -> None:
        while len(a):
            if self.f is None:
                self.f = open(self._path() + ".tmp", "wb")
            take = min(len(a), self.shard_tokens - self.n)
            self.f.write(a[:take].tobytes())
            self.n += take
            a = a[take:]
            if self.n == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
            os.replace(self._path() + ".tmp", self._path())
            self.shards.append({"file": os.path.basename(self._path()), "tokens": self.n})
            self.n = 0


# -----------------------------------------------------------------------------
# the two passes


def prepare(
    tokenizer_dir: str,
    inputs: list[str],
    out_dir: str,
    shard_mb: float = 50,
    val_tokens: int = 1_000_000,
    seed: int = 1337,
    workers: int = 0,
    dtype: str = "auto",
    bucket_mb: float = 64,
    batch_docs: int = 512,
    batch_mb: float = 1,
    quiet: bool = False,
    text_column: str = "",
) -> dict:
    """text_column: the JSONL field / table column that holds the text; "" = the first of TEXT_FIELDS present."""
    # The tokenizers library makes its thread pool at the first batch encode and reads this then, so setting it here
    # (after the import) is in time.
    os.environ.setdefault("RAYON_NUM_THREADS", str(workers or os.cpu_count() or 1))

    sources = [src for spec in inputs for src in parse_input(spec)]
    if not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"--tokenizer {tokenizer_dir}: no such directory (run the tokenizer stage first)")
    hf_tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok = hf_tok.backend_tokenizer
    vocab_size, eos = len(hf_tok), hf_tok.eos_token_id
    if eos is None:
        raise ValueError(f"{tokenizer_dir}: the tokenizer has no eos_token; documents could not be separated")
    need = dtype_for_vocab(vocab_size)
    if dtype == "auto":
        dtype = need
        if dtype != "uint16":
            print(f"WARNING: vocabulary of {vocab_size} ids does not fit uint16; writing {dtype} shards (2x disk)")
    elif dtype == "uint16" and need != "uint16":
        raise ValueError(
            f"{tokenizer_dir}: vocabulary of {vocab_size} ids does not fit uint16 (max id 65535); "
            f"use --dtype uint32 or a smaller vocabulary"
        )
    np_dtype = np.dtype(dtype).newbyteorder("<")
    fingerprint = tokenizer_fingerprint(hf_tok)
    check_out_dir(out_dir, fingerprint)
    # Pretraining text is text: "<|im_start|>" written in a document is its 12 characters, not the control id the
    # chat template alone may emit. Otherwise a corpus that carries ChatML markers (or a page quoting them) would
    # teach the base model turn boundaries of arbitrary text and let any document forge them (as user content
    # must not either); SFT teaches the real ids. The tokenizer stage learned such strings as text too.
    tok.encode_special_tokens = True
    specials = [t for t in hf_tok.all_special_tokens if t]
    text_fields = (text_column,) if text_column else TEXT_FIELDS

    # From here on we write into out_dir: on any failure (bad input, full disk, Ctrl-C) remove what this run wrote,
    # so the directory holds nothing half-done (a SIGKILL cannot be caught: check_out_dir clears that on the rerun).
    try:
        # Bucket count from a size estimate (text bytes ~ token bytes for uint16 at ~3 bytes/token of Chinese): each
        # bucket should hold about bucket_mb, which is what phase 2 loads at once.
        est = sum(input_bytes(src.path) * src.weight for src in sources)
        n_buckets = max(1, min(1024, math.ceil(est / (bucket_mb * 1e6))))
        est_tokens = sum(input_bytes(src.path) for src in sources) / 3
        val_rate = min(0.5, val_tokens / max(est_tokens, 1)) if val_tokens > 0 else 0.0
        tmp_dir = os.path.join(out_dir, BUCKET_DIR)
        os.makedirs(tmp_dir)  # check_out_dir removed any older one
        buckets = [open(os.path.join(tmp_dir, f"{b:04d}"), "wb") for b in range(n_buckets)]
        val_f = open(os.path.join(out_dir, "val.bin.tmp"), "wb")
        stats = {"bytes": 0, "tokens": 0, "val_tokens": 0, "val_docs": 0, "special_docs": 0, "special_strings": 0}
        src_meta, selected = [], {}  # selected: documents per --inputs item
        t0 = last = time.time()

        # phase 1: read -> weight -> tokenise in batches -> scatter copies into buckets (val documents go to val.bin)
        def flush(batch: list[tuple[bytes, str, int, bool]], sm: dict) -> None:
            # _fast: ids only, no offsets (an Encoding with offsets costs many times the text: bench/RESULTS.md)
            enc = tok.encode_batch_fast([b[1] for b in batch], add_special_tokens=False)
            for (key, _, copies, is_val), e in zip(batch, enc):
                ids = np.empty(len(e.ids) + 1, dtype=np_dtype)
                ids[:-1] = e.ids
                ids[-1] = eos  # EOS after every document: the model learns where a text ends
                if is_val:
                    val_f.write(ids.tobytes())
                    stats["val_tokens"] += len(ids)
                    stats["val_docs"] += 1
                    continue
                header = np.array([len(ids)], dtype="<u4").tobytes()
                for c in range(copies):
                    b = (
                        int.from_bytes(
                            hashlib.blake2b(key + bytes([c % 256, c // 256]), digest_size=8).digest(), "little"
                        )
                        % n_buckets
                    )
                    buckets[b].write(header)
                    buckets[b].write(ids.tobytes())
                sm["documents"] += copies
                sm["tokens"] += copies * len(ids)
                stats["tokens"] += copies * len(ids)

        try:
            for i, src in enumerate(sources):
                path, weight = src.path, src.weight
                sm = {"path": path, "weight": weight, "documents": 0, "tokens": 0}
                sm |= {"license": src.license, "license_from": src.license_from}
                whole, frac = int(weight), weight - int(weight)
                batch, batch_bytes = [], 0
                for d in iter_documents(path, text_fields):
                    text = d["text"]
                    found = sum(text.count(t) for t in specials)
                    stats["special_docs"] += found > 0
                    stats["special_strings"] += found
                    nbytes = len(text.encode("utf-8"))
                    stats["bytes"] += nbytes
                    key = _doc_key(text, seed)
                    # the val decision depends on the text only, so a document repeated by weight (or present in two
                    # sources) never lands on both sides
                    is_val = stats["val_tokens"] < val_tokens and _unit(key, "val") < val_rate
                    copies = whole + (1 if _unit(key, f"rep{path}") < frac else 0)
                    if is_val or copies:
                        batch.append((key, text, copies, is_val))
                        batch_bytes += nbytes
                    # bounded in bytes too: 512 long articles would make a batch (and its encodings) grow with them
                    if len(batch) >= batch_docs or batch_bytes >= batch_mb * 1e6:
                        flush(batch, sm)
                        batch, batch_bytes = [], 0
                    now = time.time()
                    if not quiet and now - last > 2:
                        last = now
                        mb = stats["bytes"] / 1e6
                        print(
                            f"  read {mb:8.1f} MB | {mb / (now - t0):6.2f} MB/s | "
                            f"{stats['tokens'] / (now - t0):10,.0f} tokens/s",
                            flush=True,
                        )
                if batch:
                    flush(batch, sm)
                src_meta.append(sm)
                # checked per --inputs item, once its last file is read: one small file of a folder may give none
                selected[src.spec] = selected.get(src.spec, 0) + sm["documents"]
                last_of_item = i + 1 == len(sources) or sources[i + 1].spec != src.spec
                if last_of_item and selected[src.spec] == 0:
                    raise ValueError(f"--inputs {src.spec}: no document selected (weight too small for its size?)")
        finally:
            for f in buckets:
                f.close()
            val_f.close()

        if stats["special_docs"]:
            print(
                f"note: {stats['special_docs']:,} documents carry {stats['special_strings']:,} special-token "
                f"strings ({', '.join(specials)}); they were tokenised as plain text, not as the special ids "
                f"(those belong to the chat template); strip them from the source if they are only wrappers"
            )

        # phase 2: shuffle each bucket in memory (seeded per bucket), concatenate into shards
        writer = ShardWriter(out_dir, max(1, int(shard_mb * 1e6) // np_dtype.itemsize))
        for b in range(n_buckets):
            path = os.path.join(tmp_dir, f"{b:04d}")
            raw = np.fromfile(path, dtype=np.uint8)  # the only large allocation of phase 2: one bucket
            starts, pos = [], 0  # byte offset of each document's header (no per-document array objects)
            while pos < len(raw):
                starts.append(pos)
                pos += 4 + int(raw[pos : pos + 4].view("<u4")[0]) * np_dtype.itemsize
            order = np.random.default_rng([seed, b]).permutation(len(starts))
            for i in order:
                s = starts[i]
                n = int(raw[s : s + 4].view("<u4")[0])
                writer.add(raw[s + 4 : s + 4 + n * np_dtype.itemsize].view(np_dtype))
            del raw, starts  # the writer kept no reference, so the bucket is freed here
            os.remove(path)
        writer.flush()
        shutil.rmtree(tmp_dir, ignore_errors=True)
        val_entry = None
        if stats["val_tokens"]:
            os.replace(os.path.join(out_dir, "val.bin.tmp"), os.path.join(out_dir, "val.bin"))
            val_entry = {"file": "val.bin", "tokens": stats["val_tokens"]}
        else:
            os.remove(os.path.join(out_dir, "val.bin.tmp"))
        if not writer.shards:
            raise ValueError("no training tokens were produced (every document went to validation?)")

        meta = {
            "format": SHARD_FORMAT,
            "dtype": dtype,
            "vocab_size": vocab_size,
            "tokenizer_fingerprint": fingerprint,
            "tokenizer_dir": os.path.abspath(tokenizer_dir),
            "eos_id": eos,
            "seed": seed,
            "sources": src_meta,
            "train_shards": writer.shards,
            "val_shard": val_entry,
            "val_documents": stats["val_docs"],
            "special_token_text": {
                "documents": stats["special_docs"],
                "strings": stats["special_strings"],
                "tokenised_as": "text",
            },
        }
        write_meta(out_dir, meta)
    except BaseException:
        remove_partial_output(out_dir)
        raise
    dt = time.time() - t0
    if not quiet:
        print(
            f"wrote {len(writer.shards)} train shards ({stats['tokens']:,} tokens) + val ({stats['val_tokens']:,} "
            f"tokens, {stats['val_docs']:,} docs) to {out_dir} in {dt:.1f}s | {stats['bytes'] / 1e6 / dt:.2f} MB/s | "
            f"{(stats['tokens'] + stats['val_tokens']) / dt:,.0f} tokens/s"
        )
    return meta


def write_meta(out_dir: str, meta: dict) -> None:
    """meta.json, atomically and last: its presence is what marks the directory as complete."""
    with open(os.path.join(out_dir, "meta.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    os.replace(os.path.join(out_dir, "meta.json.tmp"), os.path.join(out_dir, "meta.json"))


def write_token_shards(out_dir: str, tokenizer, train_parts: list[np.ndarray], val: np.ndarray) -> str:
    """Shards of token ids already in memory (synthetic data in tests and benchmarks), in the very format prepare()
    writes: one train shard per part, val.bin, meta.json. Returns out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    dtype = dtype_for_vocab(len(tokenizer))
    shards = []
    for i, part in enumerate(train_parts):
        name = f"train_{i:05d}.bin"
        np.asarray(part, dtype=dtype).tofile(os.path.join(out_dir, name))
        shards.append({"file": name, "tokens": int(len(part))})
    np.asarray(val, dtype=dtype).tofile(os.path.join(out_dir, "val.bin"))
    meta = {
        "format": SHARD_FORMAT,
        "dtype": dtype,
        "vocab_size": len(tokenizer),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "eos_id": tokenizer.eos_token_id,
        "seed": 0,
        "sources": [],
        "train_shards": shards,
        "val_shard": {"file": "val.bin", "tokens": int(len(val))},
    }
    write_meta(out_dir, meta)
    return out_dir
