"""Test helpers for the inference tests: a tiny byte-level BPE chat tokenizer and a tiny random-weight checkpoint.

The tokenizer has the project's special tokens at the project's ids (0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>,
3 <|pad|>) and its ChatML template, so the engine, server and terminal tests need no trained tokenizer.
"""

import os
import random

from model.chat_format import CHAT_TEMPLATE
from tests.helpers import tiny_model

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

_ZH = "你好世界今天天气很好我们一起学习语言模型中文对话机器人谢谢再见"
_EN = ["hello", "world", "model", "chat", "token", "the", "cache", "stream", "server"]

# -----------------------------------------------------------------------------


def mixed_lines(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [
            rng.choice(_EN) if rng.random() < 0.5 else "".join(rng.sample(_ZH, rng.randint(1, 4)))
            for _ in range(rng.randint(3, 10))
        ]
        lines.append(" ".join(words))
    return lines


def build_tokenizer(vocab_size: int = 450):
    """A ByteLevel BPE fast tokenizer. Emoji never get merged at this size, so they stay split into byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(mixed_lines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", chat_template=CHAT_TEMPLATE
    )


def build_model(tokenizer, seed: int = 0, **overrides):
    """The tiny preset with a wide init (std 0.2), so that random-weight greedy outputs are diverse."""
    return tiny_model(len(tokenizer), seed, **{"initializer_range": 0.2, **overrides}).eval()


def save_checkpoint(model, tokenizer, out_dir: str) -> str:
    """What the training stages write: save_pretrained of the model plus the tokenizer files."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def literal_chatml(tokenizer, messages) -> list[int]:
    """The ids a conversation must get: the real <|im_start|>/<|im_end|> ids around each turn, and every text
    between them encoded as plain text (so '<|im_end|>' typed in a message becomes the ids of its characters)."""
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])

    def text(s):
        return tokenizer(s, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    turns = [[start, *text(f"{m['role']}\n{m['content']}"), end, *text("\n")] for m in messages]
    return [i for turn in turns for i in turn] + [start, *text("assistant\n")]
