"""
The whole pipeline in one command: corpus cleaning -> tokenizer -> shards -> pretraining -> SFT -> LoRA -> DPO ->
evaluation -> a short scripted chat, each stage the real one with a small config.

    python main.py --stage all --config config/demo.yaml            # the demo: data made by code, CPU, minutes
    python main.py --stage all --config config/demo.yaml force=true # redo every stage

A stage whose outputs are complete is skipped on a re-run (its marker file exists), so an interrupted demo
continues where it stopped. The demo measures one learnable skill (reading unseen three-digit numbers aloud,
see dataset/demo_data.py) after each training stage and prints the accuracy, so you can see what each stage did.
"""

import importlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field

import torch

from dataset.chat_data import tokenize_conversation
from dataset.corpus import print_summary, simplify
from dataset.demo_data import SMALL_TALK, task_answer, task_prompt, write_demo_data
from dataset.shard_writer import prepare
from dataset.text_sources import FilterConfig
from model.engine import CHAT_SAMPLING, Engine, SamplingParams
from model.hub import END_OF_TURN
from model.runtime import resolve_device, set_cpu_threads
from trainer.config import SEED_RANGE, at_least, load_config, setting, validate
from trainer.logprobs import token_logprobs
from trainer.stages import STAGES

ALL_STAGES = "data,corpus,tokenizer,shards,pretrain,sft,lora,dpo,eval,chat"


@dataclass
class Config:
    out_dir: str = "out/demo"  # every artifact goes under here
    stages: str = ALL_STAGES  # comma-separated subset, in this order
    force: bool = False  # redo stages whose outputs already exist
    seed: int = setting(0, bound=SEED_RANGE)  # passed on to every training stage, so it gets their bound
    n_docs: int = setting(3000, bound=at_least(1))  # generated pretraining documents
    device: str = setting("auto", device=True)  # passed to every training stage
    threads: int = setting(
        0, bound=at_least(0)
    )  # CPU threads, passed to every training stage; 0 = auto (model/runtime.py auto_cpu_threads)
    # Per-stage settings: any field of that stage's Config (paths are filled in by the pipeline).
    tokenizer: dict = field(default_factory=dict)
    shards: dict = field(default_factory=dict)  # keyword arguments of dataset/shard_writer.prepare
    pretrain: dict = field(default_factory=dict)
    sft: dict = field(default_factory=dict)
    lora: dict = field(default_factory=dict)
    dpo: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)


# -----------------------------------------------------------------------------
# helpers


def banner(text: str):
    print(f"\n{'=' * 100}\n== {text}\n{'=' * 100}", flush=True)


def run_stage(name: str, overrides: dict):
    """Build stage `name`'s Config exactly as main.py would (strict keys and types) and run it."""
    module = importlib.import_module(STAGES[name][0])
    cfg = load_config(module.Config, None, {k: v for k, v in overrides.items()})
    return module.run(cfg)


def first_sentence(text: str) -> str:
    """An answer's first sentence: a model that never learned to end its turn still gets credit for a right start
    followed by more text (whether it ended is counted on its own, chat_turns)."""
    for end in ("<|im_end|>", "<|endoftext|>", "\n", "。"):
        text = text.split(end)[0]
    return text.strip()


def chat_outputs(engine: Engine, questions: list[str], sampling: SamplingParams) -> list[list[int]]:
    """The new ids of each answer, ending with the stop token when the model chose to stop."""
    prompts = [
        engine.chat_prompt([{"role": "user", "content": q}], max_new_tokens=sampling.max_new_tokens) for q in questions
    ]
    return engine.generate(prompts, sampling)


def greedy_answers(engine: Engine, questions: list[str], max_new_tokens: int) -> list[str]:
    outputs = chat_outputs(engine, questions, SamplingParams(max_new_tokens=max_new_tokens))
    return [first_sentence(engine.decode(o)) for o in outputs]


@torch.no_grad()
def end_of_turn_loss(model, tokenizer, pairs: list[tuple[str, str]]) -> float:
    """Mean cross-entropy of the <|im_end|> that closes each (question, answer) turn: high for a model that never
    learned to end its turn (the demo's: 18 after pretraining, ~4 after LoRA with frozen marker rows), near 0 for
    one that did."""
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    losses = []
    for question, answer in pairs:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        ids, labels = tokenize_conversation(tokenizer, messages)
        logp = token_logprobs(model, torch.as_tensor(ids[None], dtype=torch.long))[0]  # position t: log p(ids[t + 1])
        at_end = torch.as_tensor(labels[1:]) == end  # the answer's <|im_end|>, not the prompt's (its label is -100)
        losses.append(-logp[at_end])
    return torch.cat(losses).mean().item()


def held_out_accuracy(model_dir: str, held_out: list[int], adapter: str | None = None) -> tuple[int, int, list]:
    """Greedy answers to the never-seen numbers; exact match with the digit-by-digit reading."""
    engine = Engine.from_pretrained(model_dir, adapter=adapter, device="cpu")
    answers = greedy_answers(engine, [task_prompt(n) for n in held_out], 12)
    correct = sum(a == task_answer(n) for a, n in zip(answers, held_out))
    return correct, len(held_out), list(zip(held_out, answers))[:3]


