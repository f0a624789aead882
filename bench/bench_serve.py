"""
Serving throughput: the API server with static batches vs serving one request at a time, in the same run.

    python bench/bench_serve.py [--model_config config/model/small.json] [--tokenizer out/tokenizer]
                                [--clients 1,8,32] [--requests_per_client 1] [--max_tokens 64] [--threads 1]

The server (model/server/http.py, in-process on a free loopback port) serves a random-weight model of the given
config with the trained tokenizer. For each number of concurrent clients, every client sends its requests one after
another (plain, non-streaming chat completions over real sockets, greedy, exactly max_tokens new tokens: stop tokens
are ignored so every answer has the same length). Reported per mode and client count: aggregate completion
tokens/s (all tokens over the wall time of the round) and the p50/p95 request latency. "serial" is the same server
with max_batch=1, i.e. one request at a time as before batching. CPU only. Prints a markdown table.
"""

import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: repo root on path

import torch
from transformers import AutoTokenizer

from model import SLMConfig, SLMForCausalLM
from model.engine import Engine
from model.server.http import make_server
from model.server.protocol import ServerLimits

# Distinct questions of different lengths, so the batches are left-padded as in real use.
QUESTIONS = [
    "你好，请介绍一下你自己。",
    "中国的首都是哪里？",
    "请用三句话解释什么是机器学习。",
    "今天天气怎么样？",
    "写一首关于春天的短诗。",
    "一年有几个季节？每个季节有什么特点？",
    "如何学习一门新的语言？",
    "请把这句话翻译成英文：我喜欢读书。",
    "为什么天空是蓝色的？",
    "推荐几本适合初学者的历史书。",
]

# -----------------------------------------------------------------------------


class FixedLengthEngine(Engine):
    """Ignores stop tokens, so every answer is exactly max_tokens long (random weights stop at random)."""

    def stream_batch(self, prompts, samplings):
        return super().stream_batch(prompts, [s.replace(stop_token_ids=()) for s in samplings])


def one_request(port: int, question: str, max_tokens: int) -> tuple[float, int]:
    body = json.dumps(
        {
            "model": "bench",
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
    ).encode()
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    reply = json.loads(resp.read())
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {reply}")
    return time.perf_counter() - t0, reply["usage"]["completion_tokens"]


def run_round(port: int, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    """clients threads, each sending requests_per_client requests in a row; tokens/s and latency percentiles."""
    latencies, tokens, errors = [], [], []
    lock = threading.Lock()

    def client(c: int):
        for r in range(requests_per_client):
            try:
                latency, n = one_request(port, QUESTIONS[(c * requests_per_client + r) % len(QUESTIONS)], max_tokens)
            except Exception as e:  # reported below; a benchmark with failed requests is not a result
                errors.append(e)
                return
            with lock:
                latencies.append(latency)
                tokens.append(n)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    q = statistics.quantiles(latencies, n=20, method="inclusive")  # q[9] = p50, q[18] = p95
    return {
        "tokens_per_s": sum(tokens) / wall,
        "p50_s": q[9],
        "p95_s": q[18],
        "requests": len(latencies),
        "wall_s": wall,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_config", default="config/model/small.json")
    parser.add_argument("--tokenizer", default="out/tokenizer")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests_per_client", type=int, default=1, help="one client always sends 2")
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 on a shared machine, where spinning OpenMP threads slow each other down",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not os.path.isfile(os.path.join(args.tokenizer, "tokenizer.json")):
        sys.exit(f"no tokenizer in {args.tokenizer}: train one first (python main.py --stage tokenizer ...)")

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    with open(args.model_config, encoding="utf-8") as f:
        cfg = SLMConfig(**{**json.load(f), "vocab_size": len(tokenizer)})
    torch.manual_seed(0)
    engine = FixedLengthEngine(SLMForCausalLM(cfg).eval(), tokenizer, device="cpu")
    counts = [int(c) for c in args.clients.split(",")]
    print(
        f"{args.model_config}, random weights, CPU ({torch.get_num_threads()} threads), greedy {args.max_tokens} "
        f"new tokens, {args.requests_per_client} requests per client (2 for one client)\n"
    )
    print("| mode | clients | requests | tokens/s | p50 latency s | p95 latency s | batches (size: count) |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for mode, max_batch in (("serial", 1), ("batched", max(counts))):
        limits = ServerLimits(max_batch=max_batch, max_queue=4 * max(counts), max_connections=4 * max(counts))
        server = make_server(engine, "127.0.0.1", 0, model_name="bench", quiet=True, limits=limits)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        try:
            one_request(port, QUESTIONS[0], 4)  # warm-up: the template check, allocator, kernels
            for clients in counts:
                server.worker.batch_sizes.clear()
                per_client = 2 if clients == 1 else args.requests_per_client
                r = run_round(port, clients, per_client, args.max_tokens)
                results[mode, clients] = r
                sizes = ", ".join(f"{k}: {v}" for k, v in sorted(server.worker.batch_sizes.items()))
                print(
                    f"| {mode} | {clients} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['p50_s']:.2f} | "
                    f"{r['p95_s']:.2f} | {sizes} |",
                    flush=True,
                )
        finally:
            server.shutdown()
            server.server_close()
            server.worker.stop()
    top = max(counts)
    base = results["batched", min(counts)]["tokens_per_s"]
    print(
        f"\nbatched, {top} clients vs 1: {results['batched', top]['tokens_per_s'] / base:.1f}x the tokens/s; "
        f"p95 {results['batched', top]['p95_s']:.2f} s vs serial {results['serial', top]['p95_s']:.2f} s"
    )


if __name__ == "__main__":
    main()
