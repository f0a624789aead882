"""
Preference pairs for DPO and the reward model (and prompts for PPO/GRPO): read, normalise, tokenize, batch.

    from dataset.preference_data import load_pairs, tokenize_pairs, PairDataset, collate_pairs
    pairs, stats = load_pairs("a.json,b.jsonl.gz")            # [{"prompt": [messages], "chosen": str, "rejected": str}]
    samples = tokenize_pairs(pairs, tokenizer, seq_len=512)
    batch = collate_pairs([PairDataset(samples)[0]], pad_id=3)  # rows [chosen...; rejected...]

Formats, detected per record (files are JSON Lines or JSON arrays, optionally gzipped, or parquet/Arrow/save_to_disk
tables, as in dataset/chat_data.py; columns="src=dst,..." renames keys first):
    messages   {"chosen": [messages], "rejected": [messages], "prompt"?: ...}   MiniMind, TRL's implicit prompt,
               HuggingFaceH4/ultrafeedback_binarized (its "prompt" string, "messages" and scores are ignored: the
               conversations carry the prompt); both end with the assistant reply
    ranking    {"conversations": [{from, value}] | [{role, content}], "chosen": {from, value} | str,
                "rejected": ..., "system"?}                              LLaMA-Factory ranking, MedicalGPT
    strings    {"prompt": str | [messages], "chosen": str | [{"role": "assistant", ...}], "rejected": ...,
                "system"?}                                               TRL's (conversational) format
    openai     {"input": {"messages": [...], "tools"?}, "preferred_output": [{"role": "assistant", ...}],
                "non_preferred_output": [...]}                           OpenAI preference fine-tuning
    hh         {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}   Anthropic hh-rlhf; split at
               the last "\\n\\nAssistant:" (the two transcripts share everything before it)
Turns are normalised by chat_data.to_messages / check_messages, so the roles and checks are the SFT ones.

Tokens: each side is the ChatML rendering of prompt + reply (chat_data.tokenize_conversation); its loss mask
marks only the final reply and its <|im_end|> (earlier assistant turns of a multi-turn prompt are context).
Too long: the prompt loses its oldest tokens first (down to half of seq_len), then the replies are cut at
seq_len; a pair left with an empty side is dropped and counted. Exact duplicate pairs (the two Chinese
demo files share 23 prompts) are kept once.
"""

import json
import re
from collections import Counter

import numpy as np
import torch

from dataset.chat_data import check_messages, length_bucket, to_messages, tokenize_conversation
from dataset.records import BadRecord, SkipRecord, read_records
from model.chat_format import chatml_pieces

HH_TURN = re.compile(r"\n\n(Human|Assistant):")
PAIR_KEYS = (("chosen", "rejected"), ("preferred_output", "non_preferred_output"))  # the two sides, first match wins
PAIR_FORMATS = (
    "chosen/rejected (strings, messages or whole conversations) with a prompt, conversations or hh transcripts, "
    "or OpenAI's input/preferred_output/non_preferred_output"
)


# -----------------------------------------------------------------------------
# Records -> {"prompt": [messages], "chosen": str, "rejected": str}


def _hh_messages(transcript: str, where: str) -> list[dict]:
    parts = HH_TURN.split(transcript)  # ['', 'Human', ' q', 'Assistant', ' a', ...]
    if len(parts) < 3 or parts[0].strip():
        raise BadRecord(where, "malformed", "hh transcript does not start with '\\n\\nHuman:'")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def _reply(value, where: str, what: str) -> str:
    if isinstance(value, dict):  # LLaMA-Factory: {"from": "gpt", "value": ...}
        value = value.get("value", value.get("content"))
    if not isinstance(value, str):
        raise BadRecord(where, "malformed", f"{what} is {type(value).__name__}, not a string or message")
    return value


def _split_last(messages: list[dict], where: str, what: str) -> tuple[list[dict], str]:
    if not messages or messages[-1]["role"] != "assistant":
        raise BadRecord(where, "last turn not assistant", what)
    return messages[:-1], messages[-1]["content"]


def _pair_side(value, where: str, what: str) -> tuple[list[dict], str]:
    """One side of a pair -> (the turns before its reply, the reply). A string or one {from, value} / {role,
    content} message is a reply alone (no turns); a list of messages ends with the reply: [assistant] alone (TRL's
    conversational format, OpenAI's preferred_output) or a whole conversation (MiniMind, UltraFeedback)."""
    if not isinstance(value, list):
        return [], _reply(value, where, what)
    fmt = "sharegpt" if value and isinstance(value[0], dict) and "from" in value[0] else "conversations"
    return _split_last(to_messages({"conversations": value}, fmt, where), where, what)


