"""The daemon's registry of hook-connected jobs.

A job is keyed by (run, rank) and owned by the uid of the connection that registered it:
another user can neither take its name nor send it decisions. The run name stays the owner's
across daemon restarts (owners.py). A job that disconnects stays
visible for a grace period (its last counters are still scraped), then is dropped, so label
values stay bounded.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from looptune.collectors.hookjobs import HookView
from looptune.daemon.owners import RunOwners
from looptune.protocol import ProtocolError


@dataclass
class HookJob:
    run: str
    rank: int
    world_size: int
    pid: int
    uid: int
    conn_id: int | None
    tuners: list[str]
    tune: bool
    report: dict[str, Any] | None = None
    report_time: float = 0.0              # unix time of the last report
    report_mono: float = 0.0              # monotonic time of the last report
    seq: int = 0                          # reports received
    prev: tuple[float, dict[str, float]] | None = None   # (monotonic, counters) of the report before
    rate_samples: float | None = None
    wait_share: float | None = None
    disconnected_at: float | None = None  # monotonic
    decisions: deque = field(default_factory=lambda: deque(maxlen=64))

    @property
    def key(self) -> tuple[str, int]:
        return (self.run, self.rank)


class HookRegistry:
    def __init__(self, grace_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 max_jobs_per_uid: int = 64, max_jobs: int = 256, owners: RunOwners | None = None) -> None:
        self.grace_seconds = grace_seconds
        self.max_jobs_per_uid = max_jobs_per_uid   # one user cannot grow the registry (or labels) unbounded
        self.max_jobs = max_jobs                   # nor can all users together
        self.owners = owners or RunOwners(None)    # who owns each run name, across restarts
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, int], HookJob] = {}
        # the daemon's engine hears each acknowledgement (called in the socket thread)
        self.on_applied: Callable[[HookJob, dict[str, Any]], None] | None = None

    def register(self, conn_id: int, uid: int, hello: dict[str, Any]) -> HookJob:
        key = (hello["run"], hello["rank"])
        with self._lock:
            old = self._jobs.get(key)
            if (old is not None and old.uid != uid) or self.owners.owner(key[0]) not in (None, uid):
                # the first user to register a run owns it, across daemon restarts: the owner always
                # gets its name back, another user's hello for it is refused
                raise ProtocolError("job_owned", f"run {key[0]} belongs to another user")
            if old is not None:
                if old.conn_id is not None:
                    raise ProtocolError("duplicate_job", f"run {key[0]} rank {key[1]} is already connected")
            if old is None and sum(1 for j in self._jobs.values() if j.uid == uid) >= self.max_jobs_per_uid:
                raise ProtocolError("too_many_jobs", f"uid {uid} already has {self.max_jobs_per_uid} jobs here")
            if old is None and len(self._jobs) >= self.max_jobs:
                raise ProtocolError("too_many_jobs", f"this node has {self.max_jobs} jobs already (jobs.max_jobs)")
            self.owners.claim(key[0], uid)
            job = HookJob(run=key[0], rank=key[1], world_size=hello["world_size"], pid=hello["pid"], uid=uid,
                          conn_id=conn_id, tuners=hello["tuners"], tune=hello["tune"])
            if old is not None and old.pid == job.pid:   # same process reconnecting (daemon restart)
                job.decisions = old.decisions
            self._jobs[key] = job
            return job

    def report(self, job: HookJob, rep: dict[str, Any]) -> None:
        now = self._clock()
        with self._lock:
            c = rep["counters"]
            prev = job.report["counters"] if job.report is not None else None
            if prev is not None and any(c[k] < prev[k] for k in ("samples", "batches", "steps")):
                raise ProtocolError("invalid", "counters went backwards")
            if job.prev is not None:
                t0, c0 = job.prev
                dt = now - t0
                if dt > 0:
                    job.rate_samples = (c["samples"] - c0["samples"]) / dt
                dstep = c["step_seconds"] - c0["step_seconds"]
                if dstep > 0:
                    job.wait_share = min(1.0, max(0.0, (c["data_wait_seconds"] - c0["data_wait_seconds"]) / dstep))
            # rates over windows of at least a second, however often reports come
            if job.prev is None or now - job.prev[0] >= 1.0:
                job.prev = (now, dict(c))
            job.report = rep
            job.world_size = rep["world_size"]
            job.report_time = time.time()
            job.report_mono = now
            job.seq += 1

    def decision_outcome(self, job: HookJob, applied: dict[str, Any]) -> None:
        if self.on_applied is not None:
            self.on_applied(job, applied)
        with self._lock:
            for d in job.decisions:
                if d.get("id") == applied["id"]:
                    d["outcome"] = applied["outcome"]
                    d["detail"] = applied["detail"]
                    d["step"] = applied["step"]
                    return

    def record_decision(self, job: HookJob, decision: dict[str, Any]) -> None:
        with self._lock:
            job.decisions.append({**decision, "outcome": "sent", "time": time.time()})

    def disconnect(self, job: HookJob) -> None:
        with self._lock:
            job.conn_id = None
            job.disconnected_at = self._clock()

    def expire(self) -> list[HookJob]:
        now = self._clock()
        with self._lock:
            gone = [j for j in self._jobs.values()
                    if j.disconnected_at is not None and now - j.disconnected_at > self.grace_seconds]
            for j in gone:
                del self._jobs[j.key]
            return gone

    def connected(self) -> list[HookJob]:
        with self._lock:
            return [j for j in self._jobs.values() if j.conn_id is not None and j.report is not None]

    def find(self, run: str, rank: int) -> HookJob | None:
        with self._lock:
            return self._jobs.get((run, rank))

    def views(self, uid: int | None = None) -> list[HookView]:
        """Jobs with at least one report; `uid` limits them to one user's (None: all)."""
        with self._lock:
            out = []
            for j in self._jobs.values():
                if j.report is None or (uid is not None and j.uid != uid):
                    continue
                r = j.report
                out.append(HookView(
                    run=j.run, rank=str(j.rank), world_size=j.world_size, pid=j.pid, counters=r["counters"],
                    step_hist=r["step_hist"], knobs=r["knobs"], memory=r["memory"], hook_errors=r["hook_errors"],
                    disabled=r["disabled"], connected=j.conn_id is not None, last_report_time=j.report_time,
                    samples_per_second=j.rate_samples, data_wait_share=j.wait_share,
                    last_decision=dict(j.decisions[-1]) if j.decisions else None))
            return out

    def registered_pids(self) -> dict[int, tuple[str, str, str]]:
        """pid -> (run, rank, world_size) of connected jobs, for the process-tree collector."""
        with self._lock:
            return {j.pid: (j.run, str(j.rank), str(j.world_size)) for j in self._jobs.values()
                    if j.conn_id is not None}

    def runs(self) -> set[str]:
        """Run names with a job here, connected or in its grace period."""
        with self._lock:
            return {j.run for j in self._jobs.values()}

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)