def chat_turns(model_dir: str, adapter: str | None = None, max_new_tokens: int = 40, samples: int = 5) -> dict:
    """A chat turn per small-talk question of the SFT data: right when the greedy answer's first sentence is the
    trained answer's (a model that learned only the digit task fails here). Ended: of `samples` answers per
    question, sampled as scripts/chat_terminal.py samples them (CHAT_SAMPLING, seeded), those that stop on
    <|im_end|> before max_new_tokens. Greedy decoding would hide a model that never learned to end its turn: its
    <|im_end|> can be the most likely token at 2 % (a loss of 3.96) and still lose to the tail when sampled. Also
    the loss of that <|im_end|> after the trained answers."""
    engine = Engine.from_pretrained(model_dir, adapter=adapter, device="cpu")
    questions = [q for q, _ in SMALL_TALK]
    answers = greedy_answers(engine, questions, max_new_tokens)
    sampled = chat_outputs(engine, questions * samples, CHAT_SAMPLING.replace(max_new_tokens=max_new_tokens, seed=0))
    end = engine.tokenizer.convert_tokens_to_ids(END_OF_TURN)
    return {
        "right": sum(a == first_sentence(want) for a, (_, want) in zip(answers, SMALL_TALK)),
        "total": len(SMALL_TALK),
        "ended": sum(len(o) < max_new_tokens and o[-1:] == [end] for o in sampled),
        "sampled": len(sampled),
        "end_of_turn_loss": end_of_turn_loss(engine.model, engine.tokenizer, SMALL_TALK),
        "examples": [(q, a) for (q, _), a in zip(SMALL_TALK, answers)][:2],
    }


# -----------------------------------------------------------------------------
# the pipeline


