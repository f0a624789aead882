"""Test helpers for the preference and RL stages: a tiny causal-LM checkpoint and toy preference files."""

import gzip
import json
import random

# Replies in the tiny tokenizer's vocabulary: "good" ones are about study and science, "bad" ones are poems,
# so a pair is separable by its reply alone (the reward-model test) and DPO has a clear direction.
PROMPTS = [
    "中国的首都是哪里？",
    "今天天气怎么样？",
    "人工智能是什么？",
    "我们今天学习什么？",
    "小明每天几点起床？",
    "机器学习需要什么？",
    "hello world",
    "a small chat model",
    "北京是中国的首都吗？",
    "你喜欢数学吗？",
    "明月在哪里？",
    "tokens per second",
    "我们去公园吗？",
    "language is data",
    "学校上课吗？",
    "什么是计算机？",
]
GOOD = [
    "我们今天学习数学和语言。",
    "人工智能是计算机科学的一个分支。",
    "机器学习需要大量的数据和计算资源。",
    "北京是中国的首都。",
    "小明每天早上七点起床。",
]
BAD = ["床前明月光，疑是地上霜。", "春眠不觉晓，处处闻啼鸟。", "举头望明月，低头思故乡。", "处处闻啼鸟。"]


def toy_pairs(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    return [(rng.choice(PROMPTS), rng.choice(GOOD), rng.choice(BAD)) for _ in range(n)]


def write_pairs(path: str, pairs: list[tuple[str, str, str]], fmt: str) -> str:
    """Write (prompt, chosen, rejected) in one of the four supported formats."""
    records = []
    for prompt, chosen, rejected in pairs:
        user = {"role": "user", "content": prompt}
        if fmt == "messages":  # MiniMind
            records.append(
                {
                    "chosen": [user, {"role": "assistant", "content": chosen}],
                    "rejected": [user, {"role": "assistant", "content": rejected}],
                }
            )
        elif fmt == "ranking":  # LLaMA-Factory
            records.append(
                {
                    "conversations": [{"from": "human", "value": prompt}],
                    "chosen": {"from": "gpt", "value": chosen},
                    "rejected": {"from": "gpt", "value": rejected},
                }
            )
        elif fmt == "strings":
            records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        elif fmt == "hh":
            records.append(
                {
                    "chosen": f"\n\nHuman: {prompt}\n\nAssistant: {chosen}",
                    "rejected": f"\n\nHuman: {prompt}\n\nAssistant: {rejected}",
                }
            )
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        if fmt == "ranking":
            json.dump(records, f, ensure_ascii=False)  # LLaMA-Factory files are one JSON array
        else:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return path
