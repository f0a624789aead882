"""model/server/web_chat.html's chat logic, run under node with a fake page and a fake streaming server (issue 27.3,
issue 24.8): one reply at a time, a stop button that keeps what was shown, the model name, and a tool call shown and
kept in the history. Skipped where node is not installed."""

import json
import shutil
import subprocess

import pytest

from tests.helpers import ROOT

NODE = shutil.which("node")


@pytest.fixture(scope="module")
def run():
    if NODE is None:
        pytest.skip("node is not installed")
    proc = subprocess.run(
        [NODE, str(ROOT / "tests" / "web_chat_driver.js"), str(ROOT / "model" / "server" / "web_chat.html")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_no_second_send_while_a_reply_streams(run):
    assert run["busyWhileStreaming"] and run["secondSendAccepted"] is False and run["requestsWhileStreaming"] == 1
    assert run["buttonsWhileStreaming"] == {"send": True, "stop": False}


def test_stop_ends_the_reply_and_keeps_what_was_shown(run):
    after = run["afterStop"]
    assert after["busy"] is False and after["buttons"] == {"send": False, "stop": True}
    assert after["history"] == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你"}]
    assert ["meta", "（已停止 stopped）"] in run["bubbles"]


def test_model_name_is_shown(run):
    assert run["model"] == "final"


def test_tool_call_is_sent_shown_and_kept(run):
    request = run["secondRequest"]
    assert request["tools"][0]["function"]["name"] == "get_weather"
    assert [m["role"] for m in request["messages"]] == ["user", "assistant", "user"]
    call = {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}
    assert run["history"][-1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert ["tool", '调用工具 tool call:\n🔧 get_weather({"city": "北京"})'] in run["bubbles"]
    assert any(role == "meta" and "7 tokens" in text for role, text in run["bubbles"])


def test_page_speaks_chinese():
    page = (ROOT / "model" / "server" / "web_chat.html").read_text(encoding="utf-8")
    for label in ("发送", "停止", "设置", "清空对话"):
        assert label in page
