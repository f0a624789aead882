"""
Prompts for the rollout stages (PPO, GRPO): prompt files in any format the chat and preference readers know,
tokenized as the ChatML prompt generation starts after. Records go through dataset/records.py read_records
(bad-record policy, skip counts, max_samples), so a broken line fails or is skipped the same way as in SFT and DPO
data.

    prompts = load_prompts("dataset/rl_prompts.jsonl", tokenizer, max_prompt_tokens=384)
"""

from dataset.chat_data import CHAT_FORMATS, detect_format, to_messages
from dataset.preference_data import PAIR_FORMATS, PAIR_KEYS, prompt_ids, record_to_pair
from dataset.records import BadRecord, SkipRecord, read_records

# -----------------------------------------------------------------------------


def load_prompts(
    paths: str,
    tokenizer,
    max_prompt_tokens: int,
    on_bad: str = "error",
    max_samples: int = 0,
    log=print,
    columns: dict | None = None,
) -> list[dict]:
    """Prompts for rollouts -> [{"prompt": messages, "answer": str | None, "ids": [int]}].

    Reads {"prompt": str | messages, "answer"?: str}, GSM8K's {"question", "answer"} (the answer keeps its
    "#### N" line, which the gsm8k reward rule checks), any preference-pair format (the shared prompt) and any chat
    format of dataset/chat_data.py (the conversation before the last assistant turn; that turn becomes the answer,
    unless it is empty, as in MiniMind's RLAIF prompts). Prompts longer than max_prompt_tokens are skipped: cutting
    them would change the question. columns renames keys first (chat_data.parse_columns)."""

    def to_prompt(record, where: str) -> dict:
        if isinstance(record, dict) and any(sides[0] in record for sides in PAIR_KEYS):
            messages, answer = record_to_pair(record, where)["prompt"], None
        elif isinstance(record, dict) and ("prompt" in record or "question" in record):
            p = record["prompt"] if "prompt" in record else record["question"]
            if isinstance(p, str):
                messages = [{"role": "user", "content": p}]
            elif isinstance(p, list):  # a message list: checked turn by turn as a chat record's
                messages = to_messages({"messages": p}, "conversations", where)
            else:
                raise BadRecord(where, "malformed", f"prompt is {type(p).__name__}, not a string or a message list")
            answer = record.get("answer")
        else:
            messages = to_messages(record, detect_format(record, where), where)
            answer = None
            if messages and messages[-1]["role"] == "assistant":
                messages, answer = messages[:-1], messages[-1]["content"] or None
        if not messages or messages[-1]["role"] != "user":
            raise BadRecord(where, "prompt not ending with user")
        ids = prompt_ids(tokenizer, messages)
        if len(ids) > max_prompt_tokens:
            raise SkipRecord("prompt too long")
        return {"prompt": messages, "answer": None if answer is None else str(answer), "ids": ids}

    formats = f"prompt (+ answer), GSM8K question/answer; preference pairs: {PAIR_FORMATS}; chats: {CHAT_FORMATS}"
    prompts, _ = read_records(
        paths, lambda path: to_prompt, "prompts", on_bad, max_samples, None, log, columns, formats=formats
    )
    return prompts
