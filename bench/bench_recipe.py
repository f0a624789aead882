"""
Token efficiency of training recipes: what a token teaches, not how fast it goes by.

    python bench/bench_recipe.py                    # hidden 256, 4 layers, vocab 6400, CPU: under 30 minutes
    python bench/bench_recipe.py --quick            # smoke run: a tiny model, a few steps (~1-2 minutes)
    python bench/bench_recipe.py --device cuda --preset small --steps 2000 --seeds 0 1
    python bench/bench_recipe.py --recipes ours-adamw ours-muon --set muon-x20:optimizer=muon,muon_lr_ratio=20
    python bench/bench_recipe.py --recipes ours-muon --sft_lrs 3e-5 1e-4 3e-4 1e-3   # then the SFT lr sweep

Every recipe trains the same model from the same seed on the same shards for the same number of tokens, through
the real PretrainTrainer (trainer/pretrain.py), so what is measured is what `main.py --stage pretrain` runs. The
validation bits-per-byte (trainer/pretrain.py's bpb, from token_byte_lengths) is read at regular points. Printed per
recipe: the bpb curve, and how many tokens it needs to reach the baseline's (ours-adamw) final bpb as a share of
the baseline's budget, interpolated linearly between evaluations; below 1 is better. With several seeds every
recipe is compared with the baseline of its own seed, and the mean and the spread (min-max) are printed.

Data: the shared pack's Chinese text (../shared/data/pretrain/zh, see its README) is cleaned with
scripts/zh_simplify.py, a tokenizer is trained on it (trainer/train_tokenizer.py) and shards are written with
scripts/prepare_shards.py, all into bench/_work/recipe/ (git-ignored) and reused by later runs. Without the pack
the benchmark says so and exits.

Recipes (a recipe is a set of TrainConfig overrides on top of the shared ones):
    ours-adamw   config/pretrain.yaml with optimizer=adamw (its warmup kept as the same share of the run)
    ours-muon    the same with optimizer=muon (and the yaml's or TrainConfig's muon settings)
    minimind     MiniMind's pretraining: AdamW with torch's default betas (0.9, 0.999) and weight decay 0.01,
                 lr 5e-4, cosine to lr/10, no warmup
    plus the variants in VARIANTS and any --set name:key=value,key=value.

SFT learning rate (--sft_lrs): the --sft_from recipe's pretrained model (first seed) is fine-tuned with
config/sft.yaml's recipe on its chat files from the shared pack (../shared/data/sft), once per lr, for --sft_steps
steps on the benchmark's batch and sequence length; printed: the validation loss (assistant tokens, nats) per lr.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run directly: repo root importable

import argparse
import contextlib
import json
import shutil
import subprocess
import time

import torch
import yaml

from trainer.config import ConfigError, config_to_dict, load_config, parse_overrides
from trainer.core import run_trainer
from trainer.pretrain import Config, PretrainTrainer
from trainer.sft import Config as SFTConfig
from trainer.sft import SFTTrainer
from trainer.train_tokenizer import Config as TokenizerConfig
from trainer.train_tokenizer import run as train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "bench", "_work", "recipe")
PACK = os.path.join(os.path.dirname(ROOT), "shared", "data", "pretrain", "zh")
SFT_PACK = os.path.join(os.path.dirname(ROOT), "shared", "data", "sft")
BASELINE = "ours-adamw"

# Modern prose (wiki paragraphs, reports, essays) plus vernacular novels: about 4M Chinese characters.
PACK_FILES = [
    "cmrc2018_dev.json",
    "zhwiki_wikiextractor_json_wiki_00.jsonl",
    "gov_work_reports_1954_2025.jsonl",
    "luxun",
    "novels",
]
QUICK_FILES = ["luxun/nahan_1923.txt", "luxun/panghuang_1926.txt"]

# The model and run sizes. `model` is a preset name or a dict of SLMConfig fields (vocab_size comes from the
# tokenizer). The default fits a 2-core CPU: 3 recipes x 1 seed in under 30 minutes.
SIZES = {
    "default": dict(
        model=dict(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        ),
        vocab=6400,
        steps=400,
        batch=8,
        seq_len=256,
        evals=8,
        eval_batches=8,
    ),
    "quick": dict(
        model=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        ),
        vocab=1024,
        steps=12,
        batch=8,
        seq_len=64,
        evals=3,
        eval_batches=2,
    ),
}

MINIMIND = dict(
    optimizer="adamw",
    lr=5e-4,
    beta1=0.9,
    beta2=0.999,
    weight_decay=0.01,
    lr_schedule="cosine",
    min_lr_ratio=0.1,
    warmup_steps=0,
)
RECIPES = {"ours-adamw": dict(optimizer="adamw"), "ours-muon": dict(optimizer="muon"), "minimind": MINIMIND}
# What a recipe is made of, taken from config/pretrain.yaml (with TrainConfig's defaults where it is silent).
RECIPE_KEYS = (
    "optimizer",
    "lr",
    "min_lr_ratio",
    "lr_schedule",
    "decay_ratio",
    "weight_decay",
    "beta1",
    "beta2",
    "grad_clip",
    "muon_lr_ratio",
    "muon_momentum",
)
# Issue 15 point 4: what else might pay at this scale, each tried against ours-muon (a "model" entry changes the
# benchmark model's SLMConfig, e.g. its init; the trained model stays a stock Llama either way).
VARIANTS = {
    "ours-muon-wsd": dict(optimizer="muon", lr_schedule="wsd"),
    "ours-adamw-wsd": dict(lr_schedule="wsd"),
    "muon-no-warmup": dict(optimizer="muon", warmup_steps=0),
    "muon-warmup-x3": dict(optimizer="muon", warmup_share=3),
    "muon-no-embed-decay": dict(optimizer="muon", decay_embeddings=False),
    "muon-zero-init": dict(optimizer="muon", model=dict(residual_init="zero")),
}

# -----------------------------------------------------------------------------
# data: the project's own cleaning, tokenizer and shard code


def run_quiet(cmd: list[str], log: str) -> None:
    with open(log, "a", encoding="utf-8") as f:
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=f, stderr=subprocess.STDOUT)


def prepare_data(work: str, files: list[str], vocab: int, shard_mb: float, val_tokens: int) -> tuple[str, str]:
    """(tokenizer_dir, shard_dir) under `work`, built once: each step is skipped when its output exists."""
    os.makedirs(work, exist_ok=True)
    log = os.path.join(work, "prepare.log")
    corpus = os.path.join(work, "corpus.jsonl")
    if not os.path.exists(corpus):
        print(f"[bench] cleaning {len(files)} inputs of the shared pack -> {corpus}", flush=True)
        run_quiet(
            [
                sys.executable,
                "scripts/zh_simplify.py",
                "--input",
                *[os.path.join(PACK, f) for f in files],
                "--output",
                corpus,
            ],
            log,
        )
    tokenizer = os.path.join(work, f"tokenizer_{vocab}")
    if not os.path.exists(os.path.join(tokenizer, "tokenizer_report.json")):
        print(f"[bench] training a {vocab}-token tokenizer -> {tokenizer}", flush=True)
        with open(log, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f):
            train_tokenizer(TokenizerConfig(data_path=corpus, vocab_size=vocab, out_dir=tokenizer, seed=0))
    shards = os.path.join(work, f"shards_{vocab}")
    if not os.path.exists(os.path.join(shards, "meta.json")):
        print(f"[bench] writing shards -> {shards}", flush=True)
        shutil.rmtree(shards, ignore_errors=True)
        run_quiet(
            [
                sys.executable,
                "scripts/prepare_shards.py",
                "--tokenizer",
                tokenizer,
                "--inputs",
                corpus,
                "--out_dir",
                shards,
                "--shard_mb",
                str(shard_mb),
                "--val_tokens",
                str(val_tokens),
                "--seed",
                "0",
            ],
            log,
        )
    return tokenizer, shards


# -----------------------------------------------------------------------------
# recipes -> runs


def base_settings(size: dict, args, tokenizer: str, shards: str, model_config: str) -> dict:
    """The shared settings: config/pretrain.yaml's recipe on the benchmark's model, data and budget."""
    yaml_cfg = load_config(Config, os.path.join(ROOT, "config", "pretrain.yaml"), [])
    warmup = round(args.steps * yaml_cfg.warmup_steps / yaml_cfg.max_steps)  # the same share of the run
    eval_every = max(1, args.steps // size["evals"])
    recipe = {key: getattr(yaml_cfg, key) for key in RECIPE_KEYS}
    return dict(
        **recipe,
        model_config=model_config,
        tokenizer_dir=tokenizer,
        data_dir=shards,
        max_steps=args.steps,
        batch_size=size["batch"],
        global_batch_size=size["batch"],
        seq_len=size["seq_len"],
        warmup_steps=warmup,
        device=args.device,
        compile=args.compile and args.device != "cpu",
        dtype="auto",
        eval_every=eval_every,
        eval_batches=size["eval_batches"],
        save_every=0,
        keep_last=1,
        resume="never",
        log_every=max(1, args.steps // 4),
        sample_tokens=0,
    )


def eval_records(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["split"] == "eval"]


def finished_run(cfg: Config, keep_final: bool) -> bool:
    """Whether cfg.out_dir holds a finished run of exactly this config (config.yaml, the last evaluation), so a
    rerun of the benchmark (another seed, one more variant) reuses it: a run is deterministic on CPU."""
    path = os.path.join(cfg.out_dir, "config.yaml")
    if not os.path.isfile(path) or keep_final and not os.path.isdir(os.path.join(cfg.out_dir, "final")):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            done = yaml.safe_load(f)
        records = eval_records(cfg.out_dir)
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return done == config_to_dict(cfg) and bool(records) and records[-1]["step"] == cfg.max_steps


def train_recipe(name: str, settings: dict, seed: int, out_dir: str, keep_final: bool = False) -> dict:
    """One run; returns its eval curve as (tokens seen, bpb) points and the wall time. The weights are deleted
    afterwards, but for final/ with keep_final. A finished run of the same config in out_dir is reused."""
    cfg = Config(**{**settings, "seed": seed, "out_dir": out_dir})
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    if finished_run(cfg, keep_final):
        records = eval_records(out_dir)
        seconds = records[-1]["time"] - os.path.getmtime(os.path.join(out_dir, "config.yaml"))
        print(f"[bench] {name} seed {seed}: reusing the finished run in {out_dir}", flush=True)
        return {
            "recipe": name,
            "seed": seed,
            "curve": [(r["step"] * tokens_per_step, r["bpb"]) for r in records],
            "seconds": seconds,
        }
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    start = time.time()
    with open(os.path.join(out_dir, "train.log"), "w", encoding="utf-8") as f, contextlib.redirect_stdout(f):
        run_trainer(PretrainTrainer, cfg)
    seconds = time.time() - start
    curve = [(r["step"] * tokens_per_step, r["bpb"]) for r in eval_records(out_dir)]
    for step_dir in os.listdir(out_dir):  # the weights are not needed afterwards
        if step_dir.startswith("step_") or step_dir == "final" and not keep_final:
            shutil.rmtree(os.path.join(out_dir, step_dir), ignore_errors=True)
    return {"recipe": name, "seed": seed, "curve": curve, "seconds": seconds}


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which the curve first reaches `target` bpb, linear between evaluations; None if it never does."""
    for i, (tokens, bpb) in enumerate(curve):
        if bpb <= target:
            if i == 0:
                return float(tokens)  # reached by the first evaluation: an upper bound
            t0, b0 = curve[i - 1]
            return t0 + (tokens - t0) * (b0 - target) / (b0 - bpb)
    return None


