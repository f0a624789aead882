"""
The demo's data, made by code: deterministic, small, bilingual, and with a task whose success can be measured.

    from dataset.demo_data import write_demo_data
    paths = write_demo_data("out/demo/data", seed=0)

The task: read a three-digit number aloud digit by digit in Chinese ("把 372 逐位读成中文" -> "读作 三 七 二").
Numbers are split three ways: pretraining text sees some, SFT/DPO see others, and HELD_OUT numbers appear
nowhere, so the demo's accuracy on them shows that the model learned the rule, not a lookup table. The answer's
digits are spaced so that each Chinese numeral is its own pre-token (the Qwen2 regex keeps letters together).

The pretraining corpus also carries what the cleaning and tokenizer stages must handle: a WikiExtractor-style
file with traditional characters and `-{zh-cn:...;zh-tw:...}-` conversion markup, empty brackets left by removed
templates, emoji and English.
"""

import json
import os
import random

DIGITS = "零一二三四五六七八九"
NUMBERS = list(range(100, 1000))


def split_numbers(seed: int = 0) -> dict:
    """Disjoint number sets: held-out (never seen), supervised (SFT/DPO), and pretraining text."""
    rng = random.Random(seed)
    numbers = NUMBERS[:]
    rng.shuffle(numbers)
    return {"held_out": sorted(numbers[:60]), "sft": sorted(numbers[60:560]), "pretrain": sorted(numbers[560:])}


def read_digits(n: int) -> str:
    return " ".join(DIGITS[int(d)] for d in str(n))


def task_prompt(n: int) -> str:
    return f"把 {n} 逐位读成中文"


def task_answer(n: int) -> str:
    # Starts like the pretraining sentences ("数字 372 逐位读作 三 七 二。"), so even LoRA, whose embeddings stay
    # frozen, can reuse what pretraining learned about these tokens.
    return f"读作 {read_digits(n)}"


# Traditional-character sentences (the cleaner converts them) with the simplified form they should become.
TRADITIONAL = [
    "這是一個關於數學的簡單例子。",
    "我們學習語言，也學習計算。",
    "電腦可以幫助人們處理資訊。",
    "臺灣和香港使用繁體字。",
    "圖書館裡有很多書。",
]
FACTS = [
    "北京是中国的首都。",
    "长江是中国最长的河流。",
    "一年有十二个月。",
    "水在零度结冰。",
    "太阳从东方升起。",
    "熊猫喜欢吃竹子。",
    "人工智能是计算机科学的一个分支。",
    "春天来了，花都开了。",
]
ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Small models can learn simple rules.",
    "Tokens per second is what we measure.",
    "Hello, world!",
]
EMOJI = ["😀", "🚀", "🐼", "👍", "🎉"]
# The SFT small talk. Its answers are also plain pretraining text: LoRA trains neither the embeddings nor the tied
# output head, so a token pretraining never trained cannot be learned by the adapters (the demo's LoRA then could
# not say "Milli-Chat": val loss 2.97 against 0.0004 for full SFT, issue 27), while full SFT learns it either way.
SMALL_TALK = [
    ("你好", "你好！我是 Milli-Chat，一个很小的中文模型 😀"),
    ("你是谁？", "我是 Milli-Chat，由你亲手训练。"),
    ("Hello!", "Hello! 我会把数字逐位读成中文。"),
    ("中国的首都是哪里？", "北京是中国的首都。"),
]


def pretrain_documents(numbers: list[int], rng: random.Random, n_docs: int) -> list[str]:
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randrange(3, 7)):
            kind = rng.random()
            if kind < 0.45:
                n = rng.choice(numbers)
                parts.append(f"数字 {n} 逐位读作 {read_digits(n)}。")
            elif kind < 0.65:
                parts.append(rng.choice(FACTS))
            elif kind < 0.75:
                parts.append(rng.choice(SMALL_TALK)[1])
            elif kind < 0.9:
                parts.append(rng.choice(ENGLISH) + " " + rng.choice(EMOJI))
            else:
                parts.append(rng.choice(FACTS) + "（）")  # debris the cleaner removes
        docs.append("".join(parts))
    return docs


def wiki_file(rng: random.Random, n_docs: int) -> str:
    """WikiExtractor output: <doc> blocks, traditional characters, conversion markup."""
    blocks = []
    for i in range(n_docs):
        body = "".join(rng.choice(TRADITIONAL) for _ in range(rng.randrange(3, 6)))
        body += "-{zh-cn:软件;zh-tw:軟體}-是電腦的靈魂（；）。" + rng.choice(FACTS)
        blocks.append(
            f'<doc id="{i}" url="https://zh.wikipedia.org/wiki?curid={i}" title="條目{i}">\n條目{i}\n\n{body}\n</doc>'
        )
    return "\n".join(blocks) + "\n"


def conversations(numbers: list[int], rng: random.Random) -> list[dict]:
    chats = []
    for n in numbers:
        chats.append(
            {
                "conversations": [
                    {"role": "user", "content": task_prompt(n)},
                    {"role": "assistant", "content": task_answer(n)},
                ]
            }
        )
    for _ in range(max(20, len(numbers) // 4)):
        q, a = rng.choice(SMALL_TALK)
        chats.append({"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    rng.shuffle(chats)
    return chats


def preference_pairs(numbers: list[int], rng: random.Random) -> list[dict]:
    """chosen = the right reading; rejected = a plausible mistake (a digit misread or the order reversed)."""
    pairs = []
    for n in numbers:
        s = str(n)
        wrong = s[::-1] if s != s[::-1] and rng.random() < 0.5 else s[:-1] + str((int(s[-1]) + 1) % 10)
        pairs.append({"prompt": task_prompt(n), "chosen": task_answer(n), "rejected": task_answer(int(wrong))})
    return pairs


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_demo_data(out_dir: str, seed: int = 0, n_docs: int = 3000) -> dict:
    """Write every input the demo needs; returns their paths and the held-out numbers."""
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    split = split_numbers(seed)
    paths = {"held_out": split["held_out"]}
    paths["corpus_jsonl"] = write_jsonl(
        os.path.join(out_dir, "corpus.jsonl"), [{"text": d} for d in pretrain_documents(split["pretrain"], rng, n_docs)]
    )
    paths["corpus_wiki"] = os.path.join(out_dir, "wiki_00")
    with open(paths["corpus_wiki"], "w", encoding="utf-8") as f:
        f.write(wiki_file(rng, max(50, n_docs // 20)))
    paths["sft"] = write_jsonl(os.path.join(out_dir, "sft.jsonl"), conversations(split["sft"], rng))
    paths["dpo"] = write_jsonl(os.path.join(out_dir, "dpo.jsonl"), preference_pairs(split["sft"], rng))
    paths["prompts"] = write_jsonl(
        os.path.join(out_dir, "prompts.jsonl"),
        [{"prompt": task_prompt(n), "reference": task_answer(n)} for n in split["held_out"][:8]]
        + [{"prompt": "你好"}, {"prompt": "中国的首都是哪里？"}],
    )
    return paths
