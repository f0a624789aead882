"""
The HTTP layer of the chat server: routes, streaming and the defences against hostile clients, on the standard
library's ThreadingHTTPServer. Each connection gets a thread (at most max_connections open at once) that reads,
checks and answers; the generation itself is the worker's (model/server/worker.py).

    server = make_server(engine, "127.0.0.1", 0, api_key="KEY")   # port 0: any free port; the worker is started
    server.serve_forever()                                        # then server.server_close(); server.worker.stop()

Routes: POST /v1/chat/completions (plain JSON, or "stream": true as server-sent events ending with [DONE]),
GET /v1/models, and a one-page web chat at / (model/server/web_chat.html). With tools the streamed reply is held
back and sent at its end (a <tool_call> block is only known to be one when it closes). A client that disconnects is
noticed within POLL_S, streaming or not, and its row of the batch stops. Plain http.server is enough for a
single-model server and keeps the dependencies at zero (FastAPI would add three).

Hostile clients: every limit of ServerLimits is on by default (the body size, the conversation before trimming,
the queue, the generation time, the read timeout, the connections). The connection cap cannot be taken by clients
that never send a whole request that passes the checks (Host, Origin, API key): when it is reached, the oldest such
"unchecked" connection of the client holding the most of them is closed to make room, so idle or trickling
connections never keep a checked request out; only when every open connection is being answered is a new one
refused (503 with Retry-After). Busy with checked requests, the server answers 429 with Retry-After (the queue).
Browsers: the Host header must be a loopback name or one given with --allowed_hosts (a DNS-rebinding page has a
foreign Host), an Origin header must name such a host (a foreign page cannot drive the API), and a POST must be
application/json (a form or text/plain POST needs no CORS preflight; JSON does, and we answer none).
"""

import hashlib
import hmac
import io
import json
import os
import queue
import re
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from base64 import b64encode
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from model.engine import CHAT_SAMPLING, SamplingParams
from model.server.protocol import ApiError, ServerLimits, parse_chat_request, tool_call_message
from model.server.worker import Job, Worker

WEB_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web_chat.html")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
POLL_S = 0.05  # how often a waiting handler checks that its client is still there

# -----------------------------------------------------------------------------
# Reading a request with a deadline


class ClientGone(Exception):
    pass


class DeadlineReader(io.RawIOBase):
    """The connection's bytes for the handler's rfile. Each recv waits at most per_read_s, and none goes past
    deadline (when set): a per-recv timeout alone lets a client that sends one byte in time hold the thread forever.
    The deadline covers the request line and headers, then the body (ChatHandler.handle_one_request, parse_request);
    past it a read raises TimeoutError, which closes the connection."""

    def __init__(self, sock: socket.socket, per_read_s: float):
        self.sock, self.per_read_s = sock, per_read_s
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        wait = self.per_read_s
        if self.deadline is not None:
            wait = min(wait, self.deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError("the client took longer than read_timeout_s to send its request")
        self.sock.settimeout(wait)
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.per_read_s)  # writes keep the plain per-operation timeout


# -----------------------------------------------------------------------------
# The handler: the checks every request passes, the routes, the answers (plain and streamed)


