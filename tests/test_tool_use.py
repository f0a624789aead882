"""
Tool use end to end: a tiny model fine-tuned (trainer/sft.py) on OpenAI tool records learns to call get_weather,
and the server (model/server/http.py) hands the call to the official openai client as tool_calls, plain and streamed.

    python -m pytest tests/test_tool_use.py
"""

import json
import threading

import pytest

pytestmark = pytest.mark.slow  # subprocesses and fresh interpreters: seconds each

openai = pytest.importorskip("openai")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "查询城市的天气",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CITIES = ["北京", "上海", "广州", "深圳"]


def weather_record(city: str) -> dict:
    """One OpenAI fine-tuning record: the user asks, the assistant calls the tool (arguments as JSON text, as OpenAI
    writes them), the tool answers, the assistant replies."""
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city}, ensure_ascii=False)},
    }
    return {
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": f"{city}的天气怎么样？"}]},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "晴，20度"},
            {"role": "assistant", "content": f"{city}今天晴，20度。"},
        ],
    }


@pytest.fixture(scope="module")
def served(tiny_tokenizer_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    from model.engine import Engine
    from model.server.http import make_server
    from tests.helpers import fine_tune, tiny_model

    root = tmp_path_factory.mktemp("tools")
    base = str(root / "base")  # a random tiny model; 1024 positions, as the tools block alone is ~500 tokens here
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tiny_model(len(tok), num_hidden_layers=2, max_position_embeddings=1024).save_pretrained(base)
    tok.save_pretrained(base)
    data = root / "weather.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(weather_record(city), ensure_ascii=False) + "\n" for city in CITIES)
    final = fine_tune(base, data, root / "sft", seq_len=768, batch=4, max_steps=80)
    engine = Engine.from_pretrained(final, device="cpu")
    server = make_server(engine, "127.0.0.1", 0, model_name="tiny", quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    yield openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="x", timeout=60, max_retries=0)
    server.shutdown()
    server.server_close()
    server.worker.stop()


def ask(city: str) -> list[dict]:
    return [{"role": "user", "content": f"{city}的天气怎么样？"}]


@pytest.mark.parametrize("city", ["北京", "深圳"])
def test_learned_tool_call_comes_back_as_tool_calls(served, city):
    r = served.chat.completions.create(model="tiny", messages=ask(city), tools=TOOLS, temperature=0, max_tokens=128)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": city}


def test_tool_result_turn_then_the_learned_answer(served):
    """The client sends the call and the tool's answer back; the model answers in text (finish_reason stop)."""
    first = (
        served.chat.completions.create(model="tiny", messages=ask("北京"), tools=TOOLS, temperature=0, max_tokens=128)
        .choices[0]
        .message
    )
    assert first.tool_calls, first.content
    messages = ask("北京") + [
        first.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "晴，20度"},
    ]
    r = served.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0, max_tokens=128)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == "北京今天晴，20度。"
    assert not r.choices[0].message.tool_calls


def test_streamed_tool_call(served):
    chunks = list(
        served.chat.completions.create(
            model="tiny", messages=ask("深圳"), tools=TOOLS, temperature=0, max_tokens=128, stream=True
        )
    )
    calls = [c for ch in chunks for c in (ch.choices[0].delta.tool_calls or [])] if chunks else []
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == {"city": "深圳"}


def test_tool_choice_none_gives_no_tools_and_plain_text(served):
    r = served.chat.completions.create(
        model="tiny", messages=ask("北京"), tools=TOOLS, tool_choice="none", temperature=0, max_tokens=16
    )
    assert r.choices[0].finish_reason in ("stop", "length") and not r.choices[0].message.tool_calls
    with pytest.raises(openai.BadRequestError):
        served.chat.completions.create(model="tiny", messages=ask("北京"), tools=TOOLS, tool_choice="required")
