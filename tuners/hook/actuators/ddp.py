"""Hook.watch for a model: the first watched module is the job's model; a DistributedDataParallel
one gets a comm hook that does what DDP's default all-reduce does (average the bucket across
ranks) and times it, so the job can report how long each step waits for gradient communication
after backward has finished (`comm_seconds`: what the `communication` verdict reads).

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


def timed_allreduce(state, bucket):  # type: ignore[no-untyped-def]
    """DDP's default all-reduce (mean over ranks), timed. Unannotated on purpose: DDP checks a comm
    hook's annotations, and under `from __future__ import annotations` they would be strings."""
    import torch.distributed as dist
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    tensor = bucket.buffer()
    tensor.div_(group.size())
    state.launched(bucket.is_last())
    fut = dist.all_reduce(tensor, group=group, async_op=True).get_future()

    def done(f: Any) -> Any:
        state.finished()
        return f.value()[0]

    return fut.then(done)


def watch(hook: Any, module: Any) -> Any:
    from torch.nn.parallel import DistributedDataParallel
    if hook.module is None:
        hook.module = module
        if isinstance(module, DistributedDataParallel):
            timer = CommTimer(hook.meter, module.process_group)
            try:
                module.register_comm_hook(timer, timed_allreduce)
            except RuntimeError as exc:
                # the user registered a comm hook already (DDP allows one): no comm timing then
                hook.meter.comm_seconds = None
                log.info("looptune: communication not timed (%s)", exc)
    return module
