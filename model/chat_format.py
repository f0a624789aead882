"""
The chat format, in one place: ChatML with Qwen2.5's tool use (the format llama.cpp's and vLLM's `hermes` tool
parsers read). Three views of it must stay equal, and this module holds all three with the checks that keep them so:

    CHAT_TEMPLATE   the Jinja template every saved tokenizer carries (the tokenizer stage writes it; transformers'
                    apply_chat_template, llama.cpp and anything else that reads tokenizer_config.json or a GGUF run it)
    chatml_pieces   the Python rendering: the one tokenization of conversations (SFT labels, preference and RL prompt
                    data, the engine's chat prompts, the server)
    tool-call text  tools_text / tool_call_text (what both of the above write) and parse_tool_calls (the server's
                    reader of replies)
    tool checks     tools_of / tool_calls_of: tools and calls as records and requests give them -> the one form the
                    other views render (ChatFormatError, naming where, for anything else)

    system turn   ... # Tools ... <tools>\\n{tool JSON}\\n...</tools> ... (TOOLS_INTRO, the tools, TOOLS_OUTRO)
    assistant     content\\n<tool_call>\\n{"name": "get_weather", "arguments": {"city": "北京"}}\\n</tool_call>
    tool results  one user turn: \\n<tool_response>\\n...\\n</tool_response> per consecutive tool message
    content       a string, or OpenAI's content parts: their text parts joined (content_text)

check_chatml and check_chat_template compare the template with chatml_pieces on probe conversations; a change to
either one fails them (and tests/test_chat_data.py compares both on random conversations). A malformed message list
stops both with the same words naming the message: check_message_list's ValueError, the template's raise_exception
(_TEMPLATE_CHECKS). Standard library only: the tokenizer is passed in.
"""

import json
import re

# -----------------------------------------------------------------------------
# Tool-call text

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


# -----------------------------------------------------------------------------
# Tools and tool calls as data gives them, checked into the one form the template renders: training records
# (dataset/chat_data.py) and the server's requests (model/server/protocol.py) both read them here, so training and
# serving see one form and refuse the same things with the same words.


class ChatFormatError(ValueError):
    """Tools or tool calls not in a form we read; the message starts with where they came from (a record's
    file:line, a request's field). dataset/chat_data.py reports it as the record's BadRecord, the server as a 400."""

    def __init__(self, where: str, reason: str, detail: str = ""):
        super().__init__(f"{where}: {reason}" + (f" ({detail})" if detail else ""))
        self.where, self.reason, self.detail = where, reason, detail


def json_of(text: str, where: str, what: str):
    """json.loads of a JSON text inside a record, its failures as ChatFormatError ("[[[[..." overflows the parser's
    stack)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ChatFormatError(where, "malformed", f"{what} is not valid JSON: {e.msg}") from None
    except RecursionError:
        raise ChatFormatError(where, "malformed", f"{what} is nested too deeply") from None


def _check_renderable(value, where: str, what: str) -> None:
    """value must dump to the UTF-8 JSON the template writes into the prompt: a lone surrogate ("\\ud800" is valid
    JSON) is no text the tokenizer can encode, and a structure nested past the recursion limit cannot be dumped."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ChatFormatError(where, "malformed", f"{what} is not valid Unicode (a lone surrogate)") from None
    except RecursionError:
        raise ChatFormatError(where, "malformed", f"{what} is nested too deeply") from None


def _json_list(value, where: str, what: str) -> list:
    if isinstance(value, str):  # MiniMind stores tools and tool_calls as JSON text
        value = json_of(value, where, what)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ChatFormatError(where, "malformed", f"{what} must be a list of objects")
    return value


def tools_of(value, where: str) -> list[dict]:
    """Tool specs in OpenAI's form {"type": "function", "function": {"name", ...}}; a bare {"name", "description",
    "parameters"} (MiniMind's functions, OpenAI's legacy functions) is wrapped, so training and serving see one form."""
    tools = []
    for t in _json_list(value, where, "tools"):
        fn = t.get("function", t)
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]):
            raise ChatFormatError(where, "malformed", "a tool without a function name")
        tools.append({"type": "function", "function": fn})
    _check_renderable(tools, where, "tools")
    return tools


