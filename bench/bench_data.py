"""
Throughput and peak memory of the three data stages on growing inputs; prints a Markdown table.

    python bench/bench_data.py                       # 10, 40, 160 MB; Zipf 5-40 MB (~20 minutes on 2 shared cores)
    python bench/bench_data.py --sizes 10 40 --zipf_mb 5 10 --zipf_baseline_mb --zipf_capped 32:4 --bucket_mb 16
    python bench/bench_data.py --make_big 1000        # only writes bench/_work/zh_1000mb.jsonl (see RESULTS.md)

Inputs are generated under bench/_work/ (git-ignored): the shared pack's Chinese text repeated (each copy tagged so
that deduplication keeps it) for cleaning and sharding, and synthetic Han text drawn from a Zipf distribution over
characters for the tokenizer (every piece is new, the worst case for the trainer's pre-token table). Each stage
runs as its own process under /usr/bin/time, whose "max RSS" is the peak of the largest process.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run directly: repo root importable

import argparse
import json
import random
import subprocess
import time

from dataset.text_sources import iter_corpus  # noqa: E402
from trainer.train_tokenizer import split_han_runs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "bench", "_work")
PACK = os.path.join(os.path.dirname(ROOT), "shared", "data", "pretrain", "zh")

# -----------------------------------------------------------------------------
# inputs


def make_pack_input(mb: int) -> str:
    """The raw pack's documents, repeated until `mb` MB; copy k gets a tag line so it is not an exact duplicate."""

    path = os.path.join(WORK, f"pack_{mb}mb.jsonl")
    if os.path.exists(path):
        return path
    target, size, k = mb * 1_000_000, 0, 0
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        while size < target:
            for d in iter_corpus([PACK]):
                line = json.dumps({"text": f"{d['text']}\n（第{k}份）"}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode("utf-8"))
                if size >= target:
                    break
            k += 1
    os.replace(path + ".tmp", path)
    return path


def make_zipf_input(mb: int, seed: int = 0) -> str:
    """Han text with Zipf(1.1)-distributed characters over 8000 ideographs, in sentences of 4-40 characters."""
    import numpy as np

    path = os.path.join(WORK, f"zipf_{mb}mb.txt")
    if os.path.exists(path):
        return path
    rng = np.random.default_rng(seed)
    chars = np.array([chr(0x4E00 + i) for i in random.Random(seed).sample(range(20000), 8000)])
    weights = 1 / np.arange(1, 8001) ** 1.1
    weights /= weights.sum()
    size = 0
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        while size < mb * 1_000_000:
            idx = rng.choice(8000, size=200_000, p=weights)
            lens = rng.integers(4, 40, size=8000)
            text, pos = [], 0
            for n in lens:
                text.append("".join(chars[idx[pos : pos + n]]) + ("。\n" if n % 5 == 0 else "，"))
                pos += n
                if pos > 190_000:
                    break
            block = "".join(text)
            f.write(block)
            size += len(block.encode("utf-8"))
    os.replace(path + ".tmp", path)
    return path


