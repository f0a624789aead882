"""
Checkpoint I/O for the training core (nanochat's checkpoint_manager, torchtitan's checkpointer): what a run
directory holds, how it is written so that a crash never leaves a half checkpoint that looks whole, and how a run
resumes from it.

    out_dir/step_NNNNNN/   weights + config.json + tokenizer (loadable with from_pretrained alone) and
                           trainer_state.pt: step, tokens seen, optimizer, GradScaler, data position, every rank's
                           RNG states, the stage's extra state; checksums.json (SHA-256 of every other file),
                           written last
    out_dir/latest         the name of the newest complete step_* directory
    out_dir/final/         weights only, in the training dtype: the next stage's init_from; checksums.json too,
                           verified when a stage starts from it (trainer/config.py validate)

A checkpoint is data, not code: trainer_state.pt is read with torch.load(weights_only=True), which builds only
tensors, containers and plain values, plus the NumPy types of an RNG state (SAFE_GLOBALS); a file that asks for
anything else (a pickle that would run code on load) is refused, never executed. Checkpoints written before the
checksums existed still load (their state holds only those types) and are resumed unverified, with a note.

Every function takes the parts it needs (model, optimizer, flags) explicitly; the Trainer (trainer/core.py) decides
when to call them. Under FSDP the functions that gather or set state are collective: every rank calls them.
"""

import dataclasses
import glob
import json
import os
import pickle
import random
import shutil
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from dataset.licenses import card_licenses, file_licenses, shard_licenses
from model.hub import make_readable, write_model_card
from model.lora import is_adapter_dir
from model.runtime import (  # noqa: F401 (the checksum functions are re-exported: tests and stages import them here)
    CHECKSUMS_FILE,
    CheckpointError,
    dtype_name,
    sha256_file,
    verify_checksums,
    write_checksums,
)
from trainer.common import print0, seed_rngs

STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "model.safetensors"
# What an RNG state needs beyond torch's default weights_only vocabulary: np.random.get_state() is a tuple holding
# a uint32 ndarray. Both spellings of NumPy's array rebuilder, so checkpoints from NumPy 1.x and 2.x load alike.
_RECONSTRUCT = np.array(0).__reduce__()[0]  # numpy._core.multiarray._reconstruct (numpy.core.* in NumPy 1.x)
SAFE_GLOBALS = [
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
    _RECONSTRUCT,
    (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
]
_SAFE_NAMES = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}


def step_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"step_{step:06d}")


# -----------------------------------------------------------------------------
# Gathering the full state (rank 0 gets it; under FSDP every rank must take part)
# torch.distributed.checkpoint is imported only under FSDP: it is slow to import and one process never needs it.


def full_model_state(model, *, fsdp: bool, master: bool) -> dict | None:
    """The whole state dict on rank 0 (None elsewhere); under FSDP the shards are gathered to CPU."""
    if fsdp:
        # distributed modules import only where torch was built with them (dist.is_available())
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if master else None
    return model.state_dict() if master else None


def full_optimizer_state(model, optimizer, *, fsdp: bool, master: bool) -> dict | None:
    """Rank 0's optimizer state. Under FSDP it is gathered and keyed by parameter name."""
    if fsdp:
        # distributed modules import only where torch was built with them (dist.is_available())
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return state if master else None
    return optimizer.state_dict() if master else None


def gather_rng_states(device: torch.device, *, distributed: bool, world_size: int) -> list[dict]:
    """Every rank's Python, NumPy, torch and CUDA generator states, in rank order (collective when distributed)."""
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    if not distributed:
        return [rng]
    rngs = [None] * world_size
    dist.all_gather_object(rngs, rng)
    return rngs


# -----------------------------------------------------------------------------
# Writing


def save_pretrained(
    model,
    tokenizer,
    path: str,
    *,
    state: dict | None = None,
    dtype: torch.dtype | None = None,
    architecture: str | None = None,
) -> None:
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
    write_checksums(tmp)  # last: a dir with a manifest is whole, and its files are as they were written
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    with open(os.path.join(out_dir, "latest.tmp"), "w", encoding="utf-8") as f:
        f.write(os.path.basename(path) + "\n")
    os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
    prune_checkpoints(out_dir, keep_last)


