"""`hook.accumulate(batch, compute_loss)`: the loader's batch stays the batch per optimizer step;
the hook splits it into micro-batches that fit the device and accumulates their gradients.

Each micro-batch's loss (its mean) is back-propagated scaled by its share of the batch's rows,
so the accumulated gradient is the unsplit batch's. The first micro-batches of a job are the fit
(tuners/memfit.py): a small one, then sizes predicted from the device memory they took, until
one runs at the predicted largest size; after that the batch is cut into equal micro-batches of
at most that size. A probe is only another split of the same batch: no sample and no step is
spent on it.

Out of memory (torch.cuda.OutOfMemoryError, by type): the watched model's gradients and the
cached blocks are freed, the micro-batch lowered, and the whole batch done again. The error
reaches the caller only when one row does not fit.

DistributedDataParallel: every micro-batch runs under no_sync(), and the gradients are averaged
across ranks here afterwards, in buckets: an out-of-memory error can then never interrupt a
collective (in DDP's own synchronising backward it would leave buckets launched on the other
ranks and the reducer half-way, which no rank can undo), and each rank redoes its batch alone
while the others wait at the all-reduce. Module buffers are broadcast from rank 0 once per batch
here, not once per forward, so a redone forward adds no collective.

Device memory is read only through torch.cuda's is_available, mem_get_info, memory_allocated,
memory_reserved, max_memory_allocated, reset_peak_memory_stats and empty_cache.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from typing import Any, Callable

from looptune.tuners.hook.actuators import split
from looptune.tuners.memfit import SETTLE, MemoryFit

log = logging.getLogger("looptune.hook")

KNOB = "micro_batch_size"
BUCKET_BYTES = 25 * 2**20        # DDP's default bucket size
NOISE_EVERY = 10                 # steps between gradient noise scale estimates
NOISE_EMA = 0.2


def _torch() -> Any:
    import torch
    return torch


def _backward(loss: Any) -> None:
    loss.backward()


def has_batch_statistics(module: Any) -> bool:
    return any("BatchNorm" in type(m).__name__ for m in module.modules())


class MicroBatcher:
    def __init__(self, hook: Any, split_batch_norm: bool = False) -> None:
        torch = _torch()
        self.hook = hook
        self.meter = hook.meter
        self.fit = MemoryFit()
        self.fitted = False
        self.user_cap: int | None = None       # rows, set by a decision (the tuner's trial)
        self.widest = 0.0                      # elements per row of the widest batch seen
        self.max_rows = 0                      # the largest batch seen
        self.limit_rows = 0                    # the micro-batch size the last batch used
        self.recoveries = 0
        self._logged: set[str] = set()
        self._steps = 0
        self._noise_small: float | None = None
        self._noise_g2: float | None = None
        self.noise_scale: float | None = None
        module = hook.module
        self.ddp = None
        self.untunable = ""
        if module is None:
            self.untunable = "hook.watch(model) was not called: an out-of-memory error could not free its gradients"
        elif not torch.cuda.is_available():
            self.untunable = "no CUDA device: no device memory to fit"
        else:
            from torch.nn.parallel import DistributedDataParallel
            if isinstance(module, DistributedDataParallel):
                self.ddp = module
            inner = module.module if self.ddp is not None else module
            if has_batch_statistics(inner) and not split_batch_norm:
                self.untunable = ("the model has batch-statistics layers (BatchNorm): micro-batches would "
                                  "change its training (opt in: hook.micro_batch_split_batch_norm)")
        self.params = [p for p in (module.parameters() if module is not None else ()) if p.requires_grad]
        self.splitting = not self.untunable
        self._buckets: list[tuple[list[Any], Any]] | None = None
        if self.splitting:
            self.meter.oom_recoveries = 0
            hook.add_actuator(KNOB, self.get, self.set, settling=lambda: not self.fitted)
        else:
            hook.untunable[KNOB] = self.untunable
            log.info("looptune: micro_batch_size not tuned: %s", self.untunable)

    # ---- the knob ----

    def get(self) -> int:
        return int(self.limit_rows)

    def set(self, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"micro_batch_size must be a positive integer, not {value!r}")
        self.user_cap = value
        self.limit_rows = min(self.limit_rows, value) if self.limit_rows else value

    # ---- the step ----

    def accumulate(self, batch: Any, compute_loss: Callable[[Any], Any],
                   backward: Callable[[Any], None] | None = None) -> float:
        back = backward if backward is not None else _backward
        n = split.rows(batch)
        if not self.splitting or n <= 1:
            loss = compute_loss(batch)
            back(loss)
            return float(loss.detach())
        self._steps += 1
        width = split.elements(batch, n) / n or 1.0
        wider = width > self.widest > 0
        self.widest = max(self.widest, width)
        self.max_rows = max(self.max_rows, n)
        if self.ddp is not None:
            self._broadcast_buffers()
        noise = self._steps % NOISE_EVERY == 1 and all(p.grad is None for p in self.params)
        while True:
            total, failed_at, error = self._attempt(batch, n, width, compute_loss, noise, back)
            if failed_at is None:
                break
            self._recover(failed_at, width, wider, error)
        if self.ddp is not None:
            self._allreduce()
        if noise:
            self._noise_end(n)
        self.meter.device_peak_bytes = self._peak
        self._update_knob()
        self.hook.knobs[KNOB] = self.limit_rows
        return float(total)

    def _room(self) -> float:
        """Bytes this process may still allocate: free device memory plus its own cached blocks."""
        cuda = _torch().cuda
        free, _total = cuda.mem_get_info()
        return free + cuda.memory_reserved() - cuda.memory_allocated()

    def _rows_that_fit(self, n: int, width: float) -> int:
        largest = self.fit.largest(self._room())
        if largest is None:
            if self.fit.failed is not None:
                return max(1, int(self.fit.failed / width) // 2)
            return max(1, math.ceil(n / 32))        # nothing known yet: a first small probe
        return max(1, int(largest / width))

    def _update_knob(self) -> None:
        """The knob: rows of the widest input seen that fit now. It moves only on a real change
        (2%), so the allocator's jitter is not mistaken for a setting changed by the job."""
        if not self.fitted:
            return
        rows = min(self._rows_that_fit(self.max_rows, self.widest), self.user_cap or self.max_rows, self.max_rows)
        if rows < self.limit_rows or rows > self.limit_rows * 1.02 or not self.limit_rows:
            self.limit_rows = rows

    def _attempt(self, batch: Any, n: int, width: float, compute_loss: Callable[[Any], Any],
                 noise: bool, back: Callable[[Any], None] = _backward) -> tuple[Any, int | None, BaseException | None]:
        torch = _torch()
        cuda = torch.cuda
        total: Any = 0.0
        self._peak = 0
        plan = split.sizes(n, min(self._rows_that_fit(n, width), self.user_cap or n)) if self.fitted else []
        done = 0
        for mb in itertools.count():
            if done >= n:
                break
            rows = plan[mb] if plan else max(1, min(self._rows_that_fit(n, width), self.user_cap or n, n - done))
            size = int(rows * width)
            cuda.reset_peak_memory_stats()
            try:
                part = split.part(batch, n, done, done + rows)
                if self.ddp is not None:
                    with self.ddp.no_sync():
                        loss = compute_loss(part)
                        back(loss * (rows / n))
                else:
                    loss = compute_loss(part)
                    back(loss * (rows / n))
                total = total + loss.detach() * (rows / n)
                del loss, part
            except torch.cuda.OutOfMemoryError as exc:
                # the traceback's frames hold the graph: keep the error only when it is raised
                return None, size, (exc if rows <= 1 else None)
            peak = cuda.max_memory_allocated()
            self._peak = max(self._peak, peak)
            self.fit.ran(size, peak - cuda.memory_allocated())
            if noise and mb == 0:
                self._noise_small_at(rows / n, rows)
            if not self.fitted:
                # the largest that ran in this batch (not a leftover remainder)
                self.limit_rows = rows if mb == 0 else max(self.limit_rows, rows)
                predicted = self._rows_that_fit(n, width)
                if rows == n or predicted <= rows * (1 + SETTLE):
                    self.fitted = True        # it ran at the size it predicts: nothing left worth a probe
            done += rows
        return total, None, None

    def _recover(self, size: int, width: float, wider: bool, error: BaseException | None) -> None:
        torch = _torch()
        for p in self.params:
            p.grad = None
        torch.cuda.empty_cache()
        if error is not None:
            error.add_note("looptune: a micro-batch of one row does not fit in device memory")
            raise error
        kind = "while fitting" if not self.fitted else ("a wider input" if wider else "at a size that fit before")
        self.fit.oom(size)
        self.recoveries += 1
        self.meter.oom_recoveries = self.recoveries
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning("looptune: out of device memory at a micro-batch of %d rows (%s); recovered: the batch is "
                        "done again in smaller micro-batches", max(1, int(size / width)), kind)
        if self.fitted:
            self.limit_rows = max(1, min(self.limit_rows, int(self._rows_that_fit(self.max_rows, self.widest))))
            self.fitted = False     # probe back up (verified, 5% at a time) to 10% below the failure

    # ---- DDP: buffers and gradients, once per batch ----

    def _broadcast_buffers(self) -> None:
        import torch.distributed as dist
        ddp = self.ddp
        if not getattr(ddp, "broadcast_buffers", False):
            return
        bufs = list(ddp.module.buffers())
        ddp.require_forward_param_sync = False     # DDP's own per-forward broadcast: not in a redo
        for b in bufs:
            dist.broadcast(b, 0, group=ddp.process_group)

    def _allreduce(self) -> None:
        """The batch's gradients averaged across ranks, in buckets, under the job's grad_compression
        setting (the watched DDP model's comm state) when it has one."""
        import torch.distributed as dist
        torch = _torch()
        from looptune.tuners.hook.actuators.ddp import FlatBucket
        group = self.ddp.process_group
        world = dist.get_world_size(group)
        comm = self.hook.comm
        t0 = time.perf_counter()
        for p in self.params:
            if p.grad is None:                  # unused this batch: every rank sends the same layout
                p.grad = torch.zeros_like(p)
        if self._buckets is None:
            self._buckets = self._make_buckets()
        for i, (params, buf) in enumerate(self._buckets):
            if buf is None:                     # no room for a flat buffer: one by one, uncompressed
                for p in params:
                    dist.all_reduce(p.grad, group=group)
                    p.grad.div_(world)
                continue
            torch.cat([p.grad.reshape(-1) for p in params], out=buf)
            if comm is not None:
                comm.reduce_now(FlatBucket(i, buf, params))
            else:
                dist.all_reduce(buf, group=group)
                buf.div_(world)
            offset = 0
            for p in params:
                k = p.numel()
                p.grad.copy_(buf[offset:offset + k].view_as(p.grad))
                offset += k
        if self.meter.comm_seconds is not None:
            self.meter.comm_seconds += time.perf_counter() - t0

    def _make_buckets(self) -> list[tuple[list[Any], Any]]:
        """Parameters grouped by dtype and device up to BUCKET_BYTES, each with a flat buffer kept
        for the job; without room for a buffer, that bucket's gradients are reduced one by one."""
        torch = _torch()
        groups: dict[tuple[Any, Any], list[list[Any]]] = {}
        for p in self.params:
            lists = groups.setdefault((p.dtype, p.device), [[]])
            size = sum(q.numel() * q.element_size() for q in lists[-1])
            if lists[-1] and size + p.numel() * p.element_size() > BUCKET_BYTES:
                lists.append([])
            lists[-1].append(p)
        out: list[tuple[list[Any], Any]] = []
        for (dtype, device), lists in groups.items():
            for params in lists:
                try:
                    buf = torch.empty(sum(p.numel() for p in params), dtype=dtype, device=device)
                except torch.cuda.OutOfMemoryError:
                    buf = None
                out.append((params, buf))
        return out

    # ---- gradient noise scale (McCandlish et al. 2018, appendix A) ----

    def _sq_norm(self, scale: float = 1.0) -> float:
        torch = _torch()
        total = torch.zeros((), dtype=torch.float64)
        for p in self.params:
            if p.grad is not None:
                total = total + (p.grad.detach().double() * scale).pow(2).sum().cpu()
        return float(total)

    def _noise_small_at(self, share: float, rows: int) -> None:
        self._noise_small = self._sq_norm(1 / share)
        self._noise_b_small = rows

    def _noise_end(self, n: int) -> None:
        import torch.distributed as dist
        small, self._noise_small = self._noise_small, None
        b_small = self._noise_b_small
        world = dist.get_world_size(self.ddp.process_group) if self.ddp is not None else 1
        b_big = n * world
        if small is None or b_big <= b_small:
            return
        big = self._sq_norm()
        g2 = (b_big * big - b_small * small) / (b_big - b_small)        # |G|^2, unbiased
        s = (small - big) / (1 / b_small - 1 / b_big)                   # tr(covariance)
        a = NOISE_EMA
        self._ema_g2 = g2 if self._noise_g2 is None else (1 - a) * self._ema_g2 + a * g2
        self._ema_s = s if self._noise_g2 is None else (1 - a) * self._ema_s + a * s
        self._noise_g2 = self._ema_g2
        if self._ema_g2 > 0 and self._ema_s > 0:
            self.noise_scale = self._ema_s / self._ema_g2
            self.meter.gradient_noise_scale = self.noise_scale
