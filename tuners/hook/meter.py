"""The meter: the training thread's counters and the watched iterator that feeds them.

The per-batch and per-step paths only add numbers: two clock reads (vDSO, no syscall), a few
integer/float additions and one bisect into fixed buckets, without locks or allocation. The
reporter thread reads the counters as they are (single writer, torn reads are one step stale
at worst). The loss is kept as the object the user passed and turned into a float only at
report time, so a CUDA loss costs no device sync per step. A failure inside the meter goes to
`on_error` (the hook counts it); the batch is always delivered.
"""
from __future__ import annotations

import math
import time
from bisect import bisect_left
from typing import Any, Callable

from looptune import protocol

perf = time.perf_counter
BUCKETS = protocol.STEP_BUCKETS

_SIZED: set[type] = set()   # tensor-like batch types: len() gives dim 0 without building a torch.Size


def batch_size(batch: Any) -> int:
    """Samples in a batch: dim 0 of its first tensor (tuples, lists, dicts of them), else 1."""
    t = type(batch)
    if t in _SIZED:
        try:
            return len(batch)
        except TypeError:          # a 0-d tensor
            return 1
    if t is tuple or t is list:
        if not batch:
            return 0
        first = batch[0]
        if type(first) in _SIZED or isinstance(first, (list, tuple, dict)) or hasattr(first, "shape"):
            return batch_size(first)
        return len(batch)
    if t is dict:
        for value in batch.values():
            return batch_size(value)
        return 0
    if hasattr(batch, "shape") and hasattr(batch, "__len__"):
        _SIZED.add(t)
        return batch_size(batch)
    return 1


class Meter:
    """Counters of one training process. Written by the training thread only."""

    def __init__(self, on_error: Callable[[BaseException], None]) -> None:
        self.off = False                 # set when the hook disabled itself: no more measuring
        self.on_error = on_error
        self.steps = 0
        self.batches = 0
        self.samples = 0
        self.pending_samples = 0         # samples of batches taken since the last step
        self.data_wait = 0.0
        self.step_seconds = 0.0
        self.comm_seconds: float | None = None   # set by the DDP actuator once it times all-reduce
        self.comm_bytes: int | None = None       # set by the DDP actuator: bytes all-reduced
        self.comm_wire_seconds: float | None = None   # set by rank sync: the ranks' smallest comm wait
        self.wire_ratio = 0.0            # of this rank's comm wait since the last sync, the wire's part
        self.wire_mark = 0.0             # this rank's comm_seconds at the last sync
        self._wire_out = 0.0             # the last comm_wire_seconds reported: a counter never falls
        self.oom_recoveries: int | None = None   # set by hook.accumulate once it splits batches
        self.device_peak_bytes: int | None = None
        self.gradient_noise_scale: float | None = None
        self.hist = [0] * (len(BUCKETS) + 1)
        self.t_step = perf()
        self.loss: Any = None            # the latest loss object, read at report time
        self.loss_nonfinite = 0
        self._loss_seen = False

    def restart_step_clock(self) -> None:
        """An epoch starts: the time since the last step (evaluation, checkpoints) is no step."""
        self.t_step = perf()

    def step(self, loss: Any = None) -> None:
        """The per-step path (Hook.step)."""
        t = perf()
        self.steps += 1
        self.samples += self.pending_samples
        self.pending_samples = 0
        dt = t - self.t_step
        self.t_step = t
        self.step_seconds += dt
        self.hist[bisect_left(BUCKETS, dt)] += 1
        if loss is not None:
            self.loss = loss

    def wrap(self, watched: Any) -> WatchedIter:
        return WatchedIter(self, watched)

    def read_loss(self) -> float | None:
        """The latest loss as a float (one device sync, in the reporter thread), None if none or
        not finite; a non-finite one is counted in loss_nonfinite."""
        loss = self.loss
        if loss is None:
            return None
        self._loss_seen = True
        try:
            value = float(loss.detach()) if hasattr(loss, "detach") else float(loss)
        except (TypeError, ValueError, RuntimeError) as exc:   # not a scalar: say so once, keep training
            self.loss = None
            self.on_error(exc)
            return None
        if not math.isfinite(value):
            self.loss_nonfinite += 1
            return None
        return value

    def wire_estimate(self) -> float | None:
        """comm_wire_seconds as of now: the ranks agree on it only every sync_every_steps steps (more
        than a report apart when steps are long), so between syncs this rank's comm wait since the
        last one counts at the wire's share the last sync found. Never below a value reported before."""
        if self.comm_wire_seconds is None or self.comm_seconds is None:
            return self.comm_wire_seconds
        est = self.comm_wire_seconds + self.wire_ratio * max(0.0, self.comm_seconds - self.wire_mark)
        self._wire_out = max(self._wire_out, est)
        return self._wire_out

    def figures(self) -> dict[str, float | None]:
        """The report's figures, keyed as schema.FIGURES declares them."""
        loss = self.read_loss()
        out: dict[str, float | None] = {
            "samples": self.samples, "batches": self.batches, "steps": self.steps,
            "data_wait_seconds": self.data_wait, "step_seconds": self.step_seconds,
            "comm_seconds": self.comm_seconds, "comm_wire_seconds": self.wire_estimate(),
            "comm_bytes": self.comm_bytes, "loss": loss,
            "loss_nonfinite": self.loss_nonfinite if self._loss_seen else None,
            "oom_recoveries": self.oom_recoveries, "device_memory_peak_bytes": self.device_peak_bytes,
            "gradient_noise_scale": self.gradient_noise_scale,
        }
        return {k: v for k, v in out.items() if v is not None}


class WatchedIter:
    """The per-batch path: two clock reads and three additions around the real next()."""
    __slots__ = ("_m", "_w")

    def __init__(self, meter: Meter, watched: Any) -> None:
        self._m = meter
        self._w = watched       # actuators.loader.WatchedLoader: its `it` may be swapped at a step boundary

    def __iter__(self) -> WatchedIter:
        return self

    def __next__(self) -> Any:
        m = self._m
        w = self._w
        if m.off:
            batch = next(w.it)
            w.delivered += 1
            return batch
        t0 = perf()
        batch = next(w.it)
        t1 = perf()
        w.delivered += 1
        try:
            m.data_wait += t1 - t0
            m.batches += 1
            m.pending_samples += batch_size(batch)
        except Exception as exc:  # noqa: BLE001 - measurement must never cost the batch
            m.on_error(exc)
        return batch