def latest_step_dir(out_dir: str) -> str | None:
    """The step_* dir that out_dir/latest names (the newest complete checkpoint), or None."""
    try:
        with open(os.path.join(out_dir, "latest"), encoding="utf-8") as f:
            path = os.path.join(out_dir, f.read().strip())
    except OSError:
        return None
    return path if os.path.isdir(path) else None


def prune_checkpoints(out_dir: str, keep_last: int) -> None:
    steps = sorted(glob.glob(os.path.join(out_dir, "step_[0-9]*[0-9]")))
    for old in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def write_final(out_dir: str, *, write_weights: Callable[[str], None]) -> str:
    """Rank 0 only: out_dir/final/ (and its checksums.json) through a .tmp dir, replacing an older one whole."""
    path = os.path.join(out_dir, "final")
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_weights(tmp)
    write_checksums(tmp)
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


def newest_readable(
    out_dir: str, resume: str, *, read_weights: Callable[[str], dict], stage: str
) -> tuple[str, dict, dict] | None:
    """(path, trainer state, weights) of the checkpoint to resume from, or None. Everything is verified and read
    before anything is restored, so a torn, corrupted or code-carrying checkpoint is skipped whole (resume=auto)
    or is an error (an explicit path)."""
    for path in resume_candidates(out_dir, resume):
        try:
            verified = verify_checksums(path)
            state = read_state(path)
            weights = read_weights(path)
        except Exception as e:  # a torn or partial checkpoint: never load it, try the one before
            if resume != "auto":
                raise
            print0(f"[{stage}] WARNING: skipping unreadable checkpoint {path} ({type(e).__name__}: {e})")
            continue
        if not verified:
            print0(f"[{stage}] note: {path} has no {CHECKSUMS_FILE} (written before checksums); resuming unverified")
        return path, state, weights
    return None


def read_state(path: str) -> dict:
    """trainer_state.pt as data: weights_only=True, so a pickle that names any callable beyond tensors, plain
    containers and SAFE_GLOBALS is refused before anything in it runs."""
    file = os.path.join(path, STATE_FILE)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:  # lists the GLOBALs without unpickling anything
            foreign = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(file) if g not in _SAFE_NAMES]
        except (OSError, RuntimeError, ValueError, pickle.UnpicklingError):
            foreign = []
        if not foreign:  # not a refusal: a torn or garbled file
            raise
        raise CheckpointError(
            f"{file}: refused, it is not plain checkpoint data: it asks to import "
            f"{', '.join(foreign[:5])}, which would run code while loading (a checkpoint from "
            f"an untrusted source, or from code that saved other objects); it was not "
            f"loaded"
        ) from None


def read_weights(path: str) -> dict:
    """The weights save_pretrained wrote into a step_* dir."""
    return load_file(os.path.join(path, WEIGHTS_FILE))