def summarise(runs: list[dict], baseline_name: str = BASELINE) -> dict:
    """Per recipe: final bpb and the token ratio to the same seed's baseline final bpb (mean, min, max)."""
    baseline = {r["seed"]: r for r in runs if r["recipe"] == baseline_name}
    summary = {}
    for name in dict.fromkeys(r["recipe"] for r in runs):
        mine = [r for r in runs if r["recipe"] == name]
        finals = [r["curve"][-1][1] for r in mine]
        ratios = []
        for r in mine:
            base = baseline[r["seed"]]
            needed = tokens_to_reach(r["curve"], base["curve"][-1][1])
            ratios.append(None if needed is None else needed / base["curve"][-1][0])
        reached = [x for x in ratios if x is not None]
        summary[name] = {
            "final_bpb": finals,
            "final_bpb_mean": sum(finals) / len(finals),
            "token_ratio": ratios,
            "token_ratio_mean": sum(reached) / len(reached) if len(reached) == len(ratios) else None,
            "seconds": sum(r["seconds"] for r in mine),
        }
    return summary


def print_report(runs: list[dict], summary: dict, header: str, baseline_name: str = BASELINE) -> None:
    print(f"\n{header}\n")
    points = [t for t, _ in runs[0]["curve"]]
    print("| recipe | seed | " + " | ".join(f"bpb @ {t:,} tok" for t in points) + " |")
    print("|---|---|" + "---|" * len(points))
    for r in runs:
        print(f"| {r['recipe']} | {r['seed']} | " + " | ".join(f"{b:.4f}" for _, b in r["curve"]) + " |")
    print(
        f"\n| recipe | final bpb (mean, min-max) | tokens to {baseline_name}'s final bpb (x its budget; mean, "
        f"min-max) | minutes |"
    )
    print("|---|---|---|---|")
    for name, s in summary.items():
        finals = s["final_bpb"]
        ratios = s["token_ratio"]
        if s["token_ratio_mean"] is not None:
            ratio = f"{s['token_ratio_mean']:.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
        else:
            ratio = "not reached" + (f" in {ratios.count(None)} of {len(ratios)} seeds" if len(ratios) > 1 else "")
        print(
            f"| {name} | {s['final_bpb_mean']:.4f} ({min(finals):.4f}-{max(finals):.4f}) | {ratio} | "
            f"{s['seconds'] / 60:.1f} |"
        )


