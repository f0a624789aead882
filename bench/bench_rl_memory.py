"""
Peak memory of the PPO / GRPO memory options (issue 7), on whatever device this runs on, all options in one run.

    python bench/bench_rl_memory.py                              # small preset; on CPU: tracked tensor memory
    python bench/bench_rl_memory.py --preset tiny --steps 1      # smoke run
    python bench/bench_rl_memory.py --json rl_memory.json        # on a GPU: the CUDA allocator's peak

Setup (in a temp dir): a byte-level BPE tokenizer trained by the tokenizer stage on synthetic Han text (--vocab
entries, default the preset's), a random-init checkpoint of --preset whose vocab_size is the tokenizer's length, and
a prompts file (~--prompt_tokens tokens each). Each option then runs the real stage (trainer/ppo.py or
trainer/grpo.py: Trainer.prepare(), then train_step()) for --warmup steps, and the peak is taken over --steps
more. Every step is one rollout (Engine generation, rule reward token_ids:100-163, actor / reference / critic
scoring) plus one optimizer step on it (ppo_epochs=1, one minibatch), so the measured steps hold both phases with
the AdamW state already allocated. Every option trains on --batch replies per step (GRPO: --batch / --group
prompts x --group replies), so rows differ only in the option.

Options (--options; ratios are against the first one given, by default ppo-shared, the stage defaults):
    ppo-shared            critic=shared: a value head on the actor's last hidden state
    ppo-shared-refcpu     the same with ref_device=cpu: the frozen reference offloaded
    ppo-separate          critic=separate: a second full backbone with its own gradients and AdamW state
    ppo-separate-refcpu   the same with ref_device=cpu
    ppo-half-critic       critic=separate from a checkpoint with half the layers (the "smaller critic")
    ppo-shared-ckpt       critic=shared with gradient_checkpointing=true (layer activations recomputed in backward)
    grpo, grpo-refcpu     GRPO: no critic; reference on the device / offloaded
    grpo-ckpt             GRPO with gradient_checkpointing=true

What is counted:
    persistent  weights of every model on the training device + one gradient per trainable parameter + the
                AdamW state (exp_avg, exp_avg_sq, step), summed from the trainer's objects (the same on any device;
                gradients exist from backward to the optimizer step, so they are part of the peak).
    peak, CUDA  torch.cuda.max_memory_allocated() over the measured steps (reset after warm-up), minus what was
                allocated before the option started (0 unless an earlier option leaked): live tensors as the caching
                allocator sees them, block rounding included. Not counted: the CUDA context, cached free blocks
                (memory_reserved), fragmentation. ref_device=cpu really offloads.
    peak, CPU   torch has no CPU allocator statistics, so a TorchDispatchMode counts live tensor storages: the
                output of every dispatched op, each storage once at its nbytes (views and in-place results add
                nothing) until it is freed, starting from the parameters and buffers of every model on the device.
                Not counted: buffers an op allocates internally, tensors made outside the dispatcher
                (torch.tensor(list), from_numpy: a few token-id tensors), malloc overhead, the Python/torch runtime,
                and what only a GPU has (CUDA context, allocator caching and fragmentation, cuBLAS workspace).
                On the small preset this peak was within 0.5% of the CPU allocator's own (torch.profiler
                profile_memory events, bench/RESULTS.md). ref_device=cpu is emulated (CPU is the training
                device): the reference's weights and every tensor made inside its forward (its logits included) are
                left out; its log-probs, computed from the logits after the forward ((N, T) tensors), stay counted,
                as they would be moved to the GPU.
"""

import argparse
import contextlib
import gc
import io
import itertools
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: repo root on path

import torch  # noqa: E402

from bench.tensor_memory import TensorMemoryTracker  # noqa: E402
from dataset.preference_data import prompt_ids  # noqa: E402
from model import SLMConfig, SLMForCausalLM  # noqa: E402
from model.runtime import resolve_device, resolve_dtype  # noqa: E402
from trainer.train_tokenizer import Config as TokenizerConfig  # noqa: E402
from trainer.train_tokenizer import run as train_tokenizer  # noqa: E402

