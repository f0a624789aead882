"""
Throughput of the real Trainer, the code users run (not a hand-written loop): pretraining on token shards and packed
SFT on conversations, made here from synthetic text, for presets, models, a micro-batch and dtypes.

    python bench/bench_trainer.py --preset small --seq_len 512 --batch 32 --steps 30 --dtype fp16   # a T4
    python bench/bench_trainer.py --preset small --seq_len 1024 --batch 64 --steps 30 --compile     # an H100
    python bench/bench_trainer.py --preset small base --model slm llama --no_sft                   # ours vs Llama
    python bench/bench_trainer.py --smoke                                                          # CPU, seconds

For each run it prints, as soon as it is measured: tokens/s (median over the steps after warm-up), MFU (CUDA, from
trainer/common.py's peak table), peak memory, skipped (overflow) steps and the last loss; an interim line of the same
a few steps after warm-up, so a run cut short by a time limit still reports; the packed-SFT line gives its tokens/s
as a ratio to pretraining's in the same run. The data is random but real in every other respect: a tokenizer trained
by the tokenizer stage, shards in dataset/shards.py's format, chat records read by the SFT stage.

Each stage trains with its optimizer settings from the recipe (--recipe, default small_gpu: Muon for pretraining,
AdamW for SFT), as users run it; --optimizer overrides both. With --compile packed SFT is compiled too (FlexAttention
inside the compiled model on sm80+ GPUs).

--model llama trains transformers' LlamaForCausalLM of the preset's dimensions (slm_to_llama_config, SDPA attention)
through the same PretrainTrainer, config, batches and compile setting as ours (slm), in the same run, and prints the
ratio of the two: the issue's "never slower than Llama", measured where users train.
"""

import argparse
import functools
import itertools
import json
import os
import random
import statistics
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from anywhere: repo root on path

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dataset.shard_writer import write_token_shards  # noqa: E402
from model import SLMConfig  # noqa: E402
from model.configuration_slm import slm_to_llama_config  # noqa: E402
from trainer.pretrain import Config as PretrainConfig  # noqa: E402
from trainer.pretrain import PretrainTrainer  # noqa: E402
from trainer.sft import Config as SFTConfig  # noqa: E402
from trainer.sft import SFTTrainer  # noqa: E402
from trainer.train_tokenizer import Config as TokenizerConfig  # noqa: E402
from trainer.train_tokenizer import run as train_tokenizer  # noqa: E402

ALPHABET = "的一是不了人我在有他这为之大来以个中上们到说和地也子时道出而要于就下得可你年生自会那后能对着事其所去行家十"


RECIPE_KEYS = (  # what a stage's recipe file decides about the optimizer step; the rest is the benchmark's own
    "optimizer",
    "lr",
    "weight_decay",
    "beta1",
    "beta2",
    "muon_lr_ratio",
    "muon_momentum",
    "grad_clip",
)


def recipe_optimizer(recipe_dir: str, stage: str, override: str = "") -> dict:
    """The optimizer settings of config/recipes/<recipe>/<stage>.yaml (keys it leaves out keep the stage's
    defaults, as they do in the recipe's run); override replaces the optimizer's name."""
    with open(os.path.join(recipe_dir, f"{stage}.yaml"), encoding="utf-8") as f:
        recipe = yaml.safe_load(f) or {}
    settings = {k: recipe[k] for k in RECIPE_KEYS if k in recipe}
    if override:
        settings["optimizer"] = override
    return settings


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


class LlamaPretrainTrainer(PretrainTrainer):
    """transformers' LlamaForCausalLM of the preset's dimensions, trained by the same PretrainTrainer as ours."""

    def build_model(self):
        from transformers import LlamaForCausalLM

        config = slm_to_llama_config(SLMConfig.from_preset(self.cfg.model_config, vocab_size=self.cfg.vocab_size))
        config._attn_implementation = "sdpa"
        return LlamaForCausalLM(config)

    def compute_loss(self, *, batch, num_items):
        x, y = batch
        # transformers computes a loss only when labels are given; shift_labels=y makes it our next-token target.
        return self.model(input_ids=x, labels=y, shift_labels=y, num_items_in_batch=num_items).loss, {}


def report(name: str, rows: list[dict], warmup: int) -> dict:
    """One RESULT line from the train rows the Trainer logged (one per step: log_every=1)."""
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