def sft_sweep(pretrained: str, lrs: list[float], steps: int, size: dict, args, work: str) -> list[dict]:
    """config/sft.yaml's recipe from `pretrained`, once per lr: [{lr, curve: [(step, val loss)], seconds}]."""
    yaml_cfg = load_config(SFTConfig, os.path.join(ROOT, "config", "sft.yaml"), [])
    files = [os.path.join(SFT_PACK, os.path.basename(p.strip())) for p in yaml_cfg.data_path.split(",")]
    results = []
    for lr in lrs:
        out_dir = os.path.join(work, "sft", f"lr{lr:g}")
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir)
        cfg = load_config(
            SFTConfig,
            os.path.join(ROOT, "config", "sft.yaml"),
            [
                f"init_from={pretrained}",
                f"out_dir={out_dir}",
                f"data_path={','.join(files)}",
                f"lr={lr}",
                f"max_steps={steps}",
                f"warmup_steps={round(steps * yaml_cfg.warmup_steps / yaml_cfg.max_steps)}",
                f"seq_len={size['seq_len']}",
                f"batch_size={size['batch']}",
                f"global_batch_size={size['batch']}",
                f"eval_every={max(1, steps // 4)}",
                f"eval_batches={size['eval_batches']}",
                f"device={args.device}",
                "compile=false",
                "save_every=0",
                "resume=never",
                f"log_every={max(1, steps // 4)}",
            ],
        )
        start = time.time()
        with open(os.path.join(out_dir, "train.log"), "w", encoding="utf-8") as f, contextlib.redirect_stdout(f):
            run_trainer(SFTTrainer, cfg)
        curve = [(r["step"], r["loss"]) for r in eval_records(out_dir)]
        shutil.rmtree(os.path.join(out_dir, "final"), ignore_errors=True)
        results.append({"lr": lr, "curve": curve, "seconds": time.time() - start})
        print(f"[bench] sft lr {lr:g}: val loss {curve[-1][1]:.4f} in {time.time() - start:.0f}s", flush=True)
    return results