def tool_calls_of(value, where: str) -> list[dict]:
    """OpenAI's [{"id", "type": "function", "function": {"name", "arguments": JSON text}}] or MiniMind's
    [{"name", "arguments": {...}}] (either as JSON text) -> [{"name", "arguments": dict}]. Arguments are parsed, so
    every call is rendered as the same canonical JSON the model then learns to write."""
    calls = []
    for c in _json_list(value, where, "tool_calls"):
        fn = c.get("function", c)
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]):
            raise ChatFormatError(where, "malformed", "a tool call without a function name")
        args = fn.get("arguments") or {}
        if isinstance(args, str):
            args = json_of(args, where, "tool call arguments")
        if not isinstance(args, dict):
            raise ChatFormatError(where, "malformed", "tool call arguments must be a JSON object")
        calls.append({"name": fn["name"], "arguments": args})
    _check_renderable(calls, where, "tool_calls")
    return calls


# -----------------------------------------------------------------------------
# The Jinja template
# ChatML. {% generation %} around each assistant reply and its <|im_end|> lets apply_chat_template(...,
# return_assistant_tokens_mask=True) mark what a reply is: check_chat_template compares that mask with chatml_pieces'
# trained flags, which are what SFT's labels come from. Tools follow Qwen2.5's format: with `tools`, the system turn
# lists them in <tools>; an assistant's tool_calls become <tool_call> JSON blocks (trained, inside generation); `tool`
# messages become one user turn of <tool_response> blocks. Without tools the output is plain ChatML.
# Content is a string or OpenAI's content parts (content_text). The template renders the same text in transformers,
# llama-cpp-python (Jinja2 too: tests/test_export_gguf.py, where it is installed) and llama.cpp's C++ engines
# (common/jinja, which skips the generation tag, and minja before it: compared by hand on 100 random conversations
# with tools and content parts, December 2026). Keep to what they all run: if/for/set, a namespace, `~`, `in`,
# the tests string/mapping/iterable/defined/none, tojson, raise_exception; no macros, no other filters.

ROLES = ("system", "user", "assistant", "tool")


def _content_text(name: str, content: str) -> str:
    """Jinja setting `name` to content_text(`content`): the loop gathers the text parts in a namespace, since a plain
    set inside a for loop does not outlive the loop in Jinja."""
    return (
        f"{{%- if {content} is string -%}}{{%- set {name} = {content} -%}}{{%- else -%}}"
        f"{{%- set parts = namespace(text='') -%}}{{%- for part in {content} or [] -%}}"
        "{%- if part.type == 'text' -%}{%- set parts.text = parts.text + part.text -%}{%- endif -%}"
        f"{{%- endfor -%}}{{%- set {name} = parts.text -%}}{{%- endif -%}}"
    )


def _given(x: str) -> str:
    return f"{x} is defined and {x} is not none"


def _is_list(x: str) -> str:
    """Jinja for "x is a list" that the engines read alike: Jinja2 calls a dict a sequence and iterable, llama.cpp's
    common/jinja calls an undefined value both and a dict neither, minja calls a string iterable."""
    return f"({x} is defined and {x} is iterable and {x} is not string and {x} is not mapping)"


def _raise_first(where: str, checks: list[tuple[str, str]]) -> str:
    """Jinja that raises `where` ~ problem for the first (condition, problem) whose condition holds."""
    return (
        "".join(
            f'{{%- {"elif" if k else "if"} {condition} -%}}{{{{ raise_exception({where} ~ "{problem}") }}}}'
            for k, (condition, problem) in enumerate(checks)
        )
        + "{%- endif -%}"
    )