def load_model_weights(model, weights: dict, *, fsdp: bool, where: str) -> None:
    """A full state dict into the model, every key accounted for (a tied lm_head may be absent). Under FSDP
    every rank read the whole file and keeps its shard."""
    if fsdp:
        # distributed modules import only where torch was built with them (dist.is_available())
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        missing, unexpected = set_model_state_dict(
            model, weights, options=StateDictOptions(full_state_dict=True, strict=False)
        )
    else:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not model.config.tie_word_embeddings]
    if missing or unexpected:
        raise ValueError(
            f"{where}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def load_optimizer_state(model, optimizer, state: dict, *, fsdp: bool) -> None:
    """Optimizer state from a checkpoint written with or without FSDP, into a run with or without it. FSDP
    checkpoints key it by parameter name, others by position; convert where the two differ."""
    saved = state["optimizer"]
    by_name = state.get("optimizer_by_name", False)
    if not fsdp and not by_name:
        optimizer.load_state_dict(saved)
        return
    # distributed modules import only where torch was built with them (dist.is_available())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not by_name:  # positions follow the optimizer's groups, which list parameters in model order
        names = {id(p): n for n, p in model.named_parameters()}
        position = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        saved = {
            "state": {position[i]: v for i, v in saved["state"].items()},
            "param_groups": [{**g, "params": [position[i] for i in g["params"]]} for g in saved["param_groups"]],
        }
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
    """Drop metrics logged after the checkpoint we resume from, so metrics.jsonl reads as one clean run. A torn line
    (power loss or a full disk during an append: expected only last) is dropped with a warning, never fatal."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    keep = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                logged_at = record["step"]
            except (ValueError, KeyError, TypeError):
                print0(f"WARNING: {path}:{number}: dropping a torn or malformed line ({line[:60]!r})")
                continue
            if logged_at <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(keep)


# -----------------------------------------------------------------------------
# The model card of final/


def write_card(
    path: str,
    cfg,
    *,
    stage: str,
    step: int,
    tokens_seen: int,
    global_batch: int,
    dtype: torch.dtype,
    world_size: int,
    model_config,
    evaluation: dict | None,
) -> None:
    """README.md in `path` (model/hub.py write_model_card) from the run's facts, readable by other accounts. The data
    licenses are those this stage's data declares (shards' meta.json, the metadata beside data files) plus those
    init_from's card recorded, so they accumulate along pretrain -> sft -> dpo."""
    data_dir, data_path = getattr(cfg, "data_dir", ""), getattr(cfg, "data_path", "")  # the stage's data mixins
    licenses = shard_licenses(data_dir) + file_licenses(data_path) + card_licenses(cfg.init_from)
    licenses += card_licenses(getattr(cfg, "teacher_from", ""))  # distillation: the teacher's data shaped the student
    training = {
        "stage": stage,
        "optimizer steps": step,
        "tokens seen": f"{tokens_seen:,}",
        "global batch": f"{global_batch} {cfg.batch_unit} x {cfg.seq_len} tokens",
        "peak lr": cfg.lr,
        "optimizer": cfg.optimizer,
        "schedule": f"{cfg.lr_schedule}, {cfg.warmup_steps} warmup steps",
        "data": data_dir or data_path or "(see the stage config)",
        "compute dtype": dtype_name(dtype),
        "processes": world_size,
    }
    write_model_card(
        path,
        config=model_config,
        stage=stage,
        training=training,
        evaluation=evaluation or None,
        licenses=sorted(set(licenses)),
        base_model=cfg.init_from,
        library_name="peft" if is_adapter_dir(path) else "transformers",  # the Hub's loader for the folder
    )
    make_readable(path)


# -----------------------------------------------------------------------------
# What the Trainer's save_checkpoint / export_final / resume do, given the trainer (its model, optimizer, guard,
# data position and hooks): the one place that knows what a checkpoint holds.


def save_trainer(trainer) -> str:
    """step_NNNNNN/: weights + tokenizer + trainer_state.pt, written atomically (collective under FSDP)."""
    rngs = gather_rng_states(trainer.device, distributed=trainer.distributed, world_size=trainer.world_size)
    weights = full_model_state(trainer.raw_model, fsdp=trainer.fsdp, master=trainer.master)
    optimizer = full_optimizer_state(trainer.raw_model, trainer.optimizer, fsdp=trainer.fsdp, master=trainer.master)
    path = step_dir(trainer.cfg.out_dir, trainer.step)
    if trainer.master:
        state = {
            "step": trainer.step,
            "tokens_seen": trainer.tokens_seen,
            "stage": trainer.stage,
            "optimizer": optimizer,
            "optimizer_by_name": trainer.fsdp,
            "scaler": trainer.guard.state_dict(),
            "data": trainer.train_data.state_dict(),
            "rng": rngs,
            "world_size": trainer.world_size,
            "global_batch": trainer.global_batch,
            "extra": trainer.extra_state(),
            "config": dataclasses.asdict(trainer.cfg),  # a resume with other settings says which changed
        }
        write_checkpoint(
            path,
            state=state,
            keep_last=trainer.cfg.keep_last,
            write_weights=lambda tmp: trainer.weights.save(trainer, path=tmp, state=weights),
        )
        print0(f"[{trainer.stage}] saved {path}")
    if trainer.distributed:
        dist.barrier()
    return path


def export_trainer(trainer, *, evaluation: dict | None = None) -> None:
    """final/: weights only, in the training dtype (bf16 on GPU), the `init_from` of the next stage; its model card
    lists `evaluation` (the run's last evaluation)."""
    weights = full_model_state(trainer.raw_model, fsdp=trainer.fsdp, master=trainer.master)  # collective
    if not trainer.master:
        return
    dtype = trainer.dtype if trainer.dtype != torch.float16 else torch.bfloat16

    def write(tmp: str) -> None:
        trainer.weights.save(trainer, path=tmp, dtype=dtype, state=weights)
        write_card(
            tmp,
            trainer.cfg,
            stage=trainer.stage,
            step=trainer.step,
            tokens_seen=trainer.tokens_seen,
            global_batch=trainer.global_batch,
            dtype=trainer.dtype,
            world_size=trainer.world_size,
            model_config=trainer.raw_model.config,
            evaluation=evaluation,
        )

    path = write_final(trainer.cfg.out_dir, write_weights=write)
    print0(f"[{trainer.stage}] final weights in {path}{trainer.weights.final_note(path)}")


