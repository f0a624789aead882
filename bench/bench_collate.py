"""
Packed-SFT collation on the host: time per micro-batch and bytes shipped to the device.

    python bench/bench_collate.py                     # 16 rows x 1024 tokens, one thread
    python bench/bench_collate.py --batch 32 --seq_len 2048

Random conversations (lengths 30..400 tokens) are packed by ChatDataset(pack=True) into seq_len rows; collate_chat
is timed over --repeat micro-batches of --batch rows, with torch on --threads threads (default 1). It also
times document_mask, the (B, 1, T, T) mask the model builds from the ids where FlexAttention is not used: on a GPU
that work runs on the device; on the CPU it is what the old collate did on the host.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: repo root on path

import numpy as np
import torch

from dataset.chat_data import ChatDataset, collate_chat
from model.attention import document_mask


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)  # a DataLoader worker's share of the machine
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    samples = []
    while sum(len(ids) for ids, _ in samples) < 2 * args.batch * args.seq_len:
        n = int(rng.integers(30, 400))
        ids = rng.integers(0, 6400, n).astype(np.int32)
        samples.append((ids, np.where(np.arange(n) > n // 2, ids, -100).astype(np.int32)))
    data = ChatDataset(samples, args.seq_len, pack=True)
    items = [data[i] for i in range(args.batch)]
    batch = collate_chat(items, pad_id=0)
    shipped = sum(v.numel() * v.element_size() for v in batch.values() if torch.is_tensor(v))
    docs = sum(int(it["seq_ids"][-1]) for it in items)
    print(
        f"{args.batch} x {batch['input_ids'].shape[1]} tokens, {docs} conversations, "
        f"{100 * batch['num_tokens'] / batch['input_ids'].numel():.0f}% real tokens"
    )
    names = sorted(k for k in batch if torch.is_tensor(batch[k]))
    print(
        f"collate_chat: {1000 * timed(lambda: collate_chat(items, pad_id=0), args.repeat):.2f} ms per micro-batch, "
        f"{shipped / 2**20:.2f} MiB of tensors to the device ({names})"
    )
    if "document_ids" in batch:
        ms = 1000 * timed(lambda: document_mask(batch["document_ids"]), args.repeat)
        print(
            f"document_mask from the ids (the model's fallback; on the device on a GPU): {ms:.2f} ms, "
            f"{batch['document_ids'].shape[0] * batch['document_ids'].shape[1] ** 2 / 2**20:.1f} MiB"
        )


if __name__ == "__main__":
    main()
