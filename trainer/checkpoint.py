"""
Checkpoint I/O for the training core (nanochat's checkpoint_manager, torchtitan's checkpointer): what a run
directory holds, how it is written so that a crash never leaves a half checkpoint that looks whole, and how a run
resumes from it.

    out_dir/step_NNNNNN/   weights + config.json + tokenizer (loadable with from_pretrained alone) and
                           trainer_state.pt: step, tokens seen, optimizer, GradScaler, data position, every rank's
                           RNG states, the stage's extra state
    out_dir/latest         the name of the newest complete step_* directory
    out_dir/final/         weights only, in the training dtype: the next stage's init_from

Every function takes the parts it needs (model, optimizer, flags) explicitly; the Trainer (trainer/core.py) decides
when to call them. Under FSDP the functions that gather or set state are collective: every rank calls them.
"""

import glob
import json
import os
import random
import shutil
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from model.hub import data_licenses, make_readable, write_model_card
from model.runtime import dtype_name
from trainer.common import print0

STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "model.safetensors"


def step_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"step_{step:06d}")


# -----------------------------------------------------------------------------
# Gathering the full state (rank 0 gets it; under FSDP every rank must take part)
# torch.distributed.checkpoint is imported only under FSDP: it is slow to import and one process never needs it.


def full_model_state(model, *, fsdp: bool, master: bool) -> dict | None:
    """The whole state dict on rank 0 (None elsewhere); under FSDP the shards are gathered to CPU."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if master else None
    return model.state_dict() if master else None


def full_optimizer_state(model, optimizer, *, fsdp: bool, master: bool) -> dict | None:
    """Rank 0's optimizer state. Under FSDP it is gathered and keyed by parameter name."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=True))
        return state if master else None
    return optimizer.state_dict() if master else None


def gather_rng_states(device: torch.device, *, distributed: bool, world_size: int) -> list[dict]:
    """Every rank's Python, NumPy, torch and CUDA generator states, in rank order (collective when distributed)."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if not distributed:
        return [rng]
    rngs = [None] * world_size
    dist.all_gather_object(rngs, rng)
    return rngs


# -----------------------------------------------------------------------------
# Writing


def save_pretrained(model, tokenizer, path: str, *, state: dict | None = None, dtype: torch.dtype | None = None,
                    architecture: str | None = None) -> None:
    """Weights (+ config) and the tokenizer into `path`, loadable with from_pretrained alone. `model` is the bare
    model, never a compiled/DDP wrapper (no `_orig_mod.` / `module.` prefixes); `state` is the full state dict
    (full_model_state) where the model is sharded; `architecture` names the class when `model` is FSDP's
    wrapper subclass, whose name save_pretrained would write instead."""
    if state is None:
        state = model.state_dict()
    if model.config.tie_word_embeddings:  # one copy of a tied matrix (a gathered or cast state has two)
        tied = getattr(model, "_tied_weights_keys", None) or {}
        state = {k: v for k, v in state.items() if k not in tied}
    if dtype is not None and dtype != torch.float32:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.save_pretrained(path, state_dict=state)
    if architecture is not None:
        model.config.architectures = [architecture]
        model.config.save_pretrained(path)
    tokenizer.save_pretrained(path)


def write_checkpoint(path: str, *, write_weights: Callable[[str], None], state: dict, keep_last: int) -> None:
    """Rank 0 only: weights (write_weights(dir)) and trainer_state.pt into path.tmp, then renamed to path and
    named in `latest`, so a crash mid-write leaves only a .tmp that resume never reads. Keeps the newest
    keep_last step_* dirs (0 = all)."""
    out_dir = os.path.dirname(path)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_weights(tmp)
    torch.save(state, os.path.join(tmp, STATE_FILE))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
        f.write(os.path.basename(path) + "\n")
    os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
    prune_checkpoints(out_dir, keep_last)


def prune_checkpoints(out_dir: str, keep_last: int) -> None:
    steps = sorted(glob.glob(os.path.join(out_dir, "step_[0-9]*[0-9]")))
    for old in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def write_final(out_dir: str, *, write_weights: Callable[[str], None]) -> str:
    """Rank 0 only: out_dir/final/ through a .tmp dir, replacing an older one whole."""
    path = os.path.join(out_dir, "final")
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_weights(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


# -----------------------------------------------------------------------------
# Resuming


def resume_candidates(out_dir: str, resume: str) -> list[str]:
    """resume=auto: every step_* dir in out_dir, newest first | never: none | a path: that one."""
    if resume == "never":
        return []
    if resume != "auto":
        return [resume]
    return sorted(glob.glob(os.path.join(out_dir, "step_[0-9]*[0-9]")), reverse=True)


def newest_readable(out_dir: str, resume: str, *, read_weights: Callable[[str], dict],
                    stage: str) -> tuple[str, dict, dict] | None:
    """(path, trainer state, weights) of the checkpoint to resume from, or None. Everything is read before
    anything is restored, so a torn checkpoint is skipped whole (resume=auto) or is an error (an explicit path)."""
    for path in resume_candidates(out_dir, resume):
        try:
            state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)
            weights = read_weights(path)
        except Exception as e:  # a torn or partial checkpoint: never load it, try the one before
            if resume != "auto":
                raise
            print0(f"[{stage}] WARNING: skipping unreadable checkpoint {path} ({type(e).__name__}: {e})")
            continue
        return path, state, weights
    return None


def read_weights(path: str) -> dict:
    """The weights save_pretrained wrote into a step_* dir."""
    return load_file(os.path.join(path, WEIGHTS_FILE))


def load_model_weights(model, weights: dict, *, fsdp: bool, where: str) -> None:
    """A full state dict into the model, every key accounted for (a tied lm_head may be absent). Under FSDP
    every rank read the whole file and keeps its shard."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        missing, unexpected = set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True,
                                                                                           strict=False))
    else:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not model.config.tie_word_embeddings]
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not match the model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")