# Malformed lists stop the template before it writes anything, with check_message_list's words (in its order), so
# a caller of apply_chat_template, or of a server that renders the GGUF's template, reads which message is wrong and
# why instead of a jinja2 UndefinedError or a turn rendered from nonsense. transformers checks the list, its
# elements and tools= before rendering; the element check is for hosts that do not (llama-cpp-python's formatter).
# llama.cpp's capability probes (common/jinja/caps.cpp, minja's chat-template.hpp) are well-formed lists: they
# find the same capabilities as without the checks (compared by hand, December 2026).
_TEMPLATE_CHECKS = (
    "{%- for message in messages -%}{%- set where = 'messages[' ~ loop.index0 ~ ']' -%}"
    + _raise_first(
        "where",
        [
            ("message is not mapping", " must be a dict with 'role' and 'content'"),
            (  # common/jinja refuses `in` on an undefined value: the string test comes first
                f"message.role is not string or message.role not in {list(ROLES)!r}",
                "['role'] must be one of " + ", ".join(ROLES),
            ),
            ("message.role == 'system' and not loop.first", ": a system message must come first"),
            (
                f"{_given('message.content')} and message.content is not string and not {_is_list('message.content')}",
                "['content'] must be a string or a list of content parts",
            ),
            (
                "message.tool_calls and message.role != 'assistant'",
                "['tool_calls']: only an assistant message makes tool calls",
            ),
            (
                f"{_given('message.tool_calls')} and not {_is_list('message.tool_calls')}",
                "['tool_calls'] must be a list",
            ),
        ],
    )
    + "{%- if message.content is not string -%}{%- for part in message.content or [] -%}"
    + _raise_first(
        "where ~ \"['content'][\" ~ loop.index0",
        [
            ("part is not mapping", "] must be a dict such as {'type': 'text', 'text': ...}"),
            ("part.type == 'text' and part.text is not string", "]['text'] must be a string"),
        ],
    )
    + "{%- endfor -%}{%- endif -%}{%- for call in message.tool_calls or [] -%}"
    "{%- set fn = call.function if call is mapping and call.function is defined else call -%}"
    + _raise_first(
        "where ~ \"['tool_calls'][\" ~ loop.index0",
        [
            ("fn is not mapping", "] must be a dict: {'name', 'arguments'} or OpenAI's"),
            ("fn.name is not string or not fn.name", "] needs a function name, a non-empty string"),
            (
                f"{_given('fn.arguments')} and fn.arguments is not string and fn.arguments is not mapping",
                "] arguments must be a dict or its JSON text",
            ),
        ],
    )
    + "{%- endfor -%}{%- endfor -%}"
)

CHAT_TEMPLATE = (
    _TEMPLATE_CHECKS
    + "{%- if tools -%}{{ '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' -%}"
    + _content_text("system_text", "messages[0]['content']")
    + "{%- if system_text -%}{{ system_text + '\\n\\n' }}{%- endif -%}{%- endif -%}"
    "{{ " + repr(TOOLS_INTRO) + " }}{%- for tool in tools -%}{{ '\\n' + (tool | tojson) }}{%- endfor -%}"
    "{{ " + repr(TOOLS_OUTRO) + " + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- for message in messages -%}"
    + _content_text("content", "message['content']")
    + "{%- if message['role'] == 'system' and loop.first and tools -%}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<|im_start|>assistant\\n' }}{% generation %}{{ content }}"
    "{%- for call in message.tool_calls or [] -%}{%- set fn = call.function if call.function is defined else call -%}"
    "{%- if content or not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{{ '<tool_call>\\n{\"name\": ' + (fn.name | tojson) + ', \"arguments\": ' }}"
    "{%- if fn.arguments is string -%}{{ fn.arguments }}{%- else -%}{{ (fn.arguments or {}) | tojson }}{%- endif -%}"
    "{{ '}\\n</tool_call>' }}{%- endfor -%}"
    "{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{ '<|im_start|>user' }}{%- endif -%}"
    "{{ '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{%- else -%}{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


# -----------------------------------------------------------------------------
# The Python rendering: ChatML ids per message


def content_text(content) -> str:
    """A message's content as the template writes it: a string as it is; OpenAI's content parts ([{"type": "text",
    "text": ...}, ...]) as their text parts joined, others (an image) left out, as the server reads them; none: ''."""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content or [] if isinstance(part, dict) and part.get("type") == "text")


