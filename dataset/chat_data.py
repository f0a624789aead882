"""
Chat data for SFT, LoRA and the later preference/RL stages: read, check, tokenize, truncate, pack, batch.

    from dataset.chat_data import load_conversations, tokenize_conversations, ChatDataset, collate_chat
    convs, stats = load_conversations(["a.jsonl", "b.json.gz"], placeholders={"name": "Milli-Chat"})
    samples = tokenize_conversations(convs, tokenizer, seq_len=512, stats=stats)
    dataset = ChatDataset(samples, seq_len=512, pack=True)      # dataset[i] -> one (packed) sequence
    batch = collate_chat([dataset[0], dataset[1]], pad_id=tokenizer.pad_token_id)

Formats, detected per file from its first record (a record of another shape in the same file is malformed; a
first record of no known format stops the run unless on_bad="skip_file", as the whole file would be lost):
    conversations  {"conversations" | "messages": [{"role": "system|user|assistant", "content": ...}]}  (MiniMind)
    positional     {"conversations": [{"content": ...}, ...]}: roles by position, user first (MiniMind's RLAIF)
    sharegpt       {"conversations": [{"from": "human|gpt|system", "value": ...}], "system"?: ...}; LLaMA-Factory's
                   tool-call ShareGPT too: "function_call" turns (the call JSON), "observation" turns (the tool's
                   answer) and "tools" (JSON text)
    alpaca         {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}; an
                   instruction "Human:...\nAssistant:...\nHuman:...\nAssistant:" (BELLE multiturn_chat_0.8M) is
                   split into its turns, so earlier replies are trained as replies
    pairs          {"conversation" | "conversations" | "messages": [{"human" | "user": ..., "assistant": ...}]}
                   (Firefly, and MOSS/UltraChat as Firefly ships them): each element is one user + assistant turn
A file is JSON Lines or one JSON array (whatever its extension says), optionally gzipped (.gz), or a Hugging Face
`datasets` file (parquet, Arrow, a save_to_disk folder; dataset/table_files.py, needs pyarrow) whose rows are read
like JSON lines. Other schemas load through a key mapping, columns="src=dst,..." (parse_columns), applied to JSONL
and table rows alike: it renames keys of the record and of the dicts in its lists (the turns), e.g.
columns="dialog=conversations,q=user,a=assistant" for {"dialog": [{"q", "a"}]}.
An OpenAI fine-tuning "weight": 0 on an assistant message keeps that reply as context but out of the loss.
Content may be OpenAI's list of parts ({"type": "text", "text": ...}; other parts are refused). Tool use, in the
conversations format: OpenAI's records (top-level "tools", assistant "tool_calls" with JSON-text arguments, "tool"
messages) and MiniMind's (a system message with "tools" or "functions", tool_calls as JSON text). They become a
first system message carrying "tools", assistant messages with "tool_calls" [{"name", "arguments": dict}] and "tool"
messages; the call text is trained on, tool responses are not (see chatml_pieces).

Labels: chatml_pieces (model/chat_format.py, the chat format) marks each assistant reply and its <|im_end|> as
trained; those tokens are learned, every other label is -100. All assistant turns of a multi-turn conversation are
learned. check_chat_template first checks that the tokenizer's template writes the same ids and marks the same
tokens in its {% generation %} assistant mask.

Truncation (a conversation longer than seq_len tokens):
    turns   (default) keep the longest prefix that ends right after a whole assistant turn (its <|im_end|>):
            the sample stays a well-formed conversation and the model never learns to stop mid-reply.
    tokens  cut at seq_len tokens; the last reply may lose its end and its <|im_end|>.
Either way a sample left without any trainable token is dropped and counted ("too long"), never kept.

Packing (pack=True): conversations are put into seq_len bins by best-fit decreasing. position_ids restart at
0 for each conversation and collate_chat adds per-token document ids (B, T); the model turns them into
block-diagonal causal attention on the device (FlexAttention's block mask where it compiles, else a boolean
mask, see model/attention.py), so no token attends across a conversation boundary: a packed conversation gets
the same logits as alone. Unpacked batches are right-padded and need no mask at all: under the causal rule a
real token only sees earlier tokens, which are all real, and padded positions carry label -100.

Bad records (malformed JSON or shape, a line that is not UTF-8, unknown role, empty conversation, a system turn
not first, an empty assistant reply, an unfilled {{placeholder}}, and, when required, a last turn that is not the
assistant's) raise BadRecord naming file:line with on_bad="error", or are skipped and counted with on_bad="skip"
(dataset/records.py: the one record reader and its policy, shared with the preference and prompt data). The data is
never changed silently: the only rewrites are the configured placeholders and system prompt. A truncated .gz stops
the run naming file and line with on_bad="error"; with "skip" the file ends there with a warning.
"""

