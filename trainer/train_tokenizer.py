"""
Train the byte-level BPE tokenizer (stage `tokenizer`), save it as a Hugging Face fast tokenizer with the ChatML
template, and report its compression on held-out text.

    python main.py --stage tokenizer --config config/tokenizer.yaml data_path=dataset/zh/clean.jsonl vocab_size=6400
    python -c "from trainer.train_tokenizer import Config, run; run(Config(data_path='a.jsonl', out_dir='out/t'))"

Memory: the BPE trainer keeps every distinct pre-token with its pairs, so what it is fed decides its peak RSS. We
feed it (1) a deterministic sample of at most `max_bytes` of the corpus and (2) Han text cut into pieces of at most
`han_piece_chars` characters (Chinese has no spaces, so the inference-time regex would make a whole sentence one
pre-token, and distinct sentences never repeat). The saved tokenizer uses Qwen2's standard pre-tokenizer, which
llama.cpp knows, so a GGUF export reproduces our ids; a token can never be longer than a training piece, which
at 6400-32000 entries costs nothing (Chinese words are 1-4 characters). (3) A piece of 3-4 characters that occurs
only once in the sample is fed as its overlapping pairs that occur at least twice (`rare_pieces_as_pairs`): pieces
cut at fixed offsets are mostly unique even in real text, and the trainer keeps Rust state for every distinct
pre-token (a 32-byte symbol per byte, the word counts, the pair -> words index). (4) Text goes to the trainer <= 64 KB
at a time: the pre-tokenizer builds per-byte offset tables for each string it is given. (3) costs one extra read of
the sample. What (3) and (4) save, with equal held-out compression: bench/RESULTS.md, "bench/bench_data.py, after the
memory fixes" (Tokenizer memory).
Held-out documents (every `heldout_every`-th by content hash) are never fed to the trainer; the report in
`out_dir/tokenizer_report.json` measures compression on them, per source file.
"""

import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dataset.text_sources import TEXT_FIELDS, count_cjk, expand_paths, input_bytes, is_cjk, iter_documents
from dataset.tokenizer import byte_level_alphabet
from model.chat_format import CHAT_TEMPLATE, check_chat_template
from trainer.config import ConfigError, MissingPathError, at_least, setting
from trainer.errors import OutputError, is_disk_full
from trainer.run_lock import out_dir_lock

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]  # ids 0..3; other code relies on them
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1  # the byte alphabet, the special tokens and one merge
# Qwen2's pre-tokenizer regex, one of the few that llama.cpp re-implements (LLAMA_VOCAB_PRE_TYPE_QWEN2)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass
class Config:
    data_path: str = ""  # comma-separated files, folders or globs: .txt, .jsonl, .json (any .gz), parquet, save_to_disk
    text_column: str = ""  # JSONL field / table column with the text; "" = the first of text, content present
    vocab_size: int = setting(6400, bound=at_least(MIN_VOCAB_SIZE))  # total entries, the 4 special tokens included
    out_dir: str = "out/tokenizer"  # where tokenizer.json, tokenizer_config.json and the report go
    max_bytes: int = setting(
        100_000_000, bound=at_least(1)
    )  # at most this many UTF-8 bytes are fed to the trainer (bounds its RAM)
    han_piece_chars: int = setting(
        4, bound=at_least(1)
    )  # Han runs are cut into pieces this long in the trainer's input (bounds its RAM)
    rare_pieces_as_pairs: bool = True  # a Han piece seen once in the sample is fed as its overlapping 2-char pairs
    # a pair must occur this often to be merged (the BPE trainer's own default is 0, same as 1)
    min_frequency: int = setting(2, bound=at_least(0))
    # every N-th document (by content hash) is held out for the report, never trained on: a document is held out
    # with probability 1 / heldout_every, so 1 would hold out all
    heldout_every: int = setting(50, bound=at_least(2))
    heldout_max_bytes: int = setting(
        2_000_000, bound=at_least(0)
    )  # per source file, cap on held-out text kept for the report
    eval_path: str = ""  # extra comma-separated files, folders or globs to report on (never trained on)
    seed: int = setting(1337, unchecked="any integer: it is hashed with each document's text")  # decides the sample
    #                                                                                          and the held-out split


# -----------------------------------------------------------------------------
# sampling what the trainer sees