def make_big_input(mb: int) -> str:
    """The cleaned Chinese pack (bench/_work/zh_clean.jsonl, see RESULTS.md) repeated to `mb` MB. Copy k starts with
    k % 4 extra Han characters (its first Han run is then cut into other 4-character pieces: new pre-tokens)
    and ends with a tag; no two documents are identical, so sampling and deduplication treat copies as new text."""
    src = os.path.join(WORK, "zh_clean.jsonl")
    path = os.path.join(WORK, f"zh_{mb}mb.jsonl")
    if os.path.exists(path):
        return path
    with open(src, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    size, k = 0, 0
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        while size < mb * 1_000_000:
            for t in texts:
                line = json.dumps({"text": "甲乙丙"[: k % 4] + t + f"（第{k}份）"}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode("utf-8"))
                if size >= mb * 1_000_000:
                    break
            k += 1
    os.replace(path + ".tmp", path)
    return path


# -----------------------------------------------------------------------------
# measuring one stage in its own process


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a command; /usr/bin/time reports the largest process's peak."""
    t = time.time()
    r = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M"] + cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    rss = int(next(x for x in r.stderr.splitlines() if x.startswith("MAXRSS")).split()[1]) / 1024
    return time.time() - t, rss


def unique_pieces(path: str, piece: int = 4) -> int:
    """Distinct pre-tokens the trainer counts in a Zipf file (Han runs cut into `piece` chars, plus punctuation)."""

    seen = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            # Qwen2's regex keeps a punctuation mark with the letters after it ("，天地"), "。" stands alone
            seen.update(split_han_runs(line, piece).replace("。", "\n。\n").split())
    return len(seen)


def tokenizer_cmd(data: str, out: str, vocab: int, max_bytes: int, pairs: bool = True) -> list[str]:
    code = (
        "from trainer.train_tokenizer import Config, run; "
        f"run(Config(data_path={data!r}, out_dir={out!r}, vocab_size={vocab}, max_bytes={max_bytes}, "
        f"heldout_every=1000, rare_pieces_as_pairs={pairs}))"
    )
    return [sys.executable, "-c", code]


# -----------------------------------------------------------------------------


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[10, 40, 160], help="MB, cleaning and shards")
    ap.add_argument("--zipf_mb", type=int, nargs="*", default=[5, 10, 20, 40], help="MB, tokenizer with no cap")
    ap.add_argument(
        "--zipf_baseline_mb",
        type=int,
        nargs="*",
        default=[5, 10, 20],
        help="MB, tokenizer with rare_pieces_as_pairs=False (the earlier design), for comparison",
    )
    ap.add_argument("--make_big", type=int, default=0, help="only write bench/_work/zh_{N}mb.jsonl (for the 1 GB run)")
    ap.add_argument("--zipf_capped", default="", help="INPUT_MB:MAX_MB, tokenizer with max_bytes (off if empty)")
    ap.add_argument("--no_shards", action="store_true", help="cleaning only for --sizes")
    ap.add_argument("--bucket_mb", type=float, default=64, help="prepare_shards --bucket_mb")
    ap.add_argument("--tokenizer", default=os.path.join(WORK, "tok6400"), help="for the shard stage")
    args = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    if args.make_big:
        print(make_big_input(args.make_big))
        sys.exit(0)
    rows = []
    for mb in args.sizes:
        src = make_pack_input(mb)
        real_mb = os.path.getsize(src) / 1e6
        clean = os.path.join(WORK, f"clean_{mb}mb.jsonl")
        t, rss = timed([sys.executable, "scripts/zh_simplify.py", "--input", src, "--output", clean])
        rows.append(("cleaning (zh_simplify, 2 procs)", f"{real_mb:.0f} MB", f"{real_mb / t:.2f} MB/s", f"{rss:.0f}"))
        print(rows[-1], flush=True)
        if args.no_shards:
            continue
        out = os.path.join(WORK, f"shards_{mb}mb")
        t, rss = timed(
            [
                sys.executable,
                "scripts/prepare_shards.py",
                "--tokenizer",
                args.tokenizer,
                "--inputs",
                clean,
                "--out_dir",
                out,
                "--val_tokens",
                "100000",
                "--bucket_mb",
                str(args.bucket_mb),
            ]
        )
        cmb = os.path.getsize(clean) / 1e6
        rows.append(("shards (prepare_shards, 2 threads)", f"{cmb:.0f} MB", f"{cmb / t:.2f} MB/s", f"{rss:.0f}"))
        print(rows[-1], flush=True)
    runs = [(mb, True) for mb in args.zipf_mb] + [(mb, False) for mb in args.zipf_baseline_mb]
    for mb, pairs in sorted(runs):
        src = make_zipf_input(mb)
        t, rss = timed(tokenizer_cmd(src, os.path.join(WORK, "tok_zipf"), 6400, 10**12, pairs))
        uniq = unique_pieces(src)
        name = "rare pieces as pairs (new default)" if pairs else "all pieces (rare_pieces_as_pairs=False)"
        rows.append((f"tokenizer 6400, Zipf Han, no cap, {name}", f"{mb} MB", f"{t:.0f} s", f"{rss:.0f}"))
        print(
            rows[-1],
            f"| {uniq:,} distinct 4-char-cut pre-tokens in the input | {rss / mb:.0f} B RSS per input "
            f"byte | {(rss - 270) * 1e6 / uniq:.0f} B per distinct pre-token above a 270 MB base",
            flush=True,
        )
        print(rows[-1], flush=True)
    if args.zipf_capped:
        in_mb, cap_mb = (int(x) for x in args.zipf_capped.split(":"))
        src = make_zipf_input(in_mb)
        t, rss = timed(tokenizer_cmd(src, os.path.join(WORK, "tok_zipf"), 6400, cap_mb * 1_000_000))
        rows.append((f"tokenizer 6400, Zipf Han, max_bytes={cap_mb} MB", f"{in_mb} MB", f"{t:.0f} s", f"{rss:.0f}"))
    print("\n| stage | input | speed / time | peak RSS (MB) |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
