"""
What the training loop draws its data from: one optimizer step's micro-batches at a time, resumable exactly.

Two kinds satisfy StepBatches: ShardStream (dataset/shards.py, token shards read in order, for pretraining) and
IndexBatches (below, shuffled samples held in memory: chat, preference pairs, RL prompts; held_out_split and
in_memory_batches build them for the stages whose data sits in memory). The loop knows only the protocol, so a new
data format needs a class with these three methods and nothing in trainer/core.py.
"""

import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class StepBatches(Protocol):
    """One optimizer step's worth of this rank's data per call, plus the position a checkpoint saves."""

    def next_step(self) -> list:
        """This rank's micro-batches for the next optimizer step."""

    def state_dict(self) -> dict:
        """The position in the data, global (the same on every rank), so resuming repeats no sample."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict() of an earlier run."""


class IndexBatches:
    """Yields, for each optimizer step, this rank's micro-batches of dataset indices.

    Each epoch walks a permutation seeded by (seed, epoch); a step takes the next `global_batch` indices, and
    rank r takes its contiguous slice, cut into micro-batches. The position (epoch, cursor) is global, so
    resuming reproduces the same batches, also with another number of processes."""

    def __init__(
        self,
        dataset,
        global_batch: int,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        collate=None,
    ):
        if len(dataset) < global_batch:
            raise ValueError(f"the dataset has {len(dataset)} samples, fewer than one global batch ({global_batch})")
        self.dataset, self.collate = dataset, collate
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def next_step(self) -> list:
        if self.cursor + self.global_batch > len(self._order):  # drop the ragged tail of an epoch
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        ids = self._order[self.cursor : self.cursor + self.global_batch]
        self.cursor += self.global_batch
        rows = self.global_batch // self.world_size
        mine = ids[self.rank * rows : (self.rank + 1) * rows]
        micro = [mine[i : i + self.micro_batch] for i in range(0, rows, self.micro_batch)]
        return [self.collate([self.dataset[int(i)] for i in m]) for m in micro]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)


# -----------------------------------------------------------------------------
# Datasets held in memory (chat, preference pairs): a held-out split and the step batches over the rest

HELD_OUT_SHARE = 10  # at most 1/10 of the samples are held out, whatever val_samples asks


def held_out_split(samples: list, val_samples: int, seed: int) -> tuple[list, list]:
    """(train, val): min(val_samples, len // HELD_OUT_SHARE) samples held out, drawn by seed, so the split is the
    same on every rank and on resume. One rule for SFT, DPO and the reward model, so a preference file is split
    the same way for DPO and for the reward model trained on it (with the same seed, the held-out pairs of one are
    never the training pairs of the other). val_samples is sized for real data (100-200); the cap keeps a small
    file mostly for training, where a bigger held-out share would buy a steadier metric with training data."""
    n_val = min(val_samples, len(samples) // HELD_OUT_SHARE)
    order = np.random.default_rng(seed).permutation(len(samples))
    return [samples[i] for i in order[n_val:]], [samples[i] for i in order[:n_val]]


def in_memory_batches(
    train,
    val,
    collate,
    *,
    global_batch: int,
    micro_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    eval_batches: int,
) -> tuple[IndexBatches, list | None]:
    """A Trainer's build_data result for datasets in memory: train through IndexBatches (exact resume), and up to
    eval_batches collated micro-batches of val (None when there is nothing to evaluate)."""
    train_data = IndexBatches(train, global_batch, micro_batch, rank, world_size, seed, collate)
    rows = min(len(val), eval_batches * micro_batch) if val is not None else 0
    val_batches = [collate([val[j] for j in range(i, min(i + micro_batch, rows))]) for i in range(0, rows, micro_batch)]
    return train_data, val_batches or None


class PrefetchBatches:
    """Wraps a StepBatches: builds step N+1's micro-batches (reading, collation, masks) in a background thread
    while step N trains, pinned when the batches go to a GPU so that to_device's non_blocking copies overlap.

    state_dict() and the inner source's plain attributes (e.g. ShardStream.shard_done) describe the step last
    handed out, not the one being prefetched, so a checkpoint resumes exactly where training was."""

    def __init__(self, inner: StepBatches, pin_memory: bool = False):
        self.inner, self.pin_memory = inner, pin_memory
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._pending = None
        self._handed = self._snapshot()

    def _snapshot(self) -> dict:
        # Plain values only: the data itself (datasets, arrays) is not state and is never copied.
        simple = {k: v for k, v in vars(self.inner).items() if isinstance(v, (bool, int, float, str))}
        return {"state": copy.deepcopy(self.inner.state_dict()), "attributes": simple}

    def _build(self) -> tuple[list, dict]:
        batches = self.inner.next_step()
        if self.pin_memory:
            batches = [_pinned(b) for b in batches]
        return batches, self._snapshot()

    def next_step(self) -> list:
        future = self._pending or self._pool.submit(self._build)
        batches, self._handed = future.result()
        self._pending = self._pool.submit(self._build)
        return batches

    def state_dict(self) -> dict:
        return self._handed["state"]

    def load_state_dict(self, state: dict) -> None:
        self._drop_pending()
        self.inner.load_state_dict(state)
        self._handed = self._snapshot()

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._pending.exception()  # wait for it; an error there belongs to a step nobody asked for
            self._pending = None

    def __getattr__(self, name: str):
        # Only reached for names this wrapper does not have: the inner source's, as of the step handed out.
        if name.startswith("_") or name in ("inner", "pin_memory"):
            raise AttributeError(name)
        attributes = self._handed["attributes"]
        return attributes[name] if name in attributes else getattr(self.inner, name)


def _pinned(batch):
    """Page-locked copies of a batch's tensors (dict, tuple or list of them), for asynchronous host-to-GPU copies."""
    if torch.is_tensor(batch):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: _pinned(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_pinned(v) for v in batch)
    return batch