def _unit(text: str, seed: int, salt: str) -> float:
    """A reproducible number in [0, 1) from the document's content (not its position, so re-ordering inputs or
    adding a file does not move a document between train and held-out)."""
    h = hashlib.blake2b(f"{seed}:{salt}:".encode() + text.encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(h.digest(), "little") / 2**64


def _estimated_bytes(paths: list[str]) -> int:
    # gzip of Chinese text is ~3x, good enough to set a sampling rate before reading anything
    return sum(input_bytes(p) for p in paths)


def _text_fields(cfg: "Config") -> tuple[str, ...]:
    return (cfg.text_column,) if cfg.text_column else TEXT_FIELDS


_HAN_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U000323af]+")


def han_pieces(text: str, piece: int):
    """The Han pieces split_han_runs makes (runs cut every `piece` characters)."""
    for m in _HAN_RUN.finditer(text):
        s = m.group(0)
        yield from (s[i : i + piece] for i in range(0, len(s), piece))


def _as_pairs(p: str, common: set) -> str:
    """A rare piece as its overlapping 2-char pairs ("abcd" -> "ab bc cd"), keeping only pairs in `common`; a character
    left in no kept pair is fed alone (its bytes still count). A pair seen once can never reach min_frequency=2."""
    out, covered = [], -1
    for j in range(len(p) - 1):
        if p[j : j + 2] in common:
            if covered < j:
                out.extend(p[covered + 1 : j])  # characters between kept pairs
            out.append(p[j : j + 2])
            covered = j + 1
    out.extend(p[covered + 1 :])
    return "\n".join(out)


def split_han_runs(text: str, piece: int, common: set | None = None) -> str:
    """Put a newline inside Han runs longer than `piece`, so no pre-token the trainer counts is longer than that.
    With `common` (pieces and pairs seen at least twice), a piece of 3+ characters not in it is replaced by its
    overlapping pairs that are (see _as_pairs): the trainer sees the adjacent-character pairs that can be merged,
    but a piece that occurs once no longer costs it a word entry (the Rust trainer's state per distinct pre-token)."""

    def rare(p: str) -> bool:
        return common is not None and len(p) >= 3 and p not in common

    def cut(m: re.Match) -> str:
        s = m.group(0)
        if len(s) <= piece and not rare(s):
            return s
        out = []
        for i in range(0, len(s), piece):
            p = s[i : i + piece]
            out.append(_as_pairs(p, common) if rare(p) else p)
        return "\n".join(out)

    return _HAN_RUN.sub(cut, text)


def common_pieces(cfg: "Config", paths: list[str], stats: dict) -> set:
    """First pass over the same sample: the Han pieces of 3+ characters that occur at least twice. Real Chinese
    cut at fixed offsets gives mostly unique 4-character pieces (bench/RESULTS.md counts them in the pack), and
    the BPE trainer's memory grows with distinct pre-tokens, not with bytes."""
    counts: Counter = Counter()
    pairs: Counter = Counter()
    for text in _sample(cfg, paths, {}, {"fed_bytes": 0, "fed_docs": 0, "skipped_bytes": 0}):
        long = [p for p in han_pieces(text, cfg.han_piece_chars) if len(p) >= 3]
        counts.update(long)
        pairs.update(p[j : j + 2] for p in long for j in range(len(p) - 1))
    common = {p for p, c in counts.items() if c >= 2}
    stats["distinct_long_pieces"], stats["common_long_pieces"] = len(counts), len(common)
    del counts
    common.update(p for p, c in pairs.items() if c >= 2)
    stats["distinct_pairs"], stats["common_pairs"] = len(pairs), len(common) - stats["common_long_pieces"]
    return common


def split_documents(cfg: Config, paths: list[str], heldout: dict, stats: dict, common: set | None = None):
    """Yield the training text (sampled, Han runs cut) and fill `heldout` {source: [docs]} on the way."""
    for text in _sample(cfg, paths, heldout, stats):
        text = split_han_runs(text, cfg.han_piece_chars, common)
        # the Rust pre-tokenizer builds offset tables per byte of each string (bench/RESULTS.md: Tokenizer memory),
        # so feed <= 64 KB at a time, cut after a newline (pre-tokens never span one)
        while len(text) > 65536:
            cut = text.rfind("\n", 0, 65536) + 1 or 65536
            yield text[:cut]
            text = text[cut:]
        yield text


