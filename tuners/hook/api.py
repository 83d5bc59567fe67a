"""The control hook's user API: a few lines in the training loop that measure it and apply knob
changes.

    from looptune import Hook

    with Hook(run="exp-1") as hook:
        loader = hook.watch(loader)
        for epoch in range(epochs):
            for batch in loader:
                ...
                hook.step()           # or hook.step(loss=loss)

The training thread only adds numbers (meter.py). Everything else (reports, reconnects,
decisions, memory peaks, the embedded engine) happens in one background thread (channel.py).
A decision is queued by that thread and applied by `step()` at the next step boundary through
the knob's actuator (actuators/). Any exception inside the hook is caught, logged once and
counted; after `hook.max_failures` the hook turns itself off and the training goes on untouched.
torch is never imported here: the hook reads it from sys.modules when the job has it.
"""
from __future__ import annotations

import atexit
import logging
import os
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from looptune import protocol
from looptune.tuners.hook import runinfo
from looptune.tuners.hook.actuators import WATCHERS, Actuator
from looptune.tuners.hook.channel import Channel
from looptune.tuners.hook.embedded import Embedded
from looptune.tuners.hook.meter import Meter
from looptune.tuners.hook.ranks import RankSync, rank_world

log = logging.getLogger("looptune.hook")


@dataclass
class Decision:
    """One knob change the hook applied (or could not): what `hook.decisions` lists."""
    knob: str
    old: Any
    new: Any
    reason: str
    outcome: str            # applied, failed, skipped
    time: float             # unix time
    step: int = 0
    tuner: str = ""
    id: int | None = None
    detail: str = ""
    trial: bool = False     # the start of a trial (not a roll back or the confirmation of a kept one)


