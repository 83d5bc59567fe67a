"""The control hook: a few lines in the training loop that measure it and apply knob changes.

    with Hook(run="exp-1") as hook:
        loader = hook.watch(loader)
        for epoch in range(epochs):
            for batch in loader:
                ...
                hook.step()

The training thread only adds numbers: `step()` and the loader wrapper take two clock reads
(vDSO, no syscall), a few integer/float additions and one bisect into fixed buckets, without
locks or allocation. Everything else (reports, reconnects, decisions, memory peaks) happens in
one background thread. A decision is queued by that thread and applied by `step()` at the
next step boundary. Any exception inside the hook is caught, logged once and counted; after
`hook.max_failures` the hook turns itself off and the training goes on untouched.
torch is never imported here: the hook reads it from sys.modules when the job has it.
"""
from __future__ import annotations

import atexit
import logging
import os
import resource
import select
import socket
import sys
import threading
import time
import weakref
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from looptune.tuners import protocol

log = logging.getLogger("looptune.hook")

_perf = time.perf_counter
_BUCKETS = protocol.STEP_BUCKETS


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


@dataclass
class Actuator:
    """How a knob is read and changed; `set` runs in the training thread at a step boundary."""
    get: Callable[[], Any]
    set: Callable[[Any], None]


_SIZED: set[type] = set()   # tensor-like batch types: len() gives dim 0 without building a torch.Size


def _batch_size(batch: Any) -> int:
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
            return _batch_size(first)
        return len(batch)
    if t is dict:
        for value in batch.values():
            return _batch_size(value)
        return 0
    if hasattr(batch, "shape") and hasattr(batch, "__len__"):
        _SIZED.add(t)
        return _batch_size(batch)
    return 1


def _signature(loader: Any) -> str:
    """Names the data a setting was found for: dataset type and size, batch size, sampler type."""
    import hashlib
    ds = getattr(loader, "dataset", loader)
    try:
        size = len(ds)
    except TypeError:
        size = -1
    parts = [type(ds).__module__, type(ds).__qualname__, str(size), str(getattr(loader, "batch_size", None)),
             type(getattr(loader, "sampler", None)).__name__]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def _rank_world() -> tuple[int, int]:
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # noqa: BLE001 - fall back to the environment
        pass
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        return 0, 1


def _default_run() -> str:
    from looptune.collectors.jobs import _clean, derive_run
    rid = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if rid and rid != "none":
        return _clean(rid)
    argv = list(sys.argv)
    if argv and os.path.basename(argv[0]) == "__main__.py":
        # `python -m pkg`: sys.argv[0] is .../pkg/__main__.py; name the run `pkg`, as the daemon does
        # from the command line, not `__main__`
        argv = ["-m", os.path.basename(os.path.dirname(os.path.abspath(argv[0])))] + argv[1:]
    return derive_run([sys.executable] + argv)


def _load_config(config: Any) -> Any:
    from looptune.daemon import config as cfg
    if config is None:
        try:
            return cfg.load_resolved(None)[0]
        except cfg.ConfigError as exc:
            log.warning("looptune config ignored, using defaults: %s", exc)
            return cfg.Config()
    if isinstance(config, cfg.Config):
        return config
    if isinstance(config, dict):
        return cfg.parse(config, "Hook(config=...)")
    return cfg.load(config)


class _WatchedIter:
    """The per-batch path: two clock reads and three additions around the real next()."""
    __slots__ = ("_hook", "_w")

    def __init__(self, hook: Hook, watched: Any) -> None:
        self._hook = hook
        self._w = watched       # tuners.loader.WatchedLoader: its `it` may be swapped at a step boundary

    def __iter__(self) -> _WatchedIter:
        return self

    def __next__(self) -> Any:
        h = self._hook
        w = self._w
        if h._off:
            batch = next(w.it)
            w.delivered += 1
            return batch
        t0 = _perf()
        batch = next(w.it)
        t1 = _perf()
        w.delivered += 1
        try:
            h._data_wait += t1 - t0
            h._batches += 1
            h._pending_samples += _batch_size(batch)
        except Exception as exc:  # noqa: BLE001 - measurement must never cost the batch
            h._failed(exc)
        return batch


