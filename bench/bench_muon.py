"""
What Muon's optimizer step costs, beside AdamW's step and beside the forward+backward it follows (issue 21).

    python bench/bench_muon.py                       # CPU, 1 thread, small preset: ~3 minutes
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/bench_muon.py    # as a CPU without native bf16
    python bench/bench_muon.py --torch_muon          # also torch.optim.Muon (the step before issue 21)
    python bench/bench_muon.py --recipe_model        # also whole training steps of bench_recipe.py's model
    python bench/bench_muon.py --device cuda --threads 0

Timed, side by side in one process and interleaved (repeat after repeat, the median kept), on the `small` preset in
fp32 (the CPU's training dtype) with random gradients, each optimizer built by trainer/optim.build_optimizer and
driven as the Trainer's StepGuard drives it (a device-side skip flag set):
    adamw       optimizer=adamw: fused AdamW on every parameter
    muon        optimizer=muon: BatchedMuon on the hidden matrices (Newton-Schulz in the dtype the runtime policy
                picks for this device, model/runtime.newton_schulz_dtype; --ns_dtype overrides it) + fused AdamW
    torch_muon  torch.optim.Muon (one matrix at a time, Newton-Schulz always in bf16) on the first
                --torch_muon_layers layers' matrices, scaled to all layers; without the AdamW half
    fwd+bwd     forward and backward of --batch x --seq_len tokens, scaled to the recipe's 64 x 512 tokens per
                optimizer step (config/pretrain.yaml's global_batch_size x seq_len): fewer tokens keep the run
                short, and the cost per token of a fixed sequence length does not depend on the batch
Printed: each time, Muon's step as a multiple of AdamW's and as a share of a recipe step (forward+backward of 64 x
512 tokens plus the optimizer step), and the device facts the dtype choice reads, with a measured bf16-vs-fp32
matmul speed that shows whether this CPU multiplies bf16 natively.

To measure a CPU without native bf16 on one that has it, cap both oneDNN and ATen at AVX2 (the environment above):
bf16 matmuls then take oneDNN's emulated path, and torch reports the capability the dtype policy reads as AVX2.

--recipe_model: whole training steps (forward, backward, optimizer) of bench/bench_recipe.py's model (hidden 256,
4 layers, vocab 6400, 8 x 256 tokens), optimizer=muon against optimizer=adamw: what the README's "a Muon step costs
~1.1x an AdamW step" compares.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run directly: repo root importable

import argparse
import platform
import statistics
import time

import torch
import transformers

from bench.bench_recipe import SIZES
from model import SLMConfig, SLMForCausalLM
from model.runtime import (
    CPU_BF16_FLAGS,
    cpu_flags,
    dtype_from_name,
    dtype_name,
    newton_schulz_dtype_for,
    resolve_device,
)
from trainer.config import TrainConfig
from trainer.optim import build_optimizer, is_hidden_matrix

RECIPE_TOKENS = 64 * 512  # config/pretrain.yaml: global_batch_size 64 x seq_len 512


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(fns: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds of each fn, run in turns (one warm-up call each first), so that a neighbour's load on a shared
    machine falls on all of them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def matmul_gflops(dtype: torch.dtype, device: torch.device) -> float:
    """GFLOP/s of one (512 x 1408) @ (1408 x 512) matmul in `dtype`: small's MLP shape."""
    a = torch.randn(512, 1408, device=device).to(dtype)
    b = torch.randn(1408, 512, device=device).to(dtype)
    seconds = min(timed(lambda: a @ b, device) for _ in range(3))
    return 2 * 512 * 1408 * 512 / seconds / 1e9


def optimizer_step(optimizer: torch.optim.Optimizer, device: torch.device):
    """One step as the StepGuard drives it: a device-side skip flag (0: do the step), no scale left on the grads."""
    found_inf = torch.zeros((), device=device)

    def step():
        optimizer.found_inf, optimizer.grad_scale = found_inf, None
        optimizer.step()
        del optimizer.found_inf, optimizer.grad_scale

    return step


