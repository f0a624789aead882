"""
What the training loop draws its data from: one optimizer step's micro-batches at a time, resumable exactly.

Two kinds satisfy StepBatches: ShardStream (dataset/shards.py, token shards read in order, for pretraining) and
IndexBatches (below, shuffled samples held in memory: chat, preference pairs, RL prompts). The loop knows only
the protocol, so a new data format needs a class with these three methods and nothing in trainer/core.py.
"""

from typing import Protocol, runtime_checkable

import numpy as np


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

    def __init__(self, dataset, global_batch: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, collate=None):
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
        ids = self._order[self.cursor:self.cursor + self.global_batch]
        self.cursor += self.global_batch
        rows = self.global_batch // self.world_size
        mine = ids[self.rank * rows:(self.rank + 1) * rows]
        micro = [mine[i:i + self.micro_batch] for i in range(0, rows, self.micro_batch)]
        return [self.collate([self.dataset[int(i)] for i in m]) for m in micro]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)
