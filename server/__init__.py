"""Milli-Chat's OpenAI-compatible chat server, standard library only; scripts/serve_api.py is its command line.

    protocol.py  what the server speaks: the request checked into messages + SamplingParams, OpenAI's errors and
                 tool_calls, the limits a client meets (ServerLimits)
    worker.py    the one thread that owns the model: waiting requests generated together as static batches
    http.py      routes, streaming and the defences against hostile clients; make_server builds it all

Layering (tests/test_layering.py): server/ imports model/ and dataset/ (the record checks tools share with
training), never trainer/ or an entry point; nothing below it imports it.
"""
