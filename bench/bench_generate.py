"""
Generation speed: our Engine vs transformers' generate() on the same weights, in the same run.

    python bench/bench_generate.py [--preset small] [--new_tokens 32] [--repeats 2]

For batch 1 and 8, prompts of 32 and 512 tokens, it reports time to first token (prefill + first sample) and decode
tokens/s (tokens after the first, summed over the batch, over the time after the first). Greedy, no early stop,
random weights (speed does not depend on them). CPU always, CUDA too when a GPU is present. Prints a markdown table.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: repo root on path

import torch  # noqa: E402

from model import SLMConfig, SLMForCausalLM  # noqa: E402
from model.engine import Engine  # noqa: E402
from model.runtime import resolve_dtype  # noqa: E402

# -----------------------------------------------------------------------------


class FakeTokenizer:
    """Just what Engine reads from a tokenizer when only ids go in and out."""

    pad_token_id, eos_token_id, unk_token_id = 3, 0, None

    def convert_tokens_to_ids(self, token):
        return 2  # <|im_end|>


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_pair(runs: dict, device, repeats: int, batch: int, new_tokens: int) -> dict:
    """runs maps a name to run(n), which generates n tokens. Returns {name: (TTFT ms, decode tokens/s)}, best of
    `repeats`. The implementations are timed in alternation, so a burst of load from other processes on a shared
    machine hits both rather than one of them."""
    ttft, total = {k: [] for k in runs}, {k: [] for k in runs}
    for run in runs.values():
        run(2)  # warm-up: allocator, kernels, lazy inits
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
    args = parser.parse_args()

    devices = [torch.device(d) for d in args.devices if d != "cuda" or torch.cuda.is_available()]
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, preset {args.preset}, "
        f"{args.new_tokens} new tokens, best of {args.repeats}"
    )
    print("| device | batch | prompt | ours TTFT ms | HF TTFT ms | ours decode tok/s | HF decode tok/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for device in devices:
        torch.manual_seed(0)
        dtype = resolve_dtype("auto", device)  # what the engine picks on this device
        model = SLMForCausalLM(SLMConfig.from_preset(args.preset)).to(device, dtype).eval()
        engine = Engine(model, FakeTokenizer(), device=device)
        for batch in (1, 8):
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
                print(
                    f"| {device.type} | {batch} | {prompt_len} | {o_ttft:.0f} | {h_ttft:.0f} | {o_tps:.0f} | "
                    f"{h_tps:.0f} | {o_tps / h_tps:.2f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