class Hook:
    def __init__(self, run: str | None = None, socket: str | None = None, tune: bool | list[str] = True,
                 config: Any = None) -> None:
        # counters: touched by the training thread only, read by the reporter thread
        self._off = False
        self._steps = 0
        self._batches = 0
        self._samples = 0
        self._pending_samples = 0
        self._data_wait = 0.0
        self._step_seconds = 0.0
        self._hist = [0] * (len(_BUCKETS) + 1)
        self._t_step = _perf()
        self._has_pending = False
        self._pending: deque[dict[str, Any]] = deque()
        self._errors = 0
        self._logged_error = False
        self._closed = False
        self.knobs: dict[str, Any] = {}
        self.decisions: list[Decision] = []
        self.actuators: dict[str, Actuator] = {}
        self.untunable: dict[str, str] = {}
        self.signature = ""
        self._watched: Any = None
        self._sync_every = 0
        self._sync_steps = 0
        self.tune: bool | list[str] = tune
        self.mode = "embedded"
        self._channel: _Channel | None = None
        self._engine: Any = None
        self._tree: Any = None
        self._metrics_server: Any = None
        try:
            self.config = _load_config(config)
            self.max_failures = self.config.hook.max_failures
            self.run = run or _default_run()
            if not protocol.NAME_RE.match(self.run):
                raise ValueError(f"run {self.run!r} must match {protocol.NAME_RE.pattern}")
            self.tune = tune
            self.tuners = list(tune) if isinstance(tune, (list, tuple)) else []
            self.rank, self.world_size = _rank_world()
            if isinstance(tune, (list, tuple)):
                from looptune.tuners.registry import available
                unknown = [n for n in tune if n not in available()]
                if unknown:
                    raise ValueError(f"unknown tuner(s) {', '.join(map(repr, unknown))}; known: "
                                     f"{', '.join(sorted(available()))}")
            self._decide_sync()
            self.socket_paths = self._socket_paths(socket)
            self._channel = _Channel(self)
            self._channel.start()
            if self.mode == "embedded":
                try:
                    self._start_embedded_metrics()
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
            self._off = True
            if self._channel is not None:     # started already: no reporter left running for a dead hook
                self._channel.stop()

    # ---- the user's API ----

    def watch(self, loader: Any) -> Any:
        """Wrap a DataLoader (or any iterable of batches); the result yields the same batches.

        The first watched loader is the one whose knobs are reported and tuned.
        """
        if self._off:
            return loader
        try:
            from looptune.tuners.loader import WatchedLoader, loader_knobs
            w = WatchedLoader(self, loader)
            if self._watched is None:
                self._watched = w
                self.knobs.update(loader_knobs(loader))
                self.signature = _signature(loader)
                if w.tunable_reason is None:
                    self.actuators["num_workers"] = Actuator(lambda: w.active.num_workers,
                                                             lambda v: w.set_workers(num_workers=v))
                    self.actuators["prefetch_factor"] = Actuator(lambda: w.active.prefetch_factor,
                                                                 lambda v: w.set_workers(prefetch_factor=v))
                else:
                    self.untunable = {"num_workers": w.tunable_reason[:200],
                                      "prefetch_factor": w.tunable_reason[:200]}
            self._decide_sync()
            return w
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return loader

    def _decide_sync(self) -> None:
        """Under torch.distributed with tuning on, rank 0's decisions reach every rank at the same
        step: one broadcast every `sync_every_steps`. Decided before the first step, the same way
        on every rank, so the collectives line up."""
        if self._sync_every or not self.tune or self._steps:
            return
        dist = sys.modules.get("torch.distributed")
        try:
            if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                self._sync_every = self.config.hook.sync_every_steps
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)

    def _sync_decisions(self) -> None:
        try:
            import torch.distributed as dist
            payload: list[Any] = [None]
            if self.rank == 0:
                payload[0] = list(self._pending)
                self._pending.clear()
                self._has_pending = False
            dist.broadcast_object_list(payload, src=0)
            if payload[0] and not self._off:
                self._pending.extend(payload[0])
                self._apply_pending()
        except Exception as exc:  # noqa: BLE001 - every rank fails alike here: stop syncing, keep training
            self._sync_every = 0
            self._failed(exc)

    def step(self) -> None:
        """Call once per optimizer step; applies pending knob changes at this boundary."""
        if self._sync_every:
            # every rank, a disabled hook too, takes part in the same collectives at the same steps
            self._sync_steps += 1
            if self._sync_steps % self._sync_every == 0:
                self._sync_decisions()
        if self._off:
            return
        try:
            t = _perf()
            self._steps += 1
            self._samples += self._pending_samples
            self._pending_samples = 0
            dt = t - self._t_step
            self._t_step = t
            self._step_seconds += dt
            self._hist[bisect_left(_BUCKETS, dt)] += 1
            if self._has_pending and not self._sync_every:
                self._apply_pending()
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)

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
        if self._watched is not None:
            try:           # persistent workers would otherwise wait for the cycle collector (seconds each)
                self._watched.stop_workers()
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)
        if self._metrics_server is not None:
            try:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
            except Exception:  # noqa: BLE001
                pass

    def __enter__(self) -> Hook:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- read-only figures ----

    @property
    def counters(self) -> dict[str, float]:
        return {"samples": self._samples, "batches": self._batches, "steps": self._steps,
                "data_wait_seconds": self._data_wait, "step_seconds": self._step_seconds}

    @property
    def disabled(self) -> bool:
        return self._off

    @property
    def errors(self) -> int:
        return self._errors

    # ---- decisions ----

    def _queue_decision(self, decision: dict[str, Any]) -> None:
        """Reporter thread: hand a validated decision to the training thread."""
        self._pending.append(decision)
        self._has_pending = True

    def _apply_pending(self) -> None:
        self._has_pending = False
        while self._pending:
            d = self._pending.popleft()
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
                    if self._watched is not None:
                        self.knobs.update(self._watched.knobs())
                    self.knobs[knob] = act.get()
                except Exception as exc:  # noqa: BLE001 - a failed change is reported, not raised
                    outcome, detail = "failed", f"{type(exc).__name__}: {exc}"
                    log.warning("knob %s -> %r failed: %s", knob, new, detail)
            rec = Decision(knob=knob, old=old, new=new, reason=d.get("reason", ""), outcome=outcome,
                           time=time.time(), step=self._steps, tuner=d.get("tuner", ""), id=d.get("id"),
                           detail=detail)
            self.decisions.append(rec)
            if self._channel is not None:
                self._channel.acknowledge(rec)

    # ---- failures ----

    def _failed(self, exc: BaseException) -> None:
        self._errors += 1
        if not self._logged_error:
            self._logged_error = True
            log.warning("looptune hook error (training continues): %r", exc, exc_info=exc)
        if self._errors >= getattr(self, "max_failures", 10) and not self._off:
            self._off = True
            log.warning("looptune hook disabled after %d errors; training goes on unmeasured", self._errors)

    def _after_fork_child(self) -> None:
        # a DataLoader worker: it must not speak on (or close) the parent's connection
        self._off = True
        self._closed = True
        if self._channel is not None:
            self._channel.forget_in_child()

    # ---- embedded tuning ----

    def _embedded_tick(self) -> None:
        """No daemon: the same engine runs in this process, on this process tree's own figures.
        Runs in the reporter thread; decisions reach the training thread through the queue."""
        import psutil

        from looptune.collectors.jobs import JobsCollector
        from looptune.tuners.engine import from_config
        from looptune.tuners.observe import build
        if self._engine is None:
            self._engine = from_config(self.config, lambda _key, d: (self._queue_decision(d), True)[1],
                                       daemon=False)
            me = os.getpid()
            # self_pid=-1: a collector leaves out the process it runs in (the daemon); here that process is the job
            self._tree = JobsCollector([], registered=lambda: {me: (self.run, str(self.rank), str(self.world_size))},
                                       memory_detail_interval=2.0, self_pid=-1)
        snap = self._tree.sample()
        job = snap.jobs[0] if snap.jobs else None
        obs = build(time.monotonic(), self.report(), job, host_available_bytes=psutil.virtual_memory().available,
                    pid=os.getpid())
        names: list[str] | None = None if self.tune is True else list(self.tuners)
        if not self.tune or self.rank != 0:
            names = []          # verdicts only: rank 0 decides for every rank
        self._engine.observe(("self",), self.run, obs, tuners=names)

    def _embedded_ack(self, rec: Decision) -> None:
        if self._engine is not None and rec.id is not None:
            self._engine.applied(("self",), rec.id, rec.outcome, rec.detail)

    # ---- reports ----

    def report(self) -> dict[str, Any]:
        """The report message for the daemon (also what embedded metrics show)."""
        rank, world = _rank_world()
        self.rank, self.world_size = rank, world
        return {"type": "report", "pid": os.getpid(), "world_size": world, "counters": self.counters,
                "step_hist": list(self._hist), "knobs": dict(self.knobs), "memory": _memory_peaks(),
                "hook_errors": self._errors, "disabled": self._off, "signature": self.signature,
                "untunable": dict(self.untunable)}

    def hello(self) -> dict[str, Any]:
        rank, world = _rank_world()
        self.rank, self.world_size = rank, world
        return {"type": "hello", "run": self.run, "rank": rank, "world_size": world, "pid": os.getpid(),
                "tuners": self.tuners, "tune": bool(self.tune)}

    def view(self) -> Any:
        from looptune.collectors.hookjobs import HookView
        rep = self.report()
        return HookView(run=self.run, rank=str(self.rank), world_size=self.world_size, pid=os.getpid(),
                        counters=rep["counters"], step_hist=rep["step_hist"], knobs=rep["knobs"],
                        memory=rep["memory"], hook_errors=self._errors, disabled=self._off,
                        connected=self.mode == "daemon", last_report_time=time.time(), mode=self.mode)

    # ---- connection ----

    def _socket_paths(self, explicit: str | None) -> list[str]:
        if explicit:
            return [explicit]
        if os.environ.get("LOOPTUNE_SOCKET"):
            return [os.environ["LOOPTUNE_SOCKET"]]
        if self.config.daemon.socket:
            return [self.config.daemon.socket]
        from looptune.daemon.config import default_socket_paths
        paths = [os.path.join("/run/looptune", "looptune.sock")]
        paths += [p for p in default_socket_paths({k: v for k, v in os.environ.items()
                                                   if k != "RUNTIME_DIRECTORY"}) if p not in paths]
        return paths

    def _start_embedded_metrics(self) -> None:
        listen = self.config.hook.embedded_metrics_listen
        if not listen:
            return
        from prometheus_client import CollectorRegistry, start_http_server

        from looptune.collectors.hookjobs import hook_families, tuner_families
        from looptune.daemon.config import split_listen
        hook = weakref.ref(self)

        class _Own:
            def collect(self) -> Iterable[Any]:
                h = hook()
                if h is None:
                    return []
                fams = list(hook_families([h.view()], with_info=True))
                eng = h._engine
                if eng is not None:
                    verdicts = {(h.run, str(h.rank)): v for v in eng.verdicts().values()}
                    fams.extend(tuner_families(dict(eng.outcomes), verdicts))
                return fams

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Own())
        host, port = split_listen(listen)
        self._metrics_server, _ = start_http_server(port, addr=host, registry=registry)
        log.info("looptune embedded mode: /metrics on %s", listen)


