"""
Token shards on disk: the format dataset/shard_writer.py writes (command line: scripts/prepare_shards.py) and the
readers that training uses.

A shard directory holds
    meta.json            {"format": "milli-chat-shards-v1", "dtype": "uint16", "vocab_size": V,
                          "tokenizer_fingerprint": "...", "eos_id": E, "seed": S,
                          "sources": [{"path": ..., "weight": w, "license": "mit" | null, "license_from": ...,
                                       "documents": n, "tokens": t}, ...],
                          "train_shards": [{"file": "train_00000.bin", "tokens": N}, ...],
                          "val_shard": {"file": "val.bin", "tokens": N} | null}
    train_00000.bin ...  raw little-endian token ids (no header), documents joined with EOS
    val.bin              held-out documents, same layout
Raw arrays keep the reader trivial: np.memmap maps a shard without reading it into RAM.
"""

import hashlib
import json
import os

import numpy as np
import torch

SHARD_FORMAT = "milli-chat-shards-v1"


# -----------------------------------------------------------------------------
# tokenizer identity


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary (token -> id, special tokens included).

    Shards store it so that training refuses shards made with another tokenizer. We hash the vocabulary
    rather than the tokenizer.json bytes because re-saving a tokenizer may reorder or reformat that file."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    blob = json.dumps(vocab, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def dtype_for_vocab(vocab_size: int) -> str:
    """uint16 holds ids < 65536; larger vocabularies need uint32 (twice the disk and page cache)."""
    return "uint16" if vocab_size <= 65536 else "uint32"


# -----------------------------------------------------------------------------
# meta.json


def load_meta(data_dir: str) -> dict:
    """Read and check `meta.json`; every failure names the directory and what is wrong."""
    if not data_dir or not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir '{data_dir}' does not exist: run scripts/prepare_shards.py first")
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: '{data_dir}' is not a shard directory from prepare_shards.py")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {SHARD_FORMAT!r}")
    if not meta.get("train_shards"):
        raise ValueError(f"{path}: the shard directory holds no training shards (empty corpus?)")
    for entry in meta["train_shards"] + ([meta["val_shard"]] if meta.get("val_shard") else []):
        file = os.path.join(data_dir, entry["file"])
        itemsize = np.dtype(meta["dtype"]).itemsize
        if not os.path.isfile(file) or os.path.getsize(file) != entry["tokens"] * itemsize:
            raise ValueError(f"{file}: missing or not {entry['tokens']} tokens long (interrupted write?)")
    return meta


def check_meta(meta: dict, data_dir: str, vocab_size: int, fingerprint: str | None = None) -> None:
    """Refuse shards that do not belong to this model or tokenizer, before any step is wasted on them."""
    if meta["vocab_size"] > vocab_size:
        raise _vocab_too_small(meta, data_dir, vocab_size)
    if fingerprint is not None and meta.get("tokenizer_fingerprint") not in (None, fingerprint):
        raise _other_tokenizer(meta, data_dir, fingerprint)


def _vocab_too_small(meta: dict, data_dir: str, vocab_size: int) -> ValueError:
    return ValueError(
        f"{data_dir}: shards use a vocabulary of {meta['vocab_size']} ids but the model has vocab_size="
        f"{vocab_size}; set the model's vocab_size to at least {meta['vocab_size']}"
    )


def _other_tokenizer(meta: dict, data_dir: str, fingerprint: str) -> ValueError:
    return ValueError(
        f"{data_dir}: shards were made with tokenizer {meta['tokenizer_fingerprint']}, "
        f"but the tokenizer given has fingerprint {fingerprint}; re-run prepare_shards.py with this tokenizer"
    )


def open_shard(data_dir: str, entry: dict, dtype: str) -> np.ndarray:
    """Memory-map one shard: the OS pages in only the windows we touch."""
    return np.memmap(os.path.join(data_dir, entry["file"]), dtype=np.dtype(dtype), mode="r", shape=(entry["tokens"],))


# -----------------------------------------------------------------------------
# readers


