"""
Small things every stage and the training core share: rank-0 printing, the external loggers, the error that stops
a run, the FLOPs arithmetic behind MFU and the batch_size=auto memory probe (nanochat's common.py).
"""

import importlib.util
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


# Where each hosted logger finds its credentials, and the modes in which it needs none (offline runs sync later:
# `wandb sync DIR`, `swanlab sync DIR`; tensorboard is always local).
LOGGER_CREDENTIALS = {
    "wandb": {"key": "WANDB_API_KEY", "mode": "WANDB_MODE", "offline": ("offline", "dryrun", "disabled"),
              "netrc": ".netrc", "host": "api.wandb.ai", "login": "wandb login"},
    "swanlab": {"key": "SWANLAB_API_KEY", "mode": "SWANLAB_MODE", "offline": ("offline", "local", "disabled"),
                "netrc": ".swanlab/.netrc", "host": "", "login": "swanlab login"},
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
    return (f"logger={kind}: no API key ({c['key']} unset and no `{c['login']}` done). Log in, or train offline "
            f"with {c['mode']}=offline (sync the run later), or use logger=tensorboard (always local)")


class ExternalLogger:
    def __init__(self, kind: str, project: str, run_name: str, config: dict, log_dir: str):
        self.kind = kind
        problem = logger_setup_problem(kind, dict(os.environ), os.path.expanduser("~"))
        if problem:
            raise ValueError(problem)
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