class Hook:
    def __init__(self, run: str | None = None, socket: str | None = None, tune: bool | list[str] = True,
                 config: Any = None) -> None:
        self.meter = Meter(self._failed)
        self._pending: deque[dict[str, Any]] = deque()
        self._has_pending = False
        self._errors = 0
        self._logged_error = False
        self._closed = False
        self.knobs: dict[str, Any] = {}
        self.decisions: list[Decision] = []
        self.actuators: dict[str, Actuator] = {}
        self._provisional: dict[str, Any] = {}   # knob -> its value before a trial not yet kept
        self.untunable: dict[str, str] = {}
        self.signature = ""
        self.loader: Any = None          # the first watched loader: its knobs are reported and tuned
        self.module: Any = None          # the first watched model
        self.microbatcher: Any = None    # actuators.microbatch.MicroBatcher, made at the first accumulate()
        self.comm: Any = None            # actuators.ddp.Dispatch of a watched DDP model
        self._sync = RankSync()
        # a framework adapter's view of (rank, world size), e.g. Lightning's trainer.global_rank: right
        # before torch.distributed is initialised too; None: torch.distributed, else RANK / WORLD_SIZE
        self.rank_source: Callable[[], tuple[int, int]] | None = None
        self._restore: dict[str, Any] = {}       # knob -> a checkpoint's value, set when its actuator comes
        self.tune: bool | list[str] = tune
        self.mode = "embedded"
        self._channel: Channel | None = None
        self.embedded = Embedded(self)
        try:
            self.config = runinfo.load_config(config)
            self.max_failures = self.config.hook.max_failures
            self.run = run or runinfo.default_run()
            if not protocol.NAME_RE.match(self.run):
                raise ValueError(f"run {self.run!r} must match {protocol.NAME_RE.pattern}")
            self.tuners = list(tune) if isinstance(tune, (list, tuple)) else []
            self.rank, self.world_size = self.rank_world()
            if isinstance(tune, (list, tuple)):
                from looptune.tuners.registry import available
                unknown = [n for n in tune if n not in available()]
                if unknown:
                    raise ValueError(f"unknown tuner(s) {', '.join(map(repr, unknown))}; known: "
                                     f"{', '.join(sorted(available()))}")
            self._decide_sync()
            self.socket_paths, self.socket_named = runinfo.socket_paths(socket, self.config)
            self._channel = Channel(self)
            self._channel.start()
            if self.mode == "embedded" and self.config.hook.embedded_metrics_listen:
                try:
                    self.embedded.serve_metrics(self.config.hook.embedded_metrics_listen)
                except Exception as exc:  # noqa: BLE001 - a busy port costs the /metrics, not the measurement
                    self._failed(exc)
            ref = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: (h := ref()) is not None and h._after_fork_child())
            atexit.register(self.close)
        except (ValueError, TypeError):
            raise          # the caller's own bad input (run name, config file): a clear error
        except Exception as exc:  # noqa: BLE001 - a broken environment must not stop training
            self.max_failures = getattr(self, "max_failures", 10)
            self._failed(exc)
            self.meter.off = True
            if self._channel is not None:     # started already: no reporter left running for a dead hook
                self._channel.stop()

    # ---- the user's API ----

    def watch(self, obj: Any) -> Any:
        """Measure (and, where a tuner may, tune) `obj`; returns what the loop should use instead.

        A DataLoader (or any iterable of batches) comes back as an iterable over the same batches
        in the same order; an nn.Module or DistributedDataParallel comes back as the same object.
        """
        if self._off:
            return obj
        try:
            for test, watcher in WATCHERS:
                if test(obj):
                    out = watcher(self, obj)
                    self._decide_sync()
                    return out
            return obj
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return obj

    def accumulate(self, batch: Any, compute_loss: Callable[[Any], Any],
                   backward: Callable[[Any], None] | None = None) -> float:
        """Forward and backward of one batch (the batch per optimizer step) in micro-batches that fit
        the device; returns the batch's mean loss as a float.

        `compute_loss(micro_batch)` returns the micro-batch's mean loss; each is back-propagated
        scaled by its share of the batch, so the gradient is the unsplit batch's. An out-of-memory
        error is recovered in the step (the batch done again in smaller micro-batches). With the
        batch_size tuner off (or the hook disabled before the first call) the batch is not split.
        `backward(loss)` back-propagates one (scaled) micro-batch loss where a framework has its own
        way (mixed-precision loss scaling, its backward hooks); default `loss.backward()`.
        """
        mb = self.microbatcher
        if mb is None:
            if self._off or not self._tunes("batch_size"):
                loss = compute_loss(batch)
                if backward is not None:
                    backward(loss)
                else:
                    loss.backward()
                return float(loss.detach())
            from looptune.tuners.hook.actuators.microbatch import MicroBatcher
            mb = self.microbatcher = MicroBatcher(self, split_batch_norm=self.config.hook.micro_batch_split_batch_norm)
        # not given up when the hook turns itself off: every DDP rank keeps the same collectives
        return mb.accumulate(batch, compute_loss, backward)

    def _tunes(self, tuner: str) -> bool:
        if isinstance(self.tune, (list, tuple)):
            return tuner in self.tune
        return bool(self.tune) and tuner in self.config.tuners.enabled

    def add_actuator(self, knob: str, get: Callable[[], Any], set: Callable[[Any], None], *,  # noqa: A002
                     settling: Callable[[], bool] | None = None, collective: bool = False) -> None:
        """Make `knob` tunable in this job: `get()` reads it, `set(value)` changes it at a step
        boundary (raise to refuse), `settling()` is True while a new value still warms up.
        `collective`: every rank must hold the same value (a DDP comm setting); under
        torch.distributed a change that fails on any rank is undone on all, and a hook that
        turned itself off still follows such changes."""
        if not protocol.KNOB_RE.match(knob):
            raise ValueError(f"knob {knob!r} must match {protocol.KNOB_RE.pattern}")
        self.actuators[knob] = Actuator(get, set, settling, collective)
        self.untunable.pop(knob, None)
        self.knobs[knob] = get()
        if knob in self._restore:
            self._restore_knob(knob, self._restore.pop(knob))

    def step(self, loss: Any = None) -> None:
        """Call once per optimizer step; applies pending knob changes at this boundary.

        `loss`: the step's loss, a float or a 0-dim tensor (read at report time, no device sync here).
        """
        if self.comm is not None and not self.meter.off:
            try:      # DDP's timer: the last backward's wait for gradient communication, before rank sync reads it
                self.comm.poll()
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)
        if self._sync.every and self._sync.tick():
            # every rank, a disabled hook too, takes part in the same collectives at the same steps
            self._sync_decisions()
        if self.meter.off:
            return
        try:
            self.meter.step(loss)
            if self._has_pending and not self._sync.every:
                self._apply_pending()
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this hook (JSON-able): the settled value of every tunable knob;
        a knob in a trial not yet kept has the value it held before the trial."""
        knobs: dict[str, Any] = {}
        for knob, act in self.actuators.items():
            try:
                value = self._provisional.get(knob, act.get())
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)
                continue
            if value is None or isinstance(value, (bool, int, float, str)):
                knobs[knob] = value
        for knob, value in self._restore.items():      # restored, its actuator not there yet
            knobs.setdefault(knob, value)
        return {"version": 1, "run": self.run, "signature": self.signature, "knobs": knobs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Start from a checkpoint's knob values (`state_dict()`): call at a step boundary, on every
        rank alike; a knob whose actuator comes later (the micro-batch size at the first
        `accumulate`) is set when it comes. Each change is recorded in `decisions`."""
        knobs = state.get("knobs") if isinstance(state, dict) else None
        if not isinstance(knobs, dict):
            raise ValueError(f"not a looptune hook state: {state!r:.200}")
        for knob, value in knobs.items():
            if not isinstance(knob, str) or not protocol.KNOB_RE.match(knob) or value is None:
                continue
            if knob in self.actuators:
                self._restore_knob(knob, value)
            else:
                self._restore[knob] = value

    def _restore_knob(self, knob: str, value: Any) -> None:
        try:
            if self.actuators[knob].get() == value:
                return
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return
        self._apply({"id": None, "knob": knob, "value": value, "reason": "restored from a checkpoint",
                     "tuner": "", "trial": False})

    def close(self) -> None:
        """Flush a last report and leave the daemon; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            atexit.unregister(self.close)
        except Exception:  # noqa: BLE001
            pass
        if self._channel is not None:
            self._channel.stop()
        if self.loader is not None:
            try:           # persistent workers would otherwise wait for the cycle collector (seconds each)
                self.loader.stop_workers()
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)
        self.embedded.close()

    def __enter__(self) -> Hook:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- read-only figures ----

    @property
    def counters(self) -> dict[str, float]:
        m = self.meter
        return {"samples": m.samples, "batches": m.batches, "steps": m.steps,
                "data_wait_seconds": m.data_wait, "step_seconds": m.step_seconds}

    @property
    def disabled(self) -> bool:
        return self.meter.off

    @property
    def errors(self) -> int:
        return self._errors

    @property
    def engine(self) -> Any:
        """The embedded engine (tuners.engine.Engine) once it runs; None under a daemon."""
        return self.embedded.engine

    @property
    def _off(self) -> bool:
        return self.meter.off

    # ---- rank sync ----

    def _decide_sync(self) -> None:
        if not self.tune or self.meter.steps:
            return
        try:
            self._sync.decide(self.config.hook.sync_every_steps)
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)

    def _take_pending(self) -> list[dict[str, Any]]:
        out = list(self._pending)
        self._pending.clear()
        self._has_pending = False
        return out

    def _sync_decisions(self) -> None:
        try:
            got = self._sync.exchange(self.rank, self._take_pending, self.meter)
            if not got:
                return
            collective = [d for d in got if self._is_collective(d.get("knob"))]
            before = {d["knob"]: self.actuators[d["knob"]].get() for d in collective}
            if self.meter.off:
                got = collective     # a rank whose hook is off still runs the comm setting the others run
            self._pending.extend(got)
            self._apply_pending()
            if collective:
                self._agree(before)
        except Exception as exc:  # noqa: BLE001 - every rank fails alike here: stop syncing, keep training
            self._sync.every = 0
            self._failed(exc)

    def _is_collective(self, knob: Any) -> bool:
        act = self.actuators.get(knob)
        return act is not None and act.collective

    def _agree(self, before: dict[str, Any]) -> None:
        """After collective changes at a sync step: unless every rank now holds what rank 0 holds,
        all go back to the values they held before (the same on every rank), at this same step."""
        agreed = self._sync.agree([self.actuators[k].get() for k in sorted(before)])
        if agreed:
            return
        for knob, old in before.items():
            try:
                self.actuators[knob].set(old)
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)
        self.refresh_knobs()
        for rec in self.decisions[::-1]:
            if rec.knob in before and rec.outcome == "applied" and rec.step == self.meter.steps:
                rec.outcome, rec.detail = "failed", "not applied on every rank: undone on all"
                if self._channel is not None:
                    self._channel.acknowledge(rec)
        log.warning("looptune: %s not applied alike on every rank; back to %s on all", sorted(before), before)

    # ---- decisions ----

    def _queue_decision(self, decision: dict[str, Any]) -> None:
        """Reporter thread: hand a validated decision to the training thread."""
        self._pending.append(decision)
        self._has_pending = True

    def _apply_pending(self) -> None:
        self._has_pending = False
        later: list[dict[str, Any]] = []
        while self._pending:
            d = self._pending.popleft()
            if (d.get("at_step") or 0) > self.meter.steps:
                later.append(d)          # a decision for a later step waits for it
                continue
            self._apply(d)
        if later:
            self._pending.extend(later)
            self._has_pending = True

    def _apply(self, d: dict[str, Any]) -> None:
        knob, new = d["knob"], d["value"]
        act = self.actuators.get(knob)
        old = self.knobs.get(knob)
        outcome, detail = "applied", ""
        if act is None:
            outcome, detail = "skipped", f"no actuator for knob {knob} in this job"
        else:
            try:
                old = act.get()
                act.set(new)
            except Exception as exc:  # noqa: BLE001 - a failed change is reported, not raised
                outcome, detail = "failed", f"{type(exc).__name__}: {exc}"
                log.warning("knob %s -> %r failed: %s", knob, new, detail)
            self.refresh_knobs()
        if outcome == "applied":
            if d.get("trial"):
                self._provisional.setdefault(knob, old)     # the value before the first of its trials
            else:
                self._provisional.pop(knob, None)           # kept, or rolled back: settled either way
        rec = Decision(knob=knob, old=old, new=new, reason=d.get("reason", ""), outcome=outcome,
                       time=time.time(), step=self.meter.steps, tuner=d.get("tuner", ""), id=d.get("id"),
                       detail=detail, trial=bool(d.get("trial")))
        self.decisions.append(rec)
        if self._channel is not None:
            self._channel.acknowledge(rec)

    def _abandon_trials(self, why: str) -> None:
        """Channel thread, the daemon gone: a trial it can no longer judge goes back to the value
        the knob had before it, at the next step boundary, as a roll back of the job's own."""
        for knob, old in list(self._provisional.items()):
            self._queue_decision({"id": None, "knob": knob, "value": old, "reason": f"roll back: {why}",
                                  "tuner": "", "trial": False})

    def refresh_knobs(self) -> None:
        """Read every actuated knob back (after a change, or after the job changed one itself)."""
        for knob, act in self.actuators.items():
            self.knobs[knob] = act.get()

    # ---- failures ----

    def _failed(self, exc: BaseException) -> None:
        self._errors += 1
        if not self._logged_error:
            self._logged_error = True
            log.warning("looptune hook error (training continues): %r", exc, exc_info=exc)
        if self._errors >= getattr(self, "max_failures", 10) and not self.meter.off:
            self.meter.off = True
            log.warning("looptune hook disabled after %d errors; training goes on unmeasured", self._errors)

    def _after_fork_child(self) -> None:
        # a DataLoader worker: it must not speak on (or close) the parent's connection
        self.meter.off = True
        self._closed = True
        if self._channel is not None:
            self._channel.forget_in_child()

    # ---- reports ----

    def _settling(self) -> list[str]:
        return [k for k, a in self.actuators.items() if a.settling is not None and a.settling()]

    def rank_world(self) -> tuple[int, int]:
        """This process's (rank, world size): `rank_source` when an adapter set one, else
        torch.distributed when it is up, else the launcher's RANK / WORLD_SIZE."""
        source = self.rank_source
        if source is not None:
            try:
                rank, world = source()
                return int(rank), int(world)
            except Exception:  # noqa: BLE001 - the framework cannot tell yet: fall back
                pass
        return rank_world()

    def report(self) -> dict[str, Any]:
        """The report message for the daemon (also what the embedded engine and metrics read)."""
        self.rank, self.world_size = self.rank_world()
        return {"type": "report", "pid": os.getpid(), "world_size": self.world_size,
                "counters": self.meter.figures(), "step_hist": list(self.meter.hist), "knobs": dict(self.knobs),
                "memory": runinfo.memory_peaks(), "hook_errors": self._errors, "disabled": self.meter.off,
                "signature": self.signature, "untunable": dict(self.untunable), "settling": self._settling()}

    def hello(self) -> dict[str, Any]:
        self.rank, self.world_size = self.rank_world()
        return {"type": "hello", "run": self.run, "rank": self.rank, "world_size": self.world_size,
                "pid": os.getpid(), "tuners": self.tuners, "tune": bool(self.tune)}

    def view(self) -> Any:
        from looptune.collectors.hookjobs import HookView
        rep = self.report()
        return HookView(run=self.run, rank=str(self.rank), world_size=self.world_size, pid=os.getpid(),
                        counters=rep["counters"], step_hist=rep["step_hist"], knobs=rep["knobs"],
                        memory=rep["memory"], hook_errors=self._errors, disabled=self.meter.off,
                        connected=self.mode == "daemon", last_report_time=time.time(), mode=self.mode)
