"""
Training throughput: our SLM against transformers' LlamaForCausalLM of the same dimensions, in the same run.

    python bench/bench_train.py                                  # CPU: small preset, short sequences
    python bench/bench_train.py --presets small base --seq_len 512 --batch 32 128 --compile both   # on a GPU

For each preset, micro-batch and compile setting it times full training steps (forward, backward, AdamW; bf16
autocast and fused AdamW on CUDA, fp32 on CPU) on random tokens, after warm-up steps, and prints tokens/s, MFU
(CUDA: 6N + attention FLOPs per token over the GPU's dense bf16 peak), peak memory, and the ratio to the Llama
baseline measured in the same run. Same weights shape, same batch, same dtype for both models.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: repo root on path

import torch  # noqa: E402

from model import SLMConfig, SLMForCausalLM  # noqa: E402
from scripts.export_llama import slm_to_llama_config  # noqa: E402
from trainer.core import flops_per_token, gpu_peak_flops  # noqa: E402


def build(kind: str, preset: str, device):
    config = SLMConfig.from_preset(preset)
    if kind == "slm":
        model = SLMForCausalLM(config)
    else:
        from transformers import LlamaForCausalLM

        llama_config = slm_to_llama_config(config)
        llama_config._attn_implementation = "sdpa"
        model = LlamaForCausalLM(llama_config)
    return model.to(device)


def time_steps(model, batch: int, seq_len: int, steps: int, warmup: int, device, dtype, compile_model: bool):
    torch.manual_seed(0)
    vocab = model.config.vocab_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if compile_model else model
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]

    def one_step():
        with autocast:
            logits = step_model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), y.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return batch * seq_len * steps / elapsed, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small"])
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating timing rounds; the best of each is kept")
    parser.add_argument("--compile", choices=["no", "yes", "both"], default="no")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak_flops = gpu_peak_flops(device)
    compiles = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name} | dtype {str(dtype).replace('torch.', '')} | seq_len {args.seq_len} | "
          f"{args.steps} timed steps after {args.warmup} warm-up | best of {args.rounds} alternating rounds")
    print(f"{'preset':<7} {'batch':>5} {'compile':>7} {'model':<6} {'tok/s':>12} {'MFU':>7} {'peak GiB':>8} {'vs llama':>8}")
    for preset in args.presets:
        for batch in args.batch:
            for compile_model in compiles:
                # Alternate baseline and ours for several rounds and keep each one's best: on a shared machine
                # a single timing swings by 10%, more than the difference we are measuring.
                best = {"llama": (0.0, 0.0), "slm": (0.0, 0.0)}
                for _ in range(args.rounds):
                    for kind in ("llama", "slm"):
                        model = build(kind, preset, device)
                        tok_s, peak = time_steps(model, batch, args.seq_len, args.steps, args.warmup, device, dtype,
                                                 compile_model)
                        best[kind] = max(best[kind], (tok_s, peak))
                        del model
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                fpt = flops_per_token(build("slm", preset, "meta"), args.seq_len)  # same dims: same FLOPs for both
                for kind in ("llama", "slm"):
                    tok_s, peak = best[kind]
                    mfu = f"{100 * fpt * tok_s / peak_flops:.1f}%" if peak_flops else "-"
                    print(f"{preset:<7} {batch:>5} {str(compile_model):>7} {kind:<6} {tok_s:>12,.0f} {mfu:>7} "
                          f"{peak:>8.2f} {tok_s / best['llama'][0]:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