class ShardStream:
    """The training stream: shards read in order, one optimizer step's worth of windows at a time.

    A step takes `global_batch` rows of `seq_len` tokens from one contiguous span of G*T+1 tokens
    (x = span[:-1], y = span[1:], row g = tokens g*T .. g*T+T). Rank r takes rows [r*G/W, (r+1)*G/W) and
    cuts them into micro-batches. The position (shard, offset) is global, the same on every rank, so a
    checkpoint resumes at the exact token, also with another number of processes (same global batch).
    A span never crosses a shard: the tail of a shard shorter than a span is skipped (< one step of data).
    global_batch is a multiple of micro_batch x world_size (the Trainer refuses any other)."""

    def __init__(
        self,
        data_dir: str,
        meta: dict,
        seq_len: int,
        global_batch: int,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.data_dir, self.meta, self.seq_len = data_dir, meta, seq_len
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world_size = rank, world_size
        self.span = global_batch * seq_len + 1
        self.shards = [e for e in meta["train_shards"] if e["tokens"] >= self.span]
        if not self.shards:
            raise self._step_too_long()
        self.shard_index, self.offset, self.epoch = 0, 0, 0
        self._array, self._array_index = None, -1
        self.shard_done = False  # True right after the step that used the last full span of a shard

    def _step_too_long(self) -> ValueError:
        """No shard holds one step's span."""
        biggest = max(e["tokens"] for e in self.meta["train_shards"])
        return ValueError(
            f"{self.data_dir}: one step needs {self.span:,} tokens (global batch {self.global_batch} x seq_len "
            f"{self.seq_len}) but the largest shard holds {biggest:,}; lower batch or seq_len"
        )

    def tokens_per_epoch(self) -> int:
        return sum((e["tokens"] - 1) // (self.span - 1) * (self.span - 1) for e in self.shards)

    def _shard(self) -> np.ndarray:
        if self._array_index != self.shard_index:
            self._array = open_shard(self.data_dir, self.shards[self.shard_index], self.meta["dtype"])
            self._array_index = self.shard_index
        return self._array

    def next_step(self) -> list[tuple]:
        """This rank's micro-batches for one optimizer step: a list of (x, y) int64 tensors (micro, T)."""
        if self.offset + self.span > self.shards[self.shard_index]["tokens"]:
            self._advance_shard()
        span = self._shard()[self.offset : self.offset + self.span].astype(np.int64)
        self.offset += self.span - 1
        self.shard_done = self.offset + self.span > self.shards[self.shard_index]["tokens"]
        span = torch.from_numpy(span)
        T, rows = self.seq_len, self.global_batch // self.world_size
        x = span[:-1].view(self.global_batch, T)[self.rank * rows : (self.rank + 1) * rows]
        y = span[1:].view(self.global_batch, T)[self.rank * rows : (self.rank + 1) * rows]
        return [(x[i : i + self.micro_batch], y[i : i + self.micro_batch]) for i in range(0, rows, self.micro_batch)]

    def _advance_shard(self):
        self.shard_index += 1
        self.offset = 0
        if self.shard_index == len(self.shards):
            self.shard_index, self.epoch = 0, self.epoch + 1  # all shards used: start the next epoch

    def state_dict(self) -> dict:
        return {
            "shard_index": self.shard_index,
            "offset": self.offset,
            "epoch": self.epoch,
            "shard_file": self.shards[self.shard_index]["file"],
        }

    def load_state_dict(self, state: dict) -> None:
        if self.shards[state["shard_index"]]["file"] != state["shard_file"]:
            raise ValueError(f"checkpoint was at shard {state['shard_file']} but the data dir's shard list differs")
        self.shard_index, self.offset, self.epoch = state["shard_index"], state["offset"], state["epoch"]
        self.shard_done = False


def val_windows(data_dir: str, meta: dict, seq_len: int, max_windows: int) -> np.ndarray | None:
    """Up to `max_windows` (T+1)-token windows from the validation shard, as a (N, T+1) array view."""
    entry = meta.get("val_shard")
    if not entry or entry["tokens"] < seq_len + 1:
        return None
    arr = open_shard(data_dir, entry, meta["dtype"])
    n = min(max_windows, (entry["tokens"] - 1) // seq_len)
    return np.lib.stride_tricks.as_strided(arr, shape=(n, seq_len + 1), strides=(seq_len * arr.itemsize, arr.itemsize))