import bisect
import re
from collections import Counter

import numpy as np
import torch

from dataset.records import BadRecord, UnreadableFile, read_records
from model.chat_format import (
    ROLES,
    ChatFormatError,
    chatml_pieces,
    check_chat_template,
    json_of,
    tool_calls_of,
    tools_of,
    uses_tools,
)

IGNORE = -100  # label of a position the loss skips (the model's cross-entropy ignore_index)

# ShareGPT speaker names -> chat roles. Anything else is an unknown role (a bad record). LLaMA-Factory's tool-call
# ShareGPT (glaive_toolcall_*): "function_call" is an assistant turn whose value is the call(s) as JSON text,
# "observation" the tool's answer.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
}
# BELLE multiturn_chat_0.8M keeps a whole chat in one Alpaca instruction: "Human:..\nAssistant:..\nHuman:..\nAssistant:"
BELLE_TURN = re.compile(r"(?:^|\n)(Human|Assistant):")
# Identity data writes {{name}}; code in answers writes {{ item.name }} with spaces or dots, which is not matched.
PLACEHOLDER = re.compile(r"\{\{([A-Za-z_][A-Za-z0-9_]*)\}\}")


def parse_columns(spec: str) -> dict:
    """'conversation=conversations,q=user' -> {'conversation': 'conversations', 'q': 'user'}, the mapping that
    dataset/records.py rename_keys applies."""
    mapping = {}
    for pair in [p.strip() for p in spec.split(",") if p.strip()]:
        src, sep, dst = pair.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise ValueError(f"columns: '{pair}' is not source=target")
        mapping[src.strip()] = dst.strip()
    return mapping


# -----------------------------------------------------------------------------
# Formats -> a list of {"role", "content"} messages


CHAT_FORMATS = (
    "conversations/messages with role/content (or content only, roles by position), ShareGPT from/value, "
    "human/assistant pairs or Alpaca instruction/input/output"
)
TURN_KEYS = ("conversations", "messages", "conversation")  # where a record keeps its turns, first present wins
PAIR_USER, PAIR_ASSISTANT = ("human", "user"), ("assistant",)  # keys of a "pairs" turn (Firefly: human/assistant)


def _turns(record: dict):
    return next((record[k] for k in TURN_KEYS if k in record), None)


def _pair_key(turn: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in turn), None)


def detect_format(record, where: str) -> str:
    if isinstance(record, dict):
        turns = _turns(record)
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            if "from" in turns[0]:
                return "sharegpt"
            if "role" in turns[0]:
                return "conversations"
            if set(turns[0]) == {"content"}:
                return "positional"
            if _pair_key(turns[0], PAIR_USER) and _pair_key(turns[0], PAIR_ASSISTANT):
                return "pairs"
        if "instruction" in record and "output" in record:
            return "alpaca"
    keys = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
    raise BadRecord(
        where,
        "unknown format",
        f"got {keys}; expected {CHAT_FORMATS} (other schemas: columns=src=dst,... renames keys)",
    )


def _weight(turn: dict, where: str) -> dict:
    # OpenAI fine-tuning files mark assistant replies to keep as context only with "weight": 0 (1 = trained)
    w = turn.get("weight")
    if w is None:
        return {}
    if w not in (0, 1) or isinstance(w, bool) or turn.get("role") != "assistant":
        raise BadRecord(
            where,
            "malformed",
            f"weight {w!r} on a turn of role {turn.get('role')!r}; only assistant turns take a weight, 0 or 1",
        )
    return {"weight": int(w)}


