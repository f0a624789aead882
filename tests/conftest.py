"""
Shared pytest fixtures. Run the suite from the repo root: python -m pytest
"""

import json
import random

import pytest
import torch

# The tests use tiny models, for which one thread is as fast as two and never oversubscribes the CPU when a
# test starts subprocesses (DDP, CLI) beside it.
torch.set_num_threads(1)

# -----------------------------------------------------------------------------
# a tiny tokenizer (vocab 512, special tokens 0-3, ChatML template), trained once per test session


_ZH = "我们今天学习数学和语言。人工智能是计算机科学的一个分支。春眠不觉晓，处处闻啼鸟。北京是中国的首都。天气很好，我们去公园散步吧。"  # noqa: E501
_ZH += "床前明月光，疑是地上霜。举头望明月，低头思故乡。机器学习需要大量的数据和计算资源。小明每天早上七点起床，然后去学校上课。"  # noqa: E501
_EN = [
    "the model learns",
    "language is data",
    "hello world",
    "a small chat model",
    "tokens per second",
    "training on the laptop",
    "Beijing is a big city",
    "machine learning needs data",
]


def tiny_corpus_lines(n: int = 300, seed: int = 0) -> list[str]:
    """Deterministic mixed Chinese/English lines: random Chinese spans joined with English phrases."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        i = rng.randrange(len(_ZH) - 12)
        lines.append(f"{_ZH[i : i + rng.randrange(6, 24)]} {rng.choice(_EN)} {rng.randrange(1000)}。")
    return lines


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    from trainer.train_tokenizer import Config, run

    root = tmp_path_factory.mktemp("tiny_tokenizer")
    data = root / "corpus.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for line in tiny_corpus_lines():
            f.write(json.dumps({"text": line}, ensure_ascii=False) + "\n")
    out = root / "tok"
    run(Config(data_path=str(data), vocab_size=512, out_dir=str(out), min_frequency=1, heldout_every=10, seed=0))
    return str(out)


# -----------------------------------------------------------------------------
# checkpoints and data shared by several test modules


@pytest.fixture(scope="session")
def pretrained_dir(tiny_tokenizer_dir, tmp_path_factory) -> str:
    """Stands in for a pretraining final/: a random 2-layer tiny model plus the tokenizer."""
    from tests.helpers import tiny_checkpoint

    return tiny_checkpoint(tiny_tokenizer_dir, str(tmp_path_factory.mktemp("pretrained") / "final"))


@pytest.fixture(scope="session")
def shards(tiny_tokenizer_dir, tmp_path_factory) -> str:
    """Three train shards and a val shard of the tiny tokenizer's ids."""
    from transformers import AutoTokenizer

    from tests.helpers import pretrain_corpus, write_shards

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    return write_shards(tok, pretrain_corpus(), str(tmp_path_factory.mktemp("shards")), n_shards=3)
