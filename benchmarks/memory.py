"""Peak memory of a block of PyTorch work, on any device."""
from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    """Tracks the bytes of tensor storages created inside the block and still alive; ``peak`` is the maximum.

    Storages that exist before the block (inputs, parameters: pass them as ``existing``) are not
    counted, so ``peak`` is the extra memory the work needs. Works on CPU, where PyTorch has no
    allocator statistics; buffers a kernel allocates outside tensors (scratch space) are not seen.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.live = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in self.existing:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._release, key)
        return out


def peak_bytes(fn, existing: Iterable[torch.Tensor], device: torch.device) -> int:
    """Extra peak bytes of ``fn()``: CUDA allocator statistics on CUDA, tensor tracking elsewhere."""
    existing = list(existing)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with PeakTensorMemory(existing) as tracker:
        fn()
    return tracker.peak