def _text(value, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(where, "malformed", f"{what} is {type(value).__name__}, not a string")
    return value


def to_messages(record, fmt: str, where: str) -> list[dict]:
    """One record of format `fmt` -> messages (roles mapped, nothing else changed)."""
    # The tool checks are the chat format's (model/chat_format.py, shared with the server) and raise its error; here
    # it becomes the record's BadRecord, same words. BadRecord cannot be that class: dataset/records.py is imported
    # by `main.py --help` before torch, and importing model/ imports torch.
    try:
        return _record_messages(record, fmt, where)
    except ChatFormatError as e:
        raise BadRecord(e.where, e.reason, e.detail) from None


def _record_messages(record, fmt: str, where: str) -> list[dict]:
    if not isinstance(record, dict):
        raise BadRecord(where, "malformed", f"a record is {type(record).__name__}, not an object")
    if fmt == "alpaca":
        if "instruction" not in record or "output" not in record:
            raise BadRecord(where, "malformed", f"Alpaca record without instruction/output (keys {sorted(record)})")
        messages = (
            [{"role": "system", "content": _text(record["system"], where, "system")}] if record.get("system") else []
        )
        history = record.get("history") or []
        if not isinstance(history, list):
            raise BadRecord(where, "malformed", f"history is {type(history).__name__}, not a list of pairs")
        for pair in history:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise BadRecord(where, "malformed", "history must hold [user, assistant] pairs")
            messages += [
                {"role": "user", "content": _text(pair[0], where, "history")},
                {"role": "assistant", "content": _text(pair[1], where, "history")},
            ]
        prompt = _text(record["instruction"], where, "instruction")
        extra = _text(record.get("input") or "", where, "input")
        messages += _belle_turns(prompt, where) or [{"role": "user", "content": prompt}]
        messages[-1]["content"] += "\n" + extra if extra else ""
        messages.append({"role": "assistant", "content": _text(record["output"], where, "output")})
        return messages
    turns = _turns(record)
    if not isinstance(turns, list):
        raise BadRecord(where, "malformed", f"no conversations/messages list (keys {sorted(record)})")
    messages = []
    if fmt in ("sharegpt", "pairs") and record.get("system"):
        messages.append({"role": "system", "content": _text(record["system"], where, "system")})
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadRecord(where, "malformed", "a turn is not an object")
        if fmt == "pairs":
            user, assistant = _pair_key(turn, PAIR_USER), _pair_key(turn, PAIR_ASSISTANT)
            if user is None or assistant is None:
                raise BadRecord(where, "malformed", f"pair turn without human/assistant (keys {sorted(turn)})")
            messages += [
                {"role": "user", "content": _text(turn[user], where, user)},
                {"role": "assistant", "content": _text(turn[assistant], where, assistant)},
            ]
        elif fmt == "sharegpt":
            if "from" not in turn or "value" not in turn:
                raise BadRecord(where, "malformed", f"ShareGPT turn without from/value (keys {sorted(turn)})")
            role = SHAREGPT_ROLES.get(turn["from"])
            if role is None:
                raise BadRecord(where, "unknown role", repr(turn["from"]))
            if turn["from"] == "function_call":  # {"name", "arguments"} or a list of them, as JSON text
                calls = json_of(_text(turn["value"], where, "value"), where, "function_call")
                calls = tool_calls_of([calls] if isinstance(calls, dict) else calls, where)
                messages.append({"role": "assistant", "content": "", "tool_calls": calls})
            else:
                messages.append({"role": role, "content": _text(turn["value"], where, "value")})
        elif fmt == "positional":  # MiniMind's RLAIF prompts: user, assistant, user, ... by position
            if set(turn) != {"content"}:
                raise BadRecord(where, "malformed", f"a turn of a role-less conversation has keys {sorted(turn)}")
            role = "user" if len(messages) % 2 == 0 else "assistant"
            messages.append({"role": role, "content": _content(turn["content"], where, "content")})
        else:
            if "role" not in turn or ("content" not in turn and not turn.get("tool_calls")):
                raise BadRecord(where, "malformed", f"turn without role/content (keys {sorted(turn)})")
            if turn["role"] not in ROLES:
                raise BadRecord(where, "unknown role", repr(turn["role"]))
            messages.append({**_message(turn, where), **_weight(turn, where)})
    tools = record.get("tools") or record.get("functions")  # OpenAI's fine-tuning records keep tools beside messages
    if tools and not (messages and messages[0].get("tools")):
        if not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": ""})
        messages[0]["tools"] = tools_of(tools, where)
    return messages


def _belle_turns(instruction: str, where: str) -> list[dict] | None:
    """BELLE multiturn_chat_0.8M's transcript instruction "Human:q1\nAssistant:a1\nHuman:q2\nAssistant:" -> [user q1,
    assistant a1, user q2] (the reply to q2 is the record's output); None for any other instruction. Only an
    instruction that starts with "Human:" and ends with "Assistant:" is split, so a prompt that merely mentions
    "Human:" stays one user turn."""
    if not (instruction.startswith("Human:") and instruction.rstrip().endswith("Assistant:")):
        return None
    parts = BELLE_TURN.split(instruction.rstrip())  # ['', 'Human', q1, 'Assistant', a1, ..., 'Assistant', '']
    roles = {"Human": "user", "Assistant": "assistant"}
    messages = [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]
    if messages[-1]["content"] or [m["role"] for m in messages] != ["user", "assistant"] * (len(messages) // 2):
        raise BadRecord(where, "malformed", "a BELLE transcript must alternate Human: and Assistant: turns")
    return messages[:-1]


# Tool use (OpenAI and MiniMind records) -> messages: the first system message carries the conversation's "tools"
# (a list of {"type": "function", "function": {...}}), an assistant message its "tool_calls" ([{"name", "arguments":
# dict}]) and a "tool" message the tool's answer; chatml_pieces renders them in the template's tool format. Tools
# and calls are checked by the chat format's tools_of / tool_calls_of (model/chat_format.py), which the server's
# requests pass through too.


def _content(value, where: str, what: str) -> str:
    """A string, or OpenAI content parts: their text parts joined. Other parts (images, audio) are refused: a reply
    trained without the image it describes would teach the model to invent one."""
    if not isinstance(value, list):
        return _text(value, where, what)
    texts = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text":
            raise BadRecord(where, "unsupported content", f"a {kind!r} part in {what}; only text parts are read")
        texts.append(_text(part.get("text"), where, what))
    return "".join(texts)


def _message(turn: dict, where: str) -> dict:
    """One role/content turn -> a message; tool_calls (assistant) and tools/functions (system) are kept."""
    role, calls = turn["role"], turn.get("tool_calls") if turn["role"] == "assistant" else None
    content = turn.get("content")
    message = {"role": role, "content": "" if content is None and calls else _content(content, where, "content")}
    if calls:
        message["tool_calls"] = tool_calls_of(calls, where)
    tools = turn.get("tools") or turn.get("functions") if role == "system" else None
    if tools:
        message["tools"] = tools_of(tools, where)
    return message


def check_messages(messages: list[dict], where: str, require_assistant_last: bool = True) -> None:
    if not messages or all(not m["content"].strip() and not m.get("tool_calls") for m in messages):
        raise BadRecord(where, "empty conversation")
    if any(m["role"] == "system" for m in messages[1:]):
        raise BadRecord(where, "system turn not first")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(where, "no assistant turn")
    if any(m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls") for m in messages):
        raise BadRecord(where, "empty assistant turn")
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages):
        raise BadRecord(where, "no trained assistant turn", "every assistant turn has weight 0")
    for prev, m in zip([{"role": ""}] + messages, messages):
        if m["role"] == "tool" and not (prev["role"] == "tool" or prev.get("tool_calls")):
            raise BadRecord(where, "tool turn without a call", "a tool message must follow an assistant's tool_calls")
    if require_assistant_last and messages[-1]["role"] != "assistant":
        raise BadRecord(where, "last turn not assistant", f"ends with a {messages[-1]['role']} turn")


def fill_placeholders(messages: list[dict], values: dict, where: str) -> list[dict]:
    """{{key}} -> values[key]; a placeholder with no value is a bad record (we never train on '{{name}}')."""
    out = []
    for m in messages:
        missing = {k for k in PLACEHOLDER.findall(m["content"]) if k not in values}
        if missing:
            key = min(missing)
            raise BadRecord(where, "unfilled placeholder", f"{{{{{key}}}}}; set placeholders={key}=...")
        out.append({**m, "content": PLACEHOLDER.sub(lambda g: values[g.group(1)], m["content"])})
    return out


def parse_placeholders(spec: str) -> dict:
    """'name=Milli-Chat,author=Milli team' -> {'name': 'Milli-Chat', 'author': 'Milli team'}."""
    values = {}
    for pair in [p for p in spec.split(",") if p.strip()]:
        if "=" not in pair:
            raise ValueError(f"placeholders: '{pair}' is not key=value")
        key, value = pair.split("=", 1)
        values[key.strip()] = value.strip()
    return values


def load_conversations(
    paths: str | list[str],
    placeholders: dict | None = None,
    system_prompt: str = "",
    on_bad: str = "error",
    require_assistant_last: bool = True,
    max_samples: int = 0,
    stats: Counter | None = None,
    log=print,
    columns: dict | None = None,
) -> tuple[list[list[dict]], Counter]:
    """Read every file, normalise each record to messages and check it (dataset/records.py read_records: the
    on_bad policy, skip counts and max_samples, the first max_samples usable conversations of each file).

    Returns (conversations, stats); stats counts read records, kept ones and each skip reason ("skip:<reason>").
    system_prompt becomes the system turn of conversations that have none. columns renames keys (parse_columns)."""
    placeholders = placeholders or {}
    formats: dict[str, str] = {}  # file -> its format, detected from its first readable record

    def convert_file(path: str):
        def convert(record, where: str) -> list[dict]:
            if path not in formats:
                try:
                    formats[path] = detect_format(record, where)
                except BadRecord as e:  # a file we cannot read at all is an error, never a skip
                    raise UnreadableFile(e.where, e.reason, e.detail) from None
            messages = to_messages(record, formats[path], where)
            check_messages(messages, where, require_assistant_last)
            messages = fill_placeholders(messages, placeholders, where)
            if system_prompt and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": system_prompt}] + messages
            elif system_prompt and messages[0].get("tools") and not messages[0]["content"]:
                messages[0]["content"] = system_prompt  # the system turn made only to carry the tools
            return messages

        return convert

    conversations, stats = read_records(
        paths,
        convert_file,
        "conversations",
        on_bad,
        max_samples,
        stats,
        log,
        columns,
        file_note=lambda path: formats.get(path, "no usable record"),
        formats=CHAT_FORMATS,
    )
    stats["conversations"] = len(conversations)
    return conversations, stats


# -----------------------------------------------------------------------------
# Tokenizing: ChatML ids and labels (model/chat_format.py chatml_pieces), then the truncation policy


def tokenize_conversation(tokenizer, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """-> (input_ids, labels) as int32 arrays; labels = ids on assistant tokens (+ <|im_end|>), else -100."""
    pieces = chatml_pieces(tokenizer, messages)
    ids = np.asarray([i for piece, _ in pieces for i in piece], dtype=np.int32)
    trained = np.asarray([t for _, mask in pieces for t in mask], dtype=bool)
    return ids, np.where(trained, ids, IGNORE).astype(np.int32)


def truncate(ids: np.ndarray, labels: np.ndarray, seq_len: int, policy: str = "turns"):
    """Apply the truncation policy (see the module docstring); None when no trainable token would remain."""
    if len(ids) <= seq_len:
        return ids, labels
    trained = labels != IGNORE
    if policy == "turns":
        # Ends of assistant spans: a trained token followed by an untrained one (or by the end).
        ends = np.flatnonzero(trained & ~np.append(trained[1:], False)) + 1
        fitting = ends[ends <= seq_len]
        if len(fitting) == 0:
            return None
        cut = int(fitting[-1])
    elif policy == "tokens":
        cut = seq_len
        if not trained[1:cut].any():  # position 0 is never a target (nothing comes before it)
            return None
    else:
        raise ValueError(f"truncation must be turns or tokens, got '{policy}'")
    return ids[:cut], labels[:cut]


def tokenize_conversations(
    conversations: list[list[dict]], tokenizer, seq_len: int, truncation: str = "turns", stats: Counter | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Tokenize and truncate; samples that end up with nothing to learn are dropped and counted."""
    check_chat_template(tokenizer, tools=any(uses_tools(m) for m in conversations))
    stats = Counter() if stats is None else stats
    samples = []
    for messages in conversations:
        ids, labels = tokenize_conversation(tokenizer, messages)
        kept = truncate(ids, labels, seq_len, truncation)
        if kept is None:
            stats["dropped:too long"] += 1
            continue
        if len(kept[0]) < len(ids):
            stats["truncated"] += 1
        samples.append(kept)
    stats["samples"] = len(samples)
    return samples


# -----------------------------------------------------------------------------
# Dataset (optionally packed) and collation


def pack_bins(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: each sample (longest first) goes into the open bin it fills most tightly.
    Deterministic for given lengths; the batch order is shuffled later by IndexBatches. O(n log n) lookups."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin index), sorted: the tightest fit is a bisect away
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(room, (n, -1))
        if k == len(room):
            bins.append([i])
            free, b = seq_len - n, len(bins) - 1
        else:
            free, b = room.pop(k)
            bins[b].append(i)
            free -= n
        if free > 0:
            bisect.insort(room, (free, b))
    return bins


class ChatDataset:
    """dataset[i] -> {"input_ids", "labels", "position_ids", "seq_ids"} as int64 tensors (one sequence).

    seq_ids numbers the conversations inside a packed sequence from 1 (0 is padding, added by collate_chat)."""

    def __init__(self, samples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pack: bool = False):
        self.samples = samples
        lengths = [len(ids) for ids, _ in samples]
        self.groups = pack_bins(lengths, seq_len) if pack else [[i] for i in range(len(samples))]
        self.packed = pack

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict:
        parts = [self.samples[j] for j in self.groups[i]]
        ids = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        positions = np.concatenate([np.arange(len(p[0])) for p in parts])
        seq_ids = np.concatenate([np.full(len(p[0]), k + 1) for k, p in enumerate(parts)])
        return {
            "input_ids": torch.from_numpy(ids.astype(np.int64)),
            "labels": torch.from_numpy(labels.astype(np.int64)),
            "position_ids": torch.from_numpy(positions.astype(np.int64)),
            "seq_ids": torch.from_numpy(seq_ids.astype(np.int64)),
            "packed": self.packed,
        }

    def fill_ratio(self, seq_len: int) -> float:
        """Share of the seq_len slots that hold real tokens (1.0 = no padding at all)."""
        return sum(len(s[0]) for s in self.samples) / max(1, len(self.groups) * seq_len)


def length_bucket(length: int, seq_len: int, buckets: int = 4, multiple: int = 8) -> int:
    """The padded length of a micro-batch whose longest row has `length` tokens: the smallest of seq_len,
    seq_len / 2, seq_len / 4, ... (`buckets` lengths, each rounded up to `multiple`) that holds it.

    torch.compile(dynamic=False) builds one graph per input shape; a handful of fixed lengths bounds the graphs
    per stage (dynamo compiles at most 8 per function, then runs new shapes eagerly: 4 training and 4 evaluation
    lengths fit, since eval mode and no_grad get graphs of their own), and powers of two waste at most half a row.
    A row longer than seq_len (callers truncate, so never in training) is rounded up to `multiple`."""
    if length > seq_len:
        return -(-length // multiple) * multiple
    best = seq_len
    for k in range(1, buckets):
        size = -(-(seq_len >> k) // multiple) * multiple
        if size < length:
            break
        best = size
    return best


def collate_chat(items: list[dict], pad_id: int, pad_multiple: int = 8, seq_len: int = 0) -> dict:
    """Right-pad a list of ChatDataset items into one micro-batch.

    No row gets an attention mask (see the module docstring). When a row holds several conversations the batch
    also carries document_ids (B, T), the conversation number of each token (0 = padding), and per-conversation
    position_ids: the model keeps attention inside each conversation from these, on the device, so the host never
    builds a T x T mask. With seq_len > 0, T is length_bucket(longest row, seq_len), one of a few fixed lengths (one
    compiled graph each); otherwise the longest row rounded up to pad_multiple. Items of a packed ChatDataset
    always give document_ids, even when no row of this batch holds two conversations, so that a compiled model
    sees the same inputs every step."""
    lengths = [len(it["input_ids"]) for it in items]
    T = length_bucket(max(lengths), seq_len) if seq_len > 0 else -(-max(lengths) // pad_multiple) * pad_multiple
    B = len(items)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    batch = {"input_ids": input_ids, "labels": labels, "num_tokens": sum(lengths)}
    # ids count up along a row: the last is the largest
    packed = any(it.get("packed", False) or int(it["seq_ids"][-1]) > 1 for it in items)
    if packed:
        batch["position_ids"] = torch.zeros((B, T), dtype=torch.long)
        batch["document_ids"] = torch.zeros((B, T), dtype=torch.long)
    for b, (it, n) in enumerate(zip(items, lengths)):
        input_ids[b, :n], labels[b, :n] = it["input_ids"], it["labels"]
        if packed:
            batch["position_ids"][b, :n], batch["document_ids"][b, :n] = it["position_ids"], it["seq_ids"]
    return batch