def _prompt_field(record: dict, where: str) -> list[dict] | None:
    """The prompt a record keeps beside its replies, as messages; None when it has none (hh-rlhf)."""
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    if isinstance(record.get("input"), dict):  # OpenAI preference fine-tuning: {"messages", "tools"?}
        return to_messages(record["input"], "conversations", where)
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            return system + [{"role": "user", "content": prompt}]
        return system + to_messages({"messages": prompt}, "conversations", where)
    if "conversations" in record:
        turns = record["conversations"]
        fmt = "sharegpt" if turns and isinstance(turns[0], dict) and "from" in turns[0] else "conversations"
        return to_messages({"conversations": turns, "system": record.get("system")}, fmt, where)
    return None


def record_to_pair(record, where: str) -> dict:
    """One record of any supported format -> {"prompt", "chosen", "rejected"} (see the module docstring)."""
    sides = next((keys for keys in PAIR_KEYS if isinstance(record, dict) and all(k in record for k in keys)), None)
    if sides is None:
        keys = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
        raise BadRecord(where, "unknown format", f"got {keys}; expected {PAIR_FORMATS}")
    (chosen_turns, chosen), (rejected_turns, rejected) = (_pair_side(record[k], where, k) for k in sides)
    if chosen_turns or rejected_turns:  # whole conversations: they carry the prompt, whatever else the record has
        if chosen_turns != rejected_turns:
            raise BadRecord(where, "prompts differ", "chosen and rejected must share all turns but the last")
        prompt = chosen_turns
    else:
        prompt = _prompt_field(record, where)
    if prompt is None and HH_TURN.search(chosen):
        prompt, chosen = _split_last(_hh_messages(chosen, where), where, "chosen")
        other, rejected = _split_last(_hh_messages(rejected, where), where, "rejected")
        if other != prompt:
            raise BadRecord(where, "prompts differ", "hh transcripts must differ only in the last reply")
    elif prompt is None:
        raise BadRecord(
            where,
            "unknown format",
            "chosen/rejected are neither conversations nor hh transcripts, and there is no prompt, input or "
            "conversations field",
        )
    if not prompt or prompt[-1]["role"] != "user":
        raise BadRecord(where, "prompt not ending with user", f"{len(prompt)} prompt turns")
    for reply in (chosen, rejected):
        check_messages(prompt + [{"role": "assistant", "content": reply}], where)
    if chosen == rejected:
        raise BadRecord(where, "identical replies")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def load_pairs(
    paths: str | list[str],
    on_bad: str = "error",
    max_samples: int = 0,
    stats: Counter | None = None,
    log=print,
    columns: dict | None = None,
) -> tuple[list[dict], Counter]:
    """Read every file into pairs (dataset/records.py read_records: on_bad = error, raise naming file:line | skip,
    count by reason; max_samples > 0 keeps the first max_samples usable pairs of each file); columns renames keys
    first (chat_data.parse_columns). A pair seen before, in any file, is skipped as a duplicate."""
    seen = set()

    def convert(record, where: str) -> dict:
        pair = record_to_pair(record, where)
        key = json.dumps(pair, ensure_ascii=False, sort_keys=True)
        if key in seen:
            raise SkipRecord("duplicate")
        seen.add(key)
        return pair

    pairs, stats = read_records(
        paths, lambda path: convert, "preference pairs", on_bad, max_samples, stats, log, columns, formats=PAIR_FORMATS
    )
    stats["pairs"] = len(pairs)
    return pairs, stats