def _host_name(value: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'Example.org' -> 'example.org'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _page_csp(page: bytes) -> str:
    """A Content-Security-Policy that runs exactly the page's own inline script (by its hash) and talks only to
    this server: an injected script, a foreign script or a frame around the page are all refused."""
    scripts = re.findall(rb"<script>(.*?)</script>", page, re.DOTALL)
    hashes = " ".join(f"'sha256-{b64encode(hashlib.sha256(s).digest()).decode()}'" for s in scripts)
    return (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


class ChatHandler(BaseHTTPRequestHandler):
    server_version = "MilliChat/1.0"

    def setup(self):
        self.timeout = self.server.limits.read_timeout_s  # every read and write on the socket waits at most this
        super().setup()
        self.rfile.close()  # socketserver's plain socket file, replaced by one whose reads have a deadline
        self.reader = DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self.reader)

    def finish(self):
        """After an error answer to a body too large to read first: close our side for writing (the answer is
        whole), then read and drop what the client still sends, for at most read_timeout_s. Closing with its
        bytes unread would send a reset, and the client would see that instead of the 413."""
        super().finish()
        if not getattr(self, "linger", False):
            return
        deadline = time.monotonic() + self.server.limits.read_timeout_s
        try:
            self.connection.shutdown(socket.SHUT_WR)
            while (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not self.connection.recv(1 << 16):
                    break
        except OSError:
            pass

    def handle_one_request(self):
        self.reader.deadline = time.monotonic() + self.server.limits.read_timeout_s  # request line + headers
        super().handle_one_request()

    def parse_request(self) -> bool:
        ok = super().parse_request()  # reads the headers
        self.reader.deadline = time.monotonic() + self.server.limits.read_timeout_s  # the body has its own time
        return ok

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            super().log_message(fmt, *args)

    def send_response(self, code, message=None):
        self.responded = True  # from here on an error can no longer be answered with its own status
        super().send_response(code, message)

    def end_headers(self):
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        super().end_headers()

    def _send_json(self, status: int, obj: dict, headers: dict | None = None):
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, e: ApiError, headers: dict | None = None):
        self._send_json(e.status, e.body(), headers)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a bad request line, headers too long, an unknown method) in JSON too."""
        self.close_connection = True
        if not hasattr(self, "command"):
            self.command = None
        short = self.responses.get(code, ("error",))[0]
        try:
            self._send_error(ApiError(code, message or short))
        except OSError:
            pass

    # --- checks every request passes ----------------------------------------------------------------------

    def _check_origin(self):
        allowed = self.server.allowed_hosts
        host = self.headers.get("Host")
        if host is not None and _host_name(host) not in allowed:
            raise ApiError(
                403, f"Host {host!r} is not served here (start the server with --allowed_hosts)", code="forbidden_host"
            )
        origin = self.headers.get("Origin")
        if origin is not None:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or (parts.hostname or "") not in allowed:
                raise ApiError(403, f"requests from the page at {origin!r} are not allowed", code="forbidden_origin")

    def _check_key(self):
        key = self.server.api_key
        if not key:
            return
        scheme, _, token = self.headers.get("Authorization", "").strip().partition(" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")

    def _client_gone(self) -> bool:
        """The peer closed the connection (readable with nothing to read). Nothing is consumed."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # --- routes ---------------------------------------------------------------------------------------------

    def _answer(self, route):
        """route(); an error nobody expected (a bug) is answered with a JSON 500, not a silently closed socket,
        and its traceback goes to stderr (even when quiet)."""
        self.responded = False
        try:
            route()
        except (OSError, ClientGone):  # the client is gone or too slow: nobody to answer
            self.close_connection = True
        except Exception:
            self.close_connection = True
            sys.stderr.write(f"error while answering {self.requestline!r}:\n{traceback.format_exc()}")
            if not self.responded:
                try:
                    self._send_error(ApiError(500, "internal server error (logged by the server)", code="server_error"))
                except OSError:
                    pass

    def do_GET(self):
        self._answer(self._get)

    def do_POST(self):
        self._answer(self._post)

    def _get(self):
        try:
            self._check_origin()
            if self.path in ("/", "/index.html"):
                self.server.mark_checked(self.connection)
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(self.server.page)))
                self.send_header("Content-Security-Policy", self.server.page_csp)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(self.server.page)
            elif self.path == "/v1/models":
                self._check_key()
                self.server.mark_checked(self.connection)
                self._send_json(
                    200,
                    {
                        "object": "list",
                        "data": [
                            {
                                "id": self.server.model_name,
                                "object": "model",
                                "created": self.server.created,
                                "owned_by": "milli-chat",
                            }
                        ],
                    },
                )
            else:
                raise ApiError(404, f"no route {self.path}", code="not_found")
        except ApiError as e:
            self._send_error(e)

    do_HEAD = do_GET  # the same status and headers, no body (_send_json and the page skip it)

    def _not_allowed(self):
        self._drain_body()
        self.close_connection = True
        self._send_error(
            ApiError(405, f"{self.command} is not supported here", code="method_not_allowed"),
            {"Allow": "GET, HEAD, POST"},
        )

    do_OPTIONS = do_PUT = do_DELETE = do_PATCH = _not_allowed  # no CORS: a preflight gets no permission

    def _post(self):
        try:
            self._check_origin()
            if self.path != "/v1/chat/completions":
                raise ApiError(404, f"no route {self.path}", code="not_found")
            self._check_key()
            raw = self._read_body()
            self.server.mark_checked(self.connection)  # a whole request past the checks: no longer evictable
            req = parse_chat_request(raw, self.server.defaults, self.server.model_name)
            engine = self.server.engine
            try:
                prompt = engine.chat_prompt(
                    req["messages"], req["sampling"].max_new_tokens, self.server.limits.max_conversation_tokens
                )
            except ValueError as e:
                raise ApiError(400, str(e), "messages", "context_length_exceeded") from None
            except TypeError:  # the tokenizer refuses a string it cannot encode (parse_chat_request checks for them)
                raise ApiError(400, "the messages contain text that cannot be tokenized", "messages") from None
            sampling = req["sampling"].replace(
                max_new_tokens=min(req["sampling"].max_new_tokens, engine.max_context - len(prompt))
            )
            job = Job(prompt, sampling)
            if not self.server.worker.submit(job):
                raise ApiError(429, "the server is busy: too many requests are waiting", code="rate_limit_exceeded")
        except ApiError as e:
            self._drain_body()
            retry = {"Retry-After": str(self.server.limits.retry_after_s)} if e.status in (429, 503) else None
            self._send_error(e, retry)
            return
        except ClientGone:
            self.close_connection = True
            return
        try:
            if req["stream"]:
                self._stream(job, req["include_usage"], req["tools"])
            else:
                self._complete(job, req["tools"])
        except (BrokenPipeError, ConnectionResetError, TimeoutError, ClientGone):
            job.cancelled.set()  # the client is gone: stop generating for it
            self.close_connection = True

    # --- the body -------------------------------------------------------------------------------------------

    def _content_length(self) -> int:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # a chunked body we do not read would be taken for the next request
            raise ApiError(411, "send the body with a Content-Length (chunked bodies are not supported)")
        values = self.headers.get_all("Content-Length") or []
        if len({v.strip() for v in values}) > 1:  # which one frames the body? a proxy may pick the other (smuggling)
            self.close_connection = True
            raise ApiError(400, f"conflicting Content-Length headers: {', '.join(values)}")
        value = self.headers.get("Content-Length")
        if value is None or not value.strip().isascii() or not value.strip().isdigit():
            self.close_connection = True
            raise ApiError(400 if value is not None else 411, f"Content-Length must be a byte count, got {value!r}")
        return int(value)

    def _read_body(self) -> bytes:
        length = self._content_length()
        self._body_left = length
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}")
        limit = self.server.limits.max_body_bytes
        if length == 0:
            raise ApiError(400, "the request body is empty")
        if length > limit:
            raise ApiError(413, f"the request body is {length} bytes, more than the {limit} accepted")
        return self._read(length)

    def _read(self, n: int, keep: bool = True) -> bytes:
        """n body bytes, all by the reader's deadline (read_timeout_s after the headers): ClientGone otherwise."""
        parts = []
        while n > 0:
            try:
                chunk = self.rfile.read1(min(n, 1 << 16))
            except OSError:  # TimeoutError included
                raise ClientGone from None
            if not chunk:
                raise ClientGone
            n -= len(chunk)
            self._body_left -= len(chunk)
            if keep:
                parts.append(chunk)
        return b"".join(parts)

    def _drain_body(self):
        """Read and drop what is left of the body before an error answer, so the client, still sending, reads
        the answer instead of a reset connection. Up to drain_factor x max_body_bytes; beyond that we just close."""
        left = getattr(self, "_body_left", None)
        if left is None:
            try:
                left = self._content_length() if self.command in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS") else 0
            except ApiError:
                left = 0
        self._body_left = 0
        if left > self.server.limits.drain_factor * self.server.limits.max_body_bytes:
            self.close_connection = True
            self.linger = True  # not read here: finish() reads and drops it after the answer, for a while
            return
        if left > 0:
            try:
                self._body_left = left
                self._read(left, keep=False)
            except ClientGone:
                pass
        self.close_connection = True  # after an error the connection is not reused

    # --- answers --------------------------------------------------------------------------------------------

    def _events(self, job: Job):
        """The job's events as they come; a client that leaves meanwhile raises ClientGone. Its connection is
        looked at every POLL_S of wall time whether pieces come or not: pieces faster than POLL_S must not hide a
        client that left (plain requests write nothing until the end, so only this notices)."""
        next_check = time.monotonic() + POLL_S
        while True:
            try:
                kind, value = job.events.get(timeout=POLL_S)
            except queue.Empty:
                kind = value = None
            if time.monotonic() >= next_check:
                if self._client_gone():
                    raise ClientGone
                next_check = time.monotonic() + POLL_S
            if kind is None:
                if not self.server.worker.is_alive():
                    yield "error", "the generation worker has stopped"
                    return
                continue
            yield kind, value
            if kind != "piece":
                return

    def _common(self) -> dict:
        return {"id": self.request_id, "created": int(time.time()), "model": self.server.model_name}

    @staticmethod
    def _usage(stream) -> dict:
        return {
            "prompt_tokens": stream.prompt_tokens,
            "completion_tokens": stream.completion_tokens,
            "total_tokens": stream.prompt_tokens + stream.completion_tokens,
        }

    def _complete(self, job: Job, tools: bool = False):
        self.request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        pieces = []
        for kind, value in self._events(job):
            if kind == "piece":
                pieces.append(value)
            elif kind == "error":
                self._send_error(ApiError(500, value))
                return
        message, finish = (
            tool_call_message("".join(pieces)) if tools else ({"role": "assistant", "content": "".join(pieces)}, None)
        )
        self._send_json(
            200,
            {
                **self._common(),
                "object": "chat.completion",
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": finish or value.finish_reason}
                ],
                "usage": self._usage(value),
            },
        )

    def _stream(self, job: Job, include_usage: bool, tools: bool = False):
        """Server-sent chunks as tokens come. With tools the reply is held back until it ends (a <tool_call> block
        is only known to be one when it closes), then sent as one content or tool_calls delta."""
        self.request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()  # HTTP/1.0: closing the connection ends the body, no length needed

        def send(delta: dict, finish=None, usage=None, choices=True):
            chunk = {
                **self._common(),
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else [],
            }
            if usage is not None:
                chunk["usage"] = usage
            self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
            self.wfile.flush()

        send({"role": "assistant", "content": ""})
        held = []
        for kind, value in self._events(job):
            if kind == "piece" and tools:
                held.append(value)
            elif kind == "piece":
                send({"content": value})
            elif kind == "error":
                self.wfile.write(f"data: {json.dumps(ApiError(500, value).body())}\n\n".encode())
            else:
                finish = None
                if tools:
                    message, finish = tool_call_message("".join(held))
                    calls = [{"index": k, **c} for k, c in enumerate(message.get("tool_calls", []))]
                    send({"content": message["content"], **({"tool_calls": calls} if calls else {})})
                send({}, finish=finish or value.finish_reason)
                if include_usage:
                    send({}, usage=self._usage(value), choices=False)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


