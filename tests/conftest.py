"""
Shared pytest fixtures. Run the suite from the repo root: python -m pytest
"""

import json
import os

import pytest
import torch

from tests.helpers import pretrain_corpus, tiny_checkpoint, tiny_corpus_lines, write_shards
from tests.quick_lane import pytest_addoption, pytest_runtest_protocol, pytest_terminal_summary  # noqa: F401 (hooks)

# The tests use tiny models, for which one thread is as fast as two and never oversubscribes the CPU when a
# test starts subprocesses (DDP, CLI) beside it.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # what threads=0 (auto) takes in the stages the tests run, and children

# -----------------------------------------------------------------------------
# a tiny tokenizer (vocab 512, special tokens 0-3, ChatML template), trained once per test session


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
    return tiny_checkpoint(tiny_tokenizer_dir, str(tmp_path_factory.mktemp("pretrained") / "final"))


@pytest.fixture(scope="session")
def shards(tiny_tokenizer_dir, tmp_path_factory) -> str:
    """Three train shards and a val shard of the tiny tokenizer's ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    return write_shards(tok, pretrain_corpus(), str(tmp_path_factory.mktemp("shards")), n_shards=3)
