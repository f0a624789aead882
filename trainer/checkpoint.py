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

Every function takes the parts it needs explicitly: the model, optimizer and flags, or, for save / export / restore,
a Parts that the Trainer builds (trainer/core.py Trainer.checkpoint_parts); the Trainer decides when to call them.
The model card of final/ is model/hub.py's write_stage_card. Under FSDP the functions that gather or set state are
collective: every rank calls them.
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

from dataset.batches import StepBatches
from dataset.licenses import card_licenses, file_licenses, shard_licenses
from model.hub import make_readable, save_pretrained, write_stage_card
from model.runtime import (  # noqa: F401 (the checksum functions are re-exported: tests and stages import them here)
    CHECKSUMS_FILE,
    CheckpointError,
    sha256_file,
    verify_checksums,
    write_checksums,
)
from trainer.common import STEP_DIRS, print0, seed_rngs
from trainer.guard import StepGuard

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
    steps = sorted(glob.glob(os.path.join(out_dir, STEP_DIRS)))
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


def newest_readable(
    candidates: list[str], *, explicit: bool, read_weights: Callable[[str], dict], stage: str
) -> tuple[str, dict, dict] | None:
    """(path, trainer state, weights) of the first readable of `candidates` (common.resume_candidates), or None.
    Everything is verified and read before anything is restored, so a torn, corrupted or code-carrying checkpoint
    is skipped whole (resume=auto) or is an error (explicit: a path given)."""
    for path in candidates:
        try:
            verified = verify_checksums(path)
            state = read_state(path)
            weights = read_weights(path)
        except Exception as e:  # a torn or partial checkpoint: never load it, try the one before
            if explicit:
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
# What the Trainer's save_checkpoint / export_final / resume do, given the parts: the one place that knows what a
# checkpoint holds.


@dataclasses.dataclass(frozen=True)
class Parts:
    """Everything a checkpoint saves, restores or records, handed over explicitly (Trainer.checkpoint_parts builds
    it): what it holds (model, optimizer, guard, data position, the stage's own state), then the run's facts and
    where this process runs. The loop's position (step, tokens seen) is no part: save and export take it, restore
    returns it."""

    cfg: object  # the stage's TrainConfig: out_dir, resume, keep_last, seed, the card's facts; saved whole
    stage: str  # log prefix, recorded in trainer_state.pt
    model: torch.nn.Module  # the bare model, never a compiled/DDP wrapper (FSDP's sharded one under fsdp)
    model_class: str  # its class before FSDP subclassed it: the `architectures` config.json names
    tokenizer: object  # saved beside the weights
    weights: "ModelWeights"  # what of the model a checkpoint holds (LoRA: trainer/lora.py AdapterWeights)
    optimizer: torch.optim.Optimizer
    guard: StepGuard  # the GradScaler and the skipped-step counters
    data: StepBatches  # the data position
    extra_state: Callable[[], dict]  # the stage's own state (rollout buffer, critic) ...
    load_extra_state: Callable[..., None]  # ... and how it comes back (keyword `state`)
    global_batch: int  # batch units per optimizer step, all ranks together
    dtype: torch.dtype  # the compute dtype (final/ is written in it, bf16 for fp16)
    device: torch.device
    rank: int
    world_size: int
    fsdp: bool

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def save(parts: Parts, *, step: int, tokens_seen: int) -> str:
    """step_NNNNNN/: weights + tokenizer + trainer_state.pt, written atomically (collective under FSDP)."""
    rngs = gather_rng_states(parts.device, distributed=parts.distributed, world_size=parts.world_size)
    weights = full_model_state(parts.model, fsdp=parts.fsdp, master=parts.master)
    optimizer = full_optimizer_state(parts.model, parts.optimizer, fsdp=parts.fsdp, master=parts.master)
    path = step_dir(parts.cfg.out_dir, step)
    if parts.master:
        state = {
            "step": step,
            "tokens_seen": tokens_seen,
            "stage": parts.stage,
            "optimizer": optimizer,
            "optimizer_by_name": parts.fsdp,
            "scaler": parts.guard.state_dict(),
            "data": parts.data.state_dict(),
            "rng": rngs,
            "world_size": parts.world_size,
            "global_batch": parts.global_batch,
            "extra": parts.extra_state(),
            "config": dataclasses.asdict(parts.cfg),  # a resume with other settings says which changed
        }
        write_checkpoint(
            path,
            state=state,
            keep_last=parts.cfg.keep_last,
            write_weights=lambda tmp: parts.weights.save(parts, path=tmp, state=weights),
        )
        print0(f"[{parts.stage}] saved {path}")
    if parts.distributed:
        dist.barrier()
    return path


