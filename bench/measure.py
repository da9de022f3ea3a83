"""What the benches share: wall time with the GPU synchronised, and peak memory (CUDA's counter, or live tensors on the CPU).

Peak memory is what a piece of code allocates above what was allocated when it began: on a GPU,
torch.cuda.max_memory_allocated; on the CPU, the most tensor storage alive at once among the storages
created inside it, counted op by op (a kernel's private workspace and the allocator's overhead are not
included).
"""

from __future__ import annotations

import contextlib
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GiB = 2**30


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    """Seconds for one call of fn, waiting for the GPU to finish."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


class TensorMemory(TorchDispatchMode):
    """The most bytes of tensor storage alive at once among the storages that ops create inside this mode
    (a kernel's private workspace is not a tensor and is not counted)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()  # a view or in-place result shares an input's storage: not new
                if key not in self._sizes and key not in inputs and storage.nbytes():
                    self._sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key)
        return out

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


def peak_bytes(fn) -> int:
    """Bytes one call of fn allocates above what is allocated before it."""
    if torch.cuda.is_available():
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - before
    with TensorMemory() as counted:
        fn()
    return counted.peak


class Meter:
    """Seconds and peak memory of the named phases of one run, above what was allocated when it began.

        with Meter() as meter:
            with meter.phase("rollout"):
                ...
                with meter.phase("scoring", memory=False):  # nested: its time only
                    ...
        meter.seconds["rollout"], meter.peak["rollout"], meter.overall_peak   # seconds, bytes

    A phase entered again adds to its time and keeps its highest peak. Memory is counted per phase for
    phases that are not nested in another counted one (CUDA has one peak counter).
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.peak: dict[str, int] = {}
        self.overall_peak = 0
        self._cuda = torch.cuda.is_available()
        self._counter: TensorMemory | None = None
        self._base = 0

    def __enter__(self) -> Meter:
        sync()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._counter = TensorMemory().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        sync()
        self.overall_peak = max(self.overall_peak, self._current_peak())
        if self._counter is not None:
            self._counter.__exit__(*exc)

    def _current_peak(self) -> int:
        return torch.cuda.max_memory_allocated() - self._base if self._cuda else self._counter.peak

    def _reset_peak(self) -> None:
        self.overall_peak = max(self.overall_peak, self._current_peak())
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self._counter.peak = self._counter.live

    @contextlib.contextmanager
    def phase(self, name: str, memory: bool = True):
        sync()
        if memory:
            self._reset_peak()
        start = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            if memory:
                self.peak[name] = max(self.peak.get(name, 0), self._current_peak())
                self.overall_peak = max(self.overall_peak, self.peak[name])
