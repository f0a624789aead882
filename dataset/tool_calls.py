"""
The text of tool use in a chat (Qwen2.5's format, which llama.cpp's and vLLM's `hermes` tool parsers read), in one
place for the chat template (trainer/train_tokenizer.py), chatml_pieces (dataset/chat_data.py) and the server's
parser of replies (scripts/serve_api.py):

    system turn   ... # Tools ... <tools>\\n{tool JSON}\\n...</tools> ... (TOOLS_INTRO, the tools, TOOLS_OUTRO)
    assistant     content\\n<tool_call>\\n{"name": "get_weather", "arguments": {"city": "北京"}}\\n</tool_call>
    tool results  one user turn: \\n<tool_response>\\n...\\n</tool_response> per consecutive tool message

Standard library only: the tokenizer stage imports it without torch.
"""

import json
import re

TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def tools_text(tools: list[dict]) -> str:
    """The tools block the system turn ends with (the template's tojson is json.dumps with ensure_ascii=False)."""
    return TOOLS_INTRO + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + TOOLS_OUTRO


def tool_call_text(call: dict) -> str:
    """One call as the template writes it: <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>. Arguments
    given as a string are written as they are (OpenAI sends a JSON string), others as JSON (the template's tojson)."""
    fn = call.get("function", call)
    args = fn.get("arguments")
    args = args if isinstance(args, str) else json.dumps(args or {}, ensure_ascii=False)
    return f'<tool_call>\n{{"name": {json.dumps(fn["name"], ensure_ascii=False)}, "arguments": {args}}}\n</tool_call>'


def parse_tool_calls(text: str) -> tuple[str, list[dict]] | None:
    """A reply -> (the content before its first <tool_call>, [{"name", "arguments": dict}, ...]), or None when it
    has no tool call or any block is not {"name": str, "arguments": object} JSON (the reply then stays plain text,
    as vLLM's hermes parser does). Text after the last block is dropped (a model that learned the format ends its
    turn there)."""
    blocks = TOOL_CALL.findall(text)
    if not blocks:
        return None
    calls = []
    for block in blocks:
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return None
        if not (
            isinstance(call, dict)
            and isinstance(call.get("name"), str)
            and call["name"]
            and isinstance(call.get("arguments", {}), dict)
        ):
            return None
        calls.append({"name": call["name"], "arguments": call.get("arguments", {})})
    return text[: text.index("<tool_call>")].rstrip("\n"), calls