def train(trainer_cls, cfg, name: str, warmup: int, keep_final: bool = False) -> dict:
    """Run one stage and report it: an interim RESULT a few steps after warm-up, the final one at the end.
    Without keep_final nothing is written to disk at the end (only the metrics are read, and a base model's
    checkpoint with its optimizer state takes seconds to write)."""
    trainer = trainer_cls(cfg)
    if not keep_final:
        trainer.save_checkpoint = trainer.export_final = lambda **_: None
    trainer.prepare()
    rows, write = [], trainer.metrics_log.write  # every logged step's record passes through here
    interim_at = warmup + min(5, (cfg.max_steps - warmup) // 2)

    def write_and_report(values: dict, *, step: int, split: str = "train"):
        write(values, step=step, split=split)
        if split == "train":
            rows.append(values)
            if len(rows) == interim_at < cfg.max_steps:
                report(f"{name} (interim, {len(rows)} steps)", rows, warmup)

    trainer.metrics_log.write = write_and_report
    trainer.fit()
    return report(name, rows, warmup)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", default=["small"], help="one run per preset (and model and dtype)")
    parser.add_argument("--model", nargs="+", default=["slm"], choices=["slm", "llama"], help="ours, Llama's")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median (compile, allocator)")
    parser.add_argument("--dtype", nargs="+", default=["auto"], help="one run per dtype: auto bf16 fp16 fp32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument(
        "--compile_backend",
        default="inductor",
        help="aot_eager: dynamo and AOTAutograd without code generation (checks compile=true in seconds on a CPU)",
    )
    parser.add_argument(
        "--recipe",
        default=os.path.join(ROOT, "config", "recipes", "small_gpu"),
        help="each stage's optimizer settings come from this recipe's pretrain.yaml and sft.yaml",
    )
    parser.add_argument("--optimizer", default="", choices=["", "adamw", "muon"], help="instead of the recipe's")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no_sft", action="store_true", help="pretraining only")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, a few steps (checks the script)")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.seq_len, args.batch, args.steps, args.warmup = ["tiny"], 64, 2, 4, 1
    return args


def make_data(args, work: str) -> tuple[str, str]:
    """-> (tokenizer dir, shards dir), enough tokens for every pretraining run of args."""
    from transformers import AutoTokenizer

    tok_dir = make_tokenizer(work)
    shards = make_shards(
        AutoTokenizer.from_pretrained(tok_dir), work, tokens=(args.steps + 2) * args.batch * (args.seq_len + 1)
    )
    return tok_dir, shards


def settings(args) -> dict:
    """The Trainer settings every run shares: one step per log line, no evaluation, no checkpoint on the way."""
    return dict(
        batch_size=args.batch,
        global_batch_size=args.batch,
        seq_len=args.seq_len,
        max_steps=args.steps,
        warmup_steps=2,
        log_every=1,
        eval_every=0,
        eval_batches=0,
        save_every=0,
        device=args.device,
        compile=args.compile,
        seed=0,
    )


def throughput(args, tok_dir: str, shards: str, work: str, common: dict) -> list[dict]:
    """Pretraining for each preset x dtype x model, then packed SFT from our model's final weights."""
    results = []
    pretrain_optimizer = recipe_optimizer(args.recipe, "pretrain", args.optimizer)
    sft_optimizer = recipe_optimizer(args.recipe, "sft", args.optimizer)
    compiled = " compiled" if args.compile else ""
    for preset, dtype in itertools.product(args.preset, args.dtype):
        vocab = SLMConfig.from_preset(preset).vocab_size
        tok_per_s = {}
        for model in args.model:
            out = os.path.join(work, f"pretrain_{preset}_{dtype}_{model}")
            cfg = PretrainConfig(
                model_config=preset,
                tokenizer_dir=tok_dir,
                data_dir=shards,
                out_dir=out,
                dtype=dtype,
                vocab_size=vocab,
                sample_tokens=0,
                **pretrain_optimizer,
                **common,
            )
            name = (
                f"pretrain {preset}{' llama' if model == 'llama' else ''} {dtype} B={args.batch} "
                f"T={args.seq_len} {cfg.optimizer}{compiled}"
            )
            sft_follows = model == "slm" and not args.no_sft
            trainer_cls = LlamaPretrainTrainer if model == "llama" else PretrainTrainer
            results.append(train(trainer_cls, cfg, name, args.warmup, keep_final=sft_follows))
            tok_per_s[model] = results[-1]["tok_per_s"]
            if not sft_follows:
                continue
            sft = SFTConfig(
                init_from=os.path.join(out, "final"),
                data_path=make_chats(work, 8 * args.batch * (args.steps + 1), args.seq_len),
                out_dir=os.path.join(work, f"sft_{preset}_{dtype}"),
                dtype=dtype,
                pack=True,
                val_samples=0,
                **sft_optimizer,
                **common,
            )
            sft_name = f"packed sft {preset} {dtype} B={args.batch} T={args.seq_len} {sft.optimizer}{compiled}"
            packed = train(SFTTrainer, sft, sft_name, args.warmup)
            packed["ratio_to_pretrain"] = packed["tok_per_s"] / tok_per_s["slm"]
            print(f"RESULT packed sft / pretrain tokens/s ({dtype}): {packed['ratio_to_pretrain']:.2f}", flush=True)
            results.append(packed)
        if len(tok_per_s) == 2:
            ratio = tok_per_s["slm"] / tok_per_s["llama"]
            print(f"RESULT ours / llama tokens/s ({preset} {dtype}): {ratio:.2f}", flush=True)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compile_backend != "inductor":
        # The Trainer calls torch.compile(model, dynamic=False); this picks the backend, in this process only.
        torch.compile = functools.partial(torch.compile, backend=args.compile_backend)
    with tempfile.TemporaryDirectory() as work:
        tok_dir, shards = make_data(args, work)
        results = throughput(args, tok_dir, shards, work, settings(args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