# -----------------------------------------------------------------------------
# The server: a connection cap that clients which never send a checked request cannot take


class ChatServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on the connections open at once (each holds a thread), which clients that
    never send a checked request cannot take (see the module docstring)."""

    daemon_threads = True  # a stuck client never blocks shutdown
    block_on_close = False

    def __init__(self, address, handler, limits: ServerLimits):
        self.limits = limits
        self.open_lock = threading.Lock()
        self.open: dict[socket.socket, list] = {}  # connection -> [client address, checked], oldest first
        self.evicted = 0  # unchecked connections closed to make room (tests, benchmarks)
        # The listen backlog (socketserver's default is 5): clients connecting at once wait to be accepted
        # instead of being reset.
        self.request_queue_size = max(128, limits.max_connections)
        super().__init__(address, handler)

    def mark_checked(self, connection: socket.socket) -> None:
        """The connection's request is whole and passed the checks: it is served, never closed to make room."""
        with self.open_lock:
            if connection in self.open:
                self.open[connection][1] = True

    def _make_room(self) -> bool:
        """Close the oldest unchecked connection of the client that holds the most unchecked ones (a per-client
        share: one client's flood of idle connections is what gets closed, not another's new request). False when
        every open connection is checked. Called with open_lock held."""
        unchecked = [(conn, host) for conn, (host, checked) in self.open.items() if not checked]
        if not unchecked:
            return False
        per_client = Counter(host for _, host in unchecked)
        most = max(per_client.values())
        victim = next(conn for conn, host in unchecked if per_client[host] == most)
        del self.open[victim]
        self.evicted += 1
        try:
            victim.shutdown(socket.SHUT_RDWR)  # its handler's read returns at once and the thread ends
        except OSError:
            pass
        return True

    def process_request(self, request, client_address):
        with self.open_lock:
            room = len(self.open) < self.limits.max_connections or self._make_room()
            if room:
                self.open[request] = [client_address[0] if client_address else "", False]
        if not room:
            body = json.dumps(ApiError(503, "too many connections", code="server_busy").body()).encode()
            try:
                request.settimeout(1.0)
                request.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Retry-After: %d\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (self.limits.retry_after_s, len(body), body)
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._forget(request)
            raise

    def _forget(self, request) -> None:
        with self.open_lock:
            self.open.pop(request, None)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)


def make_server(
    engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str = "milli-chat",
    defaults: SamplingParams = CHAT_SAMPLING,
    quiet: bool = False,
    limits: ServerLimits | None = None,
    allowed_hosts: tuple[str, ...] = (),
) -> ChatServer:
    """Build the server and start its worker; the caller runs serve_forever() (port 0 = any free port).
    allowed_hosts: names besides the loopback ones (and the bound address) that Host and Origin may carry."""
    limits = limits or ServerLimits()
    server = ChatServer((host, port), ChatHandler, limits)
    server.engine, server.api_key, server.model_name, server.quiet = engine, api_key, model_name, quiet
    server.defaults = defaults  # what a request that sets nothing gets
    bound = () if host in ("", "0.0.0.0", "::") else (host.lower(),)
    server.allowed_hosts = {*LOOPBACK_HOSTS, *bound, *(h.strip().lower() for h in allowed_hosts if h.strip())}
    with open(WEB_PAGE, "rb") as f:
        server.page = f.read()
    server.page_csp = _page_csp(server.page)
    server.created = int(time.time())
    server.worker = Worker(engine, limits)
    server.worker.start()
    return server
