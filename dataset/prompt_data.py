"""
Prompts for the rollout stages (PPO, GRPO): prompt files in any format the chat and preference readers know,
tokenized as the ChatML prompt generation starts after. Records go through dataset/chat_data.py's usable_records
(bad-record policy, skip counts), so a broken line fails or is skipped the same way as in SFT and DPO data.

    prompts = load_prompts("dataset/rl_prompts.jsonl", tokenizer, max_prompt_tokens=384)
"""

from collections import Counter

from dataset.chat_data import (
    BadRecord,
    detect_format,
    to_messages,
    usable_records,
)
from dataset.preference_data import prompt_ids, record_to_pair
from dataset.text_sources import expand_paths

# -----------------------------------------------------------------------------


def load_prompts(
    paths: str,
    tokenizer,
    max_prompt_tokens: int,
    on_bad: str = "skip",
    max_samples: int = 0,
    log=print,
    columns: dict | None = None,
) -> list[dict]:
    """Prompts for rollouts -> [{"prompt": messages, "answer": str | None, "ids": [int]}].

    Reads {"prompt": str | messages, "answer"?: str}, any preference-pair format (the shared prompt) and any
    chat format of dataset/chat_data.py (the conversation before the last assistant turn; that turn becomes the
    answer). Prompts longer than max_prompt_tokens are skipped: cutting them would change the question.
    columns renames keys first (chat_data.parse_columns)."""

    def to_prompt(record, where) -> tuple[list[dict], str | None]:
        if isinstance(record, dict) and "chosen" in record:
            messages, answer = record_to_pair(record, where)["prompt"], None
        elif isinstance(record, dict) and "prompt" in record:
            p = record["prompt"]
            messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
            answer = record.get("answer")
        else:
            messages = to_messages(record, detect_format(record, where), where)
            answer = None
            if messages and messages[-1]["role"] == "assistant":
                messages, answer = messages[:-1], messages[-1]["content"]
        if not messages or messages[-1]["role"] != "user":
            raise BadRecord(where, "prompt not ending with user")
        return messages, answer

    out, stats = [], Counter()
    for path in expand_paths(paths):
        kept = 0
        for messages, answer in usable_records(path, to_prompt, on_bad, stats, log, columns):
            ids = prompt_ids(tokenizer, messages)
            if len(ids) > max_prompt_tokens:
                stats["skip:prompt too long"] += 1
                continue
            out.append({"prompt": messages, "answer": None if answer is None else str(answer), "ids": ids})
            kept += 1
            if max_samples and kept >= max_samples:
                break
        log(f"[data] {path}: {kept:,} prompts")
    skipped = sum(n for reason, n in stats.items() if reason.startswith("skip:"))
    if skipped:
        log(
            f"[data] {skipped:,} records skipped (malformed, no user turn last, or prompt > {max_prompt_tokens} tokens)"
        )
    return out
