"""
Generation speed: our Engine vs transformers' generate() on the same weights, in the same run.

    python bench/bench_generate.py [--preset small] [--new_tokens 32] [--repeats 2]
    python bench/bench_generate.py --devices cpu --threads 1 --batches 1 --limit [--cpu_time] [--compile]
    python bench/bench_generate.py --devices cuda --batches 1 --prompt_lens 32 512   # on a GPU (compiled step)

For each batch and prompt length it reports time to first token (prefill + first sample) and decode tokens/s
(tokens after the first, summed over the batch, over the time after the first). Greedy, no early stop, random
weights (speed does not depend on them). On CUDA the Engine runs its compiled step (one CUDA graph per token);
the warm-up compiles it. Prints a markdown table.

--limit (CPU): the memory-bandwidth limit of batch-1 decode, the weights' bytes read once per token at the rate
one memcpy of 256 MiB runs here (bytes copied per second, the same threads), and each implementation's share of it.
--cpu_time: time with the thread's CPU time instead of the wall clock (one thread only), for a machine shared with
other jobs, where the wall clock measures the scheduler more than the code.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: repo root on path

import torch  # noqa: E402

from model import SLMConfig, SLMForCausalLM  # noqa: E402
from model.engine import Engine  # noqa: E402
from model.quantize import weight_bytes  # noqa: E402
from model.runtime import resolve_dtype  # noqa: E402

# -----------------------------------------------------------------------------


class FakeTokenizer:
    """Just what Engine reads from a tokenizer when only ids go in and out."""

    pad_token_id, eos_token_id, unk_token_id = 3, 0, None

    def convert_tokens_to_ids(self, token):
        return 2  # <|im_end|>


CLOCK = time.perf_counter  # --cpu_time: time.thread_time


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = CLOCK()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return CLOCK() - t0


def memcpy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes copied per second by one large tensor copy (best of repeats), with torch's current threads."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages
    return nbytes / min(timed(lambda: dst.copy_(src), src.device) for _ in range(repeats))


def bench_pair(runs: dict, device, repeats: int, batch: int, new_tokens: int) -> dict:
    """runs maps a name to run(n), which generates n tokens. Returns {name: (TTFT ms, decode tokens/s)}, best of
    `repeats`. The implementations are timed in alternation, so a burst of load from other processes on a shared
    machine hits both rather than one of them."""
    ttft, total = {k: [] for k in runs}, {k: [] for k in runs}
    for run in runs.values():
        for _ in range(2):
            run(4)  # warm-up: allocator, kernels, lazy inits; a compiled step compiles and records its graph
    for _ in range(repeats):
        for name, run in runs.items():
            ttft[name].append(timed(lambda: run(1), device))
            total[name].append(timed(lambda: run(new_tokens), device))
    return {k: (1000 * min(ttft[k]), batch * (new_tokens - 1) / max(min(total[k]) - min(ttft[k]), 1e-9)) for k in runs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompt_lens", type=int, nargs="+", default=[32, 512])
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cuda rows only where there is a GPU")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0 = torch's default)")
    parser.add_argument("--dtype", default="auto", help="auto = what the engine picks on the device; or fp32, bf16")
    parser.add_argument("--compile", action="store_true", help="the Engine's compiled step on the CPU too")
    parser.add_argument("--limit", action="store_true", help="CPU: add the memory-bandwidth limit of batch 1")
    parser.add_argument("--cpu_time", action="store_true", help="time with thread CPU time (needs --threads 1)")
    args = parser.parse_args()
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        if torch.get_num_threads() != 1:
            parser.error("--cpu_time counts one thread's time: pass --threads 1")
        CLOCK = time.thread_time

    devices = [torch.device(d) for d in args.devices if d != "cuda" or torch.cuda.is_available()]
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, preset {args.preset}, "
        f"{args.new_tokens} new tokens, best of {args.repeats}, "
        f"clock {'thread CPU time' if args.cpu_time else 'wall'}, load average {os.getloadavg()[0]:.1f}"
    )
    header = "| device | batch | prompt | ours TTFT ms | HF TTFT ms | ours decode tok/s | HF decode tok/s | speed-up |"
    print(header + (" ours % of limit | HF % of limit |" if args.limit else ""))
    print("|---" * (8 + 2 * args.limit) + "|")
    for device in devices:
        torch.manual_seed(0)
        dtype = resolve_dtype(args.dtype, device)  # auto: what the engine picks on this device
        model = SLMForCausalLM(SLMConfig.from_preset(args.preset)).to(device, dtype).eval()
        engine = Engine(model, FakeTokenizer(), device=device, compile=True if args.compile else None)
        limit = None
        if args.limit and device.type == "cpu":
            bandwidth, nbytes = memcpy_bandwidth(), weight_bytes(model)
            limit = bandwidth / nbytes
            print(
                f"limit: {nbytes / 1e6:.1f} MB of weights per token at memcpy {bandwidth / 1e9:.2f} GB/s "
                f"= {limit:.1f} tok/s (batch 1)"
            )
        for batch in args.batches:
            for prompt_len in args.prompt_lens:
                prompts = torch.randint(4, model.config.vocab_size, (batch, prompt_len))
                ids = prompts.to(device)

                def ours(n):
                    engine.generate(prompts.tolist(), max_new_tokens=n, stop_token_ids=[])

                def hf(n):
                    with torch.inference_mode():
                        model.generate(
                            ids,
                            attention_mask=torch.ones_like(ids),
                            max_new_tokens=n,
                            min_new_tokens=n,
                            do_sample=False,
                            pad_token_id=3,
                        )

                res = bench_pair({"ours": ours, "hf": hf}, device, args.repeats, batch, args.new_tokens)
                (o_ttft, o_tps), (h_ttft, h_tps) = res["ours"], res["hf"]
                share = ""
                if limit is not None:
                    share = f" {100 * o_tps / batch / limit:.0f}% | {100 * h_tps / batch / limit:.0f}% |"
                print(
                    f"| {device.type} | {batch} | {prompt_len} | {o_ttft:.0f} | {h_ttft:.0f} | {o_tps:.1f} | "
                    f"{h_tps:.1f} | {o_tps / h_tps:.2f}x |" + share,
                    flush=True,
                )


if __name__ == "__main__":
    main()