def _sample(cfg: Config, paths: list[str], heldout: dict, stats: dict):
    """The sampled training documents, as read (deterministic: two passes see the same documents)."""
    keep = min(1.0, cfg.max_bytes / max(_estimated_bytes(paths), 1))
    fed = 0
    for path in paths:
        held_bytes: dict = {}
        for d in iter_documents(path, _text_fields(cfg)):
            text = d["text"]
            name = d.get("origin") or os.path.basename(path)  # cleaned JSONL remembers each document's source
            nbytes = len(text.encode("utf-8"))
            if _unit(text, cfg.seed, "heldout") < 1 / cfg.heldout_every:
                if held_bytes.get(name, 0) < cfg.heldout_max_bytes:
                    heldout.setdefault(name, []).append(text)
                    held_bytes[name] = held_bytes.get(name, 0) + nbytes
                continue
            if fed >= cfg.max_bytes or _unit(text, cfg.seed, "sample") >= keep:
                stats["skipped_bytes"] += nbytes
                continue
            fed += nbytes
            stats["fed_bytes"] = fed
            stats["fed_docs"] += 1
            stats["special_docs"] = stats.get("special_docs", 0) + any(t in text for t in SPECIAL_TOKENS)
            yield text


# -----------------------------------------------------------------------------
# building, training and saving


def build_tokenizer():
    tok = Tokenizer(models.BPE())  # no unk: byte-level covers every byte, so any string encodes
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # No normalizer (Qwen2 has NFC): decode(encode(x)) must give back x byte for byte, NFC or not.
    return tok


