"""
Small things every stage and the training core share: rank-0 printing, the external loggers, the error that stops
a run, the FLOPs arithmetic behind MFU and the batch_size=auto memory probe (nanochat's common.py).
"""

import os

import torch


def print0(*args, **kwargs):
    """Print on rank 0 only (every process runs the same code under torchrun)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


class TrainingStopped(RuntimeError):
    """Raised when training cannot go on (e.g. a NaN loss); the message says where the last good state is."""


# -----------------------------------------------------------------------------
# Loggers: metrics.jsonl is always written (trainer/core.py); these mirror it to an external service


class NullLogger:
    """Stands in for wandb/swanlab/tensorboard when none is asked for (nanochat's DummyWandb)."""

    def log(self, values: dict, step: int):
        pass

    def finish(self):
        pass


class ExternalLogger:
    def __init__(self, kind: str, project: str, run_name: str, config: dict, log_dir: str):
        self.kind = kind
        if kind == "wandb":
            import wandb
            self.run = wandb.init(project=project, name=run_name, config=config)
        elif kind == "swanlab":
            import swanlab
            self.run = swanlab.init(project=project, experiment_name=run_name, config=config)
        elif kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
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
        self.run.close() if self.kind == "tensorboard" else self.run.finish()


# -----------------------------------------------------------------------------
# What the hardware allows: peak FLOPs (for MFU) and the largest micro-batch that fits (batch_size=auto)


# Dense bf16 peak FLOP/s per GPU, for MFU. Unknown GPUs get no MFU rather than a wrong one.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
                  "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "T4": 65e12, "V100": 125e12}


def gpu_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward + backward) plus attention's 12 * L * d * T
    (nanoGPT/PaLM). N counts tied embeddings once, which stands for the lm_head matmul."""
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    if getattr(cfg, "use_moe", False):  # only the experts a token visits do work
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        n_params -= cfg.num_hidden_layers * per_expert * (cfg.num_experts - cfg.num_experts_per_tok)
    return 6 * n_params + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


def probe_micro_batch(model, *, seq_len: int, target: int, autocast, device: torch.device) -> int:
    """Double the micro-batch until a forward+backward runs out of memory; keep the last that fit, halved once
    more for headroom (optimizer state and fragmentation come later) unless everything up to `target` fit. The
    global batch must stay divisible, so only powers of two are tried. Leaves no gradients behind."""
    best, trial = 1, 1
    vocab = model.config.vocab_size
    while trial <= target:
        try:
            ids = torch.randint(0, vocab, (trial, seq_len), device=device)
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            best = trial
            trial *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return max(1, best // 2) if best < target else best
