"""Test helpers: token shards written straight in dataset/shards.py's format (independent of prepare_shards)."""

import json
import os

import numpy as np

from dataset.shards import SHARD_FORMAT, tokenizer_fingerprint


def write_shards(tokenizer, texts: list[str], out_dir: str, n_shards: int = 3, val_fraction: float = 0.1) -> str:
    """Tokenise `texts` (EOS after each), split into train shards and a val shard, write meta.json."""
    ids = []
    for text in texts:
        ids += tokenizer.encode(text) + [tokenizer.eos_token_id]
    arr = np.array(ids, dtype=np.uint16)
    os.makedirs(out_dir, exist_ok=True)
    n_val = int(len(arr) * val_fraction)
    val, train = arr[:n_val], arr[n_val:]
    shards = []
    for i, chunk in enumerate(np.array_split(train, n_shards)):
        name = f"train_{i:05d}.bin"
        chunk.tofile(os.path.join(out_dir, name))
        shards.append({"file": name, "tokens": int(len(chunk))})
    val.tofile(os.path.join(out_dir, "val.bin"))
    meta = {"format": SHARD_FORMAT, "dtype": "uint16", "vocab_size": len(tokenizer),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "eos_id": tokenizer.eos_token_id, "seed": 0,
            "sources": [], "train_shards": shards, "val_shard": {"file": "val.bin", "tokens": int(len(val))}}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f)
    return out_dir


def read_metrics(out_dir: str, split: str = "train") -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]
