"""Hook.watch for a model: the first watched module is the job's model. A DistributedDataParallel
one gets the knob `grad_compression`: how each gradient bucket is averaged across ranks (none:
DDP's own all-reduce; fp16 / bf16: cast for the wire; powersgd: low-rank with error feedback,
actuators/powersgd.py). Switching is a knob with a collective actuator: every rank applies it at
the same step boundary, or none does.

At `none` nothing of looptune's runs in backward: DDP's C++ all-reduce averages the gradients.
looptune's one comm hook (a Python call and a future callback per bucket) is registered only at
the first switch away from `none` (DDP takes one comm hook, at any step), and stays.

The wait is DDP's own timer (its runtime stats, every iteration on CPU): the exposed wait of one
backward pass is from the end of backward compute until every bucket's all-reduce has completed;
overlapped communication is not counted. `poll()` (each hook.step) adds it to `comm_seconds`
(what the `communication` verdict reads) and the bytes sent to `comm_bytes`.
"""
from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("looptune.hook")

SETTINGS = ("none", "fp16", "bf16", "powersgd")
CAST = {"fp16": "float16", "bf16": "bfloat16"}
# DDP's runtime stats on a GPU: each sampled iteration synchronises its events at the next forward,
# so one in ten, the others counted at its wait (on CPU every iteration: a clock read each)
GPU_SAMPLE_EVERY = 10
OWN_HOOK = "the job registered its own DDP comm hook"


def own_comm_hook(module: Any) -> str | None:
    """The comm hook the job registered on `module` itself (Python or built-in), or None."""
    hooks = getattr(module, "_comm_hooks", None)
    if hooks:
        return getattr(hooks[0][0], "__qualname__", repr(hooks[0][0]))
    try:
        return module.logger._get_ddp_logging_data().strs_map.get("comm_hook") or None
    except Exception:  # noqa: BLE001 - no logger: nothing registered through it
        return None


class Dispatch:
    """A watched DDP model's comm state: the setting every rank runs now, its implementations,
    and the reading of DDP's timer."""

    def __init__(self, meter: Any, module: Any, untunable: dict[str, str]) -> None:
        import torch.distributed as dist
        self.meter = meter
        self.untunable = untunable                 # the hook's: knob -> why the job cannot tune it
        self.module = module
        self.group = module.process_group if module.process_group is not None else dist.group.WORLD
        self.world = self.group.size()
        self.setting = "none"
        self.registered = False                    # looptune's comm hook on the model (from the first switch)
        self.unusable: dict[str, str] = {}          # setting -> why this job cannot use it
        from looptune.tuners.hook.actuators.powersgd import PowerSGD
        self.powersgd = PowerSGD(rank=1)
        params = [p for p in module.parameters() if p.requires_grad]
        self.grad_bytes = sum(p.numel() * p.element_size() for p in params)
        on_cpu = not params or params[0].device.type == "cpu"
        module._set_ddp_runtime_logging_sample_rate(1 if on_cpu else GPU_SAMPLE_EVERY)
        self._iteration = 0          # DDP's iteration last counted
        self._comm_end = None        # its host time of that iteration's comm end: a backward counted once
        meter.comm_seconds = 0.0
        meter.comm_bytes = 0

    def poll(self) -> None:
        """The training thread, each step: DDP's timer's latest backward, once. Sampled iterations
        stand for those since the last one (every iteration is sampled on CPU)."""
        stats = self.module.logger._get_ddp_logging_data().ints_map
        iteration = stats.get("iteration", 0)
        end = stats.get("backward_comm_time_end")
        if iteration <= self._iteration or end is None or end == self._comm_end:
            return
        n, self._iteration, self._comm_end = iteration - self._iteration, iteration, end
        exposed = (stats.get("backward_comm_time", 0) - stats.get("backward_compute_comm_overlap_time", 0)) / 1e9
        self.meter.comm_seconds += max(0.0, exposed) * n
        if not self.registered:        # DDP's own all-reduce: every gradient, uncompressed
            self.meter.comm_bytes += self.grad_bytes * n

    # the actuators (the training thread, at a step boundary: no backward in flight)

    def get_setting(self) -> str:
        return self.setting

    def set_setting(self, value: Any) -> None:
        if value not in SETTINGS:
            raise ValueError(f"grad_compression must be one of {', '.join(SETTINGS)}, not {value!r}")
        if value in self.unusable:
            raise ValueError(f"grad_compression {value} cannot be used here: {self.unusable[value]}")
        if value != "none" and not self.registered:
            try:
                self.module.register_comm_hook(self, dispatch)
            except RuntimeError as exc:     # a hook registered after watch(): DDP takes one
                for name in SETTINGS[1:]:
                    self.unusable[name] = f"{OWN_HOOK}: {exc}"[:200]
                for knob in ("grad_compression", "powersgd_rank"):
                    self.untunable[knob] = OWN_HOOK
                raise ValueError(f"grad_compression {value} cannot be used here: {self.unusable[value]}") from exc
            self.registered = True
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
    """The one comm hook: DDP's average under the current setting, bytes counted (DDP's timer
    times the wait). Unannotated on purpose: DDP checks a comm hook's annotations, and under
    `from __future__ import annotations` they would be strings."""
    import torch
    setting = state.setting
    buf = bucket.buffer()
    if setting == "powersgd":
        # synchronous, inside backward: DDP's timer counts it as compute, so it is added here
        t0 = time.perf_counter()
        out, sent = state.powersgd(bucket, state.group, state.world)
        state.meter.comm_bytes += sent
        state.meter.comm_seconds += time.perf_counter() - t0
        fut = torch.futures.Future()
        fut.set_result(out)
        return fut
    if setting in CAST:
        wire = buf.to(getattr(torch, CAST[setting])).div_(state.world)
    else:
        wire = buf.div_(state.world)
    state.meter.comm_bytes += wire.numel() * wire.element_size()
    # the process group's own allreduce: dist.all_reduce's Python checks would run for every bucket, every step
    fut = state.group.allreduce([wire]).get_future()

    def done(f: Any) -> Any:
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
            own = own_comm_hook(module)
            if own is not None:
                # DDP takes one comm hook: the job's is left alone, and its wait not timed
                hook.untunable["grad_compression"] = OWN_HOOK
                hook.untunable["powersgd_rank"] = OWN_HOOK
                log.info("looptune: communication not timed, grad_compression untunable (%s: %s)", OWN_HOOK, own)
                return module
            state = Dispatch(hook.meter, module, hook.untunable)
            state.probe()
            hook.add_actuator("grad_compression", state.get_setting, state.set_setting, collective=True)
            hook.add_actuator("powersgd_rank", state.get_rank, state.set_rank, collective=True)
            hook.comm = state
    return module