class ModelWeights:
    """What step_*/ and final/ hold of the model and how a resume reads it back: the whole model, loadable with
    from_pretrained alone. A stage whose checkpoints hold something else sets its own (LoRA: the adapter only,
    trainer/lora.py AdapterWeights) as the Trainer's `weights`."""

    def save(self, trainer, *, path: str, dtype: torch.dtype | None = None, state: dict | None = None) -> None:
        """Weights (+ config) and tokenizer; `state` is the full state dict (full_model_state) where the model is
        sharded."""
        save_pretrained(
            trainer.raw_model,
            trainer.tokenizer,
            path,
            state=state,
            dtype=dtype,
            architecture=trainer.model_class_name if trainer.fsdp else None,
        )
        make_readable(path)  # safetensors writes 0600; a docker/ollama service account must be able to read it

    def read(self, path: str) -> dict:
        return read_weights(path)

    def load(self, trainer, *, path: str, weights: dict) -> None:
        load_model_weights(trainer.raw_model, weights, fsdp=trainer.fsdp, where=path)

    def final_note(self, path: str) -> str:
        """The end of the run's last line, about final/."""
        return f" (next stage: init_from={path})"


# Settings a resume may change without changing the run: how long, where to log, how often to save or evaluate.
RESUME_MAY_CHANGE = {
    "resume",
    "max_steps",
    "out_dir",
    "device",
    "prefetch",
    "log_every",
    "eval_every",
    "eval_batches",
    "save_every",
    "keep_last",
    "logger",
    "run_name",
    "max_skipped_steps",
}


def warn_changed_settings(trainer, saved: dict | None, path: str) -> None:
    """A warning for every setting that differs from the checkpoint's (lr, seq_len, ...): the resumed run goes on,
    but it is no longer the run that was started. Checkpoints older than the saved config say nothing."""
    if not isinstance(saved, dict):
        return
    now = dataclasses.asdict(trainer.cfg)
    changed = [k for k in now if k in saved and k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
    for key in changed:
        print0(
            f"[{trainer.stage}] WARNING: resuming from {path} with {key}={now[key]!r}, but it was saved with "
            f"{key}={saved[key]!r}; the run goes on with the new value"
        )


def resume_trainer(trainer) -> None:
    """Continue from the newest readable checkpoint (resume=auto), a given one, or not at all (never)."""
    found = newest_readable(
        trainer.cfg.out_dir,
        trainer.cfg.resume,
        stage=trainer.stage,
        read_weights=trainer.weights.read,
    )
    if found is None:
        return
    path, state, weights = found
    trainer.weights.load(trainer, path=path, weights=weights)
    load_optimizer_state(trainer.raw_model, trainer.optimizer, state, fsdp=trainer.fsdp)
    trainer.guard.load_state_dict(state["scaler"])
    trainer.step, trainer.tokens_seen = state["step"], state["tokens_seen"]
    if state["global_batch"] != trainer.global_batch:
        print0(
            f"[{trainer.stage}] WARNING: global batch changed from {state['global_batch']} to "
            f"{trainer.global_batch}; the data position stays exact in tokens but the run is no longer the same"
        )
    warn_changed_settings(trainer, state.get("config"), path)
    trainer.train_data.load_state_dict(state["data"])
    trainer.load_extra_state(state=state.get("extra", {}))
    if not restore_rng(state["rng"], rank=trainer.rank, world_size=trainer.world_size, device=trainer.device):
        seed_rngs(trainer.cfg.seed + trainer.step, rank=trainer.rank)  # another number of processes: reseed
    if trainer.master:
        truncate_metrics(trainer.cfg.out_dir, trainer.step)
    print0(f"[{trainer.stage}] resumed from {path} at step {trainer.step} ({trainer.tokens_seen:,} tokens seen)")