def wrap(tok):
    """The transformers view: special tokens named, chat template stored, so AutoTokenizer needs no extra code."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )


def update_chat_template(path: str) -> None:
    """Give a saved tokenizer (out/tokenizer or a checkpoint folder) the current CHAT_TEMPLATE, e.g. one saved before
    tools or content parts existed; the vocabulary and every other file stay as they are
    (scripts/update_chat_template.py)."""
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    check_chat_template(tok, tools=True, content_parts=True)  # this vocabulary renders it as chatml_pieces does
    tok.save_pretrained(path)


def single_cjk_entries(vocab: dict) -> int:
    """Vocabulary entries that decode to exactly one Han character."""
    dec = {ch: b for b, ch in byte_level_alphabet().items()}
    n = 0
    for token in vocab:
        if token in SPECIAL_TOKENS or any(c not in dec for c in token):
            continue
        try:
            s = bytes(dec[c] for c in token).decode("utf-8")
        except UnicodeDecodeError:
            continue
        n += len(s) == 1 and is_cjk(s)
    return n


def compression(tok, texts: list[str]) -> dict:
    """Characters, Han characters and bytes per token over a list of documents."""
    ids = tok.encode_batch(texts, add_special_tokens=False)
    tokens = sum(len(e.ids) for e in ids)
    chars = sum(len(t) for t in texts)
    cjk = sum(count_cjk(t) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "docs": len(texts),
        "chars": chars,
        "cjk_chars": cjk,
        "tokens": tokens,
        "chars_per_token": round(chars / max(tokens, 1), 3),
        "cjk_chars_per_token": round(cjk / max(tokens, 1), 3),
        "bytes_per_token": round(nbytes / max(tokens, 1), 3),
    }


def check_trained_size(trained: int, cfg: Config) -> None:
    """BPE stops merging when no pair occurs min_frequency times: on a small corpus it builds fewer entries than
    asked. Far fewer (under half) is an error, before anything is written; a few fewer is a warning."""
    if trained >= cfg.vocab_size:
        return
    why = (
        f"the tokenizer trained only {trained} of the vocab_size={cfg.vocab_size} entries asked: the corpus is "
        f"too small (no pair left that occurs min_frequency={cfg.min_frequency} times)"
    )
    if trained < cfg.vocab_size // 2:
        raise ConfigError(f"{why}; give more text in data_path or set vocab_size <= {trained}")
    print(f"tokenizer: WARNING: {why}; the vocabulary has {trained} entries")


def save_tokenizer_files(fast, out_dir: str) -> None:
    """The tokenizer files into out_dir through a .tmp folder, each moved in whole: a full disk leaves the old
    files (or none), never a cut tokenizer.json that a later stage would read. OutputError names the folder."""
    tmp = out_dir.rstrip("/\\") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fast.save_pretrained(tmp)
        os.makedirs(out_dir, exist_ok=True)
        for name in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    except Exception as e:  # the Rust tokenizer raises a plain Exception for an I/O error
        if not is_disk_full(e) and not isinstance(e, OSError):
            raise
        raise OutputError(f"could not write the tokenizer to {out_dir} ({e}); nothing was written there") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(cfg: Config) -> dict:
    with out_dir_lock(cfg.out_dir, stage="tokenizer"):  # one run per out_dir, as the training stages (run_trainer)
        return train(cfg)


def train(cfg: Config) -> dict:
    if not cfg.data_path.strip():
        raise ConfigError("data_path is empty: give one or more comma-separated files, folders or glob patterns")
    try:
        paths = expand_paths(cfg.data_path)  # the one path contract of every data setting; a missing path raises
    except FileNotFoundError as e:  # a usage mistake: main.py prints one line and exits 2
        raise MissingPathError(f"data_path: {e}") from None
    eval_paths = expand_paths(cfg.eval_path) if cfg.eval_path.strip() else []
    if cfg.vocab_size < MIN_VOCAB_SIZE:  # validate() refuses it too; a Config made in code is not validated
        raise ValueError(f"vocab_size={cfg.vocab_size} is too small: the byte alphabet alone needs 260 entries")
    t0 = time.time()
    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=list(byte_level_alphabet().values()),
        show_progress=False,
    )
    heldout: dict = {}
    stats = {"fed_bytes": 0, "fed_docs": 0, "skipped_bytes": 0}
    common = common_pieces(cfg, paths, stats) if cfg.rare_pieces_as_pairs else None
    tok.train_from_iterator(split_documents(cfg, paths, heldout, stats, common), trainer=trainer)
    del common
    train_s = time.time() - t0
    if stats["fed_docs"] == 0:
        raise ValueError(f"no training text in {cfg.data_path} (all documents held out or empty)")
    check_trained_size(tok.get_vocab_size(), cfg)
    if stats.get("special_docs"):
        print(
            f"note: {stats['special_docs']:,} training documents carry special-token strings "
            f"({', '.join(SPECIAL_TOKENS)}); the tokenizer learned them as plain text (the shard stage encodes "
            f"them as text too; the special ids are only for the chat template)"
        )
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, f"special token {name} got id {tok.token_to_id(name)}, expected {i}"

    save_tokenizer_files(wrap(tok), cfg.out_dir)

    for p in eval_paths:  # files never seen in training
        held, size = [], 0
        for d in iter_documents(p, _text_fields(cfg)):
            held.append(d["text"])
            size += len(d["text"].encode("utf-8"))
            if size >= cfg.heldout_max_bytes:
                break
        heldout["eval:" + os.path.basename(p)] = held
    report = {
        "vocab_size": tok.get_vocab_size(),
        "single_cjk_tokens": single_cjk_entries(tok.get_vocab()),
        "train_seconds": round(train_s, 1),
        "fed_bytes": stats["fed_bytes"],
        "fed_docs": stats["fed_docs"],
        "skipped_bytes": stats["skipped_bytes"],
        "distinct_long_pieces": stats.get("distinct_long_pieces"),
        "common_long_pieces": stats.get("common_long_pieces"),
        "distinct_pairs": stats.get("distinct_pairs"),
        "common_pairs": stats.get("common_pairs"),
        "heldout": {k: compression(tok, v) for k, v in heldout.items() if v},
        "config": asdict(cfg),
    }
    with open(os.path.join(cfg.out_dir, "tokenizer_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=1)
    print(
        f"tokenizer: vocab {report['vocab_size']} | {report['single_cjk_tokens']} single-CJK tokens | trained on "
        f"{stats['fed_bytes'] / 1e6:.1f} MB in {train_s:.1f}s -> {cfg.out_dir}"
    )
    for name, r in report["heldout"].items():
        print(
            f"  held-out {name:48s} {r['chars']:>9,} chars | {r['chars_per_token']:.3f} chars/tok | "
            f"{r['cjk_chars_per_token']:.3f} CJK/tok | {r['bytes_per_token']:.2f} bytes/tok"
        )
    return report
