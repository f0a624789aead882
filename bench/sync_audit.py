"""
Host syncs in each stage's training step: a few steps each of pretraining (adamw and muon), packed SFT and DPO under
torch.cuda.set_sync_debug_mode("warn"), counting the syncs per optimizer step after warm-up and the repository lines
they come from. Each is a point where the CPU waits for the GPU instead of queueing the next kernels (a .item(), a
bool() of a device tensor, a copy from pageable memory); the issue asks for none per micro-batch.

    python bench/sync_audit.py --preset small --seq_len 512 --batch 8 --steps 8 --warmup 3   # CUDA
    python bench/sync_audit.py --smoke                                                       # without CUDA: skipped

The data and the Trainer settings are bench/bench_trainer.py's (synthetic, real formats); nothing is compiled.
"""

import argparse
import collections
import json
import os
import sys
import tempfile
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from anywhere: repo root on path

import torch  # noqa: E402

from bench.bench_trainer import make_chats, make_data, settings, synthetic_lines  # noqa: E402
from model import SLMConfig  # noqa: E402
from trainer.core import run_trainer  # noqa: E402
from trainer.dpo import Config as DPOConfig  # noqa: E402
from trainer.dpo import DPOTrainer  # noqa: E402
from trainer.pretrain import Config as PretrainConfig  # noqa: E402
from trainer.pretrain import PretrainTrainer  # noqa: E402
from trainer.sft import Config as SFTConfig  # noqa: E402
from trainer.sft import SFTTrainer  # noqa: E402


def make_pairs(work: str, n: int, seq_len: int) -> str:
    """Preference pairs (MiniMind's messages format) of about a quarter of seq_len tokens a side."""
    path = os.path.join(work, "pairs.jsonl")
    lines = synthetic_lines(3 * n, seed=3, longest=max(6, seq_len // 8))
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            user = {"role": "user", "content": lines[3 * i]}
            record = {
                side: [user, {"role": "assistant", "content": lines[3 * i + k]}]
                for k, side in ((1, "chosen"), (2, "rejected"))
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def audit_syncs(trainer_cls, cfg, name: str, warmup: int) -> dict:
    """Host syncs per optimizer step after warm-up (torch.cuda.set_sync_debug_mode("warn") around train_step), each
    placed at the innermost frame of this repository on the stack when it warned."""
    trainer = trainer_cls(cfg)
    train_step, counts, places = trainer.train_step, [], collections.Counter()

    def note(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        counts[-1] += 1
        ours = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(ROOT + os.sep)]
        places[f"{os.path.relpath(ours[-1].filename, ROOT)}:{ours[-1].lineno}" if ours else "torch"] += 1

    def audited_step():
        if trainer.step < warmup:
            return train_step()
        counts.append(0)
        with warnings.catch_warnings():  # restores the filters and showwarning afterwards
            warnings.simplefilter("always")
            warnings.showwarning = note
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return train_step()
            finally:
                torch.cuda.set_sync_debug_mode("default")

    trainer.train_step = audited_step
    trainer.save_checkpoint = trainer.export_final = lambda **_: None  # only the counts are read
    trainer.prepare()
    trainer.fit()
    where = ", ".join(f"{place} x{n}" for place, n in places.most_common(6)) or "nowhere"
    print(
        f"RESULT sync audit {name}: {sum(counts) / max(1, len(counts)):.1f} host syncs per step over "
        f"{len(counts)} steps | from {where}",
        flush=True,
    )
    return {"run": f"sync audit {name}", "syncs_per_step": counts, "places": dict(places)}


def audit(args, work: str) -> list[dict]:
    """Pretraining with each optimizer, then packed SFT and DPO from weights that one step of pretraining made."""
    tok_dir, shards = make_data(args, work)
    common = settings(args)
    vocab = SLMConfig.from_preset(args.preset).vocab_size
    pretrain = dict(model_config=args.preset, tokenizer_dir=tok_dir, data_dir=shards, vocab_size=vocab, sample_tokens=0)
    results = []
    for optimizer in ("adamw", "muon"):
        cfg = PretrainConfig(
            out_dir=os.path.join(work, f"pretrain_{optimizer}"), optimizer=optimizer, **pretrain, **common
        )
        results.append(audit_syncs(PretrainTrainer, cfg, f"pretrain {optimizer}", args.warmup))
    init = os.path.join(work, "init")
    run_trainer(PretrainTrainer, PretrainConfig(out_dir=init, **pretrain, **{**common, "max_steps": 1}))
    sft = SFTConfig(
        init_from=os.path.join(init, "final"),
        data_path=make_chats(work, 8 * args.batch * (args.steps + 1), args.seq_len),
        out_dir=os.path.join(work, "sft"),
        pack=True,
        val_samples=0,
        **common,
    )
    results.append(audit_syncs(SFTTrainer, sft, "packed sft", args.warmup))
    dpo = DPOConfig(
        init_from=os.path.join(init, "final"),
        data_path=make_pairs(work, 2 * args.batch * (args.steps + 1), args.seq_len),
        out_dir=os.path.join(work, "dpo"),
        val_samples=0,
        **common,
    )
    results.append(audit_syncs(DPOTrainer, dpo, "dpo", args.warmup))
    return results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="steps not audited (allocator, first-call setup)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, a few steps")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    args.compile = False  # what bench_trainer.settings reads
    if args.smoke:
        args.preset, args.seq_len, args.batch, args.steps, args.warmup = "tiny", 64, 2, 3, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() or args.device == "cpu":
        print("RESULT sync audit: skipped: no cuda", flush=True)
        return 0
    with tempfile.TemporaryDirectory() as work:
        results = audit(args, work)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
