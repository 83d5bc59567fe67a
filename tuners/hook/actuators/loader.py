"""The DataLoader actuator: change num_workers / prefetch_factor mid-epoch without losing a sample.

The watched loader iterates the user's DataLoader exactly as the user would, so the epoch's
order and every draw from `loader.generator` and the global RNGs are those of an untuned run.
At the start of each epoch it snapshots the RNG states (a few KB). A change at a step
boundary after k batches of the epoch:

1. replays the epoch's index stream: RNGs set back to the snapshot, the same draws the
   DataLoader iterator made (its base seed, then the index sampler), RNGs restored;
2. checks the replay against the index batches the running iterator actually pulled (a sampler
   that does not replay deterministically is left alone, nothing lost);
3. drains the running iterator's index source, so that the RNGs make the rest of the draws the
   untuned epoch makes (RandomSampler draws a last, empty randperm when it runs out), then
   stops the old iterator and serves batches k.. from a one-off DataLoader with the new
   setting, whose own generator keeps the user's untouched (a further change in the same
   epoch starts another one-off loader on the rest of those known batches);
4. later epochs iterate a DataLoader derived from the user's (same dataset, sampler, batch
   sampler, collate_fn, worker_init_fn, pin_memory, persistent_workers) with the new setting.
   Its base seed is drawn from a private generator; the watched loader makes the draw on the
   user's generator (or the global RNG) itself, exactly when the user's loader would (every
   epoch, or only the first one with persistent workers): later epochs' order is the untuned
   run's too.

An IterableDataset, or a loader delivering out of order (in_order=False), is left alone: the
stream's split across workers is the order there. torch is imported lazily, as everywhere in
tuners/.

Every value is bounded before anything starts: a decision comes from a daemon, and a worker
count is processes forked from this one. num_workers must be an integer >= 0 and, where it
raises the count, at most `worker_cap()`; prefetch_factor an integer in 1..MAX_PREFETCH_FACTOR.
A value outside is refused (KnobRefused: the decision's outcome is `failed`), never clamped.
"""
from __future__ import annotations

import numbers
import os
import random
import sys
from typing import Any, Iterator

# The host's cap on DataLoader workers. Not the core count: a latency-bound loader (network or disk
# reads, decoding that waits) overlaps waits, so it wants more workers than cores (a job seen with
# 2 cores was fastest at 24). 16 per CPU the process may use, at least 32 (the workers tuner's
# default max_workers, reachable on a small host), at most what tuners.workers.max_workers may be
# set to (its declared bound, 1024); and each new worker, a forked copy of the training process,
# is counted at WORKER_MIN_BYTES against the memory available. A fork bomb (10**9 workers, or
# anything a host cannot run) is refused; the workers tuner's measurements (throughput, CPU
# verdict, memory budget from the workers' USS) choose within the cap.
WORKERS_PER_CPU = 16
MIN_WORKER_CAP = 32
WORKER_MIN_BYTES = 64 << 20
MAX_PREFETCH_FACTOR = 64     # batches each worker keeps in flight; DataLoader's default is 2


class NotTunable(Exception):
    """This loader's knob cannot be changed safely; the message says why."""


class KnobRefused(ValueError):
    """A value outside the knob's bounds (the message says which): refused, nothing changed."""


def _declared_max_workers() -> int:
    """The most workers tuners.workers.max_workers may be configured to (its declared `hi`)."""
    from dataclasses import fields

    from looptune.tuners.workers import WorkersOptions
    return int(next(f.metadata["hi"] for f in fields(WorkersOptions) if f.name == "max_workers"))


def _cpus_allowed() -> int:
    """CPUs this process may run on (its affinity mask; taskset, cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _available_memory_bytes() -> int | None:
    """MemAvailable, or less where this process's cgroup (v2) limit leaves less; None if unknown."""
    avail: int | None = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            rel = next((line.strip()[3:] for line in f if line.startswith("0::")), None)
        if rel is not None:
            base = os.path.join("/sys/fs/cgroup", rel.lstrip("/"))
            with open(os.path.join(base, "memory.max"), encoding="ascii") as f:
                limit = f.read().strip()
            if limit != "max":
                with open(os.path.join(base, "memory.current"), encoding="ascii") as f:
                    left = max(0, int(limit) - int(f.read().strip()))
                avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    return avail


