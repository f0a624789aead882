"""
Live tensor memory on CPU, where torch keeps no allocator statistics: current and peak bytes of the tensor storages
that ops create, for the benchmarks' CPU rows (bench_rl_memory.py, bench_train.py). On CUDA use
torch.cuda.max_memory_allocated instead.
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemoryTracker(TorchDispatchMode):
    """Current and peak bytes of live tensor storages: every op's outputs are counted once per storage and
    subtracted when the storage is freed. `muted` (set around an emulated offloaded model's forward) leaves out
    what is made meanwhile, also when a view of it shows up later."""

    def __init__(self):
        super().__init__()
        self.live = {}  # storage id -> bytes counted
        self.muted_ids = set()  # storages made while muted: never counted
        self.muted = False
        self.current = 0
        self.peak = 0

    def count_existing(self, tensors) -> None:
        """Count tensors made before tracking began (weights, buffers)."""
        for t in tensors:
            self._add(t.untyped_storage())

    def leave_out(self, module: torch.nn.Module) -> None:
        """Count nothing that `module`'s forward makes (an offloaded model, emulated on the same device)."""
        module.register_forward_pre_hook(lambda *_: setattr(self, "muted", True))
        module.register_forward_hook(lambda *_: setattr(self, "muted", False))

    def reset_peak(self) -> None:
        self.peak = self.current

    def _add(self, storage) -> None:
        key = storage._cdata  # the C++ StorageImpl: views and in-place results share it
        if key in self.muted_ids:
            return
        if self.muted:
            if key not in self.live:
                self.muted_ids.add(key)
                weakref.finalize(storage, self.muted_ids.discard, key)
            return
        if key not in self.live:
            self.live[key] = 0
            weakref.finalize(storage, self._free, key)
        size, counted = storage.nbytes(), self.live[key]
        if size > counted:  # new, or grown in place (resize_, out=)
            self.live[key] = size
            self.current += size - counted
            self.peak = max(self.peak, self.current)

    def _free(self, key) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage())
        return out
