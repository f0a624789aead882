"""
Small things every stage and the training core share: rank-0 printing, seeding, what a run logs (status lines,
metrics.jsonl, the external loggers), the error that stops a run, the FLOPs arithmetic behind MFU and the
batch_size=auto memory probe (nanochat's common.py).
"""

import glob
import importlib.util
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoTokenizer

from model.runtime import check_checkpoint_dir, copies_async, pins_memory

# The checkpoint dirs of a run (trainer/checkpoint.py writes step_NNNNNN; a step_*.tmp being written does not match).
STEP_DIRS = "step_[0-9]*[0-9]"


def resume_candidates(out_dir: str, resume: str) -> list[str]:
    """resume=auto: every step_* dir in out_dir, newest first | never: none | a path: that one."""
    if resume == "auto":
        return sorted(glob.glob(os.path.join(out_dir, STEP_DIRS)), reverse=True)
    return [] if resume == "never" else [resume]


def print0(*args, **kwargs):
    """Print on rank 0 only (every process runs the same code under torchrun)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def seed_rngs(seed: int, *, rank: int) -> None:
    """Seed this process's Python, NumPy and torch generators with seed + rank (ranks draw different dropout masks
    and samples). The Trainer seeds with cfg.seed at start; a resume that cannot restore every rank's saved states
    (another number of processes) reseeds with cfg.seed + step, so it is still deterministic."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def move_to(batch, device: torch.device):
    """A batch (a tensor, or a dict, tuple or list of them) on `device`; non_blocking overlaps pinned copies."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=copies_async(device))
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def host_to_device(value, device: torch.device) -> torch.Tensor:
    """A value the host computed (a Python number, as fp32, or a CPU tensor) on `device`, without the host waiting.
    torch.tensor(x, device="cuda") copies from pageable memory, which makes the host wait until the GPU has run
    everything queued before it: a sync that no .item() counter sees. From pinned memory a non_blocking copy is
    queued on the stream like a kernel (the pinned block is not reused before it ran). Pinned only for CUDA."""
    host = value if torch.is_tensor(value) else torch.tensor(float(value))
    if pins_memory(device):
        host = host.pin_memory()
    return host.to(device, non_blocking=copies_async(device))


def load_tokenizer(*, init_from: str, tokenizer_dir: str):
    """init_from's tokenizer when it has one (later stages), else tokenizer_dir's (pretraining)."""
    if init_from:  # checked first, so a typo in init_from is not reported as a missing tokenizer
        check_checkpoint_dir(init_from, "init_from")
    path = init_from if init_from and os.path.isfile(os.path.join(init_from, "tokenizer.json")) else tokenizer_dir
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer_dir {no_tokenizer_at(tokenizer_dir)}")
    return AutoTokenizer.from_pretrained(path)


def no_tokenizer_at(path: str) -> str:
    """What to do when there is no tokenizer folder at `path` (load_tokenizer, and validate's path check)."""
    return f"'{path}' does not exist: train one with `python main.py --stage tokenizer` or point tokenizer_dir at one"


def skipped_records(stats: dict) -> str:
    """What a data reader's counts say it left out ("skip:<reason>" and "truncated"), for a stage's data line."""
    skipped = {k: v for k, v in sorted(stats.items()) if ":" in k or k == "truncated"}
    return str(skipped) if skipped else "nothing skipped"


class TrainingStopped(RuntimeError):
    """Raised when training cannot go on (e.g. a NaN loss); the message says where the last good state is."""


def status_line(stage: str, step: int, max_steps: int, values: dict, stage_metrics: list[str]) -> str:
    """The log line of a training step (without the ETA), from the values metrics.jsonl gets."""
    line = (
        f"[{stage}] step {step:05d}/{max_steps:05d} | loss {values['loss']:.4f} | lr {values['lr']:.2e} | "
        f"gnorm {values['grad_norm']:.2f} | skipped {values['skipped_steps']} | dt {values['dt_ms']:.0f}ms | "
        f"tok/s {values['tok_per_s']:,.0f}"
    )
    if "loss_scale" in values:  # fp16
        line += f" | scale {values['loss_scale']:.0f}"
    if "mfu" in values:
        line += f" | mfu {100 * values['mfu']:.1f}%"
    return line + "".join(f" | {key} {values[key]:.4f}" for key in stage_metrics)


# -----------------------------------------------------------------------------
# What a run logs: metrics.jsonl always (MetricsLog), mirrored to an external service when one is asked for


@dataclass(kw_only=True)
class MetricsLog:
    """Where a run's numbers go: one JSON object per line in out_dir/metrics.jsonl (rank 0 only; a resume cuts it
    back to the checkpoint's step, trainer/checkpoint.py), the same values to the external logger, and a printed
    line. The Trainer decides when to log; this decides what a line holds."""

    stage: str
    out_dir: str
    master: bool  # rank 0: the only one that writes
    logger: "ExternalLogger | NullLogger"
    max_steps: int
    log_every: int
    flops_per_token: float  # training FLOPs per token, for MFU
    peak_flops: float | None  # the device's peak FLOP/s; None (a CPU, an unknown GPU): no MFU
    world_size: int
    device: torch.device

    def log_step(
        self, metrics: dict, *, step: int, step_times: list, step_tokens: int, tokens_seen: int, guard_values: dict
    ) -> None:
        """A training step's status line and record: the step's metrics (tensors), throughput, MFU and ETA from the
        step times (seconds), and the StepGuard's counts."""
        values = {k: float(v) for k, v in metrics.items()}  # .item() syncs with the GPU: only at log steps
        values.update(guard_values)
        recent = step_times[-self.log_every :]
        dt = sum(recent) / len(recent)
        tok_per_s = step_tokens / dt
        steady = step_times[3:] or step_times  # leave out compile/warm-up steps from the ETA
        eta_min = (self.max_steps - step) * (sum(steady) / len(steady)) / 60
        values.update({"tok_per_s": tok_per_s, "dt_ms": dt * 1000, "tokens_seen": tokens_seen})
        if self.peak_flops:
            values["mfu"] = self.flops_per_token * tok_per_s / (self.peak_flops * self.world_size)
        line = status_line(
            self.stage,
            step,
            self.max_steps,
            values,
            stage_metrics=[k for k in metrics if k not in ("loss", "lr", "grad_norm")],
        )
        if self.device.type == "cuda":
            values["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        print0(line + f" | eta {eta_min:.1f}m")
        self.write(values, step=step)

    def write(self, values: dict, *, step: int, split: str = "train") -> None:
        """One record of `values` for `split` (train, eval); non-training splits are also printed."""
        if not values or not self.master:
            return
        record = {"step": step, "split": split, "time": time.time(), **values}
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.logger.log({f"{split}/{k}": v for k, v in values.items()}, step)
        if split != "train":
            print0(
                f"[{self.stage}] step {step:05d} {split}: "
                + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
            )

    def finish(self) -> None:
        self.logger.finish()


class NullLogger:
    """Stands in for wandb/swanlab/tensorboard when none is asked for (nanochat's DummyWandb)."""

    def log(self, values: dict, step: int):
        pass

    def finish(self):
        pass


# Where each hosted logger finds its credentials, and the modes in which it needs none (offline runs sync later:
# `wandb sync DIR`, `swanlab sync DIR`; tensorboard is always local).
LOGGER_CREDENTIALS = {
    "wandb": {
        "key": "WANDB_API_KEY",
        "mode": "WANDB_MODE",
        "offline": ("offline", "dryrun", "disabled"),
        "netrc": ".netrc",
        "host": "api.wandb.ai",
        "login": "wandb login",
    },
    "swanlab": {
        "key": "SWANLAB_API_KEY",
        "mode": "SWANLAB_MODE",
        "offline": ("offline", "local", "disabled"),
        "netrc": ".swanlab/.netrc",
        "host": "",
        "login": "swanlab login",
    },
}


def logger_setup_problem(kind: str, env: dict, home: str) -> str | None:
    """Why a hosted logger would fail at init (no package, no key in a non-interactive run), said before training
    starts, with the offline mode that needs no key; None when it can start. A pure function of env and home."""
    if kind not in LOGGER_CREDENTIALS:
        return None
    c = LOGGER_CREDENTIALS[kind]
    if importlib.util.find_spec(kind) is None:
        return f"logger={kind}: the {kind} package is not installed (pip install {kind}), or use logger=tensorboard"
    if env.get(c["key"]) or env.get(c["mode"], "").lower() in c["offline"]:
        return None
    netrc = os.path.join(home, c["netrc"])
    if os.path.isfile(netrc) and c["host"] in open(netrc, encoding="utf-8", errors="replace").read():
        return None
    return (
        f"logger={kind}: no API key ({c['key']} unset and no `{c['login']}` done). Log in, or train offline "
        f"with {c['mode']}=offline (sync the run later), or use logger=tensorboard (always local)"
    )


class ExternalLogger:
    def __init__(self, kind: str, project: str, run_name: str, config: dict, log_dir: str):
        self.kind = kind
        problem = logger_setup_problem(kind, dict(os.environ), os.path.expanduser("~"))
        if problem:
            raise ValueError(problem)
        if kind == "wandb":
            import wandb  # optional: installed only by those who log there

            self.run = wandb.init(project=project, name=run_name, config=config)
        elif kind == "swanlab":
            import swanlab  # optional: installed only by those who log there

            # logdir: the run's own folder (as tensorboard's), where an offline run waits for `swanlab sync`
            self.run = swanlab.init(project=project, experiment_name=run_name, config=config, logdir=log_dir)
        elif kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

            self.run = SummaryWriter(log_dir)
        else:
            raise ValueError(f"logger must be none, wandb, swanlab or tensorboard, got '{kind}'")

    def log(self, values: dict, step: int):
        if self.kind == "tensorboard":
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.run.add_scalar(key, value, step)
        else:
            self.run.log(values, step=step)

    def finish(self):
        if self.kind == "tensorboard":
            self.run.close()
        else:
            self.run.finish()


# -----------------------------------------------------------------------------
# What the hardware allows: peak FLOPs (for MFU) and the largest micro-batch that fits (batch_size=auto)


# Dense (no sparsity) tensor-core peak FLOP/s per GPU and compute dtype, as NVIDIA's datasheets list them, for MFU.
# fp32 is the TF32 peak where the GPU has TF32 (the Trainer turns it on), else plain fp32; a dtype a GPU only
# emulates (bf16 on Turing and Volta) has none. Matched on whole words of the device name, most specific first, so
# "L40" is not an "L4" and "H100 PCIe" is not the SXM part. Unknown GPUs get no MFU rather than a wrong one.
_SXM_H100 = {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12}
_NVL_H100 = {"bf16": 835e12, "fp16": 835e12, "fp32": 418e12}
_A100 = {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}
GPU_PEAK_FLOPS = [
    (("H100", "NVL"), _NVL_H100),
    (("H100", "PCIE"), {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    (("H100",), _SXM_H100),
    (("H200", "NVL"), _NVL_H100),
    (("H200",), _SXM_H100),
    (("H800",), _SXM_H100),
    (("A100",), _A100),
    (("A800",), _A100),
    (("L40S",), {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12}),
    (("L40",), {"bf16": 181e12, "fp16": 181e12, "fp32": 90.5e12}),
    (("L4",), {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12}),
    (("A10G",), {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12}),
    (("A10",), {"bf16": 125e12, "fp16": 125e12, "fp32": 62.5e12}),
    (("RTX", "4090"), {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12}),  # fp32 accumulation
    (("RTX", "3090"), {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12}),
    (("T4",), {"fp16": 65e12, "fp32": 8.1e12}),
    (("V100", "PCIE"), {"fp16": 112e12, "fp32": 14e12}),
    (("V100",), {"fp16": 125e12, "fp32": 15.7e12}),
]


def gpu_peak_flops(name: str, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of the GPU called `name` (torch.cuda.get_device_name) computing in `dtype`; None if unknown."""
    words = set(name.upper().replace("-", " ").replace("_", " ").split())
    key = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype)
    for required, peaks in GPU_PEAK_FLOPS:
        if words.issuperset(required):
            return peaks.get(key)
    return None


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    return gpu_peak_flops(torch.cuda.get_device_name(device), dtype) if device.type == "cuda" else None


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward + backward) plus attention's 12 * L * d * T
    (nanoGPT/PaLM). N counts tied embeddings once, which stands for the lm_head matmul."""
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    if getattr(cfg, "use_moe", False):  # only the experts a token visits do work
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        n_params -= cfg.num_hidden_layers * per_expert * (cfg.num_experts - cfg.num_experts_per_tok)
    return 6 * n_params + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


def probe_micro_batch(try_micro_batch: Callable[[int], None], *, model, target: int, device: torch.device) -> int:
    """Double the micro-batch until try_micro_batch(n) (the stage's forward+backward of n batch units, see
    Trainer.probe_step) runs out of memory; keep the last that fit, halved once more for headroom (optimizer state
    and fragmentation come later) unless everything up to `target` fit. The global batch must stay divisible, so
    only powers of two are tried. Leaves no gradients behind, and no peak either: peak_mem_gb reports training."""
    best, trial = 1, 1
    while trial <= target:
        try:
            try_micro_batch(trial)
            best = trial
            trial *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return max(1, best // 2) if best < target else best
