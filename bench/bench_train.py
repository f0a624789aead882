"""
Training throughput: our SLM against transformers' LlamaForCausalLM of the same dimensions, in the same run.

    python bench/bench_train.py                                  # CPU: small preset, short sequences
    python bench/bench_train.py --presets small base --seq_len 512 --batch 32 128 --compile both   # on a GPU

For each preset, micro-batch and compile setting it times full training steps (forward, backward, AdamW; bf16
autocast and fused AdamW on CUDA, fp32 on CPU) on random tokens, after warm-up steps, and prints tokens/s, MFU
(CUDA: 6N + attention FLOPs per token over the GPU's dense bf16 peak), peak memory (CUDA: the allocator's peak;
CPU, uncompiled: live tensors counted by bench/tensor_memory.py over one extra step), and the ratio to the Llama
baseline measured in the same run. Same weights shape, same batch, same dtype for both models.
--models picks the rows: llama (the baseline), slm (ours), slm+chunk (ours with the chunked loss of
model/model_slm.py, --loss_chunk tokens at a time; its point is memory: compare its peak with slm's) and slm+sync
(ours reading a flag back from the device every step, as the Trainer's NaN guard does: what that sync costs).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: repo root on path

import torch  # noqa: E402

from bench.tensor_memory import TensorMemoryTracker  # noqa: E402
from model import SLMConfig, SLMForCausalLM  # noqa: E402
from model.configuration_slm import slm_to_llama_config  # noqa: E402
from model.runtime import resolve_device, resolve_dtype  # noqa: E402
from trainer.common import device_peak_flops, flops_per_token  # noqa: E402


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


def time_steps(
    model,
    batch: int,
    seq_len: int,
    steps: int,
    warmup: int,
    device,
    dtype,
    compile_model: bool,
    loss_chunk: int = 0,
    sync_check: bool = False,
    profile: bool = False,
):
    torch.manual_seed(0)
    vocab = model.config.vocab_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if compile_model else model
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]

    def one_step():
        with autocast:
            if loss_chunk:  # our chunked loss inside the model: the logits never exist whole
                loss = step_model(input_ids=x, shift_labels=y, loss_chunk=loss_chunk).loss
            else:
                logits = step_model(input_ids=x).logits
                loss = torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), y.reshape(-1))
        loss.backward()
        if sync_check:  # what the Trainer's NaN guard costs: the CPU waits for the GPU before the next step
            bool(torch.isfinite(loss))
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
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    elif not compile_model:  # CPU: one more step with live tensors counted (bench/tensor_memory.py), untimed
        tracker = TensorMemoryTracker()
        tracker.count_existing(
            [
                *model.parameters(),
                *(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)),
            ]
        )
        with tracker:
            one_step()
        peak = tracker.peak / 2**30
    else:  # compiled code allocates outside the dispatcher, where the tracker cannot see it
        peak = float("nan")
    if profile:
        print_profile(one_step, device)
    return batch * seq_len * steps / elapsed, peak


def print_profile(one_step, device, rows: int = 15):
    """Where one training step's time goes: the ops with the most self time (on the GPU when there is one)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        one_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=40), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small"])
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating timing rounds; the best of each is kept")
    parser.add_argument("--compile", choices=["no", "yes", "both"], default="no")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["llama", "slm"],
        choices=["llama", "slm", "slm+chunk", "slm+sync"],
        help="slm+chunk: ours with --loss_chunk; slm+sync: ours reading a loss flag back every step "
        "(the Trainer's NaN guard); ratios are against the first",
    )
    parser.add_argument("--loss_chunk", type=int, default=8192, help="tokens per chunk for slm+chunk")
    parser.add_argument("--profile", action="store_true", help="print the top ops of one step of ours (last round)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)  # what training picks on this device
    peak_flops = device_peak_flops(device, dtype)
    compiles = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(
        f"device: {name} | dtype {str(dtype).replace('torch.', '')} | seq_len {args.seq_len} | "
        f"{args.steps} timed steps after {args.warmup} warm-up | best of {args.rounds} alternating rounds"
    )
    base = args.models[0]
    print(
        f"{'preset':<7} {'batch':>5} {'compile':>7} {'model':<9} {'tok/s':>12} {'MFU':>7} {'peak GiB':>8} "
        f"{'vs ' + base:>12}"
    )
    for preset in args.presets:
        for batch in args.batch:
            for compile_model in compiles:
                # Alternate baseline and ours for several rounds and keep each one's best: on a shared machine
                # a single timing swings by 10%, more than the difference we are measuring.
                kinds = args.models
                best = {kind: (0.0, 0.0) for kind in kinds}
                for round_index in range(args.rounds):
                    last_round = round_index == args.rounds - 1
                    for kind in kinds:
                        model = build(kind.split("+")[0], preset, device)
                        tok_s, peak = time_steps(
                            model,
                            batch,
                            args.seq_len,
                            args.steps,
                            args.warmup,
                            device,
                            dtype,
                            compile_model,
                            args.loss_chunk if kind == "slm+chunk" else 0,
                            sync_check=kind == "slm+sync",
                            profile=args.profile and kind == "slm" and last_round,
                        )
                        best[kind] = max(best[kind], (tok_s, peak))
                        del model
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                fpt = flops_per_token(build("slm", preset, "meta"), args.seq_len)  # same dims: same FLOPs for both
                for kind in kinds:
                    tok_s, peak = best[kind]
                    mfu = f"{100 * fpt * tok_s / peak_flops:.1f}%" if peak_flops else "-"
                    print(
                        f"{preset:<7} {batch:>5} {str(compile_model):>7} {kind:<9} {tok_s:>12,.0f} {mfu:>7} "
                        f"{peak:>8.2f} {tok_s / best[base][0]:>11.2f}x",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
