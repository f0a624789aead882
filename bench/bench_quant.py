"""
Weight-only quantization: decode speed, weight memory and perplexity of fp32 vs int8 vs int4, in one run.

    python bench/bench_quant.py [--model DIR | --preset small] [--tokenizer DIR] [--text FILE] [--new_tokens 32]

Without --model, the preset is built with random weights (speed does not depend on them; the perplexity change
then only shows how far quantization moves the logits, not quality). Decode tokens/s is the engine's batch-1
greedy decode (prefill excluded, best of --repeats); perplexity is over the same --ppl_tokens tokens of --text
for every variant. Prints a markdown table.
"""

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: repo root on path

import torch  # noqa: E402

from model import SLMConfig, SLMForCausalLM  # noqa: E402
from model.engine import Engine  # noqa: E402
from model.quantize import quantize_model, weight_bytes  # noqa: E402
from trainer.eval import perplexity, ppl_windows  # noqa: E402

FALLBACK_TEXT = (
    "人工智能是计算机科学的一个分支，它企图了解智能的实质，"
    "并生产出一种新的能以人类智能相似的方式做出反应的智能机器。"
    "北京是中华人民共和国的首都，是全国的政治中心、文化中心。"
    "The quick brown fox jumps over the lazy dog. "
)


def decode_tokens_per_s(engine, prompt: list[int], new_tokens: int, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        stream = engine.stream(prompt, max_new_tokens=new_tokens, stop_token_ids=[])
        for _ in stream:
            pass
        best = max(best, stream.tokens_per_s)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="checkpoint dir; default: --preset with random weights")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--tokenizer", default="out/tokenizer", help="used with --preset")
    parser.add_argument("--text", default="", help="text/JSONL file for perplexity (default: a built-in paragraph)")
    parser.add_argument("--ppl_tokens", type=int, default=8192)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    if args.model:
        base = SLMForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(args.model)
        weights = f"trained weights from {args.model}"
    else:
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
        torch.manual_seed(0)
        base = SLMForCausalLM(SLMConfig.from_preset(args.preset, vocab_size=len(tok))).eval()
        weights = f"{args.preset} preset, random weights"
    if args.text:
        windows = ppl_windows(args.text, tok, args.seq_len, args.ppl_tokens)
    else:
        ids = tok.encode(FALLBACK_TEXT * (1 + args.ppl_tokens // len(tok.encode(FALLBACK_TEXT))))
        n = len(ids) // (args.seq_len + 1)
        windows = torch.tensor(ids[: n * (args.seq_len + 1)]).view(n, args.seq_len + 1)
    prompt = tok.encode("人工智能是")
    params = sum(p.numel() for p in base.parameters())
    print(
        f"{weights}: {params / 1e6:.1f}M parameters | {windows.numel():,} ppl tokens | torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| weights | weight MiB | decode tok/s | ppl | ppl change |")
    print("|---|---|---|---|---|")
    ref_ppl = None
    for mode in ("none", "int8", "int4"):
        model = quantize_model(copy.deepcopy(base), mode)
        engine = Engine(model, tok, device="cpu")
        t0 = time.perf_counter()
        with torch.no_grad():
            ppl = perplexity(model, tok, windows, 4, "cpu")["ppl"]
        ppl_s = time.perf_counter() - t0
        speed = decode_tokens_per_s(engine, prompt, args.new_tokens, args.repeats)
        ref_ppl = ref_ppl or ppl
        label = "fp32" if mode == "none" else mode
        print(
            f"| {label} | {weight_bytes(model) / 2**20:.1f} | {speed:.1f} | {ppl:.3f} | "
            f"{100 * (ppl / ref_ppl - 1):+.2f}% | ",
            f"(ppl pass {ppl_s:.1f}s)",
            file=sys.stdout,
        )


if __name__ == "__main__":
    main()