# -----------------------------------------------------------------------------
# Tokenizing


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The ChatML prompt plus the assistant header: what generation (and the reply's mask) starts after."""
    return [i for ids, _ in chatml_pieces(tokenizer, messages, add_generation_prompt=True) for i in ids]


def _side(tokenizer, prompt: list[dict], reply: str, n_prompt: int) -> tuple[np.ndarray, np.ndarray]:
    ids, labels = tokenize_conversation(tokenizer, prompt + [{"role": "assistant", "content": reply}])
    mask = (labels != -100) & (np.arange(len(ids)) >= n_prompt)  # the final reply (+ <|im_end|>) only
    return ids, mask


def tokenize_pairs(pairs: list[dict], tokenizer, seq_len: int, stats: Counter | None = None) -> list[dict]:
    """-> [{"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"}] (numpy), truncated as documented."""
    stats = Counter() if stats is None else stats
    samples = []
    for pair in pairs:
        n_prompt = len(prompt_ids(tokenizer, pair["prompt"]))
        sides = [_side(tokenizer, pair["prompt"], pair[k], n_prompt) for k in ("chosen", "rejected")]
        longest = max(len(ids) for ids, _ in sides)
        if longest > seq_len:
            stats["truncated"] += 1
            # Drop the oldest prompt tokens first (the end of the prompt matters most), keeping at least half.
            cut = min(longest - seq_len, max(0, n_prompt - seq_len // 2))
            sides = [(ids[cut : seq_len + cut], mask[cut : seq_len + cut]) for ids, mask in sides]
        if any(not mask[1:].any() for _, mask in sides):  # position 0 has no prediction
            stats["dropped:too long"] += 1
            continue
        # End each side at the reply's <|im_end|>: a rollout ends there too, and the reward model reads its
        # score at the last token, so training and PPO/GRPO scoring see the same kind of position.
        sides = [(ids[: np.flatnonzero(mask)[-1] + 1], mask[: np.flatnonzero(mask)[-1] + 1]) for ids, mask in sides]
        samples.append(
            {
                "chosen_ids": sides[0][0],
                "chosen_mask": sides[0][1],
                "rejected_ids": sides[1][0],
                "rejected_mask": sides[1][1],
            }
        )
    stats["samples"] = len(samples)
    return samples


# -----------------------------------------------------------------------------
# Dataset and collation


class PairDataset:
    """dataset[i] -> sample i plus its index (so precomputed reference log-probs can be looked up)."""

    def __init__(self, samples: list[dict]):
        self.samples = samples
        self.ref_logps: torch.Tensor | None = None  # (N, 2) [chosen, rejected], filled by DPO's precompute_ref

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        item = {**self.samples[i], "index": i}
        if self.ref_logps is not None:
            item["ref_logps"] = self.ref_logps[i]
        return item


def read_pair_samples(
    paths: str | list[str],
    tokenizer,
    seq_len: int,
    on_bad: str = "error",
    max_samples: int = 0,
    log=print,
    columns: dict | None = None,
) -> tuple[list[dict], Counter]:
    """Files -> tokenized pair samples (what DPO and the reward model train on) and the read / skip / truncation
    counts."""
    stats = Counter()
    pairs, _ = load_pairs(paths, on_bad, max_samples, stats, log, columns)
    return tokenize_pairs(pairs, tokenizer, seq_len, stats), stats


def collate_pairs(items: list[dict], pad_id: int, pad_multiple: int = 8, seq_len: int = 0) -> dict:
    """B pairs -> one (2B, T) right-padded micro-batch, rows [chosen_0..chosen_B-1; rejected_0..rejected_B-1].

    loss_mask (2B, T-1) marks the targets of the reply tokens (position t predicts token t+1), so a sum of
    per-target log-probs under it is the reply's log-probability. No attention mask is needed for a causal LM
    (real tokens never see the right padding), nor for the reward model, which reads its score at last_index (2B,),
    each row's last real token, counted here on the host. attention_mask stays for callers that want one;
    num_tokens counts the real tokens (for tokens/s without reading a device tensor).
    seq_len > 0: T is length_bucket(longest row, seq_len), one of a few fixed lengths (one compiled graph each);
    otherwise the longest row rounded up to pad_multiple."""
    rows = [(it["chosen_ids"], it["chosen_mask"]) for it in items] + [
        (it["rejected_ids"], it["rejected_mask"]) for it in items
    ]
    longest = max(len(ids) for ids, _ in rows)
    T = length_bucket(longest, seq_len) if seq_len > 0 else -(-longest // pad_multiple) * pad_multiple
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for r, (ids, m) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.from_numpy(ids.astype(np.int64))
        attention_mask[r, : len(ids)] = 1
        mask[r, : len(ids)] = torch.from_numpy(m)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": mask[:, 1:],
        "last_index": torch.tensor([len(ids) - 1 for ids, _ in rows]),
        "num_tokens": sum(len(ids) for ids, _ in rows),
        "index": torch.tensor([it["index"] for it in items]),
        "num_pairs": len(items),
    }
    if "ref_logps" in items[0]:
        ref = torch.stack([it["ref_logps"] for it in items])  # (B, 2)
        batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])  # (2B,) in row order
    return batch
