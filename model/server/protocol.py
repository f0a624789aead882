"""
What the server speaks: OpenAI's /v1/chat/completions request, checked and turned into the messages and
SamplingParams the Engine takes; its errors in OpenAI's shape; tool calls in the reply as OpenAI's tool_calls; and
the limits a client meets (ServerLimits, each also a command-line flag of scripts/serve_api.py).

    req = parse_chat_request(body_bytes, CHAT_SAMPLING, "sft/final")  # ApiError (status, OpenAI error body)
    req["messages"], req["sampling"], req["stream"], req["include_usage"], req["tools"]

Tools and tool calls are checked by the same functions that read them from training records (model/chat_format.py
tools_of, tool_calls_of), so training and serving see one form.
"""

import argparse
import dataclasses
import json
import uuid

from model.chat_format import ChatFormatError, parse_tool_calls, tool_calls_of, tools_of
from model.engine import SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")  # developer: OpenAI's newer name for the system message


@dataclasses.dataclass
class ServerLimits:
    """What one client may send and wait for, all on by default (model/server/http.py says what each defends
    against)."""

    max_body_bytes: int = 1 << 20  # a larger request is answered 413 (after its body has been read and dropped)
    drain_factor: float = 4.0  # an error's unread body up to this x max_body_bytes is read and dropped (so the
    # client, still sending, reads the answer); a larger one is cut off
    max_conversation_tokens: int = 32768  # a longer conversation (before trimming to the context) is refused
    max_queue: int = 64  # requests waiting for the model; one more is answered 429 with Retry-After
    max_batch: int = 32  # requests generated together in one batch
    batch_wait_s: float = 0.02  # a batch waits this long for more requests, so ones arriving together share it
    max_generation_s: float = 300.0  # a request generating longer is ended (finish_reason "length")
    read_timeout_s: float = 10.0  # the longest wait for a client's bytes; its request line and headers, then its
    # body, must each come in this time (a client trickling bytes cannot hold a connection slot longer)
    max_connections: int = 512  # connections open at once (a thread each); past it the oldest unchecked one (no
    # whole request passing the Host/Origin/key checks yet) of the client holding the most is closed to make room,
    # and a new connection is answered 503 only when every open one is being answered
    retry_after_s: int = 2  # the Retry-After of a 429 or 503


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    """--max_body_bytes ... --retry_after_s: one flag per ServerLimits field, defaulting to it."""
    for f in dataclasses.fields(ServerLimits):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerLimits)})


# -----------------------------------------------------------------------------
# Request parsing and validation


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind} in [{lo}, {hi}], got {value!r}", name)
    return value


def _text(value, param: str) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"{param} must be a string, got {type(value).__name__}", param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON allows "\ud800" (a lone surrogate); it is no text we can tokenize
        raise ApiError(400, f"{param} is not valid Unicode (a lone surrogate)", param) from None
    return value


def _content(value, param: str) -> str:
    if isinstance(value, list):  # content parts: the text ones, in order (others, e.g. images, are ignored)
        texts = []
        for k, part in enumerate(value):
            if not isinstance(part, dict):
                raise ApiError(400, f"{param}[{k}] must be an object", f"{param}[{k}]")
            if part.get("type") == "text":
                texts.append(_text(part.get("text"), f"{param}[{k}].text"))
        return "".join(texts)
    return _text(value, param)


def parse_chat_request(raw: bytes, defaults: SamplingParams, model_name: str | None = None) -> dict:
    """Validate a /v1/chat/completions body; returns messages (tools on the system one), SamplingParams, stream
    options and whether the reply is parsed for tool calls.
    A "model" other than model_name is a 404, as OpenAI answers for a model it does not have."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    model = body.get("model")
    if model is not None and model_name is not None and model != model_name:
        raise ApiError(
            404, f"The model {model!r} does not exist (this server has {model_name!r})", "model", "model_not_found"
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required and must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise ApiError(400, f"messages[{i}].role must be one of {list(ROLES)}, got {role!r}", f"messages[{i}].role")
        role = "system" if m["role"] == "developer" else m["role"]
        calls = m.get("tool_calls") if role == "assistant" else None
        content = "" if m.get("content") is None and calls else _content(m.get("content"), f"messages[{i}].content")
        clean.append({"role": role, "content": content})
        if calls:
            try:
                clean[-1]["tool_calls"] = tool_calls_of(calls, f"messages[{i}].tool_calls")
            except ChatFormatError as e:
                raise ApiError(400, str(e), f"messages[{i}].tool_calls") from None
    if any(m["role"] == "system" for m in clean[1:]) or clean[-1]["role"] == "assistant":
        raise ApiError(
            400, "one optional system message first, and the last message must not be the assistant's", "messages"
        )
    tools = _tools(body)
    if tools:  # the template's tools= rides on the system message (model/chat_format.py chatml_pieces)
        if clean[0]["role"] != "system":
            clean.insert(0, {"role": "system", "content": ""})
        clean[0]["tools"] = tools
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", defaults.max_new_tokens, 1, 1 << 20, True)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    stop = [_text(s, "stop") for s in stop]
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise ApiError(400, "only n=1 is supported", "n")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {stream!r}", "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    include_usage = (stream_options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be true or false", "stream_options")
    sampling = defaults.replace(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", defaults.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", defaults.top_p, 0.0, 1.0),
        top_k=_number(body, "top_k", defaults.top_k, 0, 1 << 20, True),  # not OpenAI's, but common
        repetition_penalty=_number(body, "repetition_penalty", defaults.repetition_penalty, 0.01, 10.0),
        seed=_number(body, "seed", defaults.seed, -(1 << 63), (1 << 63) - 1, True),
        stop_strings=stop,
    )
    return {
        "messages": clean,
        "sampling": sampling,
        "stream": bool(stream),
        "include_usage": bool(include_usage),
        "tools": bool(tools),
    }


def _tools(body: dict) -> list[dict]:
    """The request's tools, [] when there are none or tool_choice is "none" (the model then gets no tools in its
    prompt and its reply is not parsed). tool_choice "required" or a named function is refused: forcing a call
    needs constrained decoding, which this server does not do."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise ApiError(400, f"tool_choice must be 'auto' or 'none', got {choice!r}", "tool_choice")
    if not tools or choice == "none":
        return []
    try:
        return tools_of(tools, "tools")
    except ChatFormatError as e:
        raise ApiError(400, str(e), "tools") from None


def tool_call_message(text: str) -> tuple[dict, str | None]:
    """A reply -> (OpenAI's assistant message, "tool_calls" or None): <tool_call> blocks become tool_calls with
    arguments as JSON text; a reply without them, or whose blocks do not parse, stays plain content."""
    parsed = parse_tool_calls(text)
    if parsed is None:
        return {"role": "assistant", "content": text}, None
    content, calls = parsed
    return {
        "role": "assistant",
        "content": content or None,
        "tool_calls": [
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)},
            }
            for c in calls
        ],
    }, "tool_calls"
