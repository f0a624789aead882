"""
An OpenAI-compatible chat server for a Milli-Chat checkpoint, standard library only.

    python scripts/serve_api.py --model out/sft/run1/final [--adapter DIR] [--host 127.0.0.1] [--port 8000]
                                [--api_key KEY] [--allowed_hosts chat.example.org] [--max_queue 64 ...]
    python scripts/serve_api.py          # no --model: the newest finished model under out/ (a final/ folder)

Endpoints: POST /v1/chat/completions (plain JSON, or "stream": true as server-sent events ending with [DONE]),
GET /v1/models, and a one-page web chat at /. Tools: "tools" (tool_choice auto or none) go into the prompt in the
chat template's format (model/chat_format.py), and <tool_call> blocks in the reply come back as OpenAI tool_calls
with finish_reason "tool_calls" (streamed: the reply is held back and sent at its end). Any OpenAI client works:
    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything").chat.completions.create(...)

The server is the library package model/server/ (protocol, batching worker, HTTP layer; see its __init__.py); this
script parses the flags, loads the model and serves until Ctrl-C.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: repo root on path

from model.engine import add_engine_args, add_sampling_args, engine_from_args, sampling_from_args
from model.server.http import LOOPBACK_HOSTS, make_server
from model.server.protocol import add_limit_args, limits_from_args


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 = this machine only")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api_key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    parser.add_argument("--allowed_hosts", default="", help="comma-separated names clients may use besides loopback")
    add_sampling_args(parser)  # the defaults of a request that omits them, the same as the terminal chat's
    add_limit_args(parser)
    args = parser.parse_args()

    if args.host not in LOOPBACK_HOSTS and not args.api_key:
        print(f"warning: listening on {args.host} without --api_key: anyone who can reach it can use it")
    engine, model = engine_from_args(args)
    # The model's id (/v1/models, the web page): "sft/final" rather than the "final" every stage ends in.
    name = "/".join(os.path.normpath(os.path.abspath(model)).split(os.sep)[-2:])
    server = make_server(
        engine,
        args.host,
        args.port,
        args.api_key,
        name,
        sampling_from_args(args),
        limits=limits_from_args(args),
        allowed_hosts=tuple(args.allowed_hosts.split(",")),
    )
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