def worker_cap(current: int) -> tuple[int, str]:
    """(the most workers a change may set, why that many): see WORKERS_PER_CPU above."""
    declared = _declared_max_workers()
    cpus = _cpus_allowed()
    cap = min(declared, max(MIN_WORKER_CAP, WORKERS_PER_CPU * cpus))
    why = (f"{WORKERS_PER_CPU} per CPU this process may use ({cpus}), at least {MIN_WORKER_CAP}, at most "
           f"{declared}")
    avail = _available_memory_bytes()
    if avail is not None and current + avail // WORKER_MIN_BYTES < cap:
        cap = current + avail // WORKER_MIN_BYTES
        why = f"{avail >> 20} MiB of memory available, {WORKER_MIN_BYTES >> 20} MiB counted per new worker"
    return cap, why


def _integer(knob: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise KnobRefused(f"{knob} must be an integer, got {value!r}; not applied")
    return int(value)


class _ListBatchSampler:
    """Index batches from a list: what a one-off DataLoader serves for the rest of an epoch."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Recorder:
    """Wraps a running iterator's index source to record what it pulls (for the replay check)."""
    __slots__ = ("it", "pulled")

    def __init__(self, it: Iterator[Any]) -> None:
        self.it = it
        self.pulled: list[Any] = []

    def __iter__(self) -> _Recorder:
        return self

    def __next__(self) -> Any:
        item = next(self.it)
        self.pulled.append(item)
        return item


def _rng_snapshot(generator: Any) -> dict[str, Any]:
    import torch
    snap: dict[str, Any] = {"torch": torch.get_rng_state(), "random": random.getstate()}
    if generator is not None:
        snap["generator"] = generator.get_state()
    np = sys.modules.get("numpy")
    if np is not None:
        snap["numpy"] = np.random.get_state()
    return snap


def _rng_restore(snap: dict[str, Any], generator: Any) -> None:
    import torch
    torch.set_rng_state(snap["torch"])
    random.setstate(snap["random"])
    if generator is not None and "generator" in snap:
        generator.set_state(snap["generator"])
    if "numpy" in snap:
        sys.modules["numpy"].random.set_state(snap["numpy"])


def _sampler_epochs(index_sampler: Any) -> list[tuple[Any, int]]:
    """(sampler, its `epoch`) along the index sampler's chain (`sampler`, `batch_sampler`, nested):
    a sampler that seeds from its epoch and advances it when it runs out (Accelerate's
    SeedableRandomSampler) must be replayed at the epoch the running iterator started with."""
    out: list[tuple[Any, int]] = []
    todo, seen = [index_sampler], set()
    while todo and len(seen) < 8:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        epoch = getattr(obj, "epoch", None)
        if isinstance(epoch, int) and not isinstance(epoch, bool):
            out.append((obj, epoch))
        todo += [getattr(obj, name, None) for name in ("sampler", "batch_sampler")]
    return out


def _set_epochs(epochs: list[tuple[Any, int]]) -> None:
    for obj, epoch in epochs:
        obj.epoch = epoch


def loader_knobs(loader: Any) -> dict[str, Any]:
    return {"num_workers": getattr(loader, "num_workers", None),
            "prefetch_factor": getattr(loader, "prefetch_factor", None),
            "batch_size": getattr(loader, "batch_size", None)}


def why_not_tunable(loader: Any) -> str | None:
    """None if the worker knobs of `loader` can change mid-epoch; else the reason."""
    try:
        from torch.utils.data import DataLoader, IterableDataset
    except ImportError:
        return "torch is not importable"
    if not isinstance(loader, DataLoader):
        return f"{type(loader).__name__} is not a torch DataLoader"
    if isinstance(loader.dataset, IterableDataset):
        return "IterableDataset: its split across workers is its order; left alone"
    if not getattr(loader, "in_order", True):
        return "in_order=False delivers batches out of order; resuming at a position is not defined"
    return None


def derive(loader: Any, num_workers: int, prefetch_factor: int | None, *,
           batch_sampler: Any = None, generator: Any = "same") -> Any:
    """A DataLoader like `loader` with another worker setting (and, optionally, index batches)."""
    import warnings

    from torch.utils.data import DataLoader
    kw: dict[str, Any] = dict(
        num_workers=num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        timeout=loader.timeout if num_workers > 0 else 0, worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context if num_workers > 0 else None,
        generator=loader.generator if generator == "same" else generator,
        # a one-off loader (batch_sampler given) serves one epoch's end: no workers kept after it
        persistent_workers=bool(loader.persistent_workers and num_workers > 0 and batch_sampler is None),
        pin_memory_device=loader.pin_memory_device)
    if num_workers > 0:
        kw["prefetch_factor"] = prefetch_factor or 2
    if hasattr(loader, "in_order"):
        kw["in_order"] = loader.in_order
    if loader._auto_collation:
        kw["batch_sampler"] = batch_sampler if batch_sampler is not None else loader.batch_sampler
    else:
        kw["batch_size"] = None
        kw["sampler"] = batch_sampler if batch_sampler is not None else loader.sampler
    with warnings.catch_warnings():
        # more workers than cores is what latency-bound loading needs; the tuner measures it
        warnings.filterwarnings("ignore", message=".*worker processes in total.*")
        return DataLoader(loader.dataset, **kw)


class WatchedLoader:
    """Iterates like the DataLoader it wraps (same batches, same order), timed by the hook."""

    def __init__(self, meter: Any, loader: Any) -> None:
        self._meter = meter             # hook.meter.Meter: the watched iterator adds to it
        self.loader = loader            # the user's, never modified
        self.active = loader            # what new epochs iterate: the user's, or one derived from it
        self.it: Any = None             # the running iterator
        self.delivered = 0              # batches of this epoch delivered so far
        self.epoch = -1
        self._snap: dict[str, Any] | None = None
        self._snap_epochs: list[tuple[Any, int]] = []
        self._drew_seed = False
        self._recorder: _Recorder | None = None
        self._pulled_before = 0
        self._oneoff: tuple[list[Any], int] | None = None   # this epoch's end: (index batches, from batch)
        self._user_started = getattr(loader, "_iterator", None) is not None
        self._stale: list[tuple[Any, Any]] = []   # (iterator, loader): persistent ones of a setting left
        self.tunable_reason = why_not_tunable(loader)
        self._warm_at: int | None = None          # meter.batches by which every new worker has delivered
        self._warm_next_epoch: int | None = None  # workers of a setting that starts with the next epoch

    # ---- iteration ----

    def __iter__(self) -> Iterator[Any]:
        self.epoch += 1
        self.delivered = 0
        self._oneoff = None
        self._recorder = None
        while self._stale:              # their workers would otherwise idle, and hold memory, for good
            _shutdown(*self._stale.pop())
        if self.tunable_reason is None:
            self._start_epoch()
        else:
            self.it = iter(self.active)
        if self._warm_next_epoch is not None:
            self._warm_at, self._warm_next_epoch = self._meter.batches + self._warm_next_epoch, None
        self._meter.restart_step_clock()
        return self._meter.wrap(self)

    def _start_epoch(self) -> None:
        import torch
        active, user = self.active, self.loader
        gen = user.generator
        self._snap = _rng_snapshot(gen)
        self._snap_epochs = _sampler_epochs(active._index_sampler)
        # the untuned run's iter(): a base seed from the user's generator (or the global RNG), except
        # where persistent workers reuse their iterator (only the first iter() draws one)
        self._drew_seed = not (user.persistent_workers and user.num_workers > 0 and self._user_started)
        self._user_started = True
        if active is not user and self._drew_seed:
            # a derived loader draws from its private generator: make it the untuned draw, and make
            # that draw on the user's RNG, whether or not the derived loader's iter() draws at all
            active.generator.set_state(gen.get_state() if gen is not None else torch.get_rng_state())
            torch.empty((), dtype=torch.int64).random_(generator=gen)
        it = _quiet_iter(active)
        self._pulled_before = getattr(it, "_send_idx", 0)   # index batches already prefetched
        self._recorder = _Recorder(it._sampler_iter)
        it._sampler_iter = self._recorder
        self.it = it

    def adopt(self, it: Any) -> Iterator[Any]:
        """This epoch's iterator over the user's loader, started by a framework before the loader
        was watched (Lightning calls iter() on its train loader before any callback runs): the
        epoch goes on in it, watched. A change can still come mid-epoch where nothing has been
        drawn from its index sampler yet (a single-process iterator that yielded nothing: the
        RNGs are where its sampler will draw from); otherwise the first change waits for the
        next epoch. Returns what the framework should iterate for the rest of this epoch."""
        self.epoch += 1
        self.delivered = 0
        self._oneoff = None
        self._recorder = None
        self._snap = None
        self._user_started = True
        while self._stale:
            _shutdown(*self._stale.pop())
        self.it = it
        fresh = (getattr(it, "_num_yielded", None) == 0 and getattr(it, "_send_idx", 0) == 0
                 and getattr(it, "_num_workers", 0) == 0 and hasattr(it, "_sampler_iter"))
        if self.tunable_reason is None and self.active is self.loader and fresh:
            self._snap = _rng_snapshot(self.loader.generator)
            self._drew_seed = False          # its base seed is drawn already: the replay starts after it
            self._pulled_before = 0
            self._recorder = _Recorder(it._sampler_iter)
            it._sampler_iter = self._recorder
        self._meter.restart_step_clock()
        return self._meter.wrap(self)

    def replace(self, loader: Any) -> None:
        """Between epochs: the framework built a new loader to iterate from now on (Lightning's
        reload_dataloaders_every_n_epochs). Later epochs iterate it with the worker setting tuned
        so far; nothing of the old one's workers is left running."""
        workers, prefetch = self.active.num_workers, self.active.prefetch_factor
        _stop_all(self)
        self.loader = self.active = loader
        self._oneoff = None
        self._recorder = None
        self._snap = None
        self._user_started = getattr(loader, "_iterator", None) is not None
        self.tunable_reason = why_not_tunable(loader)
        if self.tunable_reason is None and (workers != loader.num_workers or
                                            (workers > 0 and prefetch != loader.prefetch_factor)):
            import torch
            running = getattr(loader, "_iterator", None)
            if running is not None:      # its persistent workers, started by the framework: not what runs now
                _shutdown(running, loader)
            self.active = derive(loader, workers, prefetch if workers > 0 else None, generator=torch.Generator())

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":     # not set yet (copy.copy, unpickling): no endless recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    # ---- the actuator ----

    def knobs(self) -> dict[str, Any]:
        knobs = loader_knobs(self.active)
        knobs["batch_size"] = getattr(self.loader, "batch_size", None)   # derived loaders use a batch_sampler
        return knobs

    def set_workers(self, num_workers: int | None = None, prefetch_factor: int | None = None) -> None:
        """Change the worker setting now (call at a step boundary). Raises NotTunable, or KnobRefused
        for a value outside the bounds (module docstring)."""
        if self.tunable_reason is not None:
            raise NotTunable(self.tunable_reason)
        current = self.active.num_workers
        w = current if num_workers is None else _integer("num_workers", num_workers)
        if w < 0:
            raise KnobRefused(f"num_workers must be >= 0, got {w}; not applied")
        if w > current:          # a lower count is always allowed, even above a cap the user's loader exceeds
            cap, why = worker_cap(current)
            if w > cap:
                raise KnobRefused(f"num_workers {w} is above this job's cap of {cap} ({why}); not applied")
        if prefetch_factor is None:
            p = self.active.prefetch_factor or 2      # the user's own setting, whatever it is
        else:
            p = _integer("prefetch_factor", prefetch_factor)
            if not 1 <= p <= MAX_PREFETCH_FACTOR:
                raise KnobRefused(f"prefetch_factor must be within 1..{MAX_PREFETCH_FACTOR}, got {p}; "
                                  f"not applied")
        if w == self.active.num_workers and (w == 0 or p == self.active.prefetch_factor):
            return
        import torch
        # its base seed: see _start_epoch
        new_active = derive(self.loader, w, p if w > 0 else None, generator=torch.Generator())
        if self.it is None or self._exhausted() or (self._oneoff is None and self._recorder is None):
            # before the first epoch or between epochs: the new setting starts with the next epoch
            old_it = getattr(self.active, "_iterator", None)
            if self.active.persistent_workers and old_it is not None:
                self._stale.append((old_it, self.active))   # stopped at the next epoch's start, not under a loop
            self.active = new_active
            self._warm_next_epoch = w
            return
        if self._oneoff is not None:
            # a one-off loader serves this epoch's end already: its index batches are known
            batches, first = self._oneoff
            remaining = batches[self.delivered - first:]
        else:
            remaining = self._remaining()   # NotTunable: nothing changed, the running iterator goes on
        old, self.it = self.it, None
        _shutdown(old, self.active)         # first: the old and the new workers never run together
        g = torch.Generator()
        g.manual_seed(self.epoch * 1000003 + self.delivered)   # worker seeds of the one-off loader
        self._recorder = None
        self._oneoff = (remaining, self.delivered)
        try:
            self.it = _quiet_iter(derive(self.loader, w, p if w > 0 else None,
                                         batch_sampler=_ListBatchSampler(remaining), generator=g))
            self.active = new_active
            self._warm_at = self._meter.batches + w     # in-order delivery: batch j of the new iterator is worker j's
        except Exception:
            # the new workers did not start: serve the rest of the epoch with the old setting (its
            # iterator's workers are gone, its sampler drained), else in this process; report the failure
            old_w, old_p = self.active.num_workers, self.active.prefetch_factor
            try:
                self.it = _quiet_iter(derive(self.loader, old_w, old_p, batch_sampler=_ListBatchSampler(remaining),
                                             generator=g))
            except Exception:  # noqa: BLE001 - the failure reported is the new setting's
                self.it = _quiet_iter(derive(self.loader, 0, None, batch_sampler=_ListBatchSampler(remaining),
                                             generator=g))
            if self.active.persistent_workers:      # its workers are gone: the same setting, new workers
                self.active = derive(self.loader, self.active.num_workers, self.active.prefetch_factor,
                                     generator=torch.Generator())
            raise

    def settling(self) -> bool:
        """True until every worker of the latest setting has delivered its first batch."""
        if self._warm_next_epoch is not None:
            return True
        if self._warm_at is not None and self._meter.batches < self._warm_at:
            return True
        self._warm_at = None
        return False

    def stop_workers(self) -> None:
        """Stop every worker this wrapper started or runs (Hook.close): persistent workers of a
        loader caught in a reference cycle would otherwise linger until the cycle collector."""
        _stop_all(self)

    def _exhausted(self) -> bool:
        try:
            n = len(self.active)
        except TypeError:       # a batch sampler without __len__: the replay tells what is left
            return False
        return self.delivered >= n

    def _remaining(self) -> list[Any]:
        """The epoch's index batches after the `delivered` ones, replayed and checked."""
        loader = self.it._index_sampler if hasattr(self.it, "_index_sampler") else self.active._index_sampler
        gen = self.loader.generator
        assert self._snap is not None and self._recorder is not None
        current = _rng_snapshot(gen)
        current_epochs = _sampler_epochs(loader)
        try:
            _rng_restore(self._snap, gen)
            _set_epochs(self._snap_epochs)
            if self._drew_seed:
                import torch
                torch.empty((), dtype=torch.int64).random_(generator=gen)
            batches = list(iter(loader))
        finally:
            _rng_restore(current, gen)
            _set_epochs(current_epochs)
        start = self._pulled_before
        pulled = self._recorder.pulled
        if batches[start:start + len(pulled)] != pulled:
            raise NotTunable("the sampler does not replay the same order from its RNG state; left alone")
        if self.delivered > len(batches):
            raise NotTunable("more batches delivered than the sampler yields; left alone")
        # the rest of the running epoch's index stream, drawn on the real RNGs as the untuned run
        # draws it (a sampler's draws after its last index too): later epochs start where theirs do.
        # Batches the running iterator pulled before the recorder was in place come from the replay.
        rest = list(self._recorder.it)
        return batches[self.delivered:start] + pulled[max(0, self.delivered - start):] + rest


def _stop_all(w: "WatchedLoader") -> None:
    while w._stale:
        _shutdown(*w._stale.pop())
    if w.it is not None:
        _shutdown(w.it, w.active)
        w.it = None
    persistent = getattr(w.active, "_iterator", None)
    if persistent is not None:
        _shutdown(persistent, w.active)


def _quiet_iter(loader: Any) -> Any:
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*worker processes in total.*")
        return iter(loader)


def _shutdown(it: Any, owner: Any = None) -> None:
    """Stop an iterator's workers; a persistent one is forgotten by its loader, whose next iter()
    then starts afresh instead of resuming dead workers."""
    stop = getattr(it, "_shutdown_workers", None)
    if stop is not None:
        stop()
    if owner is not None and getattr(owner, "_iterator", None) is it:
        owner._iterator = None


def watch(hook: Any, loader: Any) -> Any:
    """Hook.watch for a DataLoader (or any iterable of batches): the first one watched is the one
    whose knobs are reported and tuned."""
    w = WatchedLoader(hook.meter, loader)
    if hook.loader is None:
        hook.loader = w
        hook.knobs.update(loader_knobs(loader))
        hook.signature = signature(loader)
        if w.tunable_reason is None:
            hook.add_actuator("num_workers", lambda: w.active.num_workers,
                              lambda v: w.set_workers(num_workers=v), settling=w.settling)
            hook.add_actuator("prefetch_factor", lambda: w.active.prefetch_factor,
                              lambda v: w.set_workers(prefetch_factor=v), settling=w.settling)
        else:
            for knob in ("num_workers", "prefetch_factor"):
                hook.untunable[knob] = w.tunable_reason[:200]
    return w


def signature(loader: Any) -> str:
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
