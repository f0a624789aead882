"""Milli-Chat's OpenAI-compatible chat server on the standard library's http.server (no web framework);
scripts/serve_api.py is its command line.

    protocol.py  what the server speaks: the request checked into messages + SamplingParams, OpenAI's errors and
                 tool_calls, the limits a client meets (ServerLimits)
    worker.py    the one thread that owns the model: waiting requests generated together as static batches
    http.py      routes, streaming and the defences against hostile clients; make_server builds it all

It serves the inference engine beside it (model/engine.py) and checks tools with the chat format's own checks
(model/chat_format.py), the ones training records pass. Layering (tests/test_layering.py): like all of model/ it
imports nothing from dataset/, trainer/ or an entry point, and of the libraries only scripts (and tests, bench) use it.
"""