# -----------------------------------------------------------------------------


def parse_set(specs: list[str]) -> dict:
    """['name:key=value,key=value', ...] -> {name: {key: value}}, keys and types checked as the CLI checks them."""
    recipes = {}
    for spec in specs:
        name, sep, body = spec.partition(":")
        pairs = [p for p in body.split(",") if p]
        if not sep or not name or not pairs:
            raise SystemExit(f"--set {spec!r}: expected name:key=value,key=value")
        try:
            cfg = load_config(Config, None, pairs)
        except ConfigError as e:
            raise SystemExit(f"--set {spec!r}: {e}") from None
        recipes[name] = {key: getattr(cfg, key) for key in parse_overrides(pairs)}
    return recipes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, a few steps: checks that it runs")
    ap.add_argument(
        "--recipes",
        nargs="+",
        default=None,
        help=f"default: {', '.join(RECIPES)}; also: {', '.join(VARIANTS)}, and the names given with --set",
    )
    ap.add_argument("--set", nargs="*", default=[], help="extra recipes: name:key=value,key=value (TrainConfig)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--baseline", default=BASELINE, help="the recipe token ratios are measured against (always run)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (the token budget)")
    ap.add_argument("--preset", default="", help="a model preset (e.g. small) instead of the benchmark model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile (GPU)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--work", default=WORK, help="data and runs (git-ignored)")
    ap.add_argument("--json", default="", help="also write the curves and the summary here")
    ap.add_argument("--sft_lrs", nargs="*", type=float, default=[], help="SFT learning rates to sweep")
    ap.add_argument("--sft_from", default="ours-muon", help="the recipe whose pretrained model the SFT sweep tunes")
    ap.add_argument("--sft_steps", type=int, default=200, help="SFT steps per lr")
    args = ap.parse_args()
    if not os.path.isdir(PACK):
        print(f"[bench] the shared data pack is not at {PACK}: nothing to benchmark (see ../shared/data/README.md)")
        return
    torch.set_num_threads(args.threads)
    size = SIZES["quick" if args.quick else "default"]
    args.steps = args.steps or size["steps"]
    extra = parse_set(args.set)
    known = {**RECIPES, **VARIANTS, **extra}
    names = args.recipes or [*RECIPES, *extra]
    if args.baseline not in names:
        names = [args.baseline, *names]
    if args.sft_lrs and args.sft_from not in names:
        names.append(args.sft_from)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; known: {', '.join(known)}")

    files = QUICK_FILES if args.quick else PACK_FILES
    data_dir = os.path.join(args.work, "quick" if args.quick else "data")
    tokenizer, shards = prepare_data(
        data_dir, files, size["vocab"], shard_mb=0.2 if args.quick else 4, val_tokens=20_000 if args.quick else 200_000
    )
    if args.preset:
        model_config = args.preset
    else:
        model_config = os.path.join(data_dir, "model.json")
        with open(model_config, "w", encoding="utf-8") as f:
            json.dump({**size["model"], "vocab_size": size["vocab"]}, f)
    settings = base_settings(size, args, tokenizer, shards, model_config)
    settings["vocab_size"] = size["vocab"]
    runs = []
    for seed in args.seeds:
        for name in names:
            recipe = dict(known[name])
            if "warmup_share" in recipe:  # a multiple of the shared warmup
                recipe["warmup_steps"] = round(settings["warmup_steps"] * recipe.pop("warmup_share"))
            if "model" in recipe:  # the benchmark model with some SLMConfig fields changed
                if args.preset:
                    raise SystemExit(f"recipe {name} changes the benchmark model; it cannot run with --preset")
                with open(model_config, encoding="utf-8") as f:
                    fields = {**json.load(f), **recipe.pop("model")}
                recipe["model_config"] = os.path.join(data_dir, f"model_{name}.json")
                with open(recipe["model_config"], "w", encoding="utf-8") as f:
                    json.dump(fields, f)
            run_dir = os.path.join(args.work, "runs", name, f"seed{seed}")
            keep = bool(args.sft_lrs) and name == args.sft_from and seed == args.seeds[0]
            run = train_recipe(name, {**settings, **recipe}, seed, run_dir, keep_final=keep)
            runs.append(run)
            print(
                f"[bench] {name} seed {seed}: final bpb {run['curve'][-1][1]:.4f} in {run['seconds']:.0f}s", flush=True
            )
    summary = summarise(runs, args.baseline)
    tokens = args.steps * settings["global_batch_size"] * settings["seq_len"]
    print_report(
        runs,
        summary,
        f"## bench_recipe: model {args.preset or size['model']}, vocab {size['vocab']}, "
        f"{args.steps} steps x {settings['global_batch_size']} x {settings['seq_len']} = {tokens:,} tokens, "
        f"seeds {args.seeds}, device {args.device}, torch {torch.__version__}",
        args.baseline,
    )
    sft = []
    if args.sft_lrs:
        pretrained = os.path.join(args.work, "runs", args.sft_from, f"seed{args.seeds[0]}", "final")
        sft = sft_sweep(pretrained, args.sft_lrs, args.sft_steps, size, args, args.work)
        print(
            f"\n## SFT lr sweep: config/sft.yaml from {args.sft_from} (seed {args.seeds[0]}), {args.sft_steps} steps\n"
        )
        print("| lr | " + " | ".join(f"val loss @ step {s}" for s, _ in sft[0]["curve"]) + " |")
        print("|---|" + "---|" * len(sft[0]["curve"]))
        for r in sft:
            print(f"| {r['lr']:g} | " + " | ".join(f"{loss:.4f}" for _, loss in r["curve"]) + " |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "runs": runs,
                    "summary": summary,
                    "recipes": {n: known[n] for n in names},
                    "settings": settings,
                    "sft": sft,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