def _memory_peaks() -> dict[str, int]:
    peaks = {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            peaks["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
            peaks["cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    except Exception:  # noqa: BLE001 - peaks are optional
        pass
    return peaks


class _Channel:
    """The background thread: reports, reconnects with backoff, receives decisions."""

    def __init__(self, hook: Hook) -> None:
        self.hook = hook
        cfg = hook.config.hook
        self.interval = cfg.report_interval_seconds
        self.backoff_max = cfg.reconnect_max_seconds
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.acks: deque[Decision] = deque()
        self.identity: tuple[str, int, int] | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="looptune-hook", daemon=True)
        self._logged_reject: set[str] = set()
        self.reconnects = 0
        self._next_embedded = 0.0
        self._connect()      # synchronously once: the mode is known when Hook() returns

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(3.0)

    def acknowledge(self, rec: Decision) -> None:
        self.acks.append(rec)
        self._wake.set()

    def forget_in_child(self) -> None:
        self.sock = None   # the fd stays open in the child; the parent owns the connection

    def _connect(self) -> bool:
        h = self.hook
        for path in h.socket_paths:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(0.5)
                s.connect(path)
                hello = h.hello()
                s.sendall(protocol.encode(hello))
                reply = self._read_line(s, deadline=time.monotonic() + 1.0)
                if reply is None or reply.get("type") != "welcome":
                    reason = (reply or {}).get("reason", "no welcome")
                    if reason not in self._logged_reject:
                        self._logged_reject.add(reason)
                        log.warning("looptune daemon at %s refused this job: %s %s", path, reason,
                                    (reply or {}).get("detail", ""))
                    s.close()
                    continue
                interval = reply.get("report_interval_seconds")
                if isinstance(interval, (int, float)) and 0.05 <= interval <= 60:
                    self.interval = float(interval)
                s.settimeout(None)
                s.setblocking(False)
                self.sock = s
                self.identity = (hello["run"], hello["rank"], hello["world_size"])
                if h.mode != "daemon":
                    log.info("looptune: reporting to the daemon at %s", path)
                h.mode = "daemon"
                return True
            except (OSError, protocol.ProtocolError):
                s.close()
        if h.mode == "daemon":
            log.warning("looptune: lost the daemon; running embedded and retrying")
        h.mode = "embedded"
        return False

    def _read_line(self, s: socket.socket, deadline: float) -> dict[str, Any] | None:
        """Blocking read of one message during the handshake."""
        buf = bytearray()
        while b"\n" not in buf and len(buf) < protocol.MAX_MESSAGE_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            s.settimeout(left)
            chunk = s.recv(4096)
            if not chunk:
                return None
            buf += chunk
        line, _, rest = bytes(buf).partition(b"\n")
        self.buf = bytearray(rest)
        return protocol.decode(line, protocol.SERVER_TYPES)

    def _drop(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None
        self.buf.clear()
        if self.hook.mode == "daemon":
            log.warning("looptune: lost the daemon; running embedded and retrying")
        self.hook.mode = "embedded"

    def _send(self, msg: dict[str, Any]) -> None:
        assert self.sock is not None
        data = protocol.encode(msg)
        self.sock.settimeout(1.0)        # a stuck daemon costs this thread a second, never training
        try:
            self.sock.sendall(data)
        finally:
            if self.sock is not None:
                self.sock.setblocking(False)

    def _receive(self) -> None:
        while self.sock is not None:
            try:
                chunk = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            if not chunk:
                self._drop()
                return
            self.buf += chunk
            while b"\n" in self.buf:
                nl = self.buf.index(b"\n")
                line = bytes(self.buf[:nl])
                del self.buf[:nl + 1]
                self._on_message(line)
            if len(self.buf) >= protocol.MAX_MESSAGE_BYTES:
                self._drop()

    def _on_message(self, line: bytes) -> None:
        try:
            msg = protocol.decode(line, protocol.SERVER_TYPES)
            if msg["type"] == "decision":
                self.hook._queue_decision(protocol.check_decision(msg))
            elif msg["type"] == "error":
                log.warning("looptune daemon closed this job's connection: %s %s", msg.get("reason"),
                            msg.get("detail", ""))
        except protocol.ProtocolError as exc:
            log.warning("looptune: ignored a bad message from the daemon: %s", exc)

    def _flush_acks(self) -> None:
        while self.acks and self.sock is not None:
            rec = self.acks.popleft()
            if rec.id is None:
                continue
            self._send({"type": "applied", "id": rec.id, "outcome": rec.outcome, "detail": rec.detail[:500],
                        "step": rec.step})

    def _tick(self) -> None:
        h = self.hook
        if self.sock is not None:
            rank, world = _rank_world()
            if self.identity is not None and (rank, world) != self.identity[1:]:
                self._drop()     # torch.distributed came up after Hook(): say hello again as the right rank
        if self.sock is None:
            return
        self._receive()
        if self.sock is not None:
            self._flush_acks()
            self._send(h.report())

    def _run(self) -> None:
        backoff = 0.1
        next_report = time.monotonic()
        while True:
            stopping = self._stop.is_set()
            try:
                if self.sock is None and not stopping and time.monotonic() >= next_report:
                    if self._connect():
                        backoff = 0.1
                        self.reconnects += 1
                    else:
                        next_report = time.monotonic() + backoff
                        backoff = min(backoff * 2, self.backoff_max)
                if self.sock is not None and (stopping or time.monotonic() >= next_report or self.acks):
                    due = stopping or time.monotonic() >= next_report
                    if due:
                        self._tick()
                        next_report = time.monotonic() + self.interval
                    else:
                        self._flush_acks()
                if stopping:
                    if self.sock is not None:
                        self._send({"type": "bye"})
                        self.sock.close()
                        self.sock = None
                    return
                if self.hook._off and self.hook._errors >= self.hook.max_failures and self.sock is None:
                    return
            except (OSError, protocol.ProtocolError):
                self._drop()
            except Exception as exc:  # noqa: BLE001 - the reporter must not die quietly either
                self.hook._failed(exc)
                if stopping:
                    return
            timeout = max(0.0, next_report - time.monotonic())
            if self.sock is not None:
                try:
                    r, _, _ = select.select([self.sock], [], [], min(timeout, 0.2))
                except (OSError, ValueError):
                    r = []
                if r:
                    try:
                        self._receive()
                    except OSError:
                        self._drop()
                if self._wake.is_set():
                    self._wake.clear()
            else:
                try:
                    while self.acks:
                        self.hook._embedded_ack(self.acks.popleft())
                    if time.monotonic() >= self._next_embedded and not self.hook._off:
                        self._next_embedded = time.monotonic() + self.interval
                        self.hook._embedded_tick()
                except Exception as exc:  # noqa: BLE001
                    self.hook._failed(exc)
                self._wake.wait(min(timeout, 0.2) if timeout else 0.05)
                self._wake.clear()
