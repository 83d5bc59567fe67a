"""Hook.watch for a model: the first watched module is the job's model; a DistributedDataParallel
one gets looptune's one comm hook, registered once: it averages each bucket across ranks under
the current `grad_compression` setting (none: DDP's own average; fp16 / bf16: cast for the wire;
powersgd: low-rank with error feedback, actuators/powersgd.py) and times it, so the job reports
how long each step waits for gradient communication after backward (`comm_seconds`: what the
`communication` verdict reads) and the bytes it sent (`comm_bytes`). Switching is a knob with a
collective actuator: every rank applies it at the same step boundary, or none does.

The exposed wait of one backward pass is from the launch of the last bucket (backward compute is
done then) until every bucket's all-reduce has completed; overlapped communication is not
counted. Callbacks run on the process group's threads: one small lock per bucket.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("looptune.hook")


class CommTimer:
    """The comm hook's state: buckets in flight in this backward pass and their times."""

    def __init__(self, meter: Any, process_group: Any = None) -> None:
        self.meter = meter
        self.process_group = process_group
        self._lock = threading.Lock()
        self._in_flight = 0
        self._last_launch: float | None = None
        self._done = 0.0
        meter.comm_seconds = 0.0

    def launched(self, last: bool) -> None:
        with self._lock:
            self._in_flight += 1
            if last:
                self._last_launch = time.perf_counter()

    def finished(self) -> None:
        t = time.perf_counter()
        with self._lock:
            self._in_flight -= 1
            self._done = max(self._done, t)
            if self._in_flight == 0 and self._last_launch is not None:
                self.meter.comm_seconds += max(0.0, self._done - self._last_launch)
                self._last_launch = None
                self._done = 0.0


SETTINGS = ("none", "fp16", "bf16", "powersgd")
CAST = {"fp16": "float16", "bf16": "bfloat16"}


class Dispatch:
    """The comm hook's state: the setting every rank runs now, its implementations, the timer."""

    def __init__(self, meter: Any, process_group: Any) -> None:
        import torch.distributed as dist
        self.timer = CommTimer(meter, process_group)
        self.meter = meter
        self.group = process_group if process_group is not None else dist.group.WORLD
        self.world = self.group.size()
        self.setting = "none"
        self.unusable: dict[str, str] = {}          # setting -> why this job cannot use it
        from looptune.tuners.hook.actuators.powersgd import PowerSGD
        self.powersgd = PowerSGD(rank=1)
        meter.comm_bytes = 0

    # the actuators (the training thread, at a step boundary: no backward in flight)

    def get_setting(self) -> str:
        return self.setting

    def set_setting(self, value: Any) -> None:
        if value not in SETTINGS:
            raise ValueError(f"grad_compression must be one of {', '.join(SETTINGS)}, not {value!r}")
        if value in self.unusable:
            raise ValueError(f"grad_compression {value} cannot be used here: {self.unusable[value]}")
        self.powersgd.reset()      # errors and Q of an earlier PowerSGD period mean nothing now
        self.setting = value

    def get_rank(self) -> int:
        return self.powersgd.rank

    def set_rank(self, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1024:
            raise ValueError(f"powersgd_rank must be an integer from 1 to 1024, not {value!r}")
        self.powersgd.reset(rank=value)

    def reduce_now(self, bucket: Any) -> None:
        """Average a bucket across ranks in place under the current setting, now (hook.accumulate's
        own gradient sync after its no_sync micro-batches); bytes counted, time left to the caller."""
        import torch
        import torch.distributed as dist
        buf = bucket.buffer()
        if self.setting == "powersgd":
            _, sent = self.powersgd(bucket, self.group, self.world)
            self.meter.comm_bytes += sent
            return
        wire = buf.to(getattr(torch, CAST[self.setting])) if self.setting in CAST else buf
        dist.all_reduce(wire, group=self.group)
        wire.div_(self.world)
        if wire is not buf:
            buf.copy_(wire)
        self.meter.comm_bytes += wire.numel() * wire.element_size()

    def probe(self) -> None:
        """Which settings the backend takes: one tiny all-reduce per cast type, on every rank alike
        (watch() runs on every rank at the same point)."""
        import torch
        import torch.distributed as dist

        from looptune.tuners.hook.ranks import collective_device
        device = collective_device(self.group)       # NCCL takes no CPU tensor: that is no refusal of the cast
        for name, dtype in CAST.items():
            try:
                dist.all_reduce(torch.zeros(2, dtype=getattr(torch, dtype), device=device), group=self.group)
            except Exception as exc:  # noqa: BLE001 - the backend's own refusal, e.g. gloo without bf16
                self.unusable[name] = f"{dist.get_backend(self.group)} cannot all-reduce {dtype}: {exc}"[:200]


class FlatBucket:
    """A bucket of hook.accumulate's own: one flat buffer and its parameters' views, shaped like
    DDP's GradBucket as far as the implementations above read it."""

    def __init__(self, index: int, buf: Any, params: list[Any]) -> None:
        self._index, self._buf = index, buf
        self._views, offset = [], 0
        for p in params:
            self._views.append(buf[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def buffer(self) -> Any:
        return self._buf

    def gradients(self) -> list[Any]:
        return self._views

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return False


def dispatch(state, bucket):  # type: ignore[no-untyped-def]
    """The one comm hook: DDP's average under the current setting, timed, bytes counted.
    Unannotated on purpose: DDP checks a comm hook's annotations, and under `from __future__
    import annotations` they would be strings."""
    import torch
    setting = state.setting
    buf = bucket.buffer()
    if setting == "powersgd":
        # synchronous: backward waits for all of it, so all of it is exposed communication
        t0 = time.perf_counter()
        out, sent = state.powersgd(bucket, state.group, state.world)
        state.meter.comm_bytes += sent
        if state.meter.comm_seconds is not None:
            state.meter.comm_seconds += time.perf_counter() - t0
        fut = torch.futures.Future()
        fut.set_result(out)
        return fut
    state.timer.launched(bucket.is_last())
    if setting in CAST:
        wire = buf.to(getattr(torch, CAST[setting])).div_(state.world)
    else:
        wire = buf.div_(state.world)
    state.meter.comm_bytes += wire.numel() * wire.element_size()
    # the process group's own allreduce: dist.all_reduce's Python checks would run for every bucket, every step
    fut = state.group.allreduce([wire]).get_future()

    def done(f: Any) -> Any:
        state.timer.finished()
        value = f.value()[0]
        if value is not buf:
            buf.copy_(value)
        return buf

    return fut.then(done)


def watch(hook: Any, module: Any) -> Any:
    from torch.nn.parallel import DistributedDataParallel
    if hook.module is None:
        hook.module = module
        if isinstance(module, DistributedDataParallel):
            state = Dispatch(hook.meter, module.process_group)
            try:
                module.register_comm_hook(state, dispatch)
            except RuntimeError as exc:
                # the user registered a comm hook already (DDP allows one): left alone, not timed
                hook.meter.comm_seconds = None
                hook.meter.comm_bytes = None
                why = "the job registered its own DDP comm hook"
                hook.untunable["grad_compression"] = why
                hook.untunable["powersgd_rank"] = why
                log.info("looptune: communication not timed, grad_compression untunable (%s)", exc)
                return module
            state.probe()
            hook.add_actuator("grad_compression", state.get_setting, state.set_setting, collective=True)
            hook.add_actuator("powersgd_rank", state.get_rank, state.set_rank, collective=True)
            hook.comm = state
    return module
