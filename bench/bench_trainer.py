"""
Throughput of the real Trainer, the code users run (not a hand-written loop): pretraining on token shards and packed
SFT on conversations, made here from synthetic text, for a preset, micro-batch and dtype.

    python bench/bench_trainer.py --preset small --seq_len 512 --batch 32 --steps 30 --dtype fp16   # a T4
    python bench/bench_trainer.py --preset small --seq_len 1024 --batch 64 --steps 30 --compile     # an H100
    python bench/bench_trainer.py --smoke                                                          # CPU, seconds

For each run it prints, as soon as it is measured: tokens/s (median over the steps after warm-up), MFU (CUDA, from
trainer/common.py's peak table), peak memory, skipped (overflow) steps and the last loss; the packed-SFT line gives
its tokens/s as a ratio to pretraining's in the same run. The data is random but real in every other respect:
a tokenizer trained by the tokenizer stage, shards in dataset/shards.py's format, chat records read by the SFT stage.
"""

import argparse
import json
import os
import random
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: repo root on path

import numpy as np  # noqa: E402

from dataset.shard_writer import write_token_shards  # noqa: E402
from model import SLMConfig  # noqa: E402
from trainer.core import run_trainer  # noqa: E402
from trainer.pretrain import Config as PretrainConfig  # noqa: E402
from trainer.pretrain import PretrainTrainer  # noqa: E402
from trainer.sft import Config as SFTConfig  # noqa: E402
from trainer.sft import SFTTrainer  # noqa: E402
from trainer.train_tokenizer import Config as TokenizerConfig  # noqa: E402
from trainer.train_tokenizer import run as train_tokenizer  # noqa: E402

ALPHABET = "的一是不了人我在有他这为之大来以个中上们到说和地也子时道出而要于就下得可你年生自会那后能对着事其所去行家十"


def synthetic_lines(n: int, seed: int = 0, longest: int = 40) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(4, longest))) + "。" for _ in range(n)]


def make_tokenizer(work: str) -> str:

    corpus = os.path.join(work, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n\n".join(synthetic_lines(2000)))
    out = os.path.join(work, "tokenizer")
    train_tokenizer(
        TokenizerConfig(data_path=corpus, vocab_size=512, out_dir=out, min_frequency=1, heldout_every=10, seed=0)
    )
    return out


def make_shards(tokenizer, work: str, tokens: int) -> str:
    """Random ids of the tokenizer's vocabulary in the shard format (ids, not text: the stream reads ids)."""
    rng = np.random.default_rng(0)
    n_special = 4
    train = rng.integers(n_special, len(tokenizer), tokens)
    val = rng.integers(n_special, len(tokenizer), max(tokens // 20, 4096))
    return write_token_shards(os.path.join(work, "shards"), tokenizer, [train], val)


def make_chats(work: str, n: int, seq_len: int) -> str:
    """Conversations of about a quarter of seq_len tokens, so packing puts several in a row."""
    path = os.path.join(work, "chat.jsonl")
    lines = synthetic_lines(2 * n, seed=2, longest=max(6, seq_len // 8))
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            msgs = [{"role": "user", "content": lines[2 * i]}, {"role": "assistant", "content": lines[2 * i + 1]}]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return path


def summarize(name: str, out_dir: str, warmup: int) -> dict:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if r["split"] == "train"]
    steady = rows[warmup:] or rows
    result = {
        "run": name,
        "tok_per_s": statistics.median(r["tok_per_s"] for r in steady),
        "mfu": statistics.median(r.get("mfu", 0.0) for r in steady),
        "loss": rows[-1]["loss"],
        "peak_mem_gb": max(r.get("peak_mem_gb", 0.0) for r in rows),
        "skipped_steps": rows[-1].get("skipped_steps", 0),
        "steps": len(rows),
    }
    print(
        f"RESULT {name}: {result['tok_per_s']:,.0f} tok/s | MFU {100 * result['mfu']:.1f}% | peak "
        f"{result['peak_mem_gb']:.2f} GB | skipped steps {result['skipped_steps']} | loss {result['loss']:.3f} "
        f"| {result['steps']} steps",
        flush=True,
    )
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median (compile, allocator)")
    parser.add_argument("--dtype", nargs="+", default=["auto"], help="one run per dtype: auto bf16 fp16 fp32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no_sft", action="store_true", help="pretraining only")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, a few steps (checks the script)")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.seq_len, args.batch, args.steps, args.warmup = "tiny", 64, 2, 4, 1

    from transformers import AutoTokenizer

    results = []
    vocab = SLMConfig.from_preset(args.preset).vocab_size
    with tempfile.TemporaryDirectory() as work:
        tok_dir = make_tokenizer(work)
        tok = AutoTokenizer.from_pretrained(tok_dir)
        shards = make_shards(tok, work, tokens=(args.steps + 2) * args.batch * (args.seq_len + 1))
        common = dict(
            batch_size=args.batch,
            global_batch_size=args.batch,
            seq_len=args.seq_len,
            lr=3e-4,
            warmup_steps=2,
            log_every=1,
            eval_every=0,
            save_every=0,
            device=args.device,
            compile=args.compile,
            seed=0,
        )
        for dtype in args.dtype:
            out = os.path.join(work, f"pretrain_{dtype}")
            cfg = PretrainConfig(
                model_config=args.preset,
                tokenizer_dir=tok_dir,
                data_dir=shards,
                out_dir=out,
                max_steps=args.steps,
                dtype=dtype,
                vocab_size=vocab,
                sample_tokens=0,
                **common,
            )
            run_trainer(PretrainTrainer, cfg)
            results.append(
                summarize(
                    f"pretrain {args.preset} {dtype} B={args.batch} T={args.seq_len}"
                    f"{' compiled' if args.compile else ''}",
                    out,
                    args.warmup,
                )
            )
            if args.no_sft:
                continue
            sft_out = os.path.join(work, f"sft_{dtype}")
            sft = SFTConfig(
                init_from=os.path.join(out, "final"),
                data_path=make_chats(work, 8 * args.batch * (args.steps + 1), args.seq_len),
                out_dir=sft_out,
                max_steps=args.steps,
                dtype=dtype,
                pack=True,
                val_samples=0,
                **common,
            )
            run_trainer(SFTTrainer, sft)
            packed = summarize(
                f"packed sft {args.preset} {dtype} B={args.batch} T={args.seq_len}", sft_out, args.warmup
            )
            packed["ratio_to_pretrain"] = packed["tok_per_s"] / results[-1]["tok_per_s"]
            print(f"RESULT packed sft / pretrain tokens/s ({dtype}): {packed['ratio_to_pretrain']:.2f}", flush=True)
            results.append(packed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
