"""
An OpenAI-compatible chat server for a Milli-Chat checkpoint, standard library only.

    python scripts/serve_api.py --model out/sft/run1/final [--adapter DIR] [--host 127.0.0.1] [--port 8000]
                                [--api_key KEY]

Endpoints: POST /v1/chat/completions (plain JSON, or "stream": true as server-sent events ending with [DONE]),
GET /v1/models, and a one-page web chat at /. Any OpenAI client works:
    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything").chat.completions.create(...)

Design: ThreadingHTTPServer gives each connection a thread that parses and answers; one worker thread owns the
model and runs requests one at a time from a queue, so two requests never share a KV cache. A client that
disconnects is noticed at the next write and its request is cancelled, which frees the worker at once. Plain
http.server is enough for a single-model server and keeps the dependencies at zero (FastAPI would add three).
"""

import argparse
import json
import os
import queue
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: repo root on path

from model.engine import CHAT_SAMPLING, Engine, SamplingParams
from scripts.chat_terminal import add_sampling_args, sampling_from_args

WEB_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web_chat.html")
ROLES = ("system", "user", "assistant")
MAX_BODY = 4 * 1024 * 1024  # bytes; a chat request is far smaller

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


def parse_chat_request(raw: bytes, defaults: SamplingParams) -> dict:
    """Validate a /v1/chat/completions body; returns messages, SamplingParams and stream options."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required and must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise ApiError(400, f"messages[{i}].role must be one of {list(ROLES)}, got {role!r}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        clean.append({"role": m["role"], "content": content})
    if clean[0]["role"] == "system" and any(m["role"] == "system" for m in clean[1:]) or \
            clean[-1]["role"] == "assistant":
        raise ApiError(400, "one optional system message first, and the last message must not be the assistant's",
                       "messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", defaults.max_new_tokens, 1, 1 << 20, True)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    sampling = defaults.replace(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", defaults.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", defaults.top_p, 0.0, 1.0),
        top_k=_number(body, "top_k", defaults.top_k, 0, 1 << 20, True),  # not OpenAI's, but common
        repetition_penalty=_number(body, "repetition_penalty", defaults.repetition_penalty, 0.01, 10.0),
        seed=_number(body, "seed", defaults.seed, -(1 << 63), (1 << 63) - 1, True),
        stop_strings=stop,
    )
    stream_options = body.get("stream_options") or {}
    return {"messages": clean, "sampling": sampling, "stream": bool(body.get("stream", False)),
            "include_usage": bool(stream_options.get("include_usage", False))}


# -----------------------------------------------------------------------------
# The worker: the only thread that touches the model


class Job:
    def __init__(self, prompt: list[int], sampling: SamplingParams):
        self.prompt, self.sampling = prompt, sampling
        self.events: queue.Queue = queue.Queue()  # ("piece", str) ..., then ("done", TextStream) or ("error", str)
        self.cancelled = threading.Event()


class Worker(threading.Thread):
    def __init__(self, engine):
        super().__init__(daemon=True, name="generation-worker")
        self.engine = engine
        self.jobs: queue.Queue = queue.Queue()

    def run(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return  # stop() was called
            if job.cancelled.is_set():
                continue  # the client left while queued
            try:
                stream = self.engine.stream(job.prompt, job.sampling)
                for piece in stream:
                    if job.cancelled.is_set():
                        break
                    job.events.put(("piece", piece))
                stream.close()
                job.events.put(("done", stream))
            except Exception as e:  # a bug must not kill the only worker
                job.events.put(("error", f"{type(e).__name__}: {e}"))

    def stop(self, timeout: float = 10.0):
        """Finish the current job, then exit (queued jobs are dropped)."""
        self.jobs.put(None)
        self.join(timeout)


# -----------------------------------------------------------------------------
# HTTP handler


class ChatHandler(BaseHTTPRequestHandler):
    server_version = "MilliChat/1.0"
    # Set on the subclass made by make_server: engine, worker, model_name, api_key, defaults.

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            super().log_message(fmt, *args)

    def _send_json(self, status: int, obj: dict):
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        key = self.server.api_key
        if key and self.headers.get("Authorization", "") != f"Bearer {key}":
            self._send_json(401, ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                          code="invalid_api_key").body())
            return False
        return True

    def do_GET(self):
        if self.path in ("/", "/index.html"):
            with open(WEB_PAGE, "rb") as f:
                data = f.read()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/v1/models":
            if self._authorised():
                self._send_json(200, {"object": "list", "data": [
                    {"id": self.server.model_name, "object": "model", "created": self.server.created,
                     "owned_by": "milli-chat"}]})
        else:
            self._send_json(404, ApiError(404, f"no route {self.path}", code="not_found").body())

    def do_POST(self):
        if self.path != "/v1/chat/completions":
            self._send_json(404, ApiError(404, f"no route {self.path}", code="not_found").body())
            return
        if not self._authorised():
            return
        try:
            length = int(self.headers.get("Content-Length", 0))
            if not 0 < length <= MAX_BODY:
                raise ApiError(400 if length <= 0 else 413, "missing or oversized request body")
            req = parse_chat_request(self.rfile.read(length), self.server.defaults)
            try:
                prompt = self.server.engine.chat_prompt(req["messages"], req["sampling"].max_new_tokens)
            except ValueError as e:
                raise ApiError(400, str(e), "messages", "context_length_exceeded") from None
        except ApiError as e:
            self._send_json(e.status, e.body())
            return
        job = Job(prompt, req["sampling"])
        self.server.worker.jobs.put(job)
        try:
            if req["stream"]:
                self._stream(job, req["include_usage"])
            else:
                self._complete(job)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            job.cancelled.set()  # the client is gone: stop generating for it

    def _common(self) -> dict:
        return {"id": self.request_id, "created": int(time.time()), "model": self.server.model_name}

    @staticmethod
    def _usage(stream) -> dict:
        return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens,
                "total_tokens": stream.prompt_tokens + stream.completion_tokens}

    def _complete(self, job: Job):
        self.request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        pieces = []
        while True:
            kind, value = job.events.get()
            if kind == "piece":
                pieces.append(value)
            elif kind == "error":
                self._send_json(500, ApiError(500, value).body())
                return
            else:
                break
        self._send_json(200, {**self._common(), "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "".join(pieces)}, "logprobs": None,
             "finish_reason": value.finish_reason}], "usage": self._usage(value)})

    def _stream(self, job: Job, include_usage: bool):
        self.request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()  # HTTP/1.0: closing the connection ends the body, no length needed

        def send(delta: dict, finish=None, usage=None, choices=True):
            chunk = {**self._common(), "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                     if choices else []}
            if usage is not None:
                chunk["usage"] = usage
            self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode("utf-8"))
            self.wfile.flush()

        send({"role": "assistant", "content": ""})
        while True:
            kind, value = job.events.get()
            if kind == "piece":
                send({"content": value})
            elif kind == "error":
                self.wfile.write(f"data: {json.dumps(ApiError(500, value).body())}\n\n".encode("utf-8"))
                break
            else:
                send({}, finish=value.finish_reason)
                if include_usage:
                    send({}, usage=self._usage(value), choices=False)
                break
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def make_server(engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                model_name: str = "milli-chat", defaults: SamplingParams = CHAT_SAMPLING, quiet: bool = False):
    """Build the server and start its worker; the caller runs serve_forever() (port 0 = any free port)."""
    server = ThreadingHTTPServer((host, port), ChatHandler)
    server.daemon_threads = True  # a stuck client never blocks shutdown
    server.engine, server.api_key, server.model_name, server.quiet = engine, api_key, model_name, quiet
    server.defaults = defaults  # what a request that sets nothing gets
    server.created = int(time.time())
    server.worker = Worker(engine)
    server.worker.start()
    return server


# -----------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory (save_pretrained output or Llama folder)")
    parser.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory, merged at load")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 = this machine only")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api_key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantize", default="none", choices=["none", "int8", "int4"],
                        help="weight-only quantization of the linear layers (CPU inference)")
    add_sampling_args(parser)  # the defaults of a request that omits them, the same as the terminal chat's
    args = parser.parse_args()

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host} without --api_key: anyone who can reach it can use it")
    engine = Engine.from_pretrained(args.model, adapter=args.adapter, device=args.device,
                                    quantize=args.quantize)
    name = os.path.basename(os.path.normpath(args.model))
    server = make_server(engine, args.host, args.port, args.api_key, name, sampling_from_args(args))
    host, port = server.server_address[:2]
    print(f"serving {name} on http://{host}:{port} (web chat at /, API at /v1) - Ctrl-C to stop")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.worker.stop()


if __name__ == "__main__":
    main()