def run(cfg: Config):
    validate(cfg)
    root = cfg.out_dir
    stages = [s for s in cfg.stages.split(",") if s]
    unknown = set(stages) - set(ALL_STAGES.split(","))
    if unknown:
        raise ValueError(f"unknown pipeline stage(s) {sorted(unknown)}; choose from {ALL_STAGES}")
    os.makedirs(root, exist_ok=True)
    if resolve_device(cfg.device).type == "cpu":  # the stages set it again; this covers the checks and the chat
        print(f"[all] {set_cpu_threads(cfg.threads)} CPU threads (threads=0: auto, OMP_NUM_THREADS if set)")
    p = {
        name: os.path.join(root, name)
        for name in ("data", "tokenizer", "shards", "pretrain", "sft", "lora", "dpo", "eval")
    }
    p["corpus"] = os.path.join(root, "corpus", "clean.jsonl")
    timings, scores, chats = [], {}, {}
    data_paths_file = os.path.join(p["data"], "paths.json")

    def done(marker: str) -> bool:
        return os.path.exists(marker) and not cfg.force

    def stage(name: str, marker: str, fn):
        if name not in stages:
            return
        if done(marker):
            print(f"[all] {name}: complete ({marker}), skipped; force=true redoes it", flush=True)
            timings.append((name, 0.0, "skipped"))
            return
        banner(f"stage {name}")
        start = time.time()
        fn()
        timings.append((name, time.time() - start, "done"))
        print(f"[all] {name}: done in {time.time() - start:.1f}s", flush=True)

    # 1. data made by code
    def make_data():
        paths = write_demo_data(p["data"], seed=cfg.seed, n_docs=cfg.n_docs)
        with open(data_paths_file, "w", encoding="utf-8") as f:
            json.dump(paths, f, ensure_ascii=False)

    stage("data", data_paths_file, make_data)
    with open(data_paths_file, encoding="utf-8") as f:
        data = json.load(f)

    # 2. cleaning: traditional -> simplified, markup and debris removed, deduplicated
    def clean():
        stats = simplify(
            [data["corpus_jsonl"], data["corpus_wiki"]],
            p["corpus"],
            FilterConfig(min_chars=8, min_cjk_ratio=0.1),
            quiet=True,
        )
        print_summary(stats, p["corpus"])

    stage("corpus", p["corpus"], clean)

    # 3. tokenizer
    stage(
        "tokenizer",
        os.path.join(p["tokenizer"], "tokenizer.json"),
        lambda: run_stage(
            "tokenizer", {"vocab_size": 1024, **cfg.tokenizer, "data_path": p["corpus"], "out_dir": p["tokenizer"]}
        ),
    )

    # 4. shards
    def shards():
        shutil.rmtree(p["shards"], ignore_errors=True)
        prepare(p["tokenizer"], [p["corpus"]], p["shards"], **{"shard_mb": 0.1, "val_tokens": 10000, **cfg.shards})

    stage("shards", os.path.join(p["shards"], "meta.json"), shards)

    common = {"device": cfg.device, "seed": cfg.seed, "threads": cfg.threads}
    # 5-8. training stages, each starting from the previous one's final/
    stage(
        "pretrain",
        os.path.join(p["pretrain"], "final", "config.json"),
        lambda: run_stage(
            "pretrain",
            {
                **common,
                **cfg.pretrain,
                "tokenizer_dir": p["tokenizer"],
                "data_dir": p["shards"],
                "out_dir": p["pretrain"],
            },
        ),
    )
    stage(
        "sft",
        os.path.join(p["sft"], "final", "config.json"),
        lambda: run_stage(
            "sft",
            {
                **common,
                **cfg.sft,
                "init_from": os.path.join(p["pretrain"], "final"),
                "data_path": data["sft"],
                "out_dir": p["sft"],
            },
        ),
    )
    stage(
        "lora",
        os.path.join(p["lora"], "final", "adapter_config.json"),
        lambda: run_stage(
            "lora",
            {
                **common,
                **cfg.lora,
                "init_from": os.path.join(p["pretrain"], "final"),
                "data_path": data["sft"],
                "out_dir": p["lora"],
            },
        ),
    )
    stage(
        "dpo",
        os.path.join(p["dpo"], "final", "config.json"),
        lambda: run_stage(
            "dpo",
            {
                **common,
                **cfg.dpo,
                "init_from": os.path.join(p["sft"], "final"),
                "data_path": data["dpo"],
                "out_dir": p["dpo"],
            },
        ),
    )

    # 9. evaluation: the eval stage's report, plus the demo's own skill check on every model
    models = [
        (name, os.path.join(p[name], "final"))
        for name in ("pretrain", "sft", "dpo")
        if os.path.exists(os.path.join(p[name], "final", "config.json"))
    ]

    def evaluate():
        run_stage(
            "eval",
            {
                **cfg.eval,
                "init_from": ",".join(path for _, path in models),
                "ppl_data": os.path.join(p["shards"]),
                "prompts": data["prompts"],
                "out_dir": p["eval"],
            },
        )

    stage("eval", os.path.join(p["eval"], "eval.json"), evaluate)
    if "eval" in stages or "chat" in stages:
        banner("held-out skill: read a never-seen three-digit number digit by digit")
        for name, path in models:
            scores[name] = held_out_accuracy(path, data["held_out"])
        lora_final = os.path.join(p["lora"], "final")
        if os.path.exists(os.path.join(lora_final, "adapter_config.json")):
            scores["lora"] = held_out_accuracy(os.path.join(p["pretrain"], "final"), data["held_out"], lora_final)
        for name, (correct, total, examples) in scores.items():
            shown = "; ".join(f"{n} -> {a!r}" for n, a in examples)
            print(f"[all] {name:<8} {correct:>3}/{total} correct ({100 * correct / total:.0f}%)   e.g. {shown}")
        banner("chat turns: the SFT data's small talk, first sentence of the greedy answer; sampled turns that end")
        for name, path in models:
            chats[name] = chat_turns(path)
        if "lora" in scores:
            chats["lora"] = chat_turns(os.path.join(p["pretrain"], "final"), lora_final)
        for name, chat in chats.items():
            shown = "; ".join(f"{q} -> {a!r}" for q, a in chat["examples"])
            print(
                f"[all] {name:<8} {chat['right']:>3}/{chat['total']} chat turns right, "
                f"{chat['ended']}/{chat['sampled']} sampled ones ended at {END_OF_TURN} "
                f"(its loss {chat['end_of_turn_loss']:.3f})   e.g. {shown}"
            )

    # 10. a short scripted chat with the final model
    if "chat" in stages and models:
        banner(f"chat with {models[-1][1]}")
        engine = Engine.from_pretrained(models[-1][1], device="cpu")
        # One fresh conversation per question: the demo's chat data has single-turn conversations only.
        for question in ("你好", "把 582 逐位读成中文", "中国的首都是哪里？"):
            answer = engine.chat([{"role": "user", "content": question}], max_new_tokens=48)
            print(f"  user: {question}\n  milli-chat: {answer}")

    # summary
    banner("summary")
    for name, seconds, status in timings:
        print(f"  {name:<10} {status:<8} {seconds:7.1f}s")
    print(
        f"\n  artifacts under {root}/: tokenizer/, shards/, pretrain/final, sft/final, lora/final (adapter), "
        f"dpo/final, eval/"
    )
    final = models[-1][1] if models else os.path.join(p["sft"], "final")
    print(f"  chat:   python scripts/chat_terminal.py --model {final}")
    print(
        f"          python scripts/chat_terminal.py --model {os.path.join(p['pretrain'], 'final')} "
        f"--adapter {os.path.join(p['lora'], 'final')}"
    )
    print(f"  serve:  python scripts/serve_api.py --model {final}")
    with open(os.path.join(root, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "timings": timings,
                "held_out_accuracy": {k: [c, t] for k, (c, t, _) in scores.items()},
                "chat_turns": {k: [c["right"], c["total"]] for k, c in chats.items()},
                "ended_turns": {k: [c["ended"], c["sampled"]] for k, c in chats.items()},
                "end_of_turn_loss": {k: round(c["end_of_turn_loss"], 4) for k, c in chats.items()},
            },
            f,
            ensure_ascii=False,
            indent=1,
        )
    return scores
