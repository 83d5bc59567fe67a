"""Which uid owns each run name on this node, kept across daemon restarts.

A run belongs to the uid that first registered it. The claim is written to a small state file
(beside the remembered settings), so after a restart the owner still wins: another user who
connects first with the same run name is refused (`job_owned`) instead of taking the name and
locking the owner out. A claim lapses after `ttl_seconds` without a registration; the table is
bounded: past `max_runs` the oldest claim of the uid holding the most goes first, so one user
registering many names evicts its own claims, not another user's. Writes happen on a new claim and at most once an hour per
run to refresh one, never per report.
"""
from __future__ import annotations

import threading
from collections import Counter
import time
from pathlib import Path
from typing import Callable

from looptune.files import read_json_object, write_json

REFRESH_SECONDS = 3600.0


class RunOwners:
    def __init__(self, path: str | None, ttl_seconds: float = 7 * 86400.0, max_runs: int = 4096,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path) if path else None
        self.ttl_seconds = ttl_seconds
        self.max_runs = max_runs
        self._clock = clock
        self._lock = threading.Lock()
        self._claims: dict[str, tuple[int, float]] = self._read()     # run -> (uid, last seen, unix time)

    def _read(self) -> dict[str, tuple[int, float]]:
        if self.path is None:
            return {}
        out = {}
        for run, v in read_json_object(self.path, "run owners").items():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], (int, float)):
                out[run] = (v[0], float(v[1]))
        return out

    def claim(self, run: str, uid: int) -> int:
        """The run's owner after `uid` asks for it: `uid` itself if the run is free or already its own."""
        now = self._clock()
        with self._lock:
            held = self._claims.get(run)
            if held is not None and held[0] != uid and now - held[1] <= self.ttl_seconds:
                return held[0]
            changed = held is None or held[0] != uid or now - held[1] > REFRESH_SECONDS
            self._claims[run] = (uid, now)
            if changed:
                self._prune(now)
                self._save()
            return uid

    def owner(self, run: str) -> int | None:
        with self._lock:
            held = self._claims.get(run)
            return held[0] if held is not None and self._clock() - held[1] <= self.ttl_seconds else None

    def _prune(self, now: float) -> None:
        for run in [r for r, (_, seen) in self._claims.items() if now - seen > self.ttl_seconds]:
            del self._claims[run]
        while len(self._claims) > self.max_runs:
            per_uid = Counter(uid for uid, _ in self._claims.values())
            top = per_uid.most_common(1)[0][0]
            oldest = min((r for r, (u, _) in self._claims.items() if u == top), key=lambda r: self._claims[r][1])
            del self._claims[oldest]

    def _save(self) -> None:
        if self.path is not None:
            write_json(self.path, {r: [u, t] for r, (u, t) in self._claims.items()}, "run owners")