def bench_small(args, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = SLMForCausalLM(SLMConfig.from_preset(args.preset)).to(device)
    named = list(model.named_parameters())
    adamw = build_optimizer(named, TrainConfig(optimizer="adamw"), device)
    muon = build_optimizer(named, TrainConfig(optimizer="muon"), device)
    if args.ns_dtype:
        muon.muon.ns_dtype = dtype_from_name(args.ns_dtype)
    print(f"  Newton-Schulz dtype: {dtype_name(muon.muon.ns_dtype)}" + (" (--ns_dtype)" if args.ns_dtype else ""))
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), device=device)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    # All in turns: each optimizer steps on the gradients of the latest backward (real ones, as in training)
    fns = {"fwd+bwd": forward_backward, "adamw": optimizer_step(adamw, device), "muon": optimizer_step(muon, device)}
    if args.torch_muon:
        matrices = [p for n, p in named if is_hidden_matrix(n, p) and int(n.split(".")[2]) < args.torch_muon_layers]
        fns["torch_muon"] = torch.optim.Muon(matrices, lr=1e-3, adjust_lr_fn="match_rms_adamw").step
    results = interleaved(fns, device, args.repeats)
    if args.torch_muon:
        results["torch_muon"] *= model.config.num_hidden_layers / args.torch_muon_layers
    results["fwd+bwd"] *= RECIPE_TOKENS / (args.batch * args.seq_len)
    return results


def bench_recipe_model(args, device: torch.device) -> dict[str, float]:
    """Whole training steps of bench_recipe.py's default model, optimizer=muon against optimizer=adamw."""
    size = SIZES["default"]
    config = SLMConfig(vocab_size=size["vocab"], **size["model"])
    steps = {}
    for optimizer_name in ("adamw", "muon"):
        torch.manual_seed(0)
        model = SLMForCausalLM(config).to(device)
        optimizer = build_optimizer(list(model.named_parameters()), TrainConfig(optimizer=optimizer_name), device)
        ids = torch.randint(0, config.vocab_size, (size["batch"], size["seq_len"]), device=device)
        step = optimizer_step(optimizer, device)

        def train_step(model=model, ids=ids, step=step, optimizer=optimizer):
            model(input_ids=ids, labels=ids).loss.backward()
            step()
            optimizer.zero_grad(set_to_none=True)

        steps[optimizer_name] = train_step
    return interleaved(steps, device, args.repeats * 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=4, help="fwd+bwd sequences measured (scaled to 64)")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ns_dtype", choices=["bf16", "fp16", "fp32"], help="override the runtime policy")
    parser.add_argument("--torch_muon", action="store_true", help="also time torch.optim.Muon")
    parser.add_argument("--torch_muon_layers", type=int, default=1, help="layers torch.optim.Muon steps (scaled)")
    parser.add_argument("--recipe_model", action="store_true", help="also bench_recipe.py's model, whole steps")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    flags = sorted(set(CPU_BF16_FLAGS) & cpu_flags())
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"  CPU: {cpu_model_name()}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"  bf16 flags: {', '.join(flags) or 'none'}; ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '-')}")
    print(f"  torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    fp32, bf16 = matmul_gflops(torch.float32, device), matmul_gflops(torch.bfloat16, device)
    print(f"  matmul 512x1408x512: fp32 {fp32:.1f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s (bf16/fp32 {bf16 / fp32:.2f}x)")
    print(f"  runtime policy: Newton-Schulz in {dtype_name(newton_schulz_dtype_for(device))}")

    print(f"\n{args.preset} preset, fp32 weights, median of {args.repeats} interleaved repeats:")
    t = bench_small(args, device)
    print(
        f"RESULT fwd+bwd  {t['fwd+bwd']:8.2f} s per {RECIPE_TOKENS:,} tokens "
        f"(measured on {args.batch} x {args.seq_len}, scaled x{RECIPE_TOKENS / (args.batch * args.seq_len):g})"
    )
    print(f"RESULT adamw    {t['adamw']:8.3f} s per step")
    recipe_step = t["fwd+bwd"] + t["muon"]
    print(
        f"RESULT muon     {t['muon']:8.3f} s per step: {t['muon'] / t['adamw']:.1f}x AdamW's step, "
        f"{t['muon'] / recipe_step:.1%} of a recipe step (fwd+bwd of {RECIPE_TOKENS:,} tokens + the step; goal <= 10%)"
    )
    if args.torch_muon:
        print(
            f"RESULT torch.optim.Muon (matrices only, {args.torch_muon_layers} layer(s) timed and scaled) "
            f"{t['torch_muon']:8.2f} s per step: {t['torch_muon'] / t['muon']:.1f}x ours, "
            f"{t['torch_muon'] / (t['fwd+bwd'] + t['torch_muon']):.1%} of a recipe step"
        )
    if args.recipe_model:
        r = bench_recipe_model(args, device)
        print(
            f"\nbench_recipe.py's model (4.6M parameters, 8 x 256 tokens), whole training steps, median of "
            f"{args.repeats * 2}: adamw {r['adamw'] * 1e3:.1f} ms, muon {r['muon'] * 1e3:.1f} ms: "
            f"a Muon step costs {r['muon'] / r['adamw']:.2f}x an AdamW step"
        )


if __name__ == "__main__":
    main()
