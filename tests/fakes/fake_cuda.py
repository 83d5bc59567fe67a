"""A stand-in GPU for the micro-batch code: device memory as numbers, out-of-memory as the real error.

The machine this is tested on has no GPU. `FakeCuda` replaces exactly the `torch.cuda` functions the
hook reads device memory through (is_available, device_count, current_device, mem_get_info,
memory_allocated, memory_reserved, max_memory_allocated, max_memory_reserved,
reset_peak_memory_stats, empty_cache, synchronize) and keeps a small model of a caching allocator:

- `alloc(n)` rounds to 512-byte blocks; what it cannot serve from the cache grows the reserved
  pool in whole segments (2 MiB, or the request rounded up to 2 MiB when larger). When the pool
  cannot grow within `capacity`, the cache is emptied and the request retried once, as the real
  allocator does, and then `torch.cuda.OutOfMemoryError` is raised with the message the real one
  starts with ("CUDA out of memory. Tried to allocate ..."), so Lightning's and Accelerate's OOM
  checks (which read the message) recognise it too.
- `free(n)` returns blocks to the cache: reserved memory stays until `empty_cache()`.

The model's memory comes from `MemoryLayer`, an nn.Module put into a real (CPU) model: its forward
allocates activation memory from the input's shape through a curve, kept until the autograd graph
is freed (after backward, or when the graph is dropped after an exception), and its backward
allocates a temporary workspace. Curves:

    straight(per_sample)                   bytes = per_sample x rows
    with_jump(per_sample, at, jump)        + `jump` bytes of workspace from `at` rows up (a kernel
                                           that picks a bigger algorithm at larger sizes)
    per_element(per_element)               bytes = per_element x numel: padded variable-length
                                           input grows with its longest sample

`inject("forward"|"backward", nth)` raises an out-of-memory error at the nth call from now, once,
whatever the memory (the DDP tests put it on one rank). Everything is per process: a DDP test
installs one in each rank.
"""
from __future__ import annotations

import math
import threading
import weakref
from typing import Any, Callable

import torch

MiB = 2**20
BLOCK = 512
SEGMENT = 2 * MiB

FUNCTIONS = ("is_available", "device_count", "current_device", "mem_get_info", "memory_allocated",
             "memory_reserved", "max_memory_allocated", "max_memory_reserved", "reset_peak_memory_stats",
             "empty_cache", "synchronize")


def _round(n: int, unit: int) -> int:
    return int(math.ceil(n / unit) * unit)


class FakeCuda:
    def __init__(self, capacity: int, *, device_count: int = 1) -> None:
        self.capacity = int(capacity)
        self.count = device_count
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.ooms = 0                   # errors raised (real and injected)
        self.allocations = 0
        self._inject: dict[str, int] = {}
        self._lock = threading.Lock()
        self._saved: dict[str, Any] = {}

    # ---- the allocator ----

    def alloc(self, nbytes: int) -> int:
        n = _round(max(0, int(nbytes)), BLOCK)
        with self._lock:
            self.allocations += 1
            if not self._grow(n):
                self.reserved = _round(self.allocated, SEGMENT) if self.allocated else 0   # empty the cache, retry
                if not self._grow(n):
                    self.ooms += 1
                    free = self.capacity - self.reserved
                    raise torch.cuda.OutOfMemoryError(
                        f"CUDA out of memory. Tried to allocate {n / MiB:.2f} MiB. GPU 0 has a total capacity of "
                        f"{self.capacity / MiB:.2f} MiB of which {max(0, free) / MiB:.2f} MiB is free. "
                        f"(looptune stand-in)")
            self.allocated += n
            self.peak_allocated = max(self.peak_allocated, self.allocated)
            return n

    def _grow(self, n: int) -> bool:
        cached = self.reserved - self.allocated
        if n <= cached:
            return True
        need = _round(max(n - cached, SEGMENT), SEGMENT)
        if self.reserved + need > self.capacity:
            return False
        self.reserved += need
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return True

    def free(self, nbytes: int) -> None:
        with self._lock:
            self.allocated = max(0, self.allocated - _round(int(nbytes), BLOCK))

    def inject(self, where: str, nth: int = 1) -> None:
        """Raise one out-of-memory error at the nth `where` ("forward" or "backward") from now."""
        if where not in ("forward", "backward"):
            raise ValueError(where)
        self._inject[where] = nth

    def _injected(self, where: str) -> None:
        left = self._inject.get(where)
        if left is None:
            return
        if left <= 1:
            del self._inject[where]
            self.ooms += 1
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 20.00 MiB (injected "
                                              f"in {where}, looptune stand-in)")
        self._inject[where] = left - 1

    # ---- the torch.cuda functions ----

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.count

    def current_device(self) -> int:
        return 0

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        return self.capacity - self.reserved, self.capacity

    def memory_allocated(self, device: Any = None) -> int:
        return self.allocated

    def memory_reserved(self, device: Any = None) -> int:
        return self.reserved

    def max_memory_allocated(self, device: Any = None) -> int:
        return self.peak_allocated

    def max_memory_reserved(self, device: Any = None) -> int:
        return self.peak_reserved

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        with self._lock:
            self.peak_allocated = self.allocated
            self.peak_reserved = self.reserved

    def empty_cache(self) -> None:
        with self._lock:
            self.reserved = _round(self.allocated, SEGMENT) if self.allocated else 0

    def synchronize(self, device: Any = None) -> None:
        pass

    # ---- install ----

    def install(self) -> FakeCuda:
        for name in FUNCTIONS:
            self._saved[name] = getattr(torch.cuda, name)
            setattr(torch.cuda, name, getattr(self, name))
        return self

    def uninstall(self) -> None:
        for name, fn in self._saved.items():
            setattr(torch.cuda, name, fn)
        self._saved.clear()

    def __enter__(self) -> FakeCuda:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()


# ---- memory curves: input tensor -> activation bytes ----

def straight(per_sample: int) -> Callable[[torch.Tensor], int]:
    return lambda x: per_sample * x.shape[0]


def with_jump(per_sample: int, at: int, jump: int) -> Callable[[torch.Tensor], int]:
    return lambda x: per_sample * x.shape[0] + (jump if x.shape[0] >= at else 0)


def per_element(per_element: int) -> Callable[[torch.Tensor], int]:
    return lambda x: per_element * x.numel()


class _Held:
    """Activation memory owned by one autograd graph: freed when the graph goes."""

    def __init__(self, fake: FakeCuda, nbytes: int) -> None:
        self.n = fake.alloc(nbytes)
        self._fin = weakref.finalize(self, fake.free, self.n)


class _Memory(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: MemoryLayer) -> torch.Tensor:   # type: ignore[override]
        layer.fake._injected("forward")
        ctx.held = _Held(layer.fake, layer.curve(x))
        ctx.layer = layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:   # type: ignore[override]
        layer = ctx.layer
        layer.fake._injected("backward")
        n = layer.fake.alloc(int(ctx.held.n * layer.backward_factor))   # the backward's workspace
        layer.fake.free(n)
        ctx.held = None
        return grad, None


class MemoryLayer(torch.nn.Module):
    """Identity on values; on the stand-in GPU it holds `curve(x)` bytes of activations per forward."""

    def __init__(self, fake: FakeCuda, curve: Callable[[torch.Tensor], int], backward_factor: float = 1.0) -> None:
        super().__init__()
        self.fake = fake
        self.curve = curve
        self.backward_factor = backward_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            self.fake._injected("forward")
            n = self.fake.alloc(self.curve(x))      # inference: freed at once
            self.fake.free(n)
            return x
        return _Memory.apply(x, self)
