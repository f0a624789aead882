"""
The optimizer and the learning-rate schedule of every stage (torchtitan's components/optimizer and lr_scheduler,
in two functions): AdamW that decays matrices only, and linear warmup followed by cosine, WSD or constant.
"""

import math

import torch

from trainer.config import TrainConfig


def build_adamw(params: list, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """Decay matrices (embeddings and linear weights); never norms, biases or other vectors."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.lr_schedule == "wsd":
        decay_start = int(cfg.max_steps * (1 - cfg.decay_ratio))
        if step < decay_start:
            return cfg.lr
        progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.lr + (min_lr - cfg.lr) * progress
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"lr_schedule must be cosine, wsd or constant, got '{cfg.lr_schedule}'")