def load_optimizer_state(model, optimizer, state: dict, *, fsdp: bool) -> None:
    """Optimizer state from a checkpoint written with or without FSDP, into a run with or without it. FSDP
    checkpoints key it by parameter name, others by position; convert where the two differ."""
    saved = state["optimizer"]
    by_name = state.get("optimizer_by_name", False)
    if not fsdp and not by_name:
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not by_name:  # positions follow the optimizer's groups, which list parameters in model order
        names = {id(p): n for n, p in model.named_parameters()}
        position = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        saved = {"state": {position[i]: v for i, v in saved["state"].items()},
                 "param_groups": [{**g, "params": [position[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, optim_state_dict=saved, options=StateDictOptions(full_state_dict=True))


def restore_rng(rngs: list[dict], *, rank: int, world_size: int, device: torch.device) -> bool:
    """Give this rank its saved generator states back. False when the checkpoint had another number of
    processes: then the caller reseeds deterministically instead."""
    if len(rngs) != world_size:
        return False
    rng = rngs[rank]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    return True


def truncate_metrics(out_dir: str, step: int) -> None:
    """Drop metrics logged after the checkpoint we resume from, so metrics.jsonl reads as one clean run."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(keep)


# -----------------------------------------------------------------------------
# The model card of final/


def write_card(path: str, cfg, *, stage: str, step: int, tokens_seen: int, global_batch: int, dtype: torch.dtype,
               world_size: int, model_config, evaluation: dict | None) -> None:
    """README.md in `path` (model/hub.py write_model_card) from the run's facts, readable by other accounts."""
    training = {"stage": stage, "optimizer steps": step, "tokens seen": f"{tokens_seen:,}",
                "global batch": f"{global_batch} {cfg.batch_unit} x {cfg.seq_len} tokens", "peak lr": cfg.lr,
                "optimizer": cfg.optimizer, "schedule": f"{cfg.lr_schedule}, {cfg.warmup_steps} warmup steps",
                "data": cfg.data_dir or cfg.data_path or "(see the stage config)",
                "compute dtype": dtype_name(dtype), "processes": world_size}
    write_model_card(path, config=model_config, stage=stage, training=training, evaluation=evaluation or None,
                     licenses=data_licenses(cfg.data_dir), base_model=cfg.init_from)
    make_readable(path)