# option -> (stage, config overrides, reference offloaded)
OPTIONS = {
    "ppo-shared": ("ppo", {"critic": "shared"}, False),
    "ppo-shared-refcpu": ("ppo", {"critic": "shared"}, True),
    "ppo-separate": ("ppo", {"critic": "separate"}, False),
    "ppo-separate-refcpu": ("ppo", {"critic": "separate"}, True),
    "ppo-half-critic": ("ppo", {"critic": "separate", "critic_from": "<half>"}, False),
    "ppo-shared-ckpt": ("ppo", {"critic": "shared", "gradient_checkpointing": True}, False),
    "grpo": ("grpo", {}, False),
    "grpo-refcpu": ("grpo", {}, True),
    "grpo-ckpt": ("grpo", {"gradient_checkpointing": True}, False),
}
RULE = "token_ids:100-163"  # a dense toy reward (tests/test_ppo_grpo.py): no reward model needed

# -----------------------------------------------------------------------------
# Inputs: tokenizer, checkpoints, prompts


@contextlib.contextmanager
def quiet(verbose: bool = False):
    """Hide the stages' own log lines (config dumps, checkpoint notes); errors still raise."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def build_inputs(work: str, preset: str, vocab: int, prompt_tokens: int, n_prompts: int = 32) -> dict:
    """Tokenizer, policy checkpoint, a half-depth critic checkpoint and prompts.jsonl under `work`."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no tqdm bar per save_pretrained
    # Synthetic Han text: 4000 ideographs, Zipf-distributed, for the tokenizer's corpus and the prompts alike.
    rng = random.Random(0)
    chars = [chr(0x4E00 + i) for i in rng.sample(range(20000), 4000)]
    cum_weights = list(itertools.accumulate(1 / (i + 1) for i in range(len(chars))))

    def han_text(n: int) -> str:
        return "".join(rng.choices(chars, cum_weights=cum_weights, k=n))

    corpus = os.path.join(work, "corpus.jsonl")
    with open(corpus, "w", encoding="utf-8") as f:
        for _ in range(max(1000, vocab)):  # ~34 characters a line: enough pairs to fill the vocabulary
            text = han_text(rng.randint(8, 60)) + "。"
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    with quiet():
        train_tokenizer(
            TokenizerConfig(
                data_path=corpus, vocab_size=vocab, out_dir=os.path.join(work, "tokenizer"), heldout_every=1000
            )
        )
    tok = AutoTokenizer.from_pretrained(os.path.join(work, "tokenizer"))

    layers = SLMConfig.from_preset(preset).num_hidden_layers
    paths, n_params = {"policy": os.path.join(work, "policy"), "half": os.path.join(work, "critic_half")}, {}
    for name, depth in (("policy", layers), ("half", max(1, layers // 2))):
        torch.manual_seed(0)
        # vocab_size = the tokenizer's length: the model must cover every token id, and sample no id beyond them
        model = SLMForCausalLM(SLMConfig.from_preset(preset, vocab_size=len(tok), num_hidden_layers=depth))
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
        n_params[name] = sum(p.numel() for p in model.parameters())

    # Grow each prompt a character at a time until it has prompt_tokens tokens (never cut inside a character).
    prompts, lengths = [], []
    for _ in range(n_prompts):
        text = ""
        while len(tok.encode(text)) < prompt_tokens:
            text += han_text(1)
        prompts.append(text)
        lengths.append(len(prompt_ids(tok, [{"role": "user", "content": text}])))
    paths["prompts"] = os.path.join(work, "prompts.jsonl")
    with open(paths["prompts"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts)
    return {
        **paths,
        "vocab": len(tok),
        "params": n_params["policy"],
        "half_params": n_params["half"],
        "prompt_len": sum(lengths) / len(lengths),
    }


# -----------------------------------------------------------------------------
# One option


def unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (tied weights count once)."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def device_models(trainer, offload_ref: bool) -> list:
    """Every model the trainer holds on its training device (actor, value head or critic, reference, reward)."""
    models = []
    for m in vars(trainer).values():
        if not isinstance(m, torch.nn.Module) or (m is trainer.ref and offload_ref):
            continue
        first = next(m.parameters(), None)
        if first is not None and first.device.type == trainer.device.type:
            models.append(m)
    return models


def model_tensors(models: list) -> list:
    return [t for m in models for t in (*m.parameters(), *m.buffers())]


def build_trainer(option: str, inputs: dict, args, out_dir: str):
    import importlib

    stage, overrides, offload_ref = OPTIONS[option]
    overrides = {k: inputs["half"] if v == "<half>" else v for k, v in overrides.items()}
    group = args.group if stage == "grpo" else 1
    settings = {
        "init_from": inputs["policy"],
        "data_path": inputs["prompts"],
        "out_dir": out_dir,
        "seq_len": args.seq_len,
        "batch_size": args.micro_batch or args.batch,
        "global_batch_size": args.batch,
        "num_generations": group,
        "max_new_tokens": args.max_new_tokens,
        "reward_rules": RULE,
        "reward_from": inputs["policy"] if args.reward_model else "",
        "ref_device": "cpu" if offload_ref else "",
        "ppo_epochs": 1,
        "rollout_minibatches": 1,
        "target_kl": 0.0,
        "lr": 1e-6,
        "lr_schedule": "constant",
        "warmup_steps": 0,
        "max_steps": args.warmup + args.steps,
        "save_every": 0,
        "resume": "never",
        "device": args.device,
        "dtype": args.dtype,
        "seed": 0,
        **overrides,
    }
    module = importlib.import_module(f"trainer.{stage}")
    trainer_cls = module.PPOTrainer if stage == "ppo" else module.GRPOTrainer
    return trainer_cls(module.Config(**settings)), offload_ref


def measure(option: str, inputs: dict, args) -> dict:
    """Build the stage for `option`, run warm-up steps, and measure the peak over the next steps."""

    cuda = resolve_device(args.device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        leftover = torch.cuda.memory_allocated()  # from earlier options; 0 unless something leaked
    with tempfile.TemporaryDirectory() as out_dir:
        trainer, offload_ref = build_trainer(option, inputs, args, out_dir)
        with quiet(args.verbose):
            trainer.prepare()
        trainer.model.train()  # as Trainer.fit() does (from_pretrained models start in eval mode)
        tracker = None
        if not cuda:
            tracker = TensorMemoryTracker()
            tracker.count_existing(model_tensors(device_models(trainer, offload_ref)))
            if offload_ref:  # emulate the offload: the reference's weights (above) and forward are not on this device
                tracker.leave_out(trainer.ref)
        t0 = time.perf_counter()
        with tracker or contextlib.nullcontext(), quiet(args.verbose):
            for _ in range(args.warmup):
                trainer.train_step()
            if cuda:
                torch.cuda.synchronize(trainer.device)
                torch.cuda.reset_peak_memory_stats(trainer.device)
            else:
                tracker.reset_peak()
            reply_len = 0.0
            for _ in range(args.steps):
                trainer.train_step()
                reply_len += float(trainer.rollout_stats["response_len"]) / args.steps
        if cuda:
            torch.cuda.synchronize(trainer.device)
            peak = torch.cuda.max_memory_allocated(trainer.device) - leftover
        else:
            peak = tracker.peak
        wall = time.perf_counter() - t0
        models = device_models(trainer, offload_ref)
        weights = unique_bytes(model_tensors(models))
        grads = sum(p.numel() * p.element_size() for p in trainer.trainable_parameters())
        adam = unique_bytes(
            t for state in trainer.optimizer.state.values() for t in state.values() if torch.is_tensor(t)
        )
        row = {
            "option": option,
            "persistent_mib": (weights + grads + adam) / 2**20,
            "weights_mib": weights / 2**20,
            "grads_mib": grads / 2**20,
            "adam_mib": adam / 2**20,
            "peak_mib": peak / 2**20,
            "reply_tokens": reply_len,
            "wall_s": wall,
        }
        del trainer, tracker, models
        gc.collect()  # the shared critic's forward hook makes a cycle through the trainer
        if cuda:
            torch.cuda.empty_cache()
        return row


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="model preset (config/model/<name>.json or a path)")
    parser.add_argument("--vocab", type=int, default=0, help="tokenizer entries; 0 = the preset's vocab_size")
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--batch", type=int, default=8, help="replies per rollout = per optimizer step")
    parser.add_argument("--micro_batch", type=int, default=0, help="replies per forward/backward; 0 = --batch")
    parser.add_argument("--group", type=int, default=4, help="GRPO replies per prompt")
    parser.add_argument("--prompt_tokens", type=int, default=128, help="prompt length before the chat template")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--seq_len", type=int, default=256, help="prompt + reply cap (longer prompts are skipped)")
    parser.add_argument("--warmup", type=int, default=1, help="steps before measuring (allocate the AdamW state)")
    parser.add_argument("--steps", type=int, default=1, help="measured steps (each a rollout + an optimizer step)")
    parser.add_argument(
        "--reward_model",
        action="store_true",
        help="also score with a reward model (the policy's checkpoint with a random score head) on the device",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto = the stage's: bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--json", default="", help="also write the settings and rows here")
    parser.add_argument("--verbose", action="store_true", help="show the stages' own log lines")
    return parser.parse_args(argv)


def main(argv=None):

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as work:
        inputs = build_inputs(
            work, args.preset, args.vocab or SLMConfig.from_preset(args.preset).vocab_size, args.prompt_tokens
        )
        if device.type == "cuda":
            where = f"{torch.cuda.get_device_name(device)}: torch.cuda.max_memory_allocated (CUDA allocator)"
        else:
            where = (
                f"CPU x{torch.get_num_threads()} threads: live tensor storages counted by a TorchDispatchMode "
                f"(no allocator overhead; ref_device=cpu emulated)"
            )
        dtype = str(resolve_dtype(args.dtype, device)).replace("torch.", "")
        reward = RULE + (" + reward model" if args.reward_model else "")
        print(
            f"device {where}\npreset {args.preset}: {inputs['params'] / 1e6:.1f}M parameters, vocab "
            f"{inputs['vocab']} | dtype {dtype} | {args.batch} replies per step (GRPO {args.batch // args.group} "
            f"prompts x {args.group}) | prompt {inputs['prompt_len']:.0f} tokens (chat template included) + up to "
            f"{args.max_new_tokens} new | {args.warmup} warm-up + {args.steps} measured step(s), each a rollout + "
            f"an optimizer step | reward {reward} | torch {torch.__version__}",
            flush=True,
        )
        rows = []
        for option in args.options:
            rows.append(measure(option, inputs, args))
            print(f"  {option}: peak {rows[-1]['peak_mib']:.1f} MiB ({rows[-1]['wall_s']:.1f} s)", flush=True)
    base = rows[0]
    print(
        f"\npersistent = weights on the device + gradients + AdamW state; peak over the measured steps; "
        f"ratio = peak / peak of {base['option']}\n"
    )
    print(
        "| option | persistent MiB | weights / grads / Adam MiB | peak MiB | peak - persistent MiB | reply tokens "
        f"| peak vs {base['option']} |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['option']} | {r['persistent_mib']:.1f} | {r['weights_mib']:.1f} / {r['grads_mib']:.1f} / "
            f"{r['adam_mib']:.1f} | {r['peak_mib']:.1f} | {r['peak_mib'] - r['persistent_mib']:.1f} | "
            f"{r['reply_tokens']:.1f} | {r['peak_mib'] / base['peak_mib']:.2f}x |"
        )
    print(f"\nwall {time.perf_counter() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "device": where,
                    "settings": vars(args),
                    "vocab": inputs["vocab"],
                    "params": inputs["params"],
                    "prompt_len": inputs["prompt_len"],
                    "rows": rows,
                },
                f,
                indent=1,
            )
    return rows


if __name__ == "__main__":
    main()