def _turn_text(messages: list[dict], i: int) -> str | None:
    """The text between <|im_start|> and <|im_end|> of message i, None when it shares the turn before it (a tool
    response after another one: consecutive tool messages make one user turn, as in Qwen2.5)."""
    m = messages[i]
    role, content = m["role"], content_text(m.get("content"))
    if role == "system" and i == 0 and m.get("tools"):
        return "system\n" + (content + "\n\n" if content else "") + tools_text(m["tools"])
    if role == "assistant":
        calls = [("\n" if content or k else "") + tool_call_text(c) for k, c in enumerate(m.get("tool_calls") or [])]
        return "assistant\n" + content + "".join(calls)
    if role == "tool":
        if i > 0 and messages[i - 1]["role"] == "tool":
            return None
        group = []
        for t in messages[i:]:
            if t["role"] != "tool":
                break
            group.append("\n<tool_response>\n" + content_text(t.get("content")) + "\n</tool_response>")
        return "user" + "".join(group)
    return role + "\n" + content


def _json_error(value) -> str | None:
    """Why json.dumps cannot write value (what tools_text and tool_call_text do with it), None when it can."""
    try:
        json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        return str(e)
    return None


def check_message_list(messages) -> None:
    """A ValueError naming the message and what is wrong with a list a Python caller built (chatml_pieces' input;
    data files are checked record by record before, with BadRecord), instead of a KeyError or TypeError from inside
    or a rendering the template would not give. CHAT_TEMPLATE raises the same words on the same lists (_TEMPLATE_CHECKS)
    but for what transformers checks before it (the list, its elements, tools=) and values JSON cannot hold."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where} must be a dict with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}['role'] must be one of {', '.join(ROLES)}, got {role!r}")
        if role == "system" and i > 0:  # as the data files and the server keep it (one optional system prompt)
            raise ValueError(f"{where}: a system message must come first")
        if content is not None and not isinstance(content, (str, list, tuple)):
            raise ValueError(
                f"{where}['content'] must be a string or a list of content parts, got {type(content).__name__}"
            )
        for k, part in enumerate(content if isinstance(content, (list, tuple)) else []):
            if not isinstance(part, dict):
                raise ValueError(f"{where}['content'][{k}] must be a dict such as {{'type': 'text', 'text': ...}}")
            if part.get("type") == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"{where}['content'][{k}]['text'] must be a string")
        if m.get("tools") is not None:
            if i > 0 or role != "system":  # chatml_pieces would drop them; the template's tools= makes a system turn
                raise ValueError(f"{where}['tools']: only a first system message carries tools")
            if not isinstance(m["tools"], (list, tuple)) or not all(isinstance(t, dict) for t in m["tools"]):
                raise ValueError(f"{where}['tools'] must be a list of dicts (tool specs)")
            if error := _json_error(m["tools"]):
                raise ValueError(f"{where}['tools'] cannot be written as JSON ({error})")
        calls = m.get("tool_calls")
        if calls and role != "assistant":  # both renderings would drop them
            raise ValueError(f"{where}['tool_calls']: only an assistant message makes tool calls")
        if calls is not None and not isinstance(calls, (list, tuple)):
            raise ValueError(f"{where}['tool_calls'] must be a list, got {type(calls).__name__}")
        for k, call in enumerate(calls or []):
            fn = call.get("function", call) if isinstance(call, dict) else call
            if not isinstance(fn, dict):
                raise ValueError(f"{where}['tool_calls'][{k}] must be a dict: {{'name', 'arguments'}} or OpenAI's")
            if not (isinstance(fn.get("name"), str) and fn["name"]):
                raise ValueError(f"{where}['tool_calls'][{k}] needs a function name, a non-empty string")
            args = fn.get("arguments")
            if args is not None and not isinstance(args, (str, dict)):
                raise ValueError(
                    f"{where}['tool_calls'][{k}] arguments must be a dict or its JSON text, got {type(args).__name__}"
                )
            if error := _json_error(args):
                raise ValueError(f"{where}['tool_calls'][{k}] arguments cannot be written as JSON ({error})")


def chatml_pieces(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[list, list]]:
    """The ChatML ids of each message, and of the assistant header last when add_generation_prompt: the one
    tokenization of conversations (SFT, preference and RL prompt data, the engine's chat prompts, the server).

    Each piece is (ids, trained): <|im_start|> role\n content <|im_end|> \n, where trained marks an assistant's
    content and its <|im_end|> (the tokens SFT learns). The markers are the special ids and the text between them
    is encoded with split_special_tokens=True, so '<|im_end|>' typed inside content stays text and cannot close
    the turn or forge a system turn. For any other content the ids are exactly the chat template's (the template
    puts a special token on each side of every text run, and the tokenizer encodes each run alone); since every
    message is encoded on its own, pieces can be dropped or joined without tokenizing again.
    Tools (CHAT_TEMPLATE): a first system message's "tools" list is the template's
    tools= (the system turn gets the <tools> block); an assistant's "tool_calls" are written after its content as
    <tool_call> blocks and trained on; a run of "tool" messages is one user turn of <tool_response> blocks, whose
    ids go to the run's first message (the others get an empty piece, so there is still one piece per message).
    Not thread-safe with other encodes of the same tokenizer (split_special_tokens is a switch on the shared Rust
    tokenizer): threads share one lock around them, as model/engine.py does."""
    check_message_list(messages)
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    texts = [_turn_text(messages, i) for i in range(len(messages))] + (["assistant\n"] if add_generation_prompt else [])
    if not texts:
        return []
    runs = [t for t in texts if t is not None]
    enc = tokenizer(runs + ["\n"], add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    newline = enc["input_ids"][-1]
    encoded = iter(zip(enc["input_ids"][:-1], enc["offset_mapping"][:-1]))
    pieces = []
    for i, text in enumerate(texts):
        if text is None:  # shares the tool-response turn before it
            pieces.append(([], []))
            continue
        ids, offsets = next(encoded)
        if i == len(messages):  # the generation prompt: a header only, nothing trained
            pieces.append(([start] + ids, [False] * (1 + len(ids))))
            break
        # An assistant turn with weight 0 (OpenAI fine-tuning records) is context only: nothing in it is trained.
        learn = messages[i]["role"] == "assistant" and bool(messages[i].get("weight", 1))
        # A token is the reply's when it ends inside the content (a token across "\n" and the content's first
        # characters counts, as in the template's {% generation %} mask).
        trained = [learn and e > len("assistant\n") for _, e in offsets]
        pieces.append(([start] + ids + [end] + newline, [False] + trained + [learn] + [False] * len(newline)))
    return pieces


# -----------------------------------------------------------------------------
# The checks: the template and chatml_pieces on probe conversations

CHAT_PROBE = [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "a 你好"},
    {"role": "assistant", "content": " b\n"},
    {"role": "user", "content": "c"},
]
# Tools, calls (one with arguments as a JSON string, as OpenAI sends them), two tool responses sharing a turn
TOOL_PROBE = [
    {"role": "system", "content": "s", "tools": [{"type": "function", "function": {"name": "f"}}]},
    {"role": "user", "content": "a"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"name": "f", "arguments": {"x": "北京"}}, {"name": "f", "arguments": '{"y": 1}'}],
    },
    {"role": "tool", "content": "r1"},
    {"role": "tool", "content": "r2"},
    {"role": "assistant", "content": "d"},
]


# Content as OpenAI's parts in every role the template writes content for: text parts joined, an image part left out
PARTS_PROBE = [
    {"role": "system", "content": [{"type": "text", "text": "s"}]},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "a "},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            {"type": "text", "text": "你好"},
        ],
    },
    {
        "role": "assistant",
        "content": [{"type": "text", "text": " b\n"}],
        "tool_calls": [{"name": "f", "arguments": {}}],
    },
    {"role": "tool", "content": [{"type": "text", "text": "r1"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "d"}]},
]
UPDATE_HINT = "scripts/update_chat_template.py writes the current one"


def _probes(tools: bool, content_parts: bool) -> list[tuple[list[dict], bool, str]]:
    """(conversation, add_generation_prompt, what it needs beyond plain ChatML). The later additions to the format
    are probed only where a caller needs them, so a tokenizer saved before them keeps serving plain chat."""
    probes = [(CHAT_PROBE, True, ""), (CHAT_PROBE[:3], False, "")]
    probes += [(TOOL_PROBE, False, "tool use")] if tools else []
    return probes + ([(PARTS_PROBE, False, "content parts")] if content_parts else [])


def _template(tokenizer, probe: list[dict], what: str = "", **kwargs):
    tools = probe[0].get("tools")
    plain = [{k: v for k, v in m.items() if k != "tools"} for m in probe]
    try:
        return tokenizer.apply_chat_template(plain, tools=tools, tokenize=True, return_dict=True, **kwargs)
    except Exception as e:
        if what:  # e.g. a template saved before content parts: "can only concatenate str (not "list") to str"
            raise ValueError(f"the tokenizer's chat template cannot render {what} ({e}); {UPDATE_HINT}") from e
        raise ValueError(f"the tokenizer has no usable chat template ({e}); use the tokenizer stage's output") from e


def check_chatml(tokenizer, tools: bool = False, content_parts: bool = False) -> None:
    """The tokenizer's chat template must be the ChatML one chatml_pieces writes (CHAT_TEMPLATE): compared on a
    probe conversation, with and without the generation prompt; with tools=True on a tool-use probe too, with
    content_parts=True on one whose contents are OpenAI content parts (a template saved before either existed fails
    them: scripts/update_chat_template.py writes the current one)."""
    for probe, gen, what in _probes(tools, content_parts):
        template = _template(tokenizer, probe, what, add_generation_prompt=gen)["input_ids"]
        if [i for ids, _ in chatml_pieces(tokenizer, probe, gen) for i in ids] != list(template):
            hint = f" for {what} ({UPDATE_HINT})" if what else ""
            raise ValueError(f"the tokenizer's chat template is not the ChatML one of model/chat_format.py{hint}")


def check_chat_template(tokenizer, tools: bool = False, content_parts: bool = False) -> None:
    """For SFT: ChatML (check_chatml), and the assistant mask needs {% generation %} in the template (without it
    every label would be -100); chatml_pieces' mask must equal the template's on each probe that ends in a reply."""
    check_chatml(tokenizer, tools, content_parts)
    for probe, gen, what in _probes(tools, content_parts):
        if gen:
            continue
        out = _template(tokenizer, probe, what, return_assistant_tokens_mask=True)
        if not any(out["assistant_masks"]):
            raise ValueError(
                "the tokenizer's chat template marks no assistant tokens: it needs {% generation %} "
                "around assistant content (the tokenizer stage writes one)"
            )
        if [t for _, trained in chatml_pieces(tokenizer, probe) for t in trained] != [
            bool(m) for m in out["assistant_masks"]
        ]:
            raise ValueError("the tokenizer's chat template marks other tokens than ChatML's assistant replies")


def uses_tools(messages: list[dict]) -> bool:
    """Whether a conversation has tools, tool calls or tool responses (its template must know the tool format)."""
    return bool(messages and messages[0].get("tools")) or any(
        m["role"] == "tool" or m.get("tool_calls") for m in messages
    )