def export(parts: Parts, *, step: int, tokens_seen: int, evaluation: dict | None = None) -> None:
    """final/: weights only, in the training dtype (bf16 on GPU), the `init_from` of the next stage; its model card
    (model/hub.py write_stage_card) lists `evaluation` (the run's last evaluation) and the data licenses: those this
    stage's data declares (shards' meta.json, the metadata beside data files) plus those init_from's card recorded,
    so they accumulate along pretrain -> sft -> dpo."""
    weights = full_model_state(parts.model, fsdp=parts.fsdp, master=parts.master)  # collective
    if not parts.master:
        return
    cfg = parts.cfg
    data_dir, data_path = getattr(cfg, "data_dir", ""), getattr(cfg, "data_path", "")  # the stage's data mixins
    licenses = shard_licenses(data_dir) + file_licenses(data_path) + card_licenses(cfg.init_from)
    licenses += card_licenses(getattr(cfg, "teacher_from", ""))  # distillation: the teacher's data shaped the student
    dtype = parts.dtype if parts.dtype != torch.float16 else torch.bfloat16

    def write(tmp: str) -> None:
        parts.weights.save(parts, path=tmp, dtype=dtype, state=weights)
        write_stage_card(
            tmp,
            cfg,
            stage=parts.stage,
            step=step,
            tokens_seen=tokens_seen,
            global_batch=parts.global_batch,
            dtype=parts.dtype,
            world_size=parts.world_size,
            model_config=parts.model.config,
            evaluation=evaluation,
            licenses=licenses,
        )

    path = write_final(cfg.out_dir, write_weights=write)
    print0(f"[{parts.stage}] final weights in {path}{parts.weights.final_note(path)}")


class ModelWeights:
    """What step_*/ and final/ hold of the model and how a resume reads it back: the whole model, loadable with
    from_pretrained alone. A stage whose checkpoints hold something else sets its own (LoRA: the adapter only,
    trainer/lora.py AdapterWeights) as the Trainer's `weights`."""

    def save(self, parts: Parts, *, path: str, dtype: torch.dtype | None = None, state: dict | None = None) -> None:
        """Weights (+ config) and tokenizer; `state` is the full state dict (full_model_state) where the model is
        sharded."""
        save_pretrained(
            parts.model,
            parts.tokenizer,
            path,
            state=state,
            dtype=dtype,
            architecture=parts.model_class if parts.fsdp else None,
        )
        make_readable(path)  # safetensors writes 0600; a docker/ollama service account must be able to read it

    def read(self, path: str) -> dict:
        return read_weights(path)

    def load(self, parts: Parts, *, path: str, weights: dict) -> None:
        load_model_weights(parts.model, weights, fsdp=parts.fsdp, where=path)

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


def warn_changed_settings(cfg, saved: dict | None, *, path: str, stage: str) -> None:
    """A warning for every setting that differs from the checkpoint's (lr, seq_len, ...): the resumed run goes on,
    but it is no longer the run that was started. Checkpoints older than the saved config say nothing."""
    if not isinstance(saved, dict):
        return
    now = dataclasses.asdict(cfg)
    changed = [k for k in now if k in saved and k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
    for key in changed:
        print0(
            f"[{stage}] WARNING: resuming from {path} with {key}={now[key]!r}, but it was saved with "
            f"{key}={saved[key]!r}; the run goes on with the new value"
        )


def restore(parts: Parts, path: str, state: dict, weights: dict) -> tuple[int, int]:
    """Put a checkpoint that newest_readable found (its path, trainer state and weights) back into the parts;
    returns the loop's position: (step, tokens seen)."""
    parts.weights.load(parts, path=path, weights=weights)
    load_optimizer_state(parts.model, parts.optimizer, state, fsdp=parts.fsdp)
    parts.guard.load_state_dict(state["scaler"])
    step, tokens_seen = state["step"], state["tokens_seen"]
    if state["global_batch"] != parts.global_batch:
        print0(
            f"[{parts.stage}] WARNING: global batch changed from {state['global_batch']} to "
            f"{parts.global_batch}; the data position stays exact in tokens but the run is no longer the same"
        )
    warn_changed_settings(parts.cfg, state.get("config"), path=path, stage=parts.stage)
    parts.data.load_state_dict(state["data"])
    parts.load_extra_state(state=state.get("extra", {}))
    if not restore_rng(state["rng"], rank=parts.rank, world_size=parts.world_size, device=parts.device):
        seed_rngs(parts.cfg.seed + step, rank=parts.rank)  # another number of processes: reseed
    if parts.master:
        truncate_metrics(parts.cfg.out_dir, step)
    print0(f"[{parts.stage}] resumed from {path} at step {step} ({tokens_seen:,} tokens seen)")
    return step, tokens_seen
