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

--llama_bench PATH (CPU): llama.cpp on the same random weights, at the same threads, beside our Engine. The model
is saved with a small trained tokenizer and exported with scripts/export_gguf.py (--gguf_types, default f32 = the
same bytes per token as our fp32, f16 and q8_0 = fewer) into a temp folder; `llama-bench -m FILE -p 0 -n
new_tokens -t threads -r repeats -o jsonl` decodes new_tokens tokens from an empty context; --llama_rounds runs of
each type, interleaved, show the spread. llama.cpp is timed by the wall clock (it has no CPU-time mode): each row
gives the load average and its CPU share (the child's CPU time over its wall time, loading included; near 1 with
one thread means it was rarely preempted). % of limit is against the fp32 limit and against the file's own bytes
(llama-bench's model_size) at the same memcpy rate, and against the fp32 weights at the rate of a read-only sum.
    python bench/bench_generate.py --devices cpu --threads 1 --batches 1 --prompt_lens 32 --limit --cpu_time \
        --llama_bench /path/to/llama.cpp/build/bin/llama-bench
"""

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: repo root on path

import torch  # noqa: E402

from model import SLMConfig, SLMForCausalLM  # noqa: E402
from model.engine import Engine  # noqa: E402
from model.quantize import weight_bytes  # noqa: E402
from model.runtime import resolve_dtype  # noqa: E402
from scripts.export_gguf import export_gguf  # noqa: E402
from trainer import train_tokenizer  # noqa: E402

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


def read_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes read per second by one large sum (best of repeats): a decode step only reads its weights, and one
    thread reads faster than it copies (a copy also writes), so this is the higher, truer batch-1 limit."""
    src = torch.ones(nbytes // 4)
    src.sum()
    return nbytes / min(timed(lambda: src.sum(), src.device) for _ in range(repeats))


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


def parse_llama_bench(text: str) -> dict:
    """The text-generation result of `llama-bench -o jsonl` (one JSON object per test; -p 0 leaves only the
    decode test): tokens/s (mean and standard deviation over its repetitions), the weights' bytes, the build."""
    tests = [json.loads(line) for line in text.splitlines() if line.strip()]
    gen = [t for t in tests if t["n_prompt"] == 0 and t["n_gen"] > 0]
    if len(gen) != 1:
        raise ValueError(f"expected one decode test (n_prompt 0, n_gen > 0) in llama-bench's output, got {len(gen)}")
    t = gen[0]
    return {
        "tok_s": t["avg_ts"],
        "sd": t["stddev_ts"],
        "bytes": t["model_size"],
        "threads": t["n_threads"],
        "build": f"{t['build_commit']} ({t['build_number']})",
    }


def export_gguf_files(model, folder: str, types: list[str]) -> dict:
    """model saved with a tokenizer trained on a few lines (export needs one; decode speed does not depend on it),
    then one GGUF file per type. Returns {type: path}."""
    corpus = os.path.join(folder, "corpus.jsonl")
    with open(corpus, "w", encoding="utf-8") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"北京是中国的首都 {i} the model learns to speak 模型学习说话。"}) + "\n")
    slm = os.path.join(folder, "slm")
    with contextlib.redirect_stdout(io.StringIO()):  # its report would land inside the table
        train_tokenizer.run(
            train_tokenizer.Config(
                data_path=corpus, vocab_size=300, out_dir=slm, min_frequency=1, heldout_every=10, seed=0
            )
        )
    model.save_pretrained(slm)
    return {t: export_gguf(slm, os.path.join(folder, f"model-{t}.gguf"), t) for t in types}


def run_llama_bench(exe: str, path: str, threads: int, new_tokens: int, repeats: int) -> dict:
    """One llama-bench decode run: parse_llama_bench's fields plus the load average and the child's CPU share."""
    cmd = [exe, "-m", path, "-p", "0", "-n", str(new_tokens), "-t", str(threads), "-r", str(repeats), "-o", "jsonl"]
    cpu0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    wall, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {**parse_llama_bench(out), "load": os.getloadavg()[0], "cpu_share": cpu / wall}


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
    parser.add_argument("--llama_bench", default="", help="CPU: path of llama.cpp's llama-bench to run beside ours")
    parser.add_argument("--gguf_types", nargs="+", default=["f32", "f16", "q8_0"], help="with --llama_bench")
    parser.add_argument("--llama_rounds", type=int, default=3, help="with --llama_bench: runs of each type")
    args = parser.parse_args()
    if args.llama_bench:
        args.limit = True  # llama.cpp's rows are read against the limit
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
                if batch == 1 and prompt_len == args.prompt_lens[0]:
                    ours_batch1 = o_tps
        if args.llama_bench and device.type == "cpu":
            print_llama_rows(args, model, limit, bandwidth, ours_batch1 if 1 in args.batches else None)


def print_llama_rows(args, model, limit: float, bandwidth: float, ours_tps):
    """llama.cpp beside our Engine (batch 1, same threads): a row per llama-bench run, rounds interleaved."""
    threads = torch.get_num_threads()
    read_limit = read_bandwidth() / weight_bytes(model)
    print(f"\nread-only limit: the fp32 weights at the rate of a 256 MiB sum = {read_limit:.1f} tok/s (batch 1)")
    print(f"llama.cpp: llama-bench -p 0 -n {args.new_tokens} -t {threads} -r {args.repeats}, wall clock")
    print(
        "| implementation | round | MB/token | decode tok/s | sd | CPU share | load avg | % of fp32 limit | "
        "% of own limit | % of fp32 read limit |"
    )
    print("|---" * 10 + "|")
    if ours_tps is not None:
        mb = weight_bytes(model) / 1e6
        print(
            f"| ours {str(next(model.parameters()).dtype)[6:]} (prompt {args.prompt_lens[0]}, "
            f"{'CPU time' if args.cpu_time else 'wall'}) | - | {mb:.1f} | {ours_tps:.1f} | | | | "
            f"{100 * ours_tps / limit:.0f}% | {100 * ours_tps / limit:.0f}% | {100 * ours_tps / read_limit:.0f}% |"
        )
    with tempfile.TemporaryDirectory() as folder:
        files = export_gguf_files(model, folder, args.gguf_types)
        build = None
        for r in range(args.llama_rounds):
            for gguf_type, path in files.items():
                res = run_llama_bench(args.llama_bench, path, threads, args.new_tokens, args.repeats)
                build = res["build"]
                own_limit = bandwidth / res["bytes"]
                print(
                    f"| llama.cpp {gguf_type} | {r + 1} | {res['bytes'] / 1e6:.1f} | {res['tok_s']:.1f} | "
                    f"{res['sd']:.1f} | {res['cpu_share']:.2f} | {res['load']:.1f} | {100 * res['tok_s'] / limit:.0f}% "
                    f"| {100 * res['tok_s'] / own_limit:.0f}% | {100 * res['tok_s'] / read_limit:.0f}% |",
                    flush=True,
                )
        print(f"llama.cpp build {build}")


if __name__ == "__main__":
    main()
